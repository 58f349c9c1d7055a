"""Resumable, verified downloads and safe archive extraction (standard library only).

:func:`download` fetches one URL into ``dest``:

* bytes go to ``dest.part`` first; an interrupted transfer resumes from there with an
  HTTP ``Range`` request (a server that ignores ``Range`` answers ``200`` and we restart
  the file cleanly);
* every attempt has a socket timeout and the number of attempts is bounded, so a dead
  or stalled server ends in a one-line :class:`DownloadError`, never a hang;
* the finished file is checked against its SHA-256 (or, without a hash, its size) and
  only then renamed onto ``dest``; on a mismatch *no* file is left behind;
* an existing ``dest`` that verifies is used as-is (so pre-placed archives work offline).

:func:`extract` unpacks ``.zip`` / ``.tar`` / ``.tar.gz`` into a temporary folder that is
renamed into place only when everything was written. Absolute member names, ``..``
components, device files and links that lead outside the folder are refused with an
:class:`UnsafeArchiveError` before anything is published.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from http.client import HTTPException
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vlmcompress.io import atomic_path

CHUNK = 1 << 20                       # bytes per read; also the resume granularity on a drop
_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
_USER_AGENT = "vlmcompress-downloader/0.1 (+python-urllib)"


class DownloadError(RuntimeError):
    """A download that failed for good (after retries) or did not verify."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected SHA-256 or size."""


class UnsafeArchiveError(ValueError):
    """An archive member that would be written outside the extraction folder."""


class _Retry(Exception):
    """Internal: this attempt failed in a way another attempt may fix."""


# --- verification ---------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, sha256: str | None, size: int | None) -> str | None:
    """``None`` when ``path`` matches the expected hash / size, else the reason (one line).

    The size is checked first because it is free; the hash is authoritative. With
    neither given there is nothing to compare and any existing file passes.
    """
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size mismatch: expected {size} bytes, got {actual_size}"
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            return f"SHA-256 mismatch: expected {sha256.lower()}, got {actual}"
    return None


def part_path(dest: Path) -> Path:
    """Where the bytes of an unfinished download of ``dest`` live."""
    return dest.with_name(dest.name + ".part")


# --- one HTTP attempt -----------------------------------------------------------------

@dataclass
class _Progress:
    """Prints a line every 10 % (or every 64 MiB when the total is unknown) to stderr."""

    label: str
    enabled: bool
    total: int | None = None
    _next: float = 0.0

    def start(self, done: int, total: int | None) -> None:
        self.total = total
        self._next = self._step_after(done)

    def _step_after(self, done: int) -> float:
        step = self.total / 10 if self.total else 64 * CHUNK
        return (done // step + 1) * step if step else float("inf")

    def update(self, done: int) -> None:
        if not self.enabled or done < self._next:
            return
        self._next = self._step_after(done)
        mb = done / 1e6
        if self.total:
            print(f"{self.label}: {100 * done / self.total:5.1f}% ({mb:.1f} / {self.total / 1e6:.1f} MB)",
                  file=sys.stderr, flush=True)
        else:
            print(f"{self.label}: {mb:.1f} MB", file=sys.stderr, flush=True)


def _content_range(header: str | None) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None); raises :class:`_Retry` if garbled."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header or "")
    if not m:
        raise _Retry(f"bad Content-Range {header!r}")
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _open(url: str, have: int, timeout_s: float):
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)


def _attempt(url: str, part: Path, timeout_s: float, progress: _Progress) -> None:
    """Append the missing bytes of ``url`` to ``part`` (or rewrite it); raise :class:`_Retry`."""
    have = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, have, timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Range beyond the end: the part file is already complete, or it is stale.
            m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", exc.headers.get("Content-Range") or "")
            if m and int(m.group(1)) == have:
                return
            part.unlink()
            raise _Retry(f"stale partial file of {have} bytes discarded") from None
        if exc.code in _RETRYABLE_HTTP:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:  # DNS, refused, reset, timeout
        raise _Retry(str(getattr(exc, "reason", exc))) from None

    with resp:
        if have and resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Retry(f"server resumed at byte {start}, expected {have}")
            mode = "ab"
        else:                           # 200: the server ignored Range -> start over
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        progress.start(have, total)
        done = have
        try:
            with open(part, mode) as fh:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    fh.write(block)
                    done += len(block)
                    progress.update(done)
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, HTTPException) as exc:  # reset or timeout mid-body; what we have is kept
            raise _Retry(f"connection lost after {done} bytes ({exc})") from None
    if total is not None and done != total:
        # http.client returns EOF silently when the peer closes early; catch it here.
        raise _Retry(f"connection closed after {done} of {total} bytes")


def download(url: str, dest: str | Path, *, sha256: str | None = None, size: int | None = None,
             timeout_s: float, retries: int, progress: bool = True,
             backoff_s: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` (resuming, verified, atomic) and return ``dest``.

    ``retries`` extra attempts follow a failed one, waiting ``backoff_s * 2**k`` seconds
    (capped at 30 s). Raises :class:`ChecksumError` (and deletes the bytes) when the
    result does not match ``sha256`` / ``size``, :class:`DownloadError` when every
    attempt failed (the ``.part`` file is kept so a later call resumes), ``ValueError``
    for a URL that is not http(s).
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"{url}: only http(s) URLs can be downloaded (got scheme {scheme!r})")
    if retries < 0 or timeout_s <= 0:
        raise ValueError(f"{url}: need retries >= 0 and timeout_s > 0 (got {retries}, {timeout_s})")
    part = part_path(dest)
    if dest.is_file():
        reason = verify_file(dest, sha256, size)
        if reason is None:
            part.unlink(missing_ok=True)
            return dest
        print(f"{dest.name}: existing file does not verify ({reason}); downloading again",
              file=sys.stderr, flush=True)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()                    # longer than the real file: cannot be a prefix of it

    meter = _Progress(dest.name, progress)
    errors: list[str] = []
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 30.0))
        try:
            _attempt(url, part, timeout_s, meter)
            break
        except _Retry as exc:
            errors.append(str(exc))
            if progress:
                print(f"{dest.name}: attempt {attempt + 1}/{retries + 1} failed: {exc}",
                      file=sys.stderr, flush=True)
    else:
        raise DownloadError(f"{url}: failed after {retries + 1} attempts (last: {errors[-1]})")

    reason = verify_file(part, sha256, size)
    if reason is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: {reason}; download deleted")
    os.replace(part, dest)
    return dest


# --- archives -------------------------------------------------------------------------

def _safe_name(name: str, archive: Path) -> str:
    """Member name as a clean relative POSIX path, or :class:`UnsafeArchiveError`."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member name with NUL byte {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(f"{archive}: absolute member path {name!r}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member path with '..' {name!r}")
    return "/".join(parts)


def _check_link(name: str, target: str, archive: Path) -> None:
    """A symlink ``name -> target`` must be relative and stay inside (lexically)."""
    t = target.replace("\\", "/")
    if not t or t.startswith("/") or re.match(r"^[A-Za-z]:", t):
        raise UnsafeArchiveError(f"{archive}: link {name!r} points to absolute path {target!r}")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), t))
    if joined == ".." or joined.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: link {name!r} points outside the archive ({target!r})")


@dataclass(frozen=True)
class _Member:
    """One archive entry, reduced to what extraction needs."""

    name: str                  # safe relative path
    kind: str                  # "file" | "dir" | "symlink"
    link: str = ""             # symlink target
    open: Callable[[], IO[bytes]] | None = None


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterator[_Member]:
    for info in zf.infolist():
        name = _safe_name(info.filename, archive)
        mode = info.external_attr >> 16
        if info.is_dir():
            yield _Member(name, "dir")
        elif stat.S_ISLNK(mode):
            target = zf.read(info).decode("utf-8", "replace")
            _check_link(name, target, archive)
            yield _Member(name, "symlink", target)
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):   # 0: no Unix type recorded
            raise UnsafeArchiveError(f"{archive}: special file member {info.filename!r}")
        else:
            yield _Member(name, "file", open=lambda info=info: zf.open(info))


def _tar_members(tf: tarfile.TarFile, archive: Path) -> Iterator[_Member]:
    for info in tf.getmembers():
        name = _safe_name(info.name, archive)
        if info.isdir():
            yield _Member(name, "dir")
        elif info.issym():
            _check_link(name, info.linkname, archive)
            yield _Member(name, "symlink", info.linkname)
        elif info.islnk():
            # Hard links are written as copies of their target, which must be a member.
            _safe_name(info.linkname, archive)
            yield _Member(name, "file", open=lambda info=info: tf.extractfile(info))
        elif info.isreg():
            yield _Member(name, "file", open=lambda info=info: tf.extractfile(info))
        else:
            raise UnsafeArchiveError(f"{archive}: special file member {info.name!r}")


@dataclass
class _Archive:
    """An opened zip or tar with a uniform member list."""

    path: Path
    handle: zipfile.ZipFile | tarfile.TarFile
    members: list[_Member]

    def close(self) -> None:
        self.handle.close()


def open_archive(archive: str | Path) -> _Archive:
    """Open a zip / tar(.gz, .bz2, .xz) and validate *every* member name up front."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such archive")
    try:
        if zipfile.is_zipfile(archive):
            zf = zipfile.ZipFile(archive)
            try:
                return _Archive(archive, zf, list(_zip_members(zf, archive)))
            except BaseException:
                zf.close()
                raise
        if tarfile.is_tarfile(archive):
            tf = tarfile.open(archive)
            try:
                return _Archive(archive, tf, list(_tar_members(tf, archive)))
            except BaseException:
                tf.close()
                raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"{archive}: corrupt archive ({exc})") from None
    raise ValueError(f"{archive}: not a zip or tar archive")


def _inside(path: Path, root: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def extract(archive: str | Path, dest_dir: str | Path,
            members_filter: Callable[[str], bool] | None = None) -> Path:
    """Extract ``archive`` into ``dest_dir`` (replacing it atomically) and return ``dest_dir``.

    ``members_filter(name)`` selects members by their clean relative POSIX name
    (e.g. ``"val2017/000000000139.jpg"``); directories are created as needed.
    File modes and owners are not restored. Hard links become copies. Symlinks are
    kept only when they resolve inside ``dest_dir``; a chain of links that would
    escape is detected before ``dest_dir`` is published.
    """
    arc = open_archive(archive)
    keep = members_filter or (lambda _name: True)
    links: list[Path] = []
    try:
        with atomic_path(dest_dir) as tmp:
            tmp.mkdir()
            root = Path(os.path.realpath(tmp))
            for m in arc.members:
                if not m.name or not keep(m.name):
                    continue
                target = root / m.name
                if not _inside(target.parent, root):
                    raise UnsafeArchiveError(f"{arc.path}: member {m.name!r} resolves outside via a link")
                if m.kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink() or target.is_file():
                    target.unlink()         # never write through an earlier link
                if m.kind == "symlink":
                    os.symlink(m.link, target)
                    links.append(target)
                    continue
                try:
                    with m.open() as src, open(target, "xb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                except KeyError:            # tar hard link to a member that is not there
                    raise UnsafeArchiveError(f"{arc.path}: link {m.name!r} has no target member") from None
            for link in links:
                if not _inside(link, root):
                    raise UnsafeArchiveError(
                        f"{arc.path}: link {link.relative_to(root).as_posix()!r} resolves outside")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise ValueError(f"{arc.path}: corrupt archive ({exc})") from None
    finally:
        arc.close()
    return Path(dest_dir)


def member_names(archive: str | Path) -> list[str]:
    """Clean names of all members (validated like :func:`extract` does)."""
    arc = open_archive(archive)
    try:
        return [m.name for m in arc.members]
    finally:
        arc.close()


def read_member(archive: str | Path, name: str) -> bytes:
    """Bytes of the one regular-file member whose path is ``name`` or ends in ``/name``.

    Reads straight from the archive (nothing is written to disk). Raises a
    ``ValueError`` (one line) when no member or several members match.
    """
    arc = open_archive(archive)
    try:
        hits = [m for m in arc.members if m.kind == "file"
                and (m.name == name or m.name.endswith("/" + name))]
        if not hits:
            raise ValueError(f"{arc.path}: no member named {name!r}")
        if len(hits) > 1:
            raise ValueError(f"{arc.path}: several members match {name!r}: "
                             f"{', '.join(m.name for m in hits[:3])}")
        try:
            with hits[0].open() as fh:
                return fh.read()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
            raise ValueError(f"{arc.path}: corrupt member {hits[0].name!r} ({exc})") from None
    finally:
        arc.close()
