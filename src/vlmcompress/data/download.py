"""Resumable, verified, bounded downloads and capped archive extraction (standard library only).

:func:`download` fetches one URL into ``dest``:

* bytes go to ``dest.part`` first; an interrupted transfer resumes from there with an HTTP
  ``Range`` request. A ``.part`` left by an earlier run is resumed only when the expected
  SHA-256 or size is known (otherwise nothing could tell its bytes from foreign ones and it
  is deleted). A server that ignores ``Range`` (``200``) restarts the file; a ``206`` whose
  ``Content-Range`` is not the range asked for discards the ``.part`` and restarts;
* the body is capped at the expected ``size`` when known, else at ``max_bytes``;
* every read has a socket timeout, the number of attempts is bounded, and one wall-clock
  deadline covers all attempts of a file (a watchdog shuts the sockets down when it passes,
  so a server trickling bytes ends in a one-line :class:`DownloadError`, never a hang);
* the finished file is checked against its SHA-256 (or, without a hash, its size) and
  only then renamed onto ``dest``; on a mismatch *no* file is left behind;
* an existing ``dest`` that verifies is used as-is (so pre-placed archives work offline).

:func:`extract` unpacks ``.zip`` / ``.tar`` / ``.tar.gz`` into a temporary folder that is
renamed into place only when everything was written. Absolute member names, ``..``
components, device files and links that lead outside the folder are refused with an
:class:`UnsafeArchiveError` before anything is published. :func:`extract` and
:func:`read_member` count the bytes they decompress and stop at the caps of
:class:`ArchiveLimits` (member count, bytes per member and in total, compression ratio)
with an :class:`ArchiveLimitError`.

:class:`RemoteZipFile` opens a remote zip with :mod:`zipfile` through HTTP range requests
(:func:`fetch_range`: exact ``206`` answers only, each bounded in bytes and time), so a few
members of a very large archive cost their own bytes: :func:`member_spans` plans the requests,
:func:`copy_member` writes one member within the same caps, atomically, its CRC-32 checked.
A host that ignores ranges raises :class:`RangesUnsupported` before any body is read.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import posixpath
import re
import socket
import stat
import sys
import tarfile
import threading
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
from typing import IO, Any

from vlmcompress.io import atomic_path

CHUNK = 1 << 20                       # bytes per read; also the resume granularity on a drop
_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
_USER_AGENT = "vlmcompress-downloader/0.1 (+python-urllib)"

DEFAULT_MAX_BYTES = 4 << 30           # body cap without a known size (4 GiB; COCO val2017.zip is 0.8 GB)
MIN_RATE_BPS = 100_000                # slowest average rate the default deadline allows (100 kB/s)
UNSIZED_BYTES = 1 << 30               # size assumed by the default deadline when none is known
MAX_LINK_TARGET = 4096                # longest symlink target read from a zip (PATH_MAX)


class DownloadError(RuntimeError):
    """A download that failed for good (after retries, past its deadline) or did not verify."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected SHA-256 or size."""


class UnsafeArchiveError(ValueError):
    """An archive member that would be written outside the extraction folder."""


class ArchiveLimitError(UnsafeArchiveError):
    """An archive that has too many members or expands past a cap of :class:`ArchiveLimits`."""


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


def default_deadline_s(timeout_s: float, size: int | None) -> float:
    """Whole-file time limit used when :func:`download` is given none.

    ``10 * timeout_s`` for connecting, stalls and retries, plus the expected size
    (:data:`UNSIZED_BYTES` when unknown) at :data:`MIN_RATE_BPS`: with ``timeout_s=60``
    a 788 MB file gets 10 + 131 minutes, a file of unknown size 10 + 179 minutes.
    """
    return 10 * timeout_s + (UNSIZED_BYTES if size is None else size) / MIN_RATE_BPS


# --- the deadline watchdog ------------------------------------------------------------

def _shutdown(sock: socket.socket) -> None:
    # The plain-socket method also for TLS sockets: it wakes a blocked read without
    # touching the TLS state another thread is using.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass                            # already closed


class _Deadline:
    """Wall-clock limit of one download, across all its attempts.

    Sockets opened for the download are registered with :meth:`watch`; when the limit
    passes, a timer thread shuts them down. That ends a read blocked on a server that
    sends a byte just often enough to never reach the per-read socket timeout, also
    while ``urlopen`` is still reading the headers.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def left(self) -> float:
        return self._end - time.monotonic()

    def passed(self) -> bool:
        return self._fired or self.left() <= 0

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            fired = self._fired
        if fired:
            _shutdown(sock)
        return sock

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            socks, self._socks = self._socks, []
        for sock in socks:
            _shutdown(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _watched(base: type[http.client.HTTPConnection], deadline: _Deadline) -> type[http.client.HTTPConnection]:
    """``base`` whose raw socket (and, for HTTPS, its TLS wrapper) are watched by ``deadline``."""
    class Watched(base):  # type: ignore[valid-type, misc]
        def connect(self) -> None:
            self._create_connection = lambda *a, **k: deadline.watch(socket.create_connection(*a, **k))
            super().connect()
            deadline.watch(self.sock)

    return Watched


class _WatchedHandler:
    """Mixin for urllib's HTTP(S) handlers: every connection they open is watched."""

    deadline: _Deadline

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        return super().do_open(_watched(http_class, self.deadline), req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_WatchedHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedHandler, urllib.request.HTTPSHandler):
    pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's default opener (proxies, redirects), with watched connections."""
    handlers = [_HTTPHandler(), _HTTPSHandler()]
    for h in handlers:
        h.deadline = deadline
    return urllib.request.build_opener(*handlers)


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


def _content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """``bytes FIRST-LAST/TOTAL`` -> (FIRST, LAST, TOTAL or None); ``None`` if garbled."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), (None if m.group(3) == "*" else int(m.group(3)))


def _length(header: str | None) -> int | None:
    return int(header) if header and header.strip().isdigit() else None


@dataclass
class _Transfer:
    """One file's download into its ``.part``, across attempts.

    ``limit`` is the most bytes the file may have (its size when known). ``total`` is
    the length the server announced for the current ``.part``; a later answer that
    announces another length means another file and restarts it. ``validator``
    (ETag or Last-Modified) is sent as ``If-Range`` so a changed file comes back whole.
    """

    url: str
    part: Path
    timeout_s: float
    size: int | None
    limit: int
    deadline: _Deadline
    meter: _Progress
    opener: urllib.request.OpenerDirector
    total: int | None = None
    validator: str | None = None

    def late(self, done: int) -> DownloadError:
        return DownloadError(f"{self.url}: not complete within the {self.deadline.seconds:g} s deadline "
                             f"(deadline_s; {done} bytes received)")

    def discard(self) -> None:
        """Forget the ``.part`` and what the server said about it: the next attempt starts over."""
        self.part.unlink(missing_ok=True)
        self.total = self.validator = None

    def attempt(self) -> None:
        """Append the missing bytes to ``part`` (or rewrite it); raise :class:`_Retry` or ``DownloadError``."""
        have = self.part.stat().st_size if self.part.exists() else 0
        resp = self._open(have)
        if resp is None:
            return
        with resp:
            self._receive(resp, self._offset(resp, have))

    def _open(self, have: int) -> Any:
        """The response to a GET (with ``Range`` when resuming); ``None`` if ``part`` is already complete."""
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if self.validator:
                headers["If-Range"] = self.validator
        timeout = max(min(self.timeout_s, self.deadline.left()), 0.05)
        try:
            return self.opener.open(urllib.request.Request(self.url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and have:
                # Range beyond the end: the part file is complete, or it is another file.
                m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", exc.headers.get("Content-Range") or "")
                if m and int(m.group(1)) == have and self.total in (None, have):
                    return None
                self.discard()
                raise _Retry(f"partial file of {have} bytes does not fit the server's; discarded") from None
            if exc.code in _RETRYABLE_HTTP:
                raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
            raise DownloadError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:  # DNS, refused, reset, timeout
            if self.deadline.passed():
                raise self.late(have) from None
            raise _Retry(str(getattr(exc, "reason", exc))) from None

    def _offset(self, resp: Any, have: int) -> int:
        """Where the body of ``resp`` starts in the file: ``have`` for a fitting 206, 0 for a 200."""
        if resp.status == 206:
            header = resp.headers.get("Content-Range")
            rng = _content_range(header)
            # We asked for "bytes=HAVE-": anything but HAVE..TOTAL-1 must not be appended.
            if not have or rng is None or rng[0] != have or (rng[2] is not None and rng[1] != rng[2] - 1):
                self.discard()
                raise _Retry(f"Content-Range {header!r} does not answer 'bytes={have}-'; restarting")
            if rng[2] is not None and self.total is not None and rng[2] != self.total:
                self.discard()
                raise _Retry(f"server now announces {rng[2]} bytes instead of {self.total}; restarting")
            self._announce(rng[2] if rng[2] is not None else self.total, resp)
            return have
        if resp.status != 200:
            raise DownloadError(f"{self.url}: unexpected HTTP {resp.status} {resp.reason}")
        self.total = self.validator = None      # a whole new body: forget what the old one said
        self._announce(_length(resp.headers.get("Content-Length")), resp)
        return 0

    def _announce(self, total: int | None, resp: Any) -> None:
        """Refuse an announced length that cannot be right, before reading the body."""
        if total is not None and self.size is not None and total != self.size:
            self.discard()
            raise ChecksumError(f"{self.url}: size mismatch: server announces {total} bytes, "
                                f"expected {self.size}; download deleted")
        if total is not None and total > self.limit:
            self.discard()
            raise DownloadError(f"{self.url}: server announces {total} bytes, more than the "
                                f"{self.limit}-byte cap (max_bytes)")
        self.total = total
        self.validator = self.validator or _validator(resp)

    def _receive(self, resp: Any, offset: int) -> None:
        """Stream the body onto ``part`` from ``offset``, checking the cap and the deadline per read."""
        done = offset
        self.meter.start(done, self.total)
        try:
            with open(self.part, "ab" if offset else "wb") as fh:
                # read1: at most one socket read, so a trickle returns often and the deadline is seen.
                while block := resp.read1(min(CHUNK, self.limit + 1 - done)):
                    if done + len(block) > self.limit:
                        self.discard()
                        raise self._too_long()
                    fh.write(block)
                    done += len(block)
                    self.meter.update(done)
                    if self.deadline.passed() and done != self.total:
                        raise self.late(done)
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, HTTPException) as exc:  # reset or timeout mid-body; what we have is kept
            if self.deadline.passed():
                raise self.late(done) from None
            raise _Retry(f"connection lost after {done} bytes ({exc})") from None
        if self.total is not None and done == self.total:
            return
        if self.deadline.passed():              # the watchdog's shutdown reads as an end of body
            raise self.late(done)
        if self.total is not None:
            # http.client returns EOF silently when the peer closes early; catch it here.
            raise _Retry(f"connection closed after {done} of {self.total} bytes")

    def _too_long(self) -> DownloadError:
        if self.size is not None:
            return ChecksumError(f"{self.url}: size mismatch: server sent more than the expected "
                                 f"{self.size} bytes; download deleted")
        return DownloadError(f"{self.url}: body exceeds the {self.limit}-byte cap (max_bytes); download deleted")


def _validator(resp: Any) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` may carry."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


def download(url: str, dest: str | Path, *, sha256: str | None = None, size: int | None = None,
             timeout_s: float, retries: int, progress: bool = True, backoff_s: float = 1.0,
             deadline_s: float | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Download ``url`` to ``dest`` (resuming, verified, bounded, atomic) and return ``dest``.

    ``timeout_s`` bounds every socket operation; ``deadline_s`` bounds the whole file
    across all attempts (default :func:`default_deadline_s`). ``retries`` extra attempts
    follow a failed one, waiting ``backoff_s * 2**k`` seconds (capped at 30 s, and never
    past the deadline). The body may not exceed ``size`` when given, else ``max_bytes``.

    Raises :class:`ChecksumError` (and deletes the bytes) when the result or the length
    the server announces does not match ``sha256`` / ``size``, :class:`DownloadError`
    when every attempt failed, the deadline passed or the body is too long, ``ValueError``
    for a URL that is not http(s) or a bad limit. After a failure the ``.part`` file is
    kept only when ``sha256`` or ``size`` is known (so a later call can resume and verify).
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"{url}: only http(s) URLs can be downloaded (got scheme {scheme!r})")
    if retries < 0 or timeout_s <= 0 or (deadline_s is not None and deadline_s <= 0) or max_bytes <= 0:
        raise ValueError(f"{url}: need retries >= 0, timeout_s > 0, deadline_s > 0 and max_bytes > 0 "
                         f"(got {retries}, {timeout_s}, {deadline_s}, {max_bytes})")
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
    resumable = sha256 is not None or size is not None
    if part.exists() and (not resumable or (size is not None and part.stat().st_size > size)):
        part.unlink()                    # unverifiable, or longer than the real file: start over

    seconds = default_deadline_s(timeout_s, size) if deadline_s is None else deadline_s
    try:
        with _Deadline(seconds) as deadline:
            job = _Transfer(url, part, timeout_s, size, size if size is not None else max_bytes, deadline,
                            _Progress(dest.name, progress), _opener(deadline))
            _run(job, retries, backoff_s, progress, dest.name)
    except DownloadError:
        if not resumable:
            part.unlink(missing_ok=True)
        raise

    reason = verify_file(part, sha256, size)
    if reason is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: {reason}; download deleted")
    os.replace(part, dest)
    return dest


def _run(job: _Transfer, retries: int, backoff_s: float, progress: bool, label: str) -> None:
    """Attempts with exponential backoff until one succeeds, the attempts run out or the deadline passes."""
    errors: list[str] = []
    for attempt in range(retries + 1):
        if attempt:
            pause = min(backoff_s * 2 ** (attempt - 1), 30.0)
            if pause >= job.deadline.left():
                raise job.late(job.part.stat().st_size if job.part.exists() else 0)
            time.sleep(pause)
        try:
            job.attempt()
            return
        except _Retry as exc:
            errors.append(str(exc))
            if progress:
                print(f"{label}: attempt {attempt + 1}/{retries + 1} failed: {exc}", file=sys.stderr, flush=True)
    raise DownloadError(f"{job.url}: failed after {retries + 1} attempts (last: {errors[-1]})")


# --- archives -------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what reading an archive may produce (defaults fit the COCO / VQAv2 / RefCOCO archives).

    Sizes are counted on the bytes actually decompressed; the sizes in member headers
    are only used to refuse early. The ratio is uncompressed / compressed bytes, checked
    per zip member and for everything read from one archive (against the archive's size
    on disk, which also covers tar.gz and tar hard links), once more than
    ``ratio_after_bytes`` came out, so small, very compressible files stay fine.
    """

    max_members: int = 100_000             # entries (val2017.zip: 5001)
    max_member_bytes: int = 1 << 30        # one member (largest used JSON: < 0.5 GB)
    max_total_bytes: int = 8 << 30         # everything one extract / read_member produces
    max_ratio: float = 200.0               # JSON deflates ~5-10x, JPEG ~1x; bombs ~1000x
    ratio_after_bytes: int = 8 << 20


def _safe_name(name: str, archive: Path | str) -> str:
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
    size: int = 0              # uncompressed size claimed by the header
    packed: int | None = None  # compressed size (zip only)


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> str:
    with zf.open(info) as fh:
        raw = fh.read(MAX_LINK_TARGET + 1)
    if len(raw) > MAX_LINK_TARGET:
        raise UnsafeArchiveError(f"{archive}: link {info.filename!r} has a target longer than "
                                 f"{MAX_LINK_TARGET} bytes")
    return raw.decode("utf-8", "replace")


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterator[_Member]:
    for info in zf.infolist():
        name = _safe_name(info.filename, archive)
        mode = info.external_attr >> 16
        if info.is_dir():
            yield _Member(name, "dir")
        elif stat.S_ISLNK(mode):
            target = _zip_link_target(zf, info, archive)
            _check_link(name, target, archive)
            yield _Member(name, "symlink", target)
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):   # 0: no Unix type recorded
            raise UnsafeArchiveError(f"{archive}: special file member {info.filename!r}")
        else:
            yield _Member(name, "file", open=lambda info=info: zf.open(info),
                          size=info.file_size, packed=info.compress_size)


def _tar_members(tf: tarfile.TarFile, archive: Path) -> Iterator[_Member]:
    # next() one header at a time (not getmembers()), so a count cap stops the listing early.
    while (info := tf.next()) is not None:
        name = _safe_name(info.name, archive)
        if info.isdir():
            yield _Member(name, "dir")
        elif info.issym():
            _check_link(name, info.linkname, archive)
            yield _Member(name, "symlink", info.linkname)
        elif info.islnk():
            # Hard links are written as copies of their target, which must be a member.
            _safe_name(info.linkname, archive)
            yield _Member(name, "file", open=lambda info=info: tf.extractfile(info), size=info.size)
        elif info.isreg():
            yield _Member(name, "file", open=lambda info=info: tf.extractfile(info), size=info.size)
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


def _listed(members: Iterator[_Member], archive: Path, limits: ArchiveLimits) -> list[_Member]:
    out: list[_Member] = []
    for m in members:
        if len(out) >= limits.max_members:
            raise ArchiveLimitError(f"{archive}: more than {limits.max_members} members (max_members)")
        out.append(m)
    return out


def open_archive(archive: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> _Archive:
    """Open a zip / tar(.gz, .bz2, .xz) and validate *every* member name (and their count) up front."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such archive")
    try:
        if zipfile.is_zipfile(archive):
            zf = zipfile.ZipFile(archive)
            try:
                return _Archive(archive, zf, _listed(_zip_members(zf, archive), archive, limits))
            except BaseException:
                zf.close()
                raise
        if tarfile.is_tarfile(archive):
            tf = tarfile.open(archive)
            try:
                return _Archive(archive, tf, _listed(_tar_members(tf, archive), archive, limits))
            except BaseException:
                tf.close()
                raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"{archive}: corrupt archive ({exc})") from None
    raise ValueError(f"{archive}: not a zip or tar archive")


@dataclass
class _Budget:
    """Counts the bytes an archive really yields and stops at the first cap crossed."""

    path: Path | str                       # named in errors (a URL for a remote zip)
    limits: ArchiveLimits
    packed_total: int                      # the archive's size on disk
    total: int = 0

    def admit(self, members: list[_Member]) -> None:
        """Refuse early what the headers already announce as too large."""
        lim, claimed = self.limits, 0
        for m in members:
            if m.size > lim.max_member_bytes:
                raise self._member_error(m)
            claimed += m.size
        if claimed > lim.max_total_bytes:
            raise self._total_error()

    def copy(self, m: _Member, dst: IO[bytes]) -> None:
        """Copy member ``m`` into ``dst`` in chunks, counting before each write."""
        lim, produced = self.limits, 0
        assert m.open is not None
        with m.open() as src:
            while block := src.read(CHUNK):
                produced += len(block)
                self.total += len(block)
                if produced > lim.max_member_bytes:
                    raise self._member_error(m)
                if self.total > lim.max_total_bytes:
                    raise self._total_error()
                if produced > lim.ratio_after_bytes and m.packed is not None \
                        and produced > lim.max_ratio * max(m.packed, 1):
                    raise ArchiveLimitError(f"{self.path}: member {m.name!r} expands more than "
                                            f"{lim.max_ratio:g}x its compressed size (max_ratio)")
                if self.total > lim.ratio_after_bytes and self.total > lim.max_ratio * max(self.packed_total, 1):
                    raise ArchiveLimitError(f"{self.path}: members expand more than {lim.max_ratio:g}x "
                                            f"the archive's size (max_ratio)")
                dst.write(block)

    def _member_error(self, m: _Member) -> ArchiveLimitError:
        return ArchiveLimitError(f"{self.path}: member {m.name!r} expands past "
                                 f"{self.limits.max_member_bytes} bytes (max_member_bytes)")

    def _total_error(self) -> ArchiveLimitError:
        return ArchiveLimitError(f"{self.path}: members expand past {self.limits.max_total_bytes} "
                                 f"bytes in total (max_total_bytes)")


def _inside(path: Path, root: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def extract(archive: str | Path, dest_dir: str | Path,
            members_filter: Callable[[str], bool] | None = None, *,
            limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract ``archive`` into ``dest_dir`` (replacing it atomically) and return ``dest_dir``.

    ``members_filter(name)`` selects members by their clean relative POSIX name
    (e.g. ``"val2017/000000000139.jpg"``); directories are created as needed.
    File modes and owners are not restored. Hard links become copies. Symlinks are
    kept only when they resolve inside ``dest_dir``; a chain of links that would
    escape is detected before ``dest_dir`` is published. The selected members must
    stay within ``limits`` (:class:`ArchiveLimitError` otherwise); on any error the
    partial extraction is deleted and ``dest_dir`` is left as it was.
    """
    arc = open_archive(archive, limits)
    keep = members_filter or (lambda _name: True)
    links: list[Path] = []
    try:
        chosen = [m for m in arc.members if m.name and keep(m.name)]
        budget = _Budget(arc.path, limits, arc.path.stat().st_size)
        budget.admit(chosen)
        with atomic_path(dest_dir) as tmp:
            tmp.mkdir()
            root = Path(os.path.realpath(tmp))
            for m in chosen:
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
                    with open(target, "xb") as dst:
                        budget.copy(m, dst)
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


def member_names(archive: str | Path, limits: ArchiveLimits = ArchiveLimits()) -> list[str]:
    """Clean names of all members (validated like :func:`extract` does)."""
    arc = open_archive(archive, limits)
    try:
        return [m.name for m in arc.members]
    finally:
        arc.close()


def read_member(archive: str | Path, name: str, *, limits: ArchiveLimits = ArchiveLimits()) -> bytes:
    """Bytes of the one regular-file member whose path is ``name`` or ends in ``/name``.

    Reads straight from the archive (nothing is written to disk), within ``limits``
    (:class:`ArchiveLimitError` otherwise; memory stays near the cap). Raises a
    ``ValueError`` (one line) when no member or several members match.
    """
    arc = open_archive(archive, limits)
    try:
        hits = [m for m in arc.members if m.kind == "file"
                and (m.name == name or m.name.endswith("/" + name))]
        if not hits:
            raise ValueError(f"{arc.path}: no member named {name!r}")
        if len(hits) > 1:
            raise ValueError(f"{arc.path}: several members match {name!r}: "
                             f"{', '.join(m.name for m in hits[:3])}")
        budget = _Budget(arc.path, limits, arc.path.stat().st_size)
        budget.admit(hits)
        buf = io.BytesIO()
        try:
            budget.copy(hits[0], buf)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, KeyError) as exc:
            raise ValueError(f"{arc.path}: corrupt member {hits[0].name!r} ({exc})") from None
        return buf.getvalue()
    finally:
        arc.close()


# --- a few members of a large remote zip, by HTTP range requests ----------------------------

ZIP_TAIL_BYTES = 65536 + 22 + 20 + 56  # largest end record with comment + the zip64 locator and record
MAX_SPAN_BYTES = 64 << 20               # most bytes one range request asks for and holds in memory; also
                                        # caps the central directory (train2017.zip: 118k entries, ~10 MB)
MIN_READ_BYTES = 64 << 10               # a read outside the prefetched bytes fetches at least this much


class RangesUnsupported(DownloadError):
    """The server answered a range request with the whole file (``200``) or no usable ``206``.

    ``length``: the whole file's ``Content-Length`` when a ``200`` announced one."""

    def __init__(self, message: str, length: int | None = None) -> None:
        super().__init__(message)
        self.length = length


def fetch_range(url: str, start: int, end: int | None, *, timeout_s: float, retries: int,
                backoff_s: float = 1.0, deadline_s: float | None = None,
                total: int | None = None) -> tuple[bytes, int, int]:
    """Bytes ``start..end`` (inclusive) of ``url``; ``start=-n, end=None``: its last ``n`` bytes.

    Returns ``(body, first, total)``: the body, its offset in the file and the file's length,
    all from an exact ``206`` (``Content-Range`` naming the range asked for, or the whole file
    when it is shorter than a suffix asked for). ``total``: the length announced earlier; another
    one means the file changed (:class:`DownloadError`). The body is capped at the length asked
    for; ``deadline_s`` (default :func:`default_deadline_s` of that length) covers every attempt.
    A ``200`` (ranges ignored) or a ``206`` for another range raise :class:`RangesUnsupported`.
    """
    want = -start if end is None else end - start + 1
    if want <= 0 or want > MAX_SPAN_BYTES or (end is not None and start < 0):
        raise ValueError(f"{url}: bad range {start}-{end} (at most {MAX_SPAN_BYTES} bytes)")
    spec = f"bytes={start}" if end is None else f"bytes={start}-{end}"
    seconds = default_deadline_s(timeout_s, want) if deadline_s is None else deadline_s
    errors: list[str] = []
    with _Deadline(seconds) as deadline:
        opener = _opener(deadline)
        for attempt in range(retries + 1):
            if attempt:
                pause = min(backoff_s * 2 ** (attempt - 1), 30.0)
                if pause >= deadline.left():
                    break
                time.sleep(pause)
            try:
                return _range_attempt(opener, url, spec, start, end, want, timeout_s, deadline, total)
            except _Retry as exc:
                errors.append(str(exc))
            if deadline.passed():
                break
    last = errors[-1] if errors else "no attempt"
    if deadline.passed():
        raise DownloadError(f"{url}: range {spec} not complete within the {seconds:g} s deadline "
                            f"(deadline_s; last: {last})")
    raise DownloadError(f"{url}: range {spec} failed after {len(errors)} attempts (last: {last})")


def _range_attempt(opener: urllib.request.OpenerDirector, url: str, spec: str, start: int, end: int | None,
                   want: int, timeout_s: float, deadline: _Deadline, total: int | None) -> tuple[bytes, int, int]:
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", "Range": spec}
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers),
                           timeout=max(min(timeout_s, deadline.left()), 0.05))
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in _RETRYABLE_HTTP:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        if exc.code == 416:
            raise RangesUnsupported(f"{url}: HTTP 416 for range {spec} (file shorter than its directory says?)")
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        raise _Retry(str(getattr(exc, "reason", exc))) from None
    with resp:
        if resp.status != 206:   # never read a whole-file body: it may be many gigabytes
            raise RangesUnsupported(f"{url}: the server answers range requests with HTTP {resp.status}",
                                    _length(resp.headers.get("Content-Length")) if resp.status == 200 else None)
        rng = _content_range(resp.headers.get("Content-Range"))
        if rng is None or rng[2] is None:
            raise RangesUnsupported(f"{url}: unusable Content-Range {resp.headers.get('Content-Range')!r}")
        first, last, size = rng
        exact = (first, last) == (start, end) if end is not None else \
            last == size - 1 and (last - first + 1 == want or (first == 0 and size < want))
        if not exact or last < first:
            raise RangesUnsupported(f"{url}: Content-Range {first}-{last}/{size} does not answer {spec!r}")
        if total is not None and size != total:
            raise DownloadError(f"{url}: the file changed ({size} bytes, was {total}); run again")
        n = last - first + 1
        try:
            body = resp.read(n + 1)
        except (OSError, HTTPException) as exc:
            raise _Retry(f"connection lost in range {spec} ({exc})") from None
        if deadline.passed():
            raise _Retry(f"range {spec}: deadline passed mid-body")
        if len(body) != n:
            raise _Retry(f"range {spec}: {len(body)} bytes instead of {n}")
        return body, first, size


class RemoteZipFile(io.RawIOBase):
    """A read-only, seekable view of a remote file that :class:`zipfile.ZipFile` can open.

    Bytes come from range requests (:func:`fetch_range`): the file's tail once, a prefetched
    span (:meth:`load`) that covers the members about to be read, and, for a read outside
    both, exactly what is read (at least :data:`MIN_READ_BYTES`). No read may exceed ``max_read``
    (at most :data:`MAX_SPAN_BYTES`), so a central directory that claims more fails in one line
    before :mod:`zipfile` builds an entry for each of its records (~0.5 kB apiece).
    """

    def __init__(self, url: str, *, timeout_s: float, retries: int, deadline_s: float | None = None,
                 backoff_s: float = 1.0, max_read: int = MAX_SPAN_BYTES) -> None:
        super().__init__()
        self.url = url
        self.max_read = min(max_read, MAX_SPAN_BYTES)
        self._get = lambda start, end: fetch_range(url, start, end, timeout_s=timeout_s, retries=retries,
                                                   backoff_s=backoff_s, deadline_s=deadline_s, total=self.size)
        self.size: int | None = None
        tail, first, self.size = self._get(-ZIP_TAIL_BYTES, None)
        self._tail = (first, tail)
        self._span = (0, b"")
        self._pos = 0
        self.requests = 1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"{self.url}: seek before the start of the file")
        self._pos = base + offset
        return self._pos

    def load(self, start: int, end: int) -> None:
        """Prefetch bytes ``start..end-1`` (one request) and keep them until the next load."""
        start, end = max(start, 0), min(end, self.size)
        if end > start:
            body, first, _ = self._get(start, end - 1)
            self.requests += 1
            self._span = (first, body)

    def read(self, n: int = -1) -> bytes:
        n = self.size - self._pos if n is None or n < 0 else min(n, self.size - self._pos)
        if n <= 0:
            return b""
        if n > self.max_read:
            raise ValueError(f"{self.url}: refused a read of {n} bytes at offset {self._pos} "
                             f"(more than {self.max_read}; a corrupt or hostile zip directory)")
        for first, data in (self._span, self._tail):
            if first <= self._pos and self._pos + n <= first + len(data):
                out = data[self._pos - first:self._pos - first + n]
                self._pos += n
                return out
        self.load(self._pos, self._pos + max(n, MIN_READ_BYTES))
        return self.read(n)

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def member_spans(zf: zipfile.ZipFile, chosen: list[zipfile.ZipInfo]) -> list[tuple[int, int, list[zipfile.ZipInfo]]]:
    """Byte ranges ``[start, end)`` that hold ``chosen`` members, merged while contiguous.

    A member runs from its local header to the next member's header (or the central
    directory), but never further than its header, name, extra field, data and data
    descriptor can reach. Groups stay under :data:`MAX_SPAN_BYTES` when their members do.
    """
    starts = sorted({i.header_offset for i in zf.infolist()} | {zf.start_dir})
    nxt = {a: b for a, b in zip(starts, starts[1:])}
    spans = []
    for info in sorted(chosen, key=lambda i: i.header_offset):
        reach = info.header_offset + 30 + 2 * 65535 + info.compress_size + 24
        spans.append((info.header_offset, min(nxt.get(info.header_offset, zf.start_dir), reach), info))
    groups: list[tuple[int, int, list[zipfile.ZipInfo]]] = []
    for start, end, info in spans:
        if groups and start == groups[-1][1] and end - groups[-1][0] <= MAX_SPAN_BYTES:
            groups[-1] = (groups[-1][0], end, groups[-1][2] + [info])
        else:
            groups.append((start, end, [info]))
    return groups


def copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, archive: str,
                limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Decompress one regular-file member to ``dest`` (atomically; size, ratio and CRC checked)."""
    name = _safe_name(info.filename, archive)
    budget = _Budget(archive, limits, max(info.compress_size, 1))
    member = _Member(name, "file", open=lambda: zf.open(info), size=info.file_size, packed=info.compress_size)
    budget.admit([member])
    try:
        with atomic_path(dest) as tmp, open(tmp, "xb") as fh:
            budget.copy(member, fh)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise ValueError(f"{archive}: corrupt member {name!r} ({_one_line(str(exc))})") from None
    return dest


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[:limit - 3] + "..."
