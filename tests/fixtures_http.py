"""A loopback HTTP server for download tests: in-memory files, Range support, injected faults.

Used as a context manager::

    with FileServer({"/a.zip": data}) as srv:   # srv: the ServerState
        srv.drop_after["/a.zip"] = [100]   # first GET of /a.zip dies after 100 body bytes
        download(srv.url("/a.zip"), ...)

Binds 127.0.0.1 on a free port, serves from a daemon thread and shuts down on exit.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class ServerState:
    files: dict[str, bytes]
    ignore_range: bool = False                             # answer 200 with the whole file
    drop_after: dict[str, list[int]] = field(default_factory=dict)  # per GET: bytes, then close
    stall_s: dict[str, float] = field(default_factory=dict)         # sleep before the body
    status: dict[str, list[int]] = field(default_factory=dict)      # per GET: error status
    log: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    stop: threading.Event = field(default_factory=threading.Event)
    base_url: str = ""

    def url(self, path: str) -> str:
        return self.base_url + path


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:   # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            rng = self.headers.get("Range")
            state.log.append((self.path, rng))
            codes = state.status.get(self.path)
            if codes:
                code = codes.pop(0)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and not state.ignore_range:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if state.stall_s.get(self.path):
                state.stop.wait(state.stall_s[self.path])
            drops = state.drop_after.get(self.path)
            if drops:
                n = drops.pop(0)
                self.wfile.write(body[:n])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

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
