"""The demo gateway's STAC backend: a ``rustac serve`` child process listening on loopback.

``rustac serve`` (a STAC API with an in-memory backend) loads ``<root>/run/served-items.ndjson``,
a copy of ``<root>/stac/items.ndjson`` whose placeholder ``{files_url}`` is replaced by the
gateway's ``/files`` URL (:func:`write_served_items`). Only the gateway talks to it, through
its ``/stac`` routes (:mod:`xstars.demo.gateway_stac`), which rewrite rustac's own base URL in
the answers (:func:`backend_rewriter`). The gateway process (:func:`xstars.demo.server.serve`)
starts it before serving and stops it on the way out; Linux also SIGTERMs it when the gateway
dies, even by SIGKILL.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from xstars.demo import layout
from xstars.errors import DataError, ServiceError

if TYPE_CHECKING:
    from xstars.demo.gateway import GatewayState

log = logging.getLogger(__name__)

#: rustac always listens on loopback: only the gateway talks to it.
BACKEND_HOST = "127.0.0.1"


def served_items_path(root: Path) -> Path:
    """The items actually loaded by rustac (placeholder replaced by the files URL)."""
    return layout.run_dir(root) / "served-items.ndjson"


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


def backend_rewriter(backend_port: int) -> re.Pattern[bytes]:
    """Pattern of rustac's own base URL in its answers (rustac ignores the Host header)."""
    # (?!\d) so that port 8766 does not also match the start of, say, 87661.
    return re.compile(re.escape(f"http://{BACKEND_HOST}:{backend_port}".encode()) + rb"(?!\d)")


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


def wait_backend(state: GatewayState, proc: subprocess.Popen, timeout_s: float) -> None:
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


def stop_process(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
