"""STAC search: one small search per group of sites, sensor and date window, made robust
against the real services (used by the catalog stage, :func:`xstars.catalog.search_shard`).

POST searches retried on 429/5xx honouring Retry-After (urllib3 ``Retry`` under pystac-client),
whole searches retried on dropped or truncated answers, items deduplicated by id, a result page
that is full but has no ``next`` link (a known Planetary Computer failure) continued by sorted id
where the server supports ``sortby`` and ``filter``, and otherwise by splitting the date window in
halves. Each search is recorded (:class:`SearchLog`): the manifest keeps them as provenance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import requests

from xstars import items as stac_items
from xstars.errors import ConfigError, ServiceError
from xstars.remote import http_retry, with_retries

if TYPE_CHECKING:
    from xstars.catalog import SearchWindow

log = logging.getLogger(__name__)


@dataclass
class SearchLog:
    """What one search asked and got: provenance for the manifest, figures for the tests."""

    collection: str
    window: str
    group_id: str
    body: dict[str, Any]
    returned: int = 0
    kept: int = 0
    attempts: int = 0
    continuations: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<item id>: <why>", items found but not usable


class StacSearcher:
    """pystac-client on a STAC API, with the robustness the real services need.

    Retries of single requests (429/5xx honouring Retry-After, dropped connections; POST
    included) are urllib3's, configured on pystac-client's own session; a search whose answer
    is truncated or unparsable is retried whole. Server-side filtering (``query``) is used when
    the API conforms to it; the same filter always runs client-side as well.
    ``catalog_cfg`` is the catalogue's entry (``catalogs.<name>``), ``http_cfg`` the ``http`` section.
    """

    def __init__(self, catalog_cfg: Mapping[str, Any], http_cfg: Mapping[str, Any],
                 name: str = "stac") -> None:
        from pystac_client import Client
        from pystac_client.stac_api_io import StacApiIO

        self.cfg = dict(catalog_cfg)
        self.http_cfg = dict(http_cfg)
        stac_io = StacApiIO(max_retries=http_retry(http_cfg, all_methods=True), timeout=float(http_cfg["timeout_s"]))
        self.url = catalog_cfg["url"]
        try:
            self.client = self._with_retries(lambda: Client.open(self.url, stac_io=stac_io), f"opening {self.url}")
        except ServiceError as err:
            raise ServiceError(f"catalogs.{name}.url {self.url} is unreachable: {err}") from None
        self.conforms_query = self._conforms("QUERY")
        self.conforms_sort_filter = self._conforms("SORT") and self._conforms("FILTER")
        self.logs: list[SearchLog] = []
        log.info("stac url=%s query=%s sort+filter=%s", self.url, self.conforms_query, self.conforms_sort_filter)

    def _conforms(self, name: str) -> bool:
        from pystac_client import ConformanceClasses

        return bool(self.client.conforms_to(getattr(ConformanceClasses, name)))

    def check_collection(self, collection: str, key: str) -> None:
        """Raise ConfigError naming ``key`` when the API has no such collection."""
        from pystac_client.exceptions import APIError

        missing = ConfigError(f"{key}: collection {collection!r} does not exist at {self.url}")
        try:
            # pystac-client answers None for a 404 on some versions and raises on others.
            found = self._with_retries(lambda: self.client.get_collection(collection), f"collection {collection}")
        except (ServiceError, APIError, KeyError) as err:
            if "404" in str(err) or isinstance(err, KeyError) or "not found" in str(err).lower():
                raise missing from None
            raise
        if found is None:
            raise missing

    def search(
        self,
        collection: str,
        bbox: Sequence[float] | None,
        window: SearchWindow | None,
        *,
        group_id: str,
        max_cloud_cover: float | None = None,
        platforms: Sequence[str] | None = None,
    ) -> list[stac_items.Item]:
        """All items of ``collection`` over ``bbox`` (WGS84) in ``window``, filtered and deduplicated."""
        query: dict[str, Any] = {}
        if self.conforms_query:
            if max_cloud_cover is not None:
                query["eo:cloud_cover"] = {"lte": max_cloud_cover}
            if platforms:  # an exact comparison on the server: every spelling of each platform
                query["platform"] = {"in": sorted({s for p in platforms for s in stac_items.platform_spellings(p)})}
        entry = SearchLog(collection, window.name if window else "-", group_id,
                          {"collections": [collection], "bbox": [round(v, 7) for v in bbox] if bbox else None,
                           "datetime": window.interval if window else None, "query": query or None,
                           "limit": int(self.cfg["page_limit"])})
        self.logs.append(entry)
        start, end = (window.start, window.end) if window else (None, None)
        found = self._search_range(entry, collection, bbox, start, end, query)
        entry.returned = len(found)
        kept = [
            item for item in stac_items.dedupe_by_id(found)
            if stac_items.platform_matches(item, platforms)
            and (max_cloud_cover is None or (stac_items.cloud_cover(item) or 0.0) <= max_cloud_cover)
        ]
        entry.kept = len(kept)
        return sorted(kept, key=lambda i: i["id"])

    def _search_range(self, entry: SearchLog, collection: str, bbox, start: datetime | None,
                      end: datetime | None, query: dict, after_id: str | None = None,
                      by_id: bool = False) -> list[dict]:
        """One search; continued by id or by halving the window when a full page has no next link.

        The first request keeps the server's own order (the Planetary Computer's fast path);
        only when a continuation is needed is the search asked again sorted by id (``by_id``),
        so that it can be resumed after the last id seen.
        """
        limit = int(self.cfg["page_limit"])
        params: dict[str, Any] = {"collections": [collection], "limit": limit}
        if bbox is not None:
            params["bbox"] = list(bbox)
        if start is not None:
            params["datetime"] = f"{stac_items.iso_time(start)}/{stac_items.iso_time(end)}"
        if query:
            params["query"] = query
        if by_id:
            # Sorted by id, the search can be resumed after the last id seen.
            params["sortby"] = [{"field": "id", "direction": "asc"}]
            if after_id is not None:
                params["filter"] = {"op": ">", "args": [{"property": "id"}, after_id]}
                params["filter_lang"] = "cql2-json"
        pages = self._with_retries(lambda: self._all_pages(params), f"search of {collection} at {self.url}", entry)
        found = [f for page in pages for f in page.get("features", [])]
        last = pages[-1] if pages else {"features": [], "links": []}
        # A page repeating items of the previous one (a known PC failure) is not fuller for it.
        earlier = {f["id"] for page in pages[:-1] for f in page.get("features", [])}
        new_on_last = {f["id"] for f in last.get("features", [])} - earlier
        truncated = len(new_on_last) >= limit and not any(link.get("rel") == "next" for link in last.get("links", []))
        if not truncated:
            return found
        if self.conforms_sort_filter and not by_id:
            entry.continuations.append("again, sorted by id")
            log.warning("search %s %s: full page without next link, searching again sorted by id", collection,
                        entry.window)
            return self._search_range(entry, collection, bbox, start, end, query, by_id=True)
        if self.conforms_sort_filter:
            last_id = max(new_on_last)
            entry.continuations.append(f"after id {last_id}")
            log.warning("search %s %s: full page without next link, continuing after id %s", collection,
                        entry.window, last_id)
            return found + self._search_range(entry, collection, bbox, start, end, query, after_id=last_id,
                                              by_id=True)
        if start is None or (end - start) <= timedelta(seconds=1):
            # Nothing left to split: either the page was the last one and happened to be full
            # (then nothing is missing), or more than page_limit items share one second here.
            entry.continuations.append(f"unsplittable full page at {stac_items.iso_time(start) if start else '-'}")
            log.warning("search %s %s: a full page of %d items without next link in a window of one second; "
                        "kept as complete (raise stac.page_limit if items are missing)", collection, entry.window,
                        limit)
            return found
        middle = start + (end - start) / 2
        entry.continuations.append(f"split at {stac_items.iso_time(middle)}")
        log.warning("search %s %s: full page without next link, splitting the window at %s", collection,
                    entry.window, stac_items.iso_time(middle))
        return (self._search_range(entry, collection, bbox, start, middle, query)
                + self._search_range(entry, collection, bbox, middle + timedelta(seconds=1), end, query))

    def _all_pages(self, params: dict[str, Any]) -> list[dict]:
        search = self.client.search(method="POST", **params)
        return list(search.pages_as_dicts())

    def _with_retries(self, call, what: str, entry: SearchLog | None = None):
        """``call()``, retried whole when an answer arrived broken (truncated, not JSON).

        Statuses 429/5xx and failed connections are already retried by urllib3 under
        pystac-client (with backoff and Retry-After): what reaches here from them is final.
        """
        from pystac_client.exceptions import APIError

        def attempt(number: int):
            if entry is not None:
                entry.attempts += 1
            return call()

        def broken_answer(err: Exception) -> bool:
            return isinstance(err, json.JSONDecodeError) or any(sign in str(err) for sign in _BROKEN_ANSWER)

        return with_retries(attempt, what=what, http_cfg=self.http_cfg, retryable=broken_answer,
                            errors=(APIError, json.JSONDecodeError, requests.RequestException))


#: How a broken answer body shows in requests/urllib3 errors (urllib3 retries only whole requests
#: that fail before the body is read).
_BROKEN_ANSWER = ("IncompleteRead", "Connection broken", "ChunkedEncodingError", "Expecting value",
                  "Unterminated string", "Expecting ',' delimiter")
