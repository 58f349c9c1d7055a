"""Atomic file output: an interrupted stage never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _kind(path: Path) -> str | None:
    """``"file"``, ``"dir"``, ``"other"`` (FIFO, device, socket, dangling link) or None (absent)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "other" if os.path.islink(path) else None
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


def check_regular_file(path: str | Path, what: str = "input") -> Path:
    """``path`` if it is an existing regular file (following links), else a one-line error.

    Refusing FIFOs and devices up front is what keeps a reader from blocking forever."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{path}: {kind}, expected an image file" if what == "input" else f"{path}: {kind}")
    return path


def read_capped(path: str | Path, limit: int, what: str = "file") -> bytes:
    """A regular file's bytes (FIFOs and devices refused before opening), or a one-line
    ``ValueError`` when it holds more than ``limit`` bytes; never reads more than ``limit + 1``."""
    path = check_regular_file(path, what)
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: {what} larger than {limit} bytes")
    return data


def check_output(path: str | Path, *, dir_ok: bool = False) -> Path:
    """``path`` if writing there replaces nothing but a regular file (or, with ``dir_ok``,
    a folder), else a one-line ``ValueError``. Call it before expensive work."""
    path = Path(path)
    kind = _kind(path)
    if kind == "dir" and not dir_ok:
        raise ValueError(f"{path}: is a folder; name a file to write")
    if kind == "other":
        raise ValueError(f"{path}: exists and is not a regular file; refusing to replace it")
    return path


class _Terminated(BaseException):
    """SIGTERM turned into an exception, so ``finally`` blocks clean up before exit."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """While the body runs, SIGTERM raises (then exits 143) instead of killing the process
    on the spot; only installed from the main thread over the default handler."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only on success.

    Whatever the body creates at the yielded path moves into place with one ``os.replace``.
    A file replaces only a regular file, a folder only a folder (the whole of it): a file
    is never written over a user's folder, FIFO or device, and that is checked before the
    body runs. On any exception, Ctrl-C or SIGTERM the temporary is removed and ``path``
    is left as it was; error messages name ``path``, never the temporary.
    """
    path = check_output(path, dir_ok=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OSError(f"{path}: cannot write ({exc.strerror})") from None
    target = tmp / path.name
    try:
        with _terminate_as_exception():
            try:
                yield target
            except OSError as exc:
                if exc.filename is None or not str(exc.filename).startswith(str(tmp)):
                    raise
                raise OSError(f"{path}: cannot write ({exc.strerror})") from None
            _commit(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(target: Path, path: Path) -> None:
    """Move the finished ``target`` onto ``path`` (file onto file, folder onto folder)."""
    made, there = _kind(target), _kind(path)
    if made is None:
        raise FileNotFoundError(f"{path}: nothing was written")
    if there is not None and there != made:
        raise ValueError(f"{path}: exists and is not a {'folder' if made == 'dir' else 'regular file'}; "
                         f"refusing to replace it")
    if made == "dir" and there == "dir":
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(target, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(target, path)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` for writing that only replaces ``path`` once the body finished without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write JSON atomically (sorted keys so diffs and ``dvc metrics diff`` stay stable)."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=True)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    """Read JSON with a one-line error naming the file on a missing or corrupt file."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}") from None
