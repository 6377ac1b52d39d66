"""Sorting by id and CQL2 ``id > value`` filtering, added by the gateway in front of rustac.

rustac 0.9's in-memory backend implements neither ``sortby`` (HTTP 500) nor ``filter``. The
Planetary Computer implements both, and the robust way to page when its ``next`` links go
missing is to sort on ``id`` and ask for ``id > last_id``. So that the pipeline's client runs
that same code path offline, the gateway advertises the two conformance classes and answers
such searches itself from rustac's results. Only what that paging needs is supported:
``sortby`` on ``id`` (asc or desc) and a ``filter`` that is a comparison of ``id`` with a
string (``>``, ``>=``, ``<``, ``<=``, ``=``) or an ``and`` of those. Anything else is a 400
naming what is unsupported, never a silently ignored parameter.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

#: Conformance classes added to rustac's (landing page ``conformsTo`` and ``/conformance``).
CONFORMANCE: tuple[str, ...] = (
    "https://api.stacspec.org/v1.0.0/item-search#sort",
    "https://api.stacspec.org/v1.0.0-rc.2/item-search#filter",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-cql2",
)

#: Search parameters this module answers; the rest of the search goes to rustac.
OWN_PARAMS: tuple[str, ...] = ("sortby", "filter", "filter-lang", "filter_lang", "skip", "limit")

DEFAULT_LIMIT = 10

_OPS: dict[str, Callable[[str, str], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "=": operator.eq,
}


class UnsupportedSearch(ValueError):
    """A sortby/filter this emulation does not implement (answered with HTTP 400)."""


def wants_emulation(params: Mapping[str, Any]) -> bool:
    return "sortby" in params or "filter" in params


def add_conformance(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the sort/filter classes to a landing page or /conformance document, in place."""
    classes = doc.setdefault("conformsTo", [])
    classes += [c for c in CONFORMANCE if c not in classes]
    return doc


def _id_predicate(node: Any) -> Callable[[str], bool]:
    if not isinstance(node, Mapping) or "op" not in node:
        raise UnsupportedSearch(f"filter must be a CQL2-JSON expression, got {node!r}")
    op, args = node["op"], node.get("args", [])
    if op == "and":
        predicates = [_id_predicate(arg) for arg in args]
        return lambda value: all(p(value) for p in predicates)
    if op in _OPS and len(args) == 2 and args[0] == {"property": "id"} and isinstance(args[1], str):
        compare, bound = _OPS[op], args[1]
        return lambda value: compare(value, bound)
    raise UnsupportedSearch(f"only comparisons of the property 'id' with a string are supported, got {node!r}")


def _sort_key(params: Mapping[str, Any]) -> bool:
    """True for descending order; raises UnsupportedSearch for anything but id."""
    sortby = params.get("sortby") or [{"field": "id", "direction": "asc"}]
    if isinstance(sortby, str):  # GET form: "+id" / "-id" / "id"
        sortby = [{"field": sortby.lstrip("+-"), "direction": "desc" if sortby.startswith("-") else "asc"}]
    if len(sortby) != 1 or sortby[0].get("field") != "id":
        raise UnsupportedSearch(f"only sortby on 'id' is supported, got {sortby!r}")
    return sortby[0].get("direction", "asc") == "desc"


def backend_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the search rustac answers (everything but sorting, filtering and paging)."""
    return {key: value for key, value in params.items() if key not in OWN_PARAMS}


def page(features: list[dict[str, Any]], params: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Sort, filter and cut one page: (features of the page, whether more follow)."""
    lang = params.get("filter-lang") or params.get("filter_lang") or "cql2-json"
    if lang != "cql2-json":
        raise UnsupportedSearch(f"filter-lang {lang!r} is not supported (cql2-json only)")
    descending = _sort_key(params)
    keep = _id_predicate(params["filter"]) if params.get("filter") else (lambda value: True)
    matching = sorted((f for f in features if keep(f["id"])), key=lambda f: f["id"], reverse=descending)
    limit = int(params.get("limit") or DEFAULT_LIMIT)
    return matching[:limit], len(matching) > limit


def next_body(params: Mapping[str, Any], last_id: str) -> dict[str, Any]:
    """The body of the ``next`` link: the same search, resumed after the last id of this page."""
    op = "<" if _sort_key(params) else ">"
    resume = {"op": op, "args": [{"property": "id"}, last_id]}
    body = {key: value for key, value in params.items() if key not in ("filter", "filter-lang", "filter_lang")}
    body["filter"] = {"op": "and", "args": [params["filter"], resume]} if params.get("filter") else resume
    body["filter-lang"] = "cql2-json"
    return body


def previous_feature(features: list[dict[str, Any]], params: Mapping[str, Any],
                     page_features: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The feature just before ``page_features`` in sort order, ignoring the filter (None if none).

    With paging by ``id > last_id``, that is the last feature of the previous page: what the
    ``duplicate_items`` fault repeats.
    """
    if not page_features or not params.get("filter"):
        return None
    descending = _sort_key(params)
    ordered = sorted(features, key=lambda f: f["id"], reverse=descending)
    index = next(i for i, f in enumerate(ordered) if f["id"] == page_features[0]["id"])
    return ordered[index - 1] if index > 0 else None
