"""The demo gateway's HTTP server: its shared state, the request dispatch, ``/wms`` and ``/_admin``.

:class:`GatewayServer` (a stdlib ThreadingHTTPServer, one thread per connection) answers every
route of the demo world; :class:`GatewayState` holds what the handlers share (the world's WMS
layers and STAC collections, the faults, the counters, the link to rustac).
:class:`GatewayHandler` dispatches each request to its route family: ``/stac`` is in
:mod:`xstars.demo.gateway_stac`, ``/files`` in :mod:`xstars.demo.gateway_files` (mixed into
the handler), and these two are here:

``/wms`` (alias ``/wms-r``, the Géoplateforme's path)
    OGC WMS 1.3.0 rendered by :mod:`xstars.demo.wms`. Errors are a ``ServiceExceptionReport``
    with **HTTP 400** and ``Content-Type: text/xml`` (the Géoplateforme may answer such reports
    with 200: a robust client checks the Content-Type too, never only the status).
``/api/sas/v1/token/<account>/<container>``
    The Planetary Computer's SAS token endpoint (:mod:`xstars.demo.tokens`), for the storage
    of the demo's collections (:data:`xstars.demo.layout.BLOB_CONTAINERS`); fault family ``tokens``.
``http://<account>.blob.core.windows.net/<container>/<collection>/...`` (as a proxy)
    Azure blob storage: the same files as ``/files``, with range requests, only for a valid,
    unexpired token of that container in the query, else 403 ``AuthenticationFailed``. Those
    hosts do not resolve: clients send the requests here as to an HTTP proxy (absolute URI,
    GDAL's ``GDAL_HTTP_PROXY``); an absolute URI of the gateway's own address is served as a
    plain path, any other host is refused (502). Fault family ``files``.
``/_admin/health``, ``/_admin/faults`` (GET; POST replaces), ``/_admin/stats``,
``/_admin/stats/reset``, ``/_admin/tokens/expire`` (POST)
    JSON. See :class:`~xstars.demo.faults.Faults` for the fault injection and
    :meth:`GatewayState.stats` for the counters; ``tokens/expire`` ends every token issued so
    far. ``/_admin`` is never faulted.

Logging: one line per request (method, host for blob storage, path, status, body bytes, route).
Query strings are logged only for ``/stac`` and ``/wms``: a signed URL carries its token there.

The process that runs the server (and its rustac) is :mod:`xstars.demo.server`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from xstars.demo import layout, wms
from xstars.demo.faults import FAULT_KINDS, FAULT_ROUTES, Faults
from xstars.demo.gateway_files import FileRoutes
from xstars.demo.gateway_stac import StacRoutes, load_collections
from xstars.demo.rustac import BACKEND_HOST, backend_rewriter
from xstars.demo.tokens import DEFAULT_TTL_S, TokenIssuer, authentication_failed

#: The path of the SAS token endpoint (the Planetary Computer's), before ``<account>/<container>``.
TOKEN_PATH = "/api/sas/v1/token/"

log = logging.getLogger(__name__)

#: Keys of the per-route request counters in the stats.
STAT_ROUTES: tuple[str, ...] = (
    "stac_search",
    "stac_search_sorted",  # of stac_search: those asking a sortby (counted twice)
    "stac_other",
    "files",
    "wms_getmap",
    "wms_capabilities",
    "wms_other",
    "tokens",
    "not_found",
)


class GatewayState:
    """Everything the request handlers share: configuration, faults, counters. Thread-safe."""

    def __init__(self, root: Path, host: str, port: int, backend_port: int,
                 token_ttl_s: int = DEFAULT_TTL_S) -> None:
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
        self._backend_pattern = backend_rewriter(backend_port)
        self.tokens = TokenIssuer(token_ttl_s)  # its secret lives and dies with this process
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
                if f.status_429_first and n <= f.status_429_first:
                    return "status_429"
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
        """``{"requests": {route: n}, "file_bytes": n, "wms_bytes": n, "faults": {kind: n},
        "tokens": {"issued": n, "refused": n}}``.

        Every request is counted under its route, faulted or not (blob storage reads under
        ``files``); ``file_bytes`` counts the bytes of file bodies actually written (half a
        body for a truncated one), ``wms_bytes`` those of the GetMap images rendered;
        ``tokens`` the tokens handed out and the storage requests refused for their token.
        """
        with self._lock:
            return {
                "requests": dict(self._requests),
                "file_bytes": self._file_bytes,
                "wms_bytes": self._wms_bytes,
                "faults": dict(self._faults_injected),
                "tokens": {"issued": self.tokens.issued, "refused": self.tokens.refused},
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._requests = dict.fromkeys(STAT_ROUTES, 0)
            self._faults_injected = dict.fromkeys(FAULT_KINDS, 0)
            self._file_bytes = 0
            self._wms_bytes = 0
            self.tokens.issued = self.tokens.refused = 0

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


class GatewayServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the shared state; one thread per connection."""

    daemon_threads = True  # do not wait for idle keep-alive connections at shutdown
    request_queue_size = 128  # GDAL opens several connections at once

    def __init__(self, address: tuple[str, int], state: GatewayState) -> None:
        self.state = state
        super().__init__(address, GatewayHandler)


class _Dropped(Exception):
    """Raised inside a handler to close the connection without answering."""


class GatewayHandler(StacRoutes, FileRoutes, BaseHTTPRequestHandler):
    """Dispatches each request to the STAC proxy, the file server, the WMS or the admin API.

    The STAC proxy (:class:`~xstars.demo.gateway_stac.StacRoutes`) and the file server
    (:class:`~xstars.demo.gateway_files.FileRoutes`) are mixins of their own modules; the
    answers, the counter faults, ``/_admin`` and ``/wms`` are here.
    """

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
        parts = urlsplit(self.path)  # an absolute URI when we are asked as a proxy
        path, query = parts.path, parts.query
        host = (parts.netloc or self.headers.get("Host", "")).lower()
        blob_account = host.removesuffix(layout.BLOB_DOMAIN) if host.endswith(layout.BLOB_DOMAIN) else None
        try:
            body = self._read_body()
            if blob_account is not None:
                self._handle_blob(blob_account, path, query)
            elif parts.netloc and not self._is_own_address(parts.netloc):
                self._route = "not_found"
                self.state.count_request("not_found")
                self._send(502, f"this gateway is no proxy for {parts.netloc}".encode(), "text/plain")
            elif path == "/_admin" or path.startswith("/_admin/"):
                self._route = "admin"
                self._handle_admin(path, body)
            elif path == "/stac" or path.startswith("/stac/"):
                self._handle_stac(path[len("/stac") :] or "/", query, body)
            elif path.startswith("/files/"):
                self._handle_files(path[len("/files/") :])
            elif path.startswith(TOKEN_PATH):
                self._handle_token(path[len(TOKEN_PATH) :])
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
        self._log_request(f"{host}{path}" if blob_account is not None else path, query)

    def _is_own_address(self, netloc: str) -> bool:
        name, _, port = netloc.rpartition(":")
        return port == str(self.state.port) and name in (self.state.host, "localhost", "127.0.0.1")

    def _log_request(self, path: str, query: str) -> None:
        # Only STAC and WMS queries are logged: a file's, blob's or token's may carry a token.
        queried = self._route.startswith(("stac", "wms"))
        shown = f"{path}?{query}" if query and queried else path
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
        elif path == "/_admin/tokens/expire" and method == "POST":
            generation = state.tokens.expire_all()
            log.info("every token issued so far expired (generation %d)", generation)
            self._send_json(200, {"generation": generation, "ttl_s": state.tokens.ttl_s})
        else:
            self._send_json(404, {"error": f"no admin route {method} {path}"})

    # --- the SAS token endpoint and the blob storage it opens
    def _handle_token(self, rest: str) -> None:
        self._route = "tokens"
        self.state.count_request("tokens")
        if self._apply_status_fault("tokens"):
            return
        account, _, container = rest.strip("/").partition("/")
        if (account, container) not in layout.BLOB_CONTAINERS.values():
            self._send_json(404, {"detail": f"no storage container {rest!r} here"})
            return
        self._send_json(200, self.state.tokens.issue(account, container))

    def _handle_blob(self, account: str, path: str, query: str) -> None:
        """A read of Azure blob storage: a valid token of the container first, then the file."""
        self._route = "files"
        self.state.count_request("files")
        if self._apply_status_fault("files"):
            return
        container = path.lstrip("/").split("/", 1)[0]
        problem = self.state.tokens.check(account, container, query)
        if problem is not None:
            self._send(403, authentication_failed(problem), "application/xml")
            return
        relative = layout.blob_relative(account, path)
        if relative is None:
            body = b'<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code></Error>'
            self._send(404, body, "application/xml")
            return
        self._serve_file(relative)

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
