"""A loopback HTTP server for download tests: in-memory files, Range support (``A-``, ``A-B``,
``-N``), injected faults.

Used as a context manager::

    with FileServer({"/a.zip": data}) as srv:   # srv: the ServerState
        srv.drop_after["/a.zip"] = [100]   # first GET of /a.zip dies after 100 body bytes
        download(srv.url("/a.zip"), ...)

Binds 127.0.0.1 on a free port, serves from daemon threads and shuts down on exit.
Misbehaving answers (trickles, endless bodies) are bounded in bytes and in time
(:data:`MAX_STREAM_S`) and stop at once when the server exits, so no handler outlives
its test for long.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_STREAM_S = 10.0                  # longest a trickle or an endless body lasts
MAX_ENDLESS_BYTES = 256 << 20        # most bytes an "endless" body sends
ENDLESS_BLOCK = 64 << 10

# A custom answer: (Range header or None) -> (status, headers, body); sent as given, then closed.
Responder = Callable[[str | None], tuple[int, dict[str, str], bytes]]


@dataclass
class ServerState:
    files: dict[str, bytes]
    ignore_range: bool = False                             # answer 200 with the whole file
    drop_after: dict[str, list[int]] = field(default_factory=dict)  # per GET: bytes, then close
    stall_s: dict[str, float] = field(default_factory=dict)         # sleep before the body
    status: dict[str, list[int]] = field(default_factory=dict)      # per GET: error status
    trickle_s: dict[str, float] = field(default_factory=dict)       # body one byte per interval
    slow_headers_s: dict[str, float] = field(default_factory=dict)  # status line + headers likewise
    endless: set[str] = field(default_factory=set)                  # no length, body never ends
    respond: dict[str, Responder] = field(default_factory=dict)     # custom answers (lying headers)
    log: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    requests: list[dict[str, str]] = field(default_factory=list)     # all headers of each GET
    stop: threading.Event = field(default_factory=threading.Event)
    base_url: str = ""

    def url(self, path: str) -> str:
        return self.base_url + path


def _dribble(handler: BaseHTTPRequestHandler, data: bytes, interval_s: float, stop: threading.Event) -> None:
    """Write ``data`` one byte per ``interval_s`` until done, the client leaves, time is up or ``stop``."""
    end = time.monotonic() + MAX_STREAM_S
    try:
        for i in range(len(data)):
            if stop.wait(interval_s) or time.monotonic() > end:
                return
            handler.wfile.write(data[i:i + 1])
            handler.wfile.flush()
    except OSError:                                  # the client gave up: that is the point
        pass


def _byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One range of RFC 9110 (``bytes=A-``, ``bytes=A-B``, ``bytes=-N``) as ``[start, stop)``;
    ``"unsatisfiable"`` past the end; ``None`` without a (parsable) header: the whole file."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
    if not m or not (m.group(1) or m.group(2)):
        return None
    if not m.group(1):                                   # suffix: the last N bytes
        n = int(m.group(2))
        return (max(size - n, 0), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(m.group(1))
    if start >= size:
        return "unsatisfiable"
    stop = min(int(m.group(2)) + 1, size) if m.group(2) else size
    return (start, stop) if stop > start else None


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:   # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            rng = self.headers.get("Range")
            state.log.append((self.path, rng))
            state.requests.append(dict(self.headers))
            codes = state.status.get(self.path)
            if codes:
                code = codes.pop(0)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path in state.respond:
                self._custom(*state.respond[self.path](rng))
                return
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            if self.path in state.slow_headers_s:
                self.close_connection = True
                head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nX-Pad: {'a' * 500}\r\n\r\n").encode()
                _dribble(self, head, state.slow_headers_s[self.path], state.stop)
                return
            if self.path in state.endless:
                self._endless()
                return
            start, stop = 0, len(data)
            span = _byte_range(rng, len(data)) if not state.ignore_range else None
            if span == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if span is not None:
                start, stop = span
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:stop]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if state.stall_s.get(self.path):
                state.stop.wait(state.stall_s[self.path])
            if self.path in state.trickle_s:
                self.close_connection = True
                _dribble(self, body, state.trickle_s[self.path], state.stop)
                return
            drops = state.drop_after.get(self.path)
            if drops:
                n = drops.pop(0)
                self.wfile.write(body[:n])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _custom(self, status: int, headers: dict[str, str], body: bytes) -> None:
            """Send exactly these headers (no computed Content-Length) and body, then close."""
            self.close_connection = True
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:                      # the client refused the answer early
                pass

        def _endless(self) -> None:
            """A body without a length that goes on until the client leaves (or the bounds)."""
            self.close_connection = True
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            block, end = b"\0" * ENDLESS_BLOCK, time.monotonic() + MAX_STREAM_S
            try:
                for _ in range(MAX_ENDLESS_BYTES // ENDLESS_BLOCK):
                    if state.stop.is_set() or time.monotonic() > end:
                        return
                    self.wfile.write(block)
            except OSError:
                pass

    return Handler


class FileServer:
    """Context manager running a :class:`ServerState`-driven server on 127.0.0.1."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.state = ServerState(files=dict(files))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> ServerState:
        host, port = self._server.server_address[:2]
        self.state.base_url = f"http://{host}:{port}"
        self._thread.start()
        return self.state

    def __exit__(self, *exc) -> None:
        self.state.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
