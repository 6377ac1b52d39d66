"""Serve a generated demo world on loopback with real HTTP servers (STAC API, files, WMS).

The pipeline's clients are never mocked: pystac-client, GDAL's ``/vsicurl/`` (through rasterio)
and plain HTTP WMS clients talk to the demo world exactly as they talk to the Planetary Computer
and to the IGN Géoplateforme. One detached process, the *gateway*, does it all::

    client ──HTTP──> gateway http://<host>:<port>   (xstars.demo.gateway, ThreadingHTTPServer)
                       ├── /stac/...   reverse proxy ──> rustac serve http://127.0.0.1:<backend>
                       ├── /files/...  static COGs with HTTP range requests
                       ├── /wms        OGC WMS 1.3.0 (GetCapabilities, GetMap: xstars.demo.wms)
                       ├── /api/sas/v1/token/...  SAS tokens (xstars.demo.tokens)
                       ├── http://<account>.blob.core.windows.net/...  (as a proxy) the same
                       │               files, for a valid token only
                       └── /_admin/... health, fault injection, statistics (never faulted)

This module is that process: :func:`serve` runs the gateway and its rustac in the foreground,
:func:`main` is ``python -m xstars.demo.server --root R``; SIGTERM stops rustac and then the
gateway. Where the rest lives:

* :mod:`xstars.demo.control`: the other side, used by the CLI and by tests:
  ``start``, ``stop``, ``ensure_up`` (a detached gateway, recorded in
  ``<root>/run/server.json``, its log in ``<root>/run/server.log``), ``health``,
  ``set_faults``, ``get_stats``, ``reset_stats``, ``read_server_json``;
* :mod:`xstars.demo.gateway`: the HTTP server, its state, the dispatch, ``/wms`` and ``/_admin``;
  :mod:`xstars.demo.gateway_stac` the ``/stac`` proxy, :mod:`xstars.demo.gateway_files` the
  ``/files`` range server;
* :mod:`xstars.demo.faults`: the faults the gateway injects on demand;
* :mod:`xstars.demo.rustac`: the ``rustac serve`` STAC backend process.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from xstars.demo.control import DEFAULT_BACKEND_PORT, DEFAULT_HOST, DEFAULT_PORT, port_free
from xstars.demo.gateway import GatewayServer, GatewayState
from xstars.demo.rustac import (
    BACKEND_HOST,
    start_rustac,
    stop_process,
    wait_backend,
    write_served_items,
)
from xstars.demo.tokens import DEFAULT_TTL_S
from xstars.errors import DataError, ServiceError

# Named explicitly: under ``python -m`` __name__ would be "__main__".
log = logging.getLogger("xstars.demo.server")


def serve(
    root: Path, host: str, port: int, backend_port: int, startup_timeout_s: float = 30.0,
    token_ttl_s: int = DEFAULT_TTL_S,
) -> int:
    """Run the gateway and rustac in the foreground until SIGTERM/SIGINT; returns an exit code."""
    root = Path(root).resolve()
    state = GatewayState(root, host, port, backend_port, token_ttl_s)  # loads layers: fails fast on a bad world
    try:
        server = GatewayServer((host, port), state)
    except OSError as exc:
        raise ServiceError(f"cannot listen on {host}:{port}: {exc}") from exc
    if not port_free(BACKEND_HOST, backend_port):
        server.server_close()
        raise ServiceError(f"the STAC backend port {BACKEND_HOST}:{backend_port} is already in use")
    write_served_items(root, f"{state.public_url}/files")
    backend = start_rustac(root, backend_port)
    try:
        wait_backend(state, backend, startup_timeout_s)

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
        stop_process(backend)
        server.server_close()
        log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m xstars.demo.server --root R [--host H] [--port P] [--backend-port B] [--token-ttl-s S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m xstars.demo.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", required=True, type=Path, help="demo world directory")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--backend-port", type=int, default=DEFAULT_BACKEND_PORT)
    parser.add_argument("--token-ttl-s", type=int, default=DEFAULT_TTL_S,
                        help="lifetime of the SAS tokens handed out (demo.token_ttl_s)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    try:
        return serve(args.root, args.host, args.port, args.backend_port, token_ttl_s=args.token_ttl_s)
    except (ServiceError, DataError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
