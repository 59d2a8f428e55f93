"""CORS: preflights answered at the door, CORS headers on every answer, errors included.

Why not aiohttp-cors: it attaches its policy to routes and answers preflights from a route
handler. The gateway has one catch-all route (aiohttp-cors refuses ``*`` routes), a preflight
answered by a route handler would first pass authentication and rate limiting (a browser's
preflight never carries a token), and it would swallow plain ``OPTIONS`` requests meant for a
backend. This middleware keeps aiohttp-cors's semantics and sits before those layers.

Policy (fixed): origins from ``CORS_ALLOW_ORIGINS``; with explicit origins credentials are
allowed and ``Vary: Origin`` is sent; with ``*`` every origin is allowed without credentials.
A WebSocket handshake from a browser (it has ``Origin``) whose origin is neither allowed nor the
gateway's own host is refused with a 403: browsers apply no CORS to WebSockets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..errors import ApiError, client_text

__all__ = ["ALLOWED_METHODS", "EXPOSED_HEADERS", "cors_headers_key", "cors_middleware", "set_cors_headers"]

# What a browser script may read from any answer: correlation and rate-limit state above all.
EXPOSED_HEADERS = (
    "X-Request-ID",
    "RateLimit",
    "RateLimit-Policy",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "WWW-Authenticate",
    "traceparent",
)
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PREFLIGHT_MAX_AGE = "600"

cors_headers_key = web.RequestKey("cors_headers", "dict[str, str]")


def cors_middleware(allow_origins: Sequence[str]) -> Any:
    """Answer CORS preflights and mark actual requests from allowed origins for ``set_cors_headers``."""
    any_origin = "*" in allow_origins
    if any_origin and len(allow_origins) > 1:
        raise ValueError("CORS_ALLOW_ORIGINS: '*' cannot be combined with explicit origins")
    origins = frozenset(allow_origins)
    exposed = ", ".join(EXPOSED_HEADERS)
    methods = ", ".join(ALLOWED_METHODS)

    def headers_for(origin: str) -> dict[str, str]:
        if any_origin:
            return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": exposed}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": exposed,
            "Vary": "Origin",
        }

    # Where the origin gets no CORS answer, a backend's own Access-Control-* headers must not
    # give it one either: the gateway's policy is the only one. With explicit origins the answer
    # depends on Origin, so caches are told even when there is none.
    no_cors: dict[str, str] = {} if any_origin else {"Vary": "Origin"}

    @web.middleware
    def cors(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if not origins:
            return handler(request)
        origin = request.headers.get("Origin")
        if origin is None:
            request[cors_headers_key] = no_cors
            return handler(request)
        allowed = any_origin or origin in origins
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allowed:
                request[cors_headers_key] = no_cors
                raise ApiError(403, f"CORS: origin '{client_text(origin)}' is not allowed")
            headers = headers_for(origin)
            del headers["Access-Control-Expose-Headers"]  # meaningless on a preflight
            headers["Access-Control-Allow-Methods"] = methods
            requested = request.headers.get("Access-Control-Request-Headers")
            if requested:
                # The gateway forwards any request header, so it allows what the page asks for.
                headers["Access-Control-Allow-Headers"] = requested
            headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
            if not any_origin:
                headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
            return _answered(web.Response(status=204, headers=headers))
        if allowed:
            request[cors_headers_key] = headers_for(origin)
            return handler(request)
        request[cors_headers_key] = no_cors
        if request.headers.get("Upgrade", "").lower() == "websocket" and not _same_host(origin, request):
            # Browsers apply no CORS to a WebSocket: any page may open one and read what comes
            # back, so the handshake is where the origin is checked (as Spring, gorilla/websocket
            # and Django Channels do). A page served through the gateway itself is same-origin.
            raise ApiError(403, f"CORS: origin '{client_text(origin)}' is not allowed")
        return handler(request)

    return cors


def _same_host(origin: str, request: web.Request) -> bool:
    """Whether ``origin`` names the host the request was sent to (``Host``), scheme aside: behind
    a TLS-terminating balancer the page is ``https`` and the gateway hears ``http``."""
    return origin.partition("://")[2].lower() == request.host.lower()


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


def set_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Part of ``on_response_prepare`` (``gateway.app.stamp_response``): the gateway's CORS answer
    (possibly none) replaces whatever a backend sent, whenever CORS is configured."""
    headers = request.get(cors_headers_key)
    if headers is None:
        return
    out = response.headers
    for name in [n for n in out if n.lower().startswith("access-control-")]:
        del out[name]
    for name, value in headers.items():
        if name == "Vary":
            # A backend may send Vary on several lines: each one counts (RFC 9110 section 5.3).
            vary = out.getall("Vary", ())
            if not vary:
                out["Vary"] = value
            elif not _varies_on_origin(vary):
                out["Vary"] = ", ".join((*vary, value))
        else:
            out[name] = value


def _varies_on_origin(vary: Sequence[str]) -> bool:
    return any(token.strip().lower() in ("origin", "*") for line in vary for token in line.split(","))
