"""The route table: longest prefix wins, and a prefix only matches at a ``/`` boundary."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from .settings import Route

if TYPE_CHECKING:
    from .upstream import Upstream

__all__ = [
    "CatchAll",
    "LiveTable",
    "RouteTable",
    "fold_case",
    "has_dot_segment",
    "has_encoded_control",
    "lenient_reading",
    "may_read_otherwise",
    "resolve_catch_all_directly",
    "shown_path",
    "shown_target",
    "strip_route_prefix",
]

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


class _SharedMatch(UrlMappingMatchInfo):
    """The catch-all's match, made once: it holds no per-request values (no path variables), so
    every proxied request can carry the same one. aiohttp adds the app to a match and freezes it
    on every request; this one was given its app and frozen when it was made."""

    __slots__ = ()

    def add_app(self, app: web.Application) -> None:
        pass

    def freeze(self) -> None:
        pass


class _GatewayRouter(web.UrlDispatcher):
    """aiohttp's router, with the answer for every path that is not one of the gateway's own
    endpoints known in advance: the catch-all's.

    aiohttp walks the path's parents through its index and builds a new match for each request
    (1.6% of a proxied GET's instructions, measured). The gateway's own endpoints are plain paths, so
    a path that is none of them, and has no percent-encoding that could decode to one, is the
    catch-all's, as aiohttp's walk would find. Anything else takes that walk.
    """

    _own: frozenset[str]
    _catch_all_match: _SharedMatch

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:  # type: ignore[override]
        path = request.raw_path.partition("?")[0]
        if path in self._own or "%" in path:
            return await super().resolve(request)
        return self._catch_all_match


def resolve_catch_all_directly(app: web.Application) -> None:
    """Give ``app``'s router :class:`_GatewayRouter`'s shortcut, when its shape allows it: one
    app (no sub-applications or domains), plain resources besides one :class:`CatchAll`. Called
    once the app is frozen, so the resources are final."""
    router = app.router
    if app._subapps or router._matched_sub_app_resources or type(router) is not web.UrlDispatcher:
        return
    catch_alls = [r for r in router.resources() if isinstance(r, CatchAll)]
    others = [r for r in router.resources() if not isinstance(r, CatchAll)]
    if len(catch_alls) != 1 or not all(isinstance(r, web.PlainResource) for r in others):
        return
    (route,) = catch_alls[0]
    if route.method != "*":
        return
    match = _SharedMatch({}, route)
    UrlMappingMatchInfo.add_app(match, app)
    UrlMappingMatchInfo.freeze(match)
    router.__class__ = _GatewayRouter  # same object and resources; only resolve differs
    router._own = frozenset(r.canonical for r in others)  # type: ignore[attr-defined]
    router._catch_all_match = match  # type: ignore[attr-defined]


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
        # As a server that ignores case reads the prefixes; of two that differ only in case, the
        # first listed.
        self._by_folded: dict[str, Route] = {}
        for route in self.routes:
            self._by_folded.setdefault(fold_case(route.prefix), route)

    def match(self, path: str) -> Route | None:
        """``path`` is the raw path without the query: ``%2F`` is not a segment boundary."""
        return self._match(path, self._by_prefix)

    def _match(self, path: str, by_prefix: Mapping[str, Route]) -> Route | None:
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

    def same_for_every_reading(self, path: str, route: Route | None) -> bool:
        """Whether every way a server might read ``path`` leads to ``route`` too (to be asked
        where ``may_read_otherwise(path)``: otherwise there is one reading).

        The table matches the raw path, which is forwarded as sent; but an upstream may decode
        ``%61`` as ``a`` (RFC 3986 says it must), ``%2F`` as ``/``, merge ``//``, drop
        ``;params``, or ignore case (Express and ASP.NET Core route ``/A/ADMIN`` to ``/a/admin``'s
        handler). Were one such reading to match a route of its own, a client could reach the
        resources behind that route (with its stricter auth or scopes) under the other route's
        policy. Such paths are refused: no client has a reason to spell a path two routes can claim.
        """
        folded = self._by_folded
        return all(
            self.match(reading) is route and self._match(fold_case(reading), folded) is route
            for reading in _readings(path)
        )


class LiveTable:
    """The table in force, kept in ``app[route_table_key]``; ``current`` is replaced whole.

    A request resolves its route and its upstream from one table when it enters the chain, so a
    reload affects new requests only; those in flight finish on the table they started with.
    """

    __slots__ = ("current", "reloading")

    def __init__(self, table: RouteTable) -> None:
        self.current = table
        # Held by a reload from reading the file to installing it: two SIGHUPs in quick
        # succession would otherwise race, and the older file's table could be installed last.
        self.reloading = asyncio.Lock()


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
    # Windows drops the spaces after a segment: ".. " (..%20) is its "..".
    return any(
        segment.replace("%2e", ".").replace("%20", " ").rstrip(" ") in (".", "..")
        for segment in _SEGMENT_BOUNDARY.split(lowered)
    )


# A control character, percent-encoded once or more (%0a, %250A). Starlette, and so FastAPI, match
# routes with re.match and "$", which matches before a final newline too: /a/admin%0a is their
# /a/admin, where the route table reads a segment "admin%0a". C code ends a path at NUL. No client
# has a reason to send either, and the raw characters never get past the HTTP parser.
has_encoded_control = re.compile(r"%(?:25)*(?:[01][0-9a-f]|7f)", re.IGNORECASE).search

# Whether some server could read a path (raw, without the query) as another path: a match or
# None. Escapes, "//", ";" and "\\" (see ``lenient_reading``); letters in upper case or outside
# ASCII (servers that ignore case, ``fold_case``); a segment ending in "." (Windows drops it).
# A bound C method, as the proxy asks it of every request.
may_read_otherwise = re.compile(r"%|//|;|\\|[A-Z]|[^\x00-\x7f]|\.(?:/|$)").search
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_LENIENT_SEPARATOR = re.compile(r"[/\\]")


def _readings(path: str) -> tuple[str, str]:
    """The path as a strict server reads it (unreserved characters decoded, as RFC 3986 §6.2.2.2
    makes them equivalent) and as the most lenient one does (``lenient_reading``)."""
    strict = _ESCAPE.sub(lambda m: c if (c := chr(int(m[1], 16))) in _UNRESERVED else m[0], path)
    return strict, lenient_reading(path)


def lenient_reading(path: str) -> str:
    """``path`` as the most lenient server reads it: every escape decoded (repeatedly, for double
    decoders; IIS's ``%u0061`` too), ``\\`` a separator, ``;params`` dropped, spaces around a
    segment and dots after it dropped (Windows, and Spring's ``trimTokens``), empty segments
    merged."""
    while "%25" in path.lower():
        path = re.sub("%25", "%", path, flags=re.IGNORECASE)
    if "%u" in path or "%U" in path:
        path = _IIS_ESCAPE.sub(lambda m: chr(int(m[1], 16)), path)
    segments = (
        segment.partition(";")[0].strip(" ").rstrip(". ")
        for segment in _LENIENT_SEPARATOR.split(unquote(path, errors="replace"))
    )
    return "/" + "/".join(segment for segment in segments if segment)


_IIS_ESCAPE = re.compile(r"%u([0-9A-Fa-f]{4})")


def fold_case(path: str) -> str:
    """``path`` as a server that ignores case compares it. Upper then lower: ASP.NET Core compares
    ``ToUpperInvariant``, which makes the dotless i (U+0131) an ``I`` and the long s (U+017F) an
    ``S``."""
    return path.upper().lower()


# The user and password of a URL inside a path, as gateway.logs hides them in any line.
_USERINFO = re.compile(r"(?<=://)[^/@\s\"]*@")


def shown_path(request: web.BaseRequest) -> str:
    """The request's path as the access log and the SERVER span's ``http.path`` show it: as sent,
    not decoded (these are the bytes the table matched; ``%2F`` is not ``/``), without the query
    (it may carry tokens), and a URL in it without its user and password
    (``/fetch/http://u:p@host/x``)."""
    return shown_target(request.raw_path)


def shown_target(target: str) -> str:
    """A request target (path and query) as :func:`shown_path` shows it."""
    path = target.partition("?")[0]
    return _USERINFO.sub("***@", path) if "@" in path else path


def strip_route_prefix(route: Route, raw_path: str) -> str:
    """The path to send upstream; ``raw_path`` includes the query and is forwarded byte for byte."""
    if not route.strip_prefix or route.prefix == "/":
        return raw_path
    rest = raw_path[len(route.prefix) :]
    return rest if rest.startswith("/") else "/" + rest
