"""The demo gateway's ``/stac`` routes: a reverse proxy to ``rustac serve`` that fills its gaps.

``/stac``
    ``rustac serve`` (:mod:`xstars.demo.rustac`) loads ``<root>/run/served-items.ndjson``.
    rustac builds its links from its own ``--addr``, so the gateway rewrites every
    ``http://127.0.0.1:<backend_port>`` in its answers to ``http://<host>:<port>/stac``; clients
    then follow ``next`` links through the gateway. When ``<root>/stac/collections.json`` exists,
    ``/collections`` and ``/collections/{id}`` answer with those documents (links rebuilt for the
    gateway) instead of the bare collections rustac generates from the items; everything else
    passes through.
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

:class:`StacRoutes` is mixed into :class:`xstars.demo.gateway.GatewayHandler`, which
dispatches to it and draws the counter faults; the search faults (``omit_next``,
``duplicate_items``) are applied here. The GET/POST search translation is pure
(:func:`search_params_from_query`, :func:`search_query_from_params`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from xstars.demo import layout, stac_sort
from xstars.errors import DataError

log = logging.getLogger(__name__)


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


class StacRoutes:
    """``/stac`` of :class:`xstars.demo.gateway.GatewayHandler`, mixed into it.

    ``self`` is that handler: ``self.state``, ``self._send``, ``self._send_json``,
    ``self._apply_status_fault`` and the per-request ``_route`` are its own.
    """

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
