"""Small real HTTP servers on loopback for the tests of xstars.remote (nothing mocked).

:func:`serve` runs a stdlib ``ThreadingHTTPServer`` in a thread, answering every request with
what a function of the request says. On top of it: :func:`range_answer` (a file with HTTP
range requests, as blob storage serves COGs), :func:`token_answer` (the Planetary Computer's
SAS token endpoint) and the recorded Géoplateforme capabilities (:data:`GEOPF_CAPABILITIES`).

The server also answers requests made through it as an HTTP proxy (``GET http://host/path``):
GDAL's ``GDAL_HTTP_PROXY`` then sends it the reads of a ``*.blob.core.windows.net`` href, so
that the href the SDK signs is read for real, on loopback.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from tests.conftest import SHARED

GEOPF_CAPABILITIES = SHARED / "fixtures" / "geoplateforme" / "wms-r-capabilities-2024-05.xml"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    query: str
    headers: dict[str, str]


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    truncate: bool = False  # announce the whole body, send half of it, close the connection


@dataclass
class Served:
    url: str  # http://127.0.0.1:<port>
    requests: list[Request]

    @property
    def proxy(self) -> str:
        return self.url.removeprefix("http://")


@contextmanager
def serve(answer: Callable[[Request], Answer]) -> Iterator[Served]:
    """A loopback server answering each request with ``answer(request)``; its requests are kept."""
    seen: list[Request] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the tests read `requests`
            pass

        def _handle(self) -> None:
            parts = urlsplit(self.path)  # an absolute URI when the client uses us as a proxy
            request = Request(self.command, parts.path, parts.query, {k.lower(): v for k, v in self.headers.items()})
            with lock:
                seen.append(request)
                reply = answer(request)
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if reply.truncate:
                self.wfile.write(reply.body[: len(reply.body) // 2])
                self.wfile.flush()
                self.close_connection = True
            else:
                self.wfile.write(reply.body)

        do_GET = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{server.server_port}", seen)
    finally:
        server.shutdown()
        server.server_close()


def range_answer(data: bytes, request: Request) -> Answer:
    """``data`` served as a file: HEAD, GET, one ``bytes=a-b`` range per request (206)."""
    size = len(data)
    spec = request.headers.get("range", "")
    if not spec.startswith("bytes="):
        return Answer(200, data, {"Accept-Ranges": "bytes"})
    first, _, last = spec.removeprefix("bytes=").partition("-")
    start, end = int(first), min(int(last) if last else size - 1, size - 1)
    return Answer(206, data[start:end + 1], {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end}/{size}"})


#: A SAS token as the Planetary Computer's token endpoint answers it (the secret is `SECRET`).
TOKEN = "st=2024-05-01T00%3A00%3A00Z&se=2099-01-01T00%3A00%3A00Z&sp=rl&sv=2021-06-08&sr=c&skoid=a1b2&sktid=c3d4" \
        "&skt=2024-05-01T00%3A00%3A00Z&ske=2099-01-01T00%3A00%3A00Z&sks=b&skv=2021-06-08&sig=SECRET"


def token_answer() -> Answer:
    return Answer(200, json.dumps({"msft:expiry": "2099-01-01T00:00:00Z", "token": TOKEN}).encode(),
                  {"Content-Type": "application/json"})


def capabilities_answer(path: Path = GEOPF_CAPABILITIES) -> Answer:
    return Answer(200, path.read_bytes(), {"Content-Type": "text/xml"})
