"""Run and query a demo gateway from another process (the CLI, the workflow, tests, benches).

:func:`start` launches ``python -m xstars.demo.server`` detached (a process group of its own, so
that :func:`stop` ends it together with its rustac); :func:`ensure_up` reuses a healthy server of
the same world or starts one, safe when several processes call it at once. A running server is
recorded in the world's run dir: ``<root>/run/server.json`` (:class:`ServerInfo`,
:func:`read_server_json`), its log ``<root>/run/server.log``, and ``server.lock`` serialises
:func:`ensure_up`. Over HTTP (``/_admin``, never through a proxy of the environment):
:func:`health`, :func:`set_faults`, :func:`get_stats`, :func:`reset_stats`, :func:`expire_tokens`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from xstars.demo import layout
from xstars.demo.faults import Faults
from xstars.demo.rustac import BACKEND_HOST
from xstars.demo.tokens import DEFAULT_TTL_S
from xstars.errors import ServiceError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_BACKEND_PORT = 8766


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

    @property
    def token_url(self) -> str:
        """The SAS token endpoint (``catalogs.<name>.token_url``, the SDK's ``sas_url``)."""
        return f"{self.base_url}/api/sas/v1/token"

    @property
    def proxy(self) -> str:
        """``host:port`` to read the blob storage hrefs through (``http.proxy``, GDAL_HTTP_PROXY)."""
        return f"{self.host}:{self.port}"


# ============================================================================ run-dir files


def server_json_path(root: Path) -> Path:
    return layout.run_dir(root) / "server.json"


def log_path(root: Path) -> Path:
    return layout.run_dir(root) / "server.log"


def _lock_path(root: Path) -> Path:
    return layout.run_dir(root) / "server.lock"


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


# ============================================================================ admin calls over HTTP

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


def _base_url(url: str) -> str:
    """``http://h:p/anything`` -> ``http://h:p`` (admin calls accept any URL of the gateway)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return f"{parts.scheme}://{parts.netloc}"


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
    """Counters of the gateway: see :meth:`xstars.demo.gateway.GatewayState.stats`."""
    url = _url_of(url)
    return _http_json(f"{_base_url(url)}/_admin/stats")


def reset_stats(url: str | ServerInfo) -> None:
    """Zero the request, byte and fault counters."""
    url = _url_of(url)
    _http_json(f"{_base_url(url)}/_admin/stats/reset", "POST", {})


def expire_tokens(url: str | ServerInfo) -> int:
    """End every SAS token the gateway issued so far (a client's cached token is refused from
    now on, 403 ``AuthenticationFailed``); returns the issuer's new generation."""
    url = _url_of(url)
    return int(_http_json(f"{_base_url(url)}/_admin/tokens/expire", "POST", {})["generation"])


# ============================================================================ the detached process

#: Processes started by this Python process, kept to reap them (no zombies) in stop().
_CHILDREN: dict[int, subprocess.Popen] = {}


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (we could bind it ourselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
    token_ttl_s: int = DEFAULT_TTL_S,
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
        if not port_free(h, p):
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
        "--token-ttl-s",
        str(token_ttl_s),
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
    token_ttl_s: int = DEFAULT_TTL_S,
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
        return start(root, host, port, backend_port, timeout_s, token_ttl_s)
