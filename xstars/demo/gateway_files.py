"""The demo gateway's ``/files`` routes: static files with HTTP range requests.

GDAL's ``/vsicurl/`` reads the demo world's COGs through them as from a public bucket; the
gateway's fake Azure blob storage serves the same files through :meth:`FileRoutes._serve_file`
once it has checked the request's SAS token.

``/files/<path>``
    Files under ``<root>/files/``: GET and HEAD, ``Accept-Ranges: bytes``, one range per request
    (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) answered 206, 416 when unsatisfiable. A
    multi-range or malformed ``Range`` header is ignored (200 with the whole file, as RFC 9110
    allows). Paths escaping ``files/`` are refused with 403.

:class:`FileRoutes` is mixed into :class:`xstars.demo.gateway.GatewayHandler`, which
dispatches to it and draws the faults (a ``truncate`` fault cuts the body here);
:func:`parse_range` is the pure part.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote

_CHUNK = 64 * 1024

#: Content-Type of served files by extension (anything else: application/octet-stream).
_CONTENT_TYPES = {
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".json": "application/json",
    ".png": "image/png",
    ".jpg": "image/jpeg",
}


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


class FileRoutes:
    """``/files`` of :class:`xstars.demo.gateway.GatewayHandler`, mixed into it.

    ``self`` is that handler: ``self.state``, ``self._send``, ``self._apply_status_fault`` and
    the per-request ``_status``, ``_sent``, ``_route``, ``_truncate`` are its own.
    """

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
        self._serve_file(relative)

    def _serve_file(self, relative: str) -> None:
        """Answer a GET or HEAD of ``files/<relative>`` (also what blob storage serves, once the
        token is checked)."""
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
