"""The application factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from aiohttp import web

from .errors import error_middleware
from .headers import drop_server_banner, keep_header_bytes
from .health import setup_health_routes
from .httpserver import expect_continue
from .keys import lifecycle_key, limiter_key, route_table_key, settings_key, tracing_key
from .limiter import Limiter, create_limiter
from .logs import lines_dropped
from .metrics import Metrics, metrics_handler, metrics_key, metrics_middleware
from .middleware.auth import TokenVerifier, auth_middleware
from .middleware.cors import cors_middleware, set_cors_headers
from .middleware.ratelimit import ratelimit_middleware, set_ratelimit_headers
from .middleware.request_id import set_request_id_header
from .middleware.tracing import Tracing, tracing_ctx, tracing_middleware
from .middleware.validation import body_checks_middleware, schema_validation_middleware
from .openapi import build_openapi
from .proxy import (
    close_when_the_connection_cannot_go_on,
    http_client_ctx,
    proxy_handler,
    routing_middleware,
    upstream_pools_ctx,
)
from .routing import CatchAll, LiveTable, RouteTable
from .settings import Settings
from .state import Lifecycle, close_while_draining
from .upstream import Upstream

__all__ = ["create_app"]

log = logging.getLogger("gateway")


def create_app(settings: Settings) -> web.Application:
    keep_header_bytes()
    tracing = Tracing(
        service_name="gateway",
        zipkin_url=settings.zipkin_url,
        sample_rate=settings.trace_sample_rate,
        trusted_proxies=settings.trusted_proxies,
    )
    limiter = create_limiter(settings.redis_url)
    verifier = TokenVerifier(settings.auth) if settings.auth.enabled else None
    metrics = Metrics()
    # Outer to inner, and why each sits where it does:
    #   tracing      first: every answer, even an error from a later layer, has a span and a
    #                request id, and the span's duration is the whole request;
    #   metrics      counts and times every request in one place, outside the error layer so it
    #                sees the final status (errors.py counts the gateway's own rejections);
    #   errors       renders ApiError and anything unexpected in the contract's JSON envelope;
    #   cors         a preflight is answered here, before routing, limits and authentication (a
    #                browser never sends a token with one), and every answer gets CORS headers;
    #   routing      resolves the route once; every later layer reads request[route_key];
    #   body checks  a declared size over the route's limit (413) or a body type the route does
    #                not take (415) is refused before anything is read or verified;
    #   ratelimit/ip anonymous requests, and requests whose token turns out bad, are charged to
    #                the client address before any work is done for them, so floods of bad
    #                tokens are limited too;
    #   auth         verifies the bearer token against the route's mode and scopes;
    #   ratelimit/sub  a verified subject is limited as itself, wherever it comes from;
    #   schema       only now, for admitted requests, is a body with a schema read and checked.
    # The proxy counts streamed bodies against the same limit as they pass.
    middlewares = [
        tracing_middleware(tracing),
        metrics_middleware(metrics, proxy=proxy_handler),
        error_middleware,
        cors_middleware(settings.cors_allow_origins),
        routing_middleware(proxy=proxy_handler),
        body_checks_middleware(),
        ratelimit_middleware(
            limiter=limiter,
            default=settings.rate_limit_default,
            stage="ip",
            trusted_proxies=settings.trusted_proxies,
            auth_enabled=settings.auth.enabled,
            known_token=verifier.knows if verifier is not None else None,
        ),
        auth_middleware(settings.auth, verifier=verifier),
        ratelimit_middleware(limiter=limiter, default=settings.rate_limit_default, stage="subject"),
        schema_validation_middleware(),
    ]
    # client_max_size only limits request.read(); the proxy streams, and reads whole bodies only
    # when they are declared small. auto_decompress is off because a proxy relays a body as the
    # bytes it was sent: aiohttp's server would otherwise inflate a Content-Encoding: gzip body and
    # the upstream would get the plain bytes still labelled gzip (and the limits would count the
    # inflated size). Set on the app, not the runner, so that no way of serving it can forget it.
    app = web.Application(
        middlewares=middlewares, client_max_size=1024**2, handler_args={"auto_decompress": False}
    )
    app[settings_key] = settings
    upstreams = {name: Upstream(service) for name, service in settings.services.items()}
    app[route_table_key] = LiveTable(RouteTable(settings.routes, upstreams))
    app[metrics_key] = metrics
    app[lifecycle_key] = Lifecycle()
    app[tracing_key] = tracing
    app[limiter_key] = limiter
    reporter = tracing.reporter
    if reporter is not None:
        metrics.spans_dropped = lambda: reporter.dropped
    metrics.log_lines_dropped = lines_dropped
    metrics.fallback_active = lambda: bool(getattr(limiter, "fallback_active", False))
    metrics.fallbacks = lambda: int(getattr(limiter, "fallbacks", 0))
    jwks = verifier.jwks if verifier is not None else None
    if jwks is not None:
        metrics.jwks_fetch_errors = lambda: jwks.fetch_errors
    app.cleanup_ctx.append(http_client_ctx)
    app.cleanup_ctx.append(upstream_pools_ctx)
    app.cleanup_ctx.append(partial(tracing_ctx, tracing=tracing))
    app.cleanup_ctx.append(partial(_close_on_cleanup, limiter=limiter, verifier=verifier))
    app.on_response_prepare.append(stamp_response)
    app.on_startup.append(_mark_ready)
    app.on_shutdown.append(_mark_draining)

    setup_health_routes(app)
    app.router.add_get("/metrics", metrics_handler, expect_handler=expect_continue)
    app.router.add_get("/openapi.json", openapi_document, expect_handler=expect_continue)
    catch_all = CatchAll()
    app.router.register_resource(catch_all)
    catch_all.add_route("*", proxy_handler, expect_handler=expect_continue)
    return app


async def stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``, so streamed and error responses get them too: the request id, the
    CORS answer, the rate-limit headers, closing after a declined upgrade or a chunked body or
    while draining, and no ``Server`` banner. One hook calling plain functions: a coroutine per
    stamp per response is measurable on the proxy's hot path."""
    set_request_id_header(request, response)
    set_cors_headers(request, response)
    set_ratelimit_headers(request, response)
    close_when_the_connection_cannot_go_on(request, response)
    close_while_draining(request, response)
    drop_server_banner(response)


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(_openapi())


@functools.cache
def _openapi() -> dict[str, Any]:
    return build_openapi()


async def _close_on_cleanup(
    app: web.Application, *, limiter: Limiter, verifier: TokenVerifier | None
) -> AsyncIterator[None]:
    yield
    await limiter.close()
    if verifier is not None:
        await verifier.close()


async def _mark_ready(app: web.Application) -> None:
    app[lifecycle_key].ready = True


async def _mark_draining(app: web.Application) -> None:
    lifecycle = app[lifecycle_key]
    lifecycle.draining = True
    # A WebSocket lives until one side closes it: without a close frame now, both its ends would
    # see the connection drop when the drain bound runs out. 1001 is "going away". Only the frames
    # are sent here; the replies are read by each session's handler, which the drain bound limits.
    await asyncio.gather(
        *(session.go_away("gateway shutting down") for session in list(lifecycle.websockets)),
        return_exceptions=True,
    )
