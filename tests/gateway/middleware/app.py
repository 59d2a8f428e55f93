"""A tiny gateway: the real error, routing, rate-limit and auth middlewares around an echo handler."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from aiohttp import web

from gateway.clientip import IPNetwork
from gateway.errors import error_middleware
from gateway.keys import auth_key, client_ip_key, route_table_key
from gateway.limiter import Limiter, MemoryLimiter
from gateway.middleware.auth import TokenVerifier, auth_middleware, identity_headers
from gateway.middleware.ratelimit import ratelimit_middleware, stamp_ratelimit_headers
from gateway.proxy import routing_middleware
from gateway.routing import LiveTable, RouteTable
from gateway.settings import AuthSettings, RateLimit, Route

ROUTES = (
    Route(prefix="/api/required", service="s"),
    Route(prefix="/api/optional", service="s", auth="optional"),
    Route(prefix="/api/open", service="s", auth="none"),
    Route(prefix="/api/scoped", service="s", scopes=("clusters:read", "clusters:write")),
    Route(prefix="/api/limited", service="s", auth="none", rate_limit=RateLimit(3, 10.0)),
)

DEFAULT_LIMIT = RateLimit(1000, 60.0)


async def echo(request: web.Request) -> web.StreamResponse:
    identity = request.get(auth_key)
    body = {
        "subject": identity.subject if identity else None,
        "scopes": sorted(identity.scopes) if identity else None,
        "upstream": identity_headers(request),
        "client_ip": request.get(client_ip_key),
    }
    if request.path.endswith("/stream"):
        response = web.StreamResponse()
        await response.prepare(request)  # headers leave now: only on_response_prepare reaches them
        await response.write(b"chunk")
        await response.write_eof()
        return response
    return web.json_response(body)


def make_app(
    *,
    auth: AuthSettings | None = None,
    verifier: TokenVerifier | None = None,
    limiter: Limiter | None = None,
    default: RateLimit = DEFAULT_LIMIT,
    trusted: Sequence[IPNetwork] = (),
    routes: Sequence[Route] = ROUTES,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    auth = auth or AuthSettings(enabled=False)
    limiter = MemoryLimiter() if limiter is None else limiter
    app = web.Application(
        middlewares=[
            error_middleware,
            routing_middleware(proxy=echo),
            ratelimit_middleware(
                limiter=limiter,
                default=default,
                stage="ip",
                trusted_proxies=trusted,
                auth_enabled=auth.enabled,
                clock=clock,
            ),
            auth_middleware(auth, verifier=verifier),
            ratelimit_middleware(limiter=limiter, default=default, stage="subject"),
        ]
    )
    app[route_table_key] = LiveTable(RouteTable(routes))
    app.on_response_prepare.append(stamp_ratelimit_headers)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
