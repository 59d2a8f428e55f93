"""The route table: longest prefix wins, and a prefix only matches at a ``/`` boundary."""

from __future__ import annotations

from collections.abc import Iterable

from .settings import Route

__all__ = ["RouteTable", "strip_route_prefix"]


class RouteTable:
    """Maps a request path to its route with one dict lookup per path segment."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
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


def strip_route_prefix(route: Route, raw_path: str) -> str:
    """The path to send upstream; ``raw_path`` includes the query and is forwarded byte for byte."""
    if not route.strip_prefix or route.prefix == "/":
        return raw_path
    rest = raw_path[len(route.prefix) :]
    return rest if rest.startswith("/") else "/" + rest
