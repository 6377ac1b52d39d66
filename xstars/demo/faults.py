"""Faults the demo gateway injects, to test clients against a service that misbehaves.

Throttling (429 with ``Retry-After``), an expired SAS token (403; real expiry is
:mod:`xstars.demo.tokens`), outages (503), dropped
connections, truncated file bodies, STAC pages that lose their ``next`` link or repeat an item.
:class:`Faults` is what ``POST /_admin/faults`` takes and ``GET /_admin/faults`` answers: the
gateway (:mod:`xstars.demo.gateway`) draws them per request, tests and benchmarks set them with
:func:`xstars.demo.control.set_faults`. Both sides validate the same dataclass, so the client
side describes a fault without importing the HTTP server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from xstars.errors import ConfigError

#: Route families the status/drop faults can be scoped to. ``files`` is the file server and the
#: blob storage the gateway fakes (the same files); ``tokens`` the SAS token endpoint.
FAULT_ROUTES: tuple[str, ...] = ("stac", "files", "wms", "tokens")

#: The families faulted when ``routes`` is not given: the token endpoint only when asked for.
DEFAULT_FAULT_ROUTES: tuple[str, ...] = ("stac", "files", "wms")

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


@dataclass
class Faults:
    """Faults the gateway injects, all off by default and all deterministic.

    Every request on a route family (``stac``, ``files``, ``wms``, ``tokens``) increments that
    family's counter n (1 for the first request after the faults were set). Request n gets,
    checking in this order and only if its family is in ``routes`` (by default all but
    ``tokens``):

    * 429 with ``Retry-After: retry_after_s`` when n <= ``status_429_first`` (a throttled
      start: the first requests refused, the next ones served);
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

    status_429_first: int = 0
    status_429_every: int = 0
    retry_after_s: int = 1
    status_403_every: int = 0
    status_503_every: int = 0
    drop_every: int = 0
    truncate_every: int = 0
    omit_next: bool = False
    no_sort_filter: bool = False
    duplicate_items: bool = False
    routes: list[str] = field(default_factory=lambda: list(DEFAULT_FAULT_ROUTES))

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
        counts = ("status_429_first", "status_429_every", "status_403_every", "status_503_every", "drop_every", "truncate_every")
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
