"""The route table: longest prefix wins, and a prefix only matches at a ``/`` boundary."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from .settings import Route

if TYPE_CHECKING:
    from .upstream import Upstream

__all__ = ["CatchAll", "LiveTable", "RouteTable", "has_dot_segment", "strip_route_prefix"]

# What some server, framework or file system somewhere takes for a segment boundary: "/", its
# encoded forms, the backslash (Windows, IIS, some routers) and ";" (Tomcat drops ";params").
_SEGMENT_BOUNDARY = re.compile(r"/|\\|%2f|%5c|;")


class CatchAll(web.DynamicResource):
    """The aiohttp resource behind the route table: every path matches it. The proxy reads
    ``request.raw_path`` and never the tail, so the regex match and the unquoting of the tail are
    skipped (per request)."""

    def __init__(self) -> None:
        super().__init__("/{tail:.*}")

    def _match(self, path: str) -> dict[str, str]:
        return {}


class RouteTable:
    """Maps a request path to its route with one dict lookup per path segment.

    It also holds the upstreams its routes lead to, so that one object is the whole
    configuration in force and a reload can replace both at once (``LiveTable``).
    """

    def __init__(self, routes: Iterable[Route], upstreams: Mapping[str, Upstream] | None = None) -> None:
        self.routes = tuple(routes)
        self.upstreams: Mapping[str, Upstream] = upstreams or {}
        self._by_prefix = {route.prefix: route for route in self.routes}
        self._catch_all = self._by_prefix.get("/")

    def match(self, path: str) -> Route | None:
        """``path`` is the raw path without the query: ``%2F`` is not a segment boundary."""
        by_prefix = self._by_prefix
        candidate = path.rstrip("/") if len(path) > 1 else path
        while candidate:
            route = by_prefix.get(candidate)
            if route is not None:
                return route
            cut = candidate.rfind("/")
            if cut <= 0:
                break
            candidate = candidate[:cut]
        return self._catch_all


class LiveTable:
    """The table in force, kept in ``app[route_table_key]``; ``current`` is replaced whole.

    A request resolves its route and its upstream from one table when it enters the chain, so a
    reload affects new requests only; those in flight finish on the table they started with.
    """

    __slots__ = ("current",)

    def __init__(self, table: RouteTable) -> None:
        self.current = table


def has_dot_segment(path: str) -> bool:
    """Whether any server could read ``path`` (raw, without the query) as holding ``.`` or ``..``.

    Dots are looked for after every decoding an upstream might apply, once or repeatedly
    (``%2e``, ``%252e``), between every separator an upstream might honour: a path that passes
    cannot be resolved, by the upstream, to somewhere outside the prefix its route matched.
    """
    if "." not in path and "%" not in path:
        return False
    lowered = path.lower()
    while "%25" in lowered:
        lowered = lowered.replace("%25", "%")
    return any(segment.replace("%2e", ".") in (".", "..") for segment in _SEGMENT_BOUNDARY.split(lowered))


def strip_route_prefix(route: Route, raw_path: str) -> str:
    """The path to send upstream; ``raw_path`` includes the query and is forwarded byte for byte."""
    if not route.strip_prefix or route.prefix == "/":
        return raw_path
    rest = raw_path[len(route.prefix) :]
    return rest if rest.startswith("/") else "/" + rest
