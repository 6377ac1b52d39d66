"""Serve a generated demo world on loopback with real HTTP servers (STAC API, files, WMS).

The pipeline's clients are never mocked: pystac-client, GDAL's ``/vsicurl/`` (through rasterio)
and plain HTTP WMS clients talk to the demo world exactly as they talk to the Planetary Computer
and to the IGN Géoplateforme. One detached process, the *gateway*, does it all::

    client ──HTTP──> gateway http://<host>:<port>   (this module, stdlib ThreadingHTTPServer)
                       ├── /stac/...   reverse proxy ──> rustac serve http://127.0.0.1:<backend>
                       ├── /files/...  static COGs with HTTP range requests
                       ├── /wms        OGC WMS 1.3.0 (GetCapabilities, GetMap: xstars.demo.wms)
                       └── /_admin/... health, fault injection, statistics (never faulted)

``/stac``
    ``rustac serve`` (a STAC API with an in-memory backend) loads
    ``<root>/run/served-items.ndjson``, a copy of ``<root>/stac/items.ndjson`` whose placeholder
    ``{files_url}`` is replaced by ``http://<host>:<port>/files``. rustac builds its links from
    its own ``--addr``, so the gateway rewrites every ``http://127.0.0.1:<backend_port>`` in its
    answers to ``http://<host>:<port>/stac``; clients then follow ``next`` links through the
    gateway. When ``<root>/stac/collections.json`` exists, ``/collections`` and
    ``/collections/{id}`` answer with those documents (links rebuilt for the gateway) instead of
    the bare collections rustac generates from the items; everything else passes through.
    ``/search`` is always sent to rustac as a POST: rustac's own GET search answers 500 as
    soon as ``bbox`` or ``collections`` is given, so a GET is translated to the equivalent POST
    body and the paging links of the answer back to GET links.
    rustac limitations (rustac 0.9.18): no ``sortby`` (HTTP 500), ``filter``/``query`` silently
    ignored (empty results), neither listed in its conformance classes; paging uses ``skip``.
    The gateway adds ``sortby`` and ``filter`` on ids (:mod:`xstars.demo.stac_sort`, the paging
    a client needs when ``next`` links go missing) and advertises them; ``query`` stays
    unsupported, so clients filter clouds client-side as against any such API;
    no ``numberMatched``; a date-only ``datetime`` interval (``2021-01-01/2021-12-31``) is
    refused with 400 (pystac-client always sends full RFC 3339 timestamps, so it is unaffected).
``/files/<path>``
    Files under ``<root>/files/``: GET and HEAD, ``Accept-Ranges: bytes``, one range per request
    (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) answered 206, 416 when unsatisfiable. A
    multi-range or malformed ``Range`` header is ignored (200 with the whole file, as RFC 9110
    allows). Paths escaping ``files/`` are refused with 403.
``/wms`` (alias ``/wms-r``, the Géoplateforme's path)
    Errors are a ``ServiceExceptionReport`` with **HTTP 400** and ``Content-Type: text/xml``
    (the Géoplateforme may answer such reports with 200: a robust client checks the
    Content-Type too, never only the status).
``/_admin/health``, ``/_admin/faults`` (GET; POST replaces), ``/_admin/stats``,
``/_admin/stats/reset`` (POST)
    JSON. See :class:`Faults` for the fault injection and :meth:`GatewayState.stats` for the
    counters.

Lifecycle (used by the CLI and by tests): :func:`start`, :func:`stop`, :func:`ensure_up`; the
state of a running server lives in ``<root>/run/server.json`` and its log in
``<root>/run/server.log``. ``python -m xstars.demo.server --root R`` runs the gateway in the
foreground (:func:`main`); SIGTERM stops rustac and then the gateway.

Logging: one line per request (method, path, status, body bytes, route). Query strings are
dropped for ``/files`` (a signed URL carries a token there): never log a full signed URL.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from xstars.demo import layout, stac_sort, wms
from xstars.errors import ConfigError, DataError, ServiceError

# Named explicitly: under ``python -m`` __name__ would be "__main__".
log = logging.getLogger("xstars.demo.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_BACKEND_PORT = 8766

#: rustac always listens on loopback: only the gateway talks to it.
BACKEND_HOST = "127.0.0.1"

#: Route families the status/drop faults can be scoped to.
FAULT_ROUTES: tuple[str, ...] = ("stac", "files", "wms")

#: Keys of the per-route request counters in the stats.
STAT_ROUTES: tuple[str, ...] = (
    "stac_search",
    "stac_search_sorted",  # of stac_search: those asking a sortby (counted twice)
    "stac_other",
    "files",
    "wms_getmap",
    "wms_capabilities",
    "wms_other",
    "not_found",
)

#: Kinds of injected faults counted in the stats.
FAULT_KINDS: tuple[str, ...] = (
    "status_429",
    "status_403",
    "status_503",
    "drop",
    "truncate",
    "omit_next",
    "duplicate_items",
)

_CHUNK = 64 * 1024

#: Content-Type of served files by extension (anything else: application/octet-stream).
_CONTENT_TYPES = {
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".json": "application/json",
    ".png": "image/png",
    ".jpg": "image/jpeg",
}


# ============================================================================ public data types


@dataclass(frozen=True)
class ServerInfo:
    """Where a running demo gateway listens (as written in ``<root>/run/server.json``)."""

    host: str
    port: int
    backend_port: int
    pid: int
    root: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stac_url(self) -> str:
        """STAC API root, to give to ``pystac_client.Client.open``."""
        return f"{self.base_url}/stac"

    @property
    def files_url(self) -> str:
        """Prefix of the asset hrefs (replaces ``{files_url}`` in the items)."""
        return f"{self.base_url}/files"

    @property
    def wms_url(self) -> str:
        """WMS endpoint (stand-in for ``https://data.geopf.fr/wms-r``)."""
        return f"{self.base_url}/wms"

    @property
    def admin_url(self) -> str:
        return f"{self.base_url}/_admin"


@dataclass
class Faults:
    """Faults the gateway injects, all off by default and all deterministic.

    Every request on a route family (``stac``, ``files``, ``wms``) increments that family's
    counter n (1 for the first request after the faults were set). Request n gets, checking in
    this order and only if its family is in ``routes``:

    * 429 with ``Retry-After: retry_after_s`` when ``status_429_every`` divides n;
    * 403 ``AuthenticationFailed`` (an expired SAS token) when ``status_403_every`` divides n;
    * 503 when ``status_503_every`` divides n;
    * no answer at all (the socket is closed) when ``drop_every`` divides n;
    * for ``/files`` GETs answered with a body: the headers with the full Content-Length but
      only half of the body, then the socket is closed, when ``truncate_every`` divides n
      (``truncate_every`` ignores ``routes``).

    Independently of the counters, on ``/stac/search`` answers:

    * ``omit_next`` removes the ``rel=next`` links (a client sees only the first page);
    * ``duplicate_items`` makes every page after the first start with the last feature of the
      previous page (as when items are inserted while a client pages), ``numberReturned``
      counting it.

    ``no_sort_filter`` turns off the gateway's ``sortby``/``filter`` on ids
    (:mod:`xstars.demo.stac_sort`): the API then conforms to neither, like rustac alone.

    Setting faults (``POST /_admin/faults``) resets the counters, so a test knows which request
    fails. ``/_admin`` routes are never faulted.
    """

    status_429_every: int = 0
    retry_after_s: int = 1
    status_403_every: int = 0
    status_503_every: int = 0
    drop_every: int = 0
    truncate_every: int = 0
    omit_next: bool = False
    no_sort_filter: bool = False
    duplicate_items: bool = False
    routes: list[str] = field(default_factory=lambda: list(FAULT_ROUTES))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build and validate faults from JSON-like data; missing keys take their default."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown fault keys {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("routes"), str):  # "files" means ["files"]
            values["routes"] = [values["routes"]]
        elif "routes" in values:
            values["routes"] = list(values["routes"])
        faults = cls(**values)
        faults.validate()
        return faults

    def validate(self) -> None:
        counts = ("status_429_every", "status_403_every", "status_503_every", "drop_every", "truncate_every")
        for name in (*counts, "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"fault {name} must be an integer >= 0, got {value!r}")
        for name in ("omit_next", "duplicate_items", "no_sort_filter"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"fault {name} must be true or false, got {value!r}")
        bad = [r for r in self.routes if r not in FAULT_ROUTES]
        if bad:
            raise ConfigError(f"fault routes {bad} unknown; use some of {list(FAULT_ROUTES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ============================================================================ run-dir files


def served_items_path(root: Path) -> Path:
    """The items actually loaded by rustac (placeholder replaced by the files URL)."""
    return layout.run_dir(root) / "served-items.ndjson"


def server_json_path(root: Path) -> Path:
    return layout.run_dir(root) / "server.json"


def log_path(root: Path) -> Path:
    return layout.run_dir(root) / "server.log"


def _lock_path(root: Path) -> Path:
    return layout.run_dir(root) / "server.lock"


def write_served_items(root: Path, files_url: str) -> Path:
    """Write ``run/served-items.ndjson``: the items with ``{files_url}`` replaced by ``files_url``.

    A plain text replacement: the placeholder only occurs at the start of asset hrefs, and the
    file stays byte-for-byte the generator's otherwise.
    """
    source = layout.items_path(root)
    if not source.is_file():
        raise DataError(f"no STAC items to serve: {source} does not exist")
    target = served_items_path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = source.read_text().replace(layout.FILES_URL_PLACEHOLDER, files_url)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return target


def load_collections(root: Path) -> dict[str, dict] | None:
    """Collections from ``<root>/stac/collections.json`` by id, or None when there is no file."""
    path = layout.collections_path(root)
    if not path.exists():
        return None
    try:
        docs = json.loads(path.read_text())
        return {str(doc["id"]): doc for doc in docs}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected a JSON list of STAC collections: {exc}") from exc


# ============================================================================ pure helpers


class RangeNotSatisfiable(Exception):
    """The Range header cannot be served from a file of this size (answer 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a ``Range`` header against a file of ``size`` bytes.

    Returns the inclusive (first, last) byte positions to send, or None to send the whole file
    (no header, a unit other than bytes, several ranges, or a malformed header: RFC 9110 lets a
    server ignore those). Raises RangeNotSatisfiable when the range starts beyond the file or
    asks for an empty suffix.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", spec)
    if not match or (not match[1] and not match[2]):
        return None
    first_s, last_s = match[1], match[2]
    if not first_s:  # bytes=-n: the last n bytes
        n = int(last_s)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # syntactically invalid: ignore it
    if first >= size:
        raise RangeNotSatisfiable(header)
    last = int(last_s) if last_s else size - 1
    return first, min(last, size - 1)


#: GET search parameters holding comma-separated lists, and those holding JSON.
_LIST_PARAMS = ("collections", "ids")
_JSON_PARAMS = ("intersects",)


def search_params_from_query(query: str) -> dict[str, Any]:
    """GET /search query string -> the equivalent POST /search body (STAC API item search).

    Raises ValueError on a malformed value (the gateway answers 400).
    """
    params: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=False):
        if key == "bbox":
            params[key] = [float(v) for v in value.split(",")]
        elif key in _LIST_PARAMS:
            params[key] = [v for v in value.split(",") if v]
        elif key in ("limit", "skip"):
            params[key] = int(value)
        elif key in _JSON_PARAMS or (key == "filter" and value.lstrip().startswith("{")):
            params[key] = json.loads(value)
        elif key == "sortby":
            params[key] = [
                {"field": f.lstrip("+-"), "direction": "desc" if f.startswith("-") else "asc"}
                for f in value.split(",")
                if f
            ]
        else:  # datetime, filter-lang, fields, ...: passed as given
            params[key] = value
    return params


def search_query_from_params(params: Mapping[str, Any]) -> str:
    """POST /search body -> GET query string (inverse of :func:`search_params_from_query`)."""
    pairs = []
    for key, value in params.items():
        if key == "sortby" and isinstance(value, list):
            value = ",".join(
                ("-" if s.get("direction") == "desc" else "") + s["field"] for s in value
            )
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, separators=(",", ":"))
        pairs.append((key, str(value)))
    return urlencode(pairs)


def _base_url(url: str) -> str:
    """``http://h:p/anything`` -> ``http://h:p`` (admin calls accept any URL of the gateway)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return f"{parts.scheme}://{parts.netloc}"


def _backend_rewriter(backend_port: int) -> re.Pattern[bytes]:
    """Pattern of rustac's own base URL in its answers (rustac ignores the Host header)."""
    # (?!\d) so that port 8766 does not also match the start of, say, 87661.
    return re.compile(re.escape(f"http://{BACKEND_HOST}:{backend_port}".encode()) + rb"(?!\d)")


# ============================================================================ gateway state


class GatewayState:
    """Everything the request handlers share: configuration, faults, counters. Thread-safe."""

    def __init__(self, root: Path, host: str, port: int, backend_port: int) -> None:
        self.root = root
        self.host = host
        self.port = port
        self.backend_port = backend_port
        self.public_url = f"http://{host}:{port}"
        self.stac_url = f"{self.public_url}/stac"
        self.files_dir = layout.files_dir(root).resolve()
        self.layers = wms.load_layers(root)
        self.wms_limits = wms.load_limits(root)
        self.collections = load_collections(root)
        self._backend_pattern = _backend_rewriter(backend_port)
        self._lock = threading.Lock()
        self._faults = Faults()
        self._counters = dict.fromkeys(FAULT_ROUTES, 0)
        self._requests = dict.fromkeys(STAT_ROUTES, 0)
        self._faults_injected = dict.fromkeys(FAULT_KINDS, 0)
        self._file_bytes = 0
        self._wms_bytes = 0

    # --- faults
    @property
    def faults(self) -> Faults:
        with self._lock:
            return Faults.from_dict(self._faults.to_dict())  # a copy

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults
            self._counters = dict.fromkeys(FAULT_ROUTES, 0)

    def draw_fault(self, family: str) -> str | None:
        """Count one request of ``family`` and say which counter-based fault it gets, if any."""
        with self._lock:
            self._counters[family] += 1
            n = self._counters[family]
            f = self._faults
            if family in f.routes:
                if f.status_429_every and n % f.status_429_every == 0:
                    return "status_429"
                if f.status_403_every and n % f.status_403_every == 0:
                    return "status_403"
                if f.status_503_every and n % f.status_503_every == 0:
                    return "status_503"
                if f.drop_every and n % f.drop_every == 0:
                    return "drop"
            if family == "files" and f.truncate_every and n % f.truncate_every == 0:
                return "truncate"
            return None

    # --- stats
    def count_request(self, route: str) -> None:
        with self._lock:
            self._requests[route] += 1

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self._faults_injected[kind] += 1

    def count_file_bytes(self, n: int) -> None:
        with self._lock:
            self._file_bytes += n

    def count_wms_bytes(self, n: int) -> None:
        with self._lock:
            self._wms_bytes += n

    def stats(self) -> dict[str, Any]:
        """``{"requests": {route: n}, "file_bytes": n, "wms_bytes": n, "faults": {kind: n}}``.

        Every request is counted under its route, faulted or not; ``file_bytes`` counts the
        bytes of /files bodies actually written (half a body for a truncated one),
        ``wms_bytes`` those of the GetMap images rendered.
        """
        with self._lock:
            return {
                "requests": dict(self._requests),
                "file_bytes": self._file_bytes,
                "wms_bytes": self._wms_bytes,
                "faults": dict(self._faults_injected),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._requests = dict.fromkeys(STAT_ROUTES, 0)
            self._faults_injected = dict.fromkeys(FAULT_KINDS, 0)
            self._file_bytes = 0
            self._wms_bytes = 0

    # --- STAC backend
    def rewrite_backend_urls(self, body: bytes) -> bytes:
        return self._backend_pattern.sub(self.stac_url.encode(), body)

    def backend_request(
        self, method: str, path_and_query: str, body: bytes | None, content_type: str | None
    ) -> tuple[int, str, bytes]:
        """One request to rustac: (status, content type, body). Raises OSError if it is down."""
        conn = http.client.HTTPConnection(BACKEND_HOST, self.backend_port, timeout=60)
        try:
            headers = {"Accept": "application/json"}
            if content_type:
                headers["Content-Type"] = content_type
            conn.request(method, path_and_query, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            return response.status, response.getheader("Content-Type", "application/json"), payload
        finally:
            conn.close()

    def backend_ok(self) -> bool:
        try:
            status, _, _ = self.backend_request("GET", "/", None, None)
        except OSError:
            return False
        return status == 200


# ============================================================================ HTTP handler


class GatewayServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the shared state; one thread per connection."""

    daemon_threads = True  # do not wait for idle keep-alive connections at shutdown
    request_queue_size = 128  # GDAL opens several connections at once

    def __init__(self, address: tuple[str, int], state: GatewayState) -> None:
        self.state = state
        super().__init__(address, GatewayHandler)


class _Dropped(Exception):
    """Raised inside a handler to close the connection without answering."""


class GatewayHandler(BaseHTTPRequestHandler):
    """Dispatches each request to the STAC proxy, the file server, the WMS or the admin API."""

    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries a Content-Length
    server_version = "xstars-demo"
    timeout = 120  # seconds an idle keep-alive connection may hold its thread
    # Headers and body go out in two writes: with Nagle's algorithm on, the body of every
    # keep-alive answer would wait for the client's delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server: GatewayServer

    # Set per request: what _log_request reports, and whether a truncate fault was drawn.
    _status: int = 0
    _sent: int = 0
    _route: str = "-"
    _truncate: bool = False

    @property
    def state(self) -> GatewayState:
        return self.server.state

    # --- entry points
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        # Only called by BaseHTTPRequestHandler for protocol errors (our own lines come from
        # _log_request); such lines may quote the request line, so they are kept at debug level.
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # replaced by _log_request, which knows the route and the body size

    # --- dispatch
    def _dispatch(self) -> None:
        self._status, self._sent, self._route, self._truncate = 0, 0, "-", False
        parts = urlsplit(self.path)
        path, query = parts.path, parts.query
        try:
            body = self._read_body()
            if path == "/_admin" or path.startswith("/_admin/"):
                self._route = "admin"
                self._handle_admin(path, body)
            elif path == "/stac" or path.startswith("/stac/"):
                self._handle_stac(path[len("/stac") :] or "/", query, body)
            elif path.startswith("/files/"):
                self._handle_files(path[len("/files/") :])
            elif path in ("/wms", "/wms-r"):
                self._handle_wms(query)
            else:
                self._route = "not_found"
                self.state.count_request("not_found")
                self._send_json(404, {"error": f"no route for {path}"})
        except _Dropped:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            # The client went away (GDAL drops connections it no longer needs).
            self.close_connection = True
        except Exception:  # a bug must not kill the connection thread silently
            log.exception("error while serving %s %s", self.command, path)
            if self._status == 0:
                self._send_json(500, {"error": "internal server error, see the server log"})
            else:
                self.close_connection = True
        self._log_request(path, query)

    def _log_request(self, path: str, query: str) -> None:
        # /files query strings may carry a signature token: never log them.
        shown = path if path.startswith("/files/") or not query else f"{path}?{query}"
        status = self._status or "dropped"
        log.info("%s %s -> %s %dB route=%s", self.command, shown, status, self._sent, self._route)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk

    # --- responses
    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a complete answer (no body for HEAD, Content-Length always right)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._status = status
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent = len(body)

    def _send_json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json", headers)

    def _apply_status_fault(self, family: str) -> bool:
        """Draw a counter-based fault for this request; answer it if it is a status or a drop.

        Returns True when the request has been answered (or dropped). A ``truncate`` draw is
        left to the file handler through ``self._truncate``.
        """
        self._truncate = False
        kind = self.state.draw_fault(family)
        if kind is None:
            return False
        if kind == "truncate":
            self._truncate = True
            return False
        self.state.count_fault(kind)
        if kind == "drop":
            raise _Dropped
        if kind == "status_429":
            retry = self.state.faults.retry_after_s
            message = f"Too many requests. Try again in {retry} seconds"
            headers = {"Retry-After": str(retry)}
            self._send(429, message.encode(), "text/plain; charset=utf-8", headers)
        elif kind == "status_403":  # what Azure blob storage answers once a SAS token expired
            body = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
                    b"<Message>Signed expiry time has to be after signed start time</Message></Error>")
            self._send(403, body, "application/xml")
        else:
            self._send(503, b"Service temporarily unavailable", "text/plain; charset=utf-8")
        return True

    # --- /_admin
    def _handle_admin(self, path: str, body: bytes) -> None:
        state = self.state
        method = self.command
        if path == "/_admin/health" and method in ("GET", "HEAD"):
            backend = state.backend_ok()
            self._send_json(
                200,
                {
                    "status": "ok" if backend else "degraded",
                    "stac_backend": backend,
                    "root": str(state.root),
                    "pid": os.getpid(),
                    "host": state.host,
                    "port": state.port,
                    "backend_port": state.backend_port,
                    "layers": sorted(state.layers),
                },
            )
        elif path == "/_admin/faults" and method == "GET":
            self._send_json(200, state.faults.to_dict())
        elif path == "/_admin/faults" and method == "POST":
            try:
                faults = Faults.from_dict(json.loads(body or b"{}"))
            except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
                self._send_json(400, {"error": str(exc)})
                return
            state.set_faults(faults)
            log.info("faults set to %s", faults.to_dict())
            self._send_json(200, faults.to_dict())
        elif path == "/_admin/stats" and method == "GET":
            self._send_json(200, state.stats())
        elif path == "/_admin/stats/reset" and method == "POST":
            state.reset_stats()
            self._send_json(200, state.stats())
        else:
            self._send_json(404, {"error": f"no admin route {method} {path}"})

    # --- /stac
    def _handle_stac(self, subpath: str, query: str, body: bytes) -> None:
        state = self.state
        is_search = subpath.rstrip("/") == "/search"
        self._route = "stac_search" if is_search else "stac_other"
        state.count_request(self._route)
        if self._apply_status_fault("stac"):
            return
        if is_search and self.command in ("GET", "POST"):
            self._handle_search(query, body)
            return
        if self.command in ("GET", "HEAD") and self._serve_collection_override(subpath):
            return
        path_and_query = subpath + (f"?{query}" if query else "")
        content_type = self.headers.get("Content-Type")
        answer = self._backend(self.command, path_and_query, body or None, content_type)
        if answer is not None:
            status, content_type, payload = answer
            payload = state.rewrite_backend_urls(payload)
            if status == 200 and subpath.rstrip("/") in ("", "/conformance") and not state.faults.no_sort_filter:
                payload = json.dumps(stac_sort.add_conformance(json.loads(payload))).encode()
            self._send(status, payload, content_type)

    def _backend(
        self, method: str, path_and_query: str, body: bytes | None, content_type: str | None
    ) -> tuple[int, str, bytes] | None:
        """A request to rustac; answers 502 itself and returns None when rustac is down."""
        try:
            return self.state.backend_request(method, path_and_query, body, content_type)
        except OSError as exc:
            log.error("STAC backend on port %d unreachable: %s", self.state.backend_port, exc)
            self._send_json(502, {"code": "BadGateway", "description": "STAC backend unreachable"})
            return None

    def _handle_search(self, query: str, body: bytes) -> None:
        """``/search``, GET or POST, always sent to rustac as a POST.

        rustac's GET /search answers 500 as soon as ``bbox`` or ``collections`` is given, so a
        GET is translated into the equivalent POST body, and the paging links of the answer
        are translated back into GET links (as a real API returns them to a GET client).
        """
        is_get = self.command == "GET"
        try:
            params = search_params_from_query(query) if is_get else json.loads(body or b"{}")
            if not isinstance(params, dict):
                raise TypeError("the search body must be a JSON object")
        except (ValueError, TypeError) as exc:
            self._send_json(400, {"code": "BadRequest", "description": f"invalid search: {exc}"})
            return
        if params.get("sortby"):
            self.state.count_request("stac_search_sorted")
        if stac_sort.wants_emulation(params) and not self.state.faults.no_sort_filter:
            doc = self._sorted_search(params)
            if doc is None:
                return
            content_type = "application/geo+json"
        else:
            answer = self._backend("POST", "/search", json.dumps(params).encode(), "application/json")
            if answer is None:
                return
            status, content_type, payload = answer
            payload = self.state.rewrite_backend_urls(payload)
            if status != 200:
                self._send(status, payload, content_type)
                return
            doc = json.loads(payload)
        if is_get:
            for link in doc.get("links", []):
                if link.get("rel") in ("next", "prev") and isinstance(link.get("body"), dict):
                    query_string = search_query_from_params(link["body"])
                    link["href"] = f"{self.state.stac_url}/search?{query_string}"
                    link["method"] = "GET"
                    link.pop("body")
                    link.pop("merge", None)
        self._apply_search_faults(doc, params)
        self._send(200, json.dumps(doc).encode(), content_type)

    def _sorted_search(self, params: dict) -> dict | None:
        """A search with ``sortby``/``filter`` on ids, answered from all of rustac's matches."""
        features: list[dict] = []
        page_size = 1000
        while True:  # every match, in rustac's pages
            body = {**stac_sort.backend_params(params), "limit": page_size, "skip": len(features)}
            answer = self._backend("POST", "/search", json.dumps(body).encode(), "application/json")
            if answer is None:
                return None
            status, content_type, payload = answer
            payload = self.state.rewrite_backend_urls(payload)
            if status != 200:
                self._send(status, payload, content_type)
                return None
            batch = json.loads(payload).get("features", [])
            features += batch
            if len(batch) < page_size:
                break
        try:
            page, more = stac_sort.page(features, params)
        except stac_sort.UnsupportedSearch as exc:
            self._send_json(400, {"code": "BadRequest", "description": str(exc)})
            return None
        links = [{"rel": "root", "href": f"{self.state.stac_url}/", "type": "application/json"}]
        if self.state.faults.duplicate_items:
            previous = stac_sort.previous_feature(features, params, page)
            if previous is not None:
                page = [previous, *page]
                self.state.count_fault("duplicate_items")
        if more:
            links.append({"rel": "next", "href": f"{self.state.stac_url}/search", "method": "POST",
                          "type": "application/geo+json", "body": stac_sort.next_body(params, page[-1]["id"]),
                          "merge": False})
        return {"type": "FeatureCollection", "features": page, "links": links, "numberReturned": len(page)}

    def _apply_search_faults(self, doc: dict, params: dict) -> None:
        """omit_next / duplicate_items on a /search answer (links already rewritten), in place."""
        faults = self.state.faults
        if faults.omit_next:
            links = doc.get("links", [])
            kept = [link for link in links if link.get("rel") != "next"]
            if len(kept) != len(links):
                doc["links"] = kept
                self.state.count_fault("omit_next")
        if faults.duplicate_items:
            previous = self._last_feature_of_previous_page(params)
            if previous is not None:
                doc["features"] = [previous, *doc.get("features", [])]
                doc["numberReturned"] = len(doc["features"])
                self.state.count_fault("duplicate_items")

    def _last_feature_of_previous_page(self, params: dict) -> dict | None:
        """Ask rustac for the feature just before this page (position skip-1); None on page 1.

        Stateless on purpose: the duplicated feature depends only on the request, so two
        clients paging at the same time see the same duplication.
        """
        skip = int(params.get("skip") or 0)
        if skip <= 0:
            return None
        previous = {**params, "skip": skip - 1, "limit": 1}
        answer = self.state.backend_request(
            "POST", "/search", json.dumps(previous).encode(), "application/json"
        )
        if answer[0] != 200:
            return None
        features = json.loads(self.state.rewrite_backend_urls(answer[2])).get("features", [])
        return features[0] if features else None

    def _serve_collection_override(self, subpath: str) -> bool:
        """Answer /collections and /collections/{id} from collections.json when there is one."""
        collections = self.state.collections
        if collections is None:
            return False
        parts = [p for p in subpath.split("/") if p]
        if parts == ["collections"]:
            stac = self.state.stac_url
            docs = [self._collection_doc(doc) for doc in collections.values()]
            links = [
                {"href": f"{stac}/", "rel": "root", "type": "application/json"},
                {"href": f"{stac}/collections", "rel": "self", "type": "application/json"},
            ]
            self._send_json(200, {"collections": docs, "links": links})
            return True
        if len(parts) == 2 and parts[0] == "collections":
            doc = collections.get(unquote(parts[1]))
            if doc is None:
                message = f"no collection {parts[1]}"
                self._send_json(404, {"code": "NotFound", "description": message})
            else:
                self._send_json(200, self._collection_doc(doc))
            return True
        return False

    def _collection_doc(self, doc: dict) -> dict:
        """A collection from collections.json with its navigation links pointing at the gateway."""
        stac = self.state.stac_url
        url = f"{stac}/collections/{doc['id']}"
        navigation = {"self", "root", "parent", "items", "child", "item"}
        links = [link for link in doc.get("links", []) if link.get("rel") not in navigation]
        links += [
            {"href": url, "rel": "self", "type": "application/json"},
            {"href": f"{stac}/", "rel": "root", "type": "application/json"},
            {"href": f"{stac}/", "rel": "parent", "type": "application/json"},
            {"href": f"{url}/items", "rel": "items", "type": "application/geo+json"},
        ]
        return {**doc, "links": links}

    # --- /files
    def _resolve_file(self, relative: str) -> Path | None:
        """The file under files/ named by the URL path.

        None if there is no such file; PermissionError if the path escapes files/.
        """
        candidate = (self.state.files_dir / unquote(relative)).resolve()
        if not candidate.is_relative_to(self.state.files_dir):
            raise PermissionError(relative)
        return candidate if candidate.is_file() else None

    def _handle_files(self, relative: str) -> None:
        self._route = "files"
        self.state.count_request("files")
        if self._apply_status_fault("files"):
            return
        if self.command not in ("GET", "HEAD"):
            self._send(405, b"Method not allowed", "text/plain", {"Allow": "GET, HEAD"})
            return
        try:
            path = self._resolve_file(relative)
        except PermissionError:
            self._send(403, b"Forbidden", "text/plain")
            return
        if path is None:
            self._send(404, b"Not found", "text/plain")
            return
        stat = path.stat()
        size = stat.st_size
        headers = {
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
            "ETag": f'"{stat.st_mtime_ns:x}-{size:x}"',
        }
        try:
            span = parse_range(self.headers.get("Range"), size)
        except RangeNotSatisfiable:
            self._send(416, b"", "text/plain", {**headers, "Content-Range": f"bytes */{size}"})
            return
        if span is None:
            status, first, last = 200, 0, size - 1
        else:
            status, (first, last) = 206, span
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        self._send_file(path, status, first, last - first + 1, headers)

    def _send_file(
        self, path: Path, status: int, offset: int, length: int, headers: dict[str, str]
    ) -> None:
        content_type = _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._status = status
        if self.command == "HEAD":
            return
        to_send = length
        if self._truncate and length > 0:
            to_send = length // 2  # the Content-Length above still announces the full length
            self.state.count_fault("truncate")
        with path.open("rb") as f:
            f.seek(offset)
            remaining = to_send
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
                self._sent += len(chunk)
                self.state.count_file_bytes(len(chunk))
        if to_send < length:
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early

    # --- /wms
    def _handle_wms(self, query: str) -> None:
        params = wms.normalize_params(query)
        request = params.get("REQUEST", "").lower()
        routes = {"getmap": "wms_getmap", "getcapabilities": "wms_capabilities"}
        self._route = routes.get(request, "wms_other")
        self.state.count_request(self._route)
        if self._apply_status_fault("wms"):
            return
        try:
            if request == "getcapabilities":
                xml = wms.capabilities_xml(self.state.layers, f"{self.state.public_url}/wms", self.state.wms_limits)
                self._send(200, xml, "text/xml; charset=utf-8")
            elif request == "getmap":
                req = wms.parse_getmap(params, self.state.layers, self.state.wms_limits)
                image = wms.render_getmap(req, self.state.layers)
                self.state.count_wms_bytes(len(image))
                self._send(200, image, req.format)
            elif not request:
                raise wms.WmsError("Missing required parameter REQUEST", "MissingParameterValue")
            else:
                message = f"Request {params['REQUEST']!r} is not supported"
                raise wms.WmsError(message, "OperationNotSupported")
        except wms.WmsError as exc:
            self._send(400, wms.exception_report(str(exc), exc.code), "text/xml; charset=utf-8")
        except Exception:  # a rendering failure is still answered the WMS way
            log.exception("WMS request failed")
            message = "Internal error while rendering, see the server log"
            report = wms.exception_report(message, "NoApplicableCode")
            self._send(500, report, "text/xml; charset=utf-8")


# ============================================================================ rustac backend


def rustac_executable() -> str:
    """The ``rustac`` CLI installed next to this Python (the venv's bin), else on PATH."""
    candidate = Path(sys.executable).parent / "rustac"
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which("rustac")
    if found is None:
        raise ServiceError(
            "the rustac executable was not found next to python nor on PATH (pip install rustac)"
        )
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM rustac when the gateway dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() still kills the whole process group


def _port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (we could bind it ourselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_rustac(root: Path, backend_port: int) -> subprocess.Popen:
    """Start ``rustac serve`` on run/served-items.ndjson; its output goes to the gateway's log."""
    command = [
        rustac_executable(),
        "serve",
        str(served_items_path(root)),
        "--addr",
        f"{BACKEND_HOST}:{backend_port}",
    ]
    log.info("starting %s", " ".join(command))
    # preexec_fn is unsafe only when threads run; the gateway starts rustac before serving.
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # noqa: PLW1509
    )


def _wait_backend(state: GatewayState, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"rustac exited with code {proc.returncode} before answering on port "
                f"{state.backend_port}"
            )
        if state.backend_ok():
            return
        time.sleep(0.1)
    raise ServiceError(
        f"rustac did not answer on {BACKEND_HOST}:{state.backend_port} within {timeout_s} s"
    )


def _stop_process(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve(
    root: Path, host: str, port: int, backend_port: int, startup_timeout_s: float = 30.0
) -> int:
    """Run the gateway and rustac in the foreground until SIGTERM/SIGINT; returns an exit code."""
    root = Path(root).resolve()
    state = GatewayState(root, host, port, backend_port)  # loads layers: fails fast on a bad world
    try:
        server = GatewayServer((host, port), state)
    except OSError as exc:
        raise ServiceError(f"cannot listen on {host}:{port}: {exc}") from exc
    if not _port_free(BACKEND_HOST, backend_port):
        server.server_close()
        raise ServiceError(f"the STAC backend port {BACKEND_HOST}:{backend_port} is already in use")
    write_served_items(root, f"{state.public_url}/files")
    backend = start_rustac(root, backend_port)
    try:
        _wait_backend(state, backend, startup_timeout_s)

        def request_shutdown(signum: int, _frame: Any) -> None:
            log.info("signal %d received, shutting down", signum)
            # shutdown() blocks until serve_forever returns: call it from another thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, request_shutdown)
        signal.signal(signal.SIGINT, request_shutdown)
        log.info(
            "serving %s on %s (/stac, /files, /wms), rustac pid %d",
            root,
            state.public_url,
            backend.pid,
        )
        server.serve_forever(poll_interval=0.2)
    finally:
        _stop_process(backend)
        server.server_close()
        log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m xstars.demo.server --root R [--host H] [--port P] [--backend-port B]``."""
    parser = argparse.ArgumentParser(
        prog="python -m xstars.demo.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", required=True, type=Path, help="demo world directory")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--backend-port", type=int, default=DEFAULT_BACKEND_PORT)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    try:
        return serve(args.root, args.host, args.port, args.backend_port)
    except (ServiceError, DataError) as exc:
        log.error("%s", exc)
        return 1


# ============================================================================ client-side API

#: Processes started by this Python process, kept to reap them (no zombies) in stop().
_CHILDREN: dict[int, subprocess.Popen] = {}

# Loopback calls must never go through an HTTP proxy configured in the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_json(url: str, method: str = "GET", doc: Any = None, timeout_s: float = 10.0) -> Any:
    data = None if doc is None else json.dumps(doc).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _NO_PROXY.open(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServiceError(f"{method} {url} answered {exc.code}: {exc.read()[:500]!r}") from exc
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{method} {url} failed: {exc}") from exc


def _url_of(target: str | ServerInfo) -> str:
    return target.base_url if isinstance(target, ServerInfo) else target


def health(url: str, timeout_s: float = 2.0) -> dict | None:
    """The gateway's health document, or None when nothing (or not a gateway) answers."""
    try:
        doc = _http_json(f"{_base_url(url)}/_admin/health", timeout_s=timeout_s)
    except ServiceError:
        return None
    return doc if isinstance(doc, dict) and "stac_backend" in doc else None


def set_faults(admin_or_base_url: str | ServerInfo, faults: Faults | Mapping[str, Any]) -> Faults:
    """Replace the gateway's faults (and reset the fault counters); returns what is in effect.

    ``admin_or_base_url`` may be any URL of the gateway (``http://h:p``, ``.../_admin``,
    ``.../stac``) or a ServerInfo. ``Faults()`` switches every fault off.
    """
    url = _url_of(admin_or_base_url)
    doc = faults.to_dict() if isinstance(faults, Faults) else Faults.from_dict(faults).to_dict()
    return Faults.from_dict(_http_json(f"{_base_url(url)}/_admin/faults", "POST", doc))


def get_stats(url: str | ServerInfo) -> dict[str, Any]:
    """Counters of the gateway: see :meth:`GatewayState.stats`."""
    url = _url_of(url)
    return _http_json(f"{_base_url(url)}/_admin/stats")


def reset_stats(url: str | ServerInfo) -> None:
    """Zero the request, byte and fault counters."""
    url = _url_of(url)
    _http_json(f"{_base_url(url)}/_admin/stats/reset", "POST", {})


def read_server_json(root: Path) -> ServerInfo | None:
    """The ServerInfo recorded by start(), or None when there is none (or it is unreadable)."""
    try:
        doc = json.loads(server_json_path(root).read_text())
        return ServerInfo(
            host=doc["host"],
            port=int(doc["port"]),
            backend_port=int(doc["backend_port"]),
            pid=int(doc["pid"]),
            root=Path(doc["root"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_server_json(info: ServerInfo) -> None:
    doc = {
        "pid": info.pid,
        "host": info.host,
        "port": info.port,
        "backend_port": info.backend_port,
        "root": str(info.root),
        "stac_url": info.stac_url,
        "log": str(log_path(info.root)),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = server_json_path(info.root)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _log_tail(root: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_path(root).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _group_alive(pgid: int) -> bool:
    """True while a non-zombie process of process group ``pgid`` exists."""
    child = _CHILDREN.get(pgid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pgid, None)  # reaped
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel (counts zombies as alive)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: pid (comm) state ppid pgrp ... ; comm may contain spaces, so split after ')'.
        fields_after = stat[stat.rfind(")") + 2 :].split()
        if len(fields_after) >= 3 and int(fields_after[2]) == pgid and fields_after[0] != "Z":
            return True
    return False


def _kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            raise ServiceError(f"not allowed to stop process group {pgid}") from None
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.05)


def start(
    root: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    backend_port: int = DEFAULT_BACKEND_PORT,
    timeout_s: float = 30.0,
) -> ServerInfo:
    """Start the gateway (which starts rustac) as a detached process and wait until both answer.

    Raises ServiceError naming host:port when a port is taken, when a server for this root is
    already running (use :func:`ensure_up` to reuse it), or when startup fails (with the tail
    of ``<root>/run/server.log``).
    """
    root = Path(root).resolve()
    run = layout.run_dir(root)
    run.mkdir(parents=True, exist_ok=True)
    existing = read_server_json(root)
    if existing is not None:
        if _group_alive(existing.pid):
            raise ServiceError(
                f"a demo server for {root} already runs (pid {existing.pid}, {existing.base_url}); "
                "call stop() first or use ensure_up()"
            )
        server_json_path(root).unlink(missing_ok=True)  # stale
    for what, h, p in (("gateway", host, port), ("STAC backend", BACKEND_HOST, backend_port)):
        if not _port_free(h, p):
            other = health(f"http://{h}:{p}")
            owner = f" by the demo server of {other['root']}" if other else " by another process"
            raise ServiceError(
                f"cannot start the demo {what} on {h}:{p}: the port is already in use{owner}"
            )

    # The child may not have xstars installed (a source checkout): give it our import path.
    env = os.environ.copy()
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "xstars.demo.server",
        "--root",
        str(root),
        "--host",
        host,
        "--port",
        str(port),
        "--backend-port",
        str(backend_port),
    ]
    with log_path(root).open("ab") as log_file:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env=env,
            cwd=str(root),
        )
    _CHILDREN[proc.pid] = proc
    info = ServerInfo(host=host, port=port, backend_port=backend_port, pid=proc.pid, root=root)

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            _CHILDREN.pop(proc.pid, None)
            raise ServiceError(
                f"the demo server for {root} on {host}:{port} exited with code {proc.returncode}; "
                f"log tail:\n{_log_tail(root)}"
            )
        doc = health(info.base_url, timeout_s=1.0)
        if doc and doc.get("pid") == proc.pid and doc.get("stac_backend"):
            break
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            raise ServiceError(
                f"the demo server for {root} did not answer on {host}:{port} within {timeout_s} s; "
                f"log tail:\n{_log_tail(root)}"
            )
        time.sleep(0.1)
    _write_server_json(info)
    log.info("demo server for %s up at %s (pid %d)", root, info.base_url, proc.pid)
    return info


def stop(root: Path) -> bool:
    """Stop the server recorded in ``<root>/run/server.json`` (and its rustac).

    Returns True if there was one to stop, False otherwise; calling it again is harmless.
    """
    root = Path(root).resolve()
    info = read_server_json(root)
    if info is None:
        return False
    if _group_alive(info.pid):
        _kill_group(info.pid)
    _CHILDREN.pop(info.pid, None)
    server_json_path(root).unlink(missing_ok=True)
    log.info("demo server for %s stopped (pid %d)", root, info.pid)
    return True


@contextlib.contextmanager
def _run_lock(root: Path) -> Iterator[None]:
    """An exclusive fcntl lock on run/server.lock (across processes and threads)."""
    layout.run_dir(root).mkdir(parents=True, exist_ok=True)
    with _lock_path(root).open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_up(
    root: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    backend_port: int = DEFAULT_BACKEND_PORT,
    timeout_s: float = 30.0,
) -> ServerInfo:
    """Return the running server of ``root`` at host:port, starting it if needed.

    Idempotent and safe when several processes call it at once (they serialise on a lock file).
    A healthy server of the same root on the same address is reused; a stale record (dead or
    unhealthy server) is cleaned up and a new server started. A server of *another* root on the
    address is an error (ServiceError), never stopped.
    """
    root = Path(root).resolve()
    with _run_lock(root):
        current = health(f"http://{host}:{port}")
        if current is not None and current.get("root") == str(root) and current.get("stac_backend"):
            if current.get("backend_port") != backend_port:
                raise ServiceError(
                    f"the demo server of {root} on {host}:{port} uses STAC backend port "
                    f"{current.get('backend_port')}, not {backend_port}; stop it first"
                )
            info = ServerInfo(
                host=host, port=port, backend_port=backend_port, pid=int(current["pid"]), root=root
            )
            if read_server_json(root) != info:
                _write_server_json(info)  # adopt a server whose record was lost
            return info
        if current is not None and current.get("root") != str(root):
            raise ServiceError(
                f"{host}:{port} already serves another demo world ({current.get('root')})"
            )
        if current is not None:  # ours but its STAC backend is down: replace it
            _kill_group(int(current["pid"]))
        stop(root)  # a stale record of this root, wherever it listened
        return start(root, host, port, backend_port, timeout_s)


if __name__ == "__main__":
    sys.exit(main())
