"""A file server on 127.0.0.1 for the download tests; it never reaches the internet.

with FileServer({"/a.bin": b"..."}) as server:
    server.url("/a.bin")           # http://127.0.0.1:<free port>/a.bin
    server.ranges = False          # ignore Range headers (answer 200 with the whole file)
    server.drop_after = 1000       # send 1000 body bytes, then close the connection
    server.requests                # [(path, Range header or None), ...]
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        owner = self.server.owner
        range_header = self.headers.get("Range")
        owner.requests.append((self.path, range_header))
        data = owner.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if owner.ranges and match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if owner.drop_after is not None:
            body = body[: owner.drop_after]
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    owner: FileServer


class FileServer:
    """Serves `files` (URL path -> bytes) on a free loopback port while in a `with` block."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.ranges = True
        self.drop_after: int | None = None
        self.requests: list[tuple[str, str | None]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def closed_port_url(path: str = "/file") -> str:
    """A loopback URL on which nothing listens: connecting is refused, as when offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
