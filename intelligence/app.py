"""The chat API application: ``create_app(settings)`` builds it, the resources live in cleanup_ctx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from gateway.errors import error_middleware
from gateway.headers import drop_server_banner
from gateway.keys import tracing_key
from gateway.middleware.request_id import set_request_id_header
from gateway.middleware.tracing import Tracing, tracing_ctx, tracing_middleware

from .api import domain_errors_middleware, setup_api_routes
from .cache import ChatCache, redis_client
from .health import setup_health_routes
from .keys import cache_key, pool_key, service_key, settings_key
from .persistence import ChatPersistenceService, create_pool
from .schema import check_migrations, load_migrations
from .settings import IntelligenceSettings

__all__ = ["create_app"]


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    """The pool; the app refuses to start while migrations are pending (or PostgreSQL is down)."""
    settings = app[settings_key]
    migrations = load_migrations(settings.migrations_dir)
    pool = await create_pool(settings.postgres)
    try:
        await check_migrations(pool, migrations, dsn=settings.postgres.dsn)
        app[pool_key] = pool
        yield
    finally:
        pool.close()
        await pool.wait_closed()


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key].cache
    async with redis_client(settings) as client:
        app[cache_key] = cache = ChatCache(client, settings)
        try:
            yield
        finally:
            await cache.aclose()


async def service_ctx(app: web.Application) -> AsyncIterator[None]:
    service = app[service_key] = ChatPersistenceService(
        app[pool_key], app[cache_key], tracing=app[tracing_key]
    )
    yield
    # Writes whose callers the drain cut off are still running (they run to their end): they get
    # no longer than the drain did, or the pool's close would wait for them (up to the statement
    # timeout). The next process to start retires the cache generation, so none is left stale.
    await service.abandon_writes()


async def _stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``, one hook as in the gateway: the request id, and no ``Server``
    banner (aiohttp's ``Python/3.x aiohttp/3.y`` would reach the gateway's clients through it,
    naming the versions to look up, as the gateway's own answers do not)."""
    set_request_id_header(request, response)
    drop_server_banner(response)


def create_app(settings: IntelligenceSettings) -> web.Application:
    tracing = Tracing(
        service_name="intelligence-engine",
        zipkin_url=settings.zipkin_url,
        sample_rate=settings.trace_sample_rate,
    )
    # Outer to inner: tracing joins the gateway's trace (and gives every answer a request id);
    # error_middleware renders every ApiError (and hides unexpected ones behind a 500);
    # domain_errors_middleware turns the persistence layer's errors into ApiErrors.
    app = web.Application(
        middlewares=[tracing_middleware(tracing), error_middleware, domain_errors_middleware]
    )
    app[settings_key] = settings
    app[tracing_key] = tracing
    app.on_response_prepare.append(_stamp_response)
    app.cleanup_ctx.append(partial(tracing_ctx, tracing=tracing))
    app.cleanup_ctx.extend([postgres_ctx, cache_ctx, service_ctx])
    setup_health_routes(app)
    setup_api_routes(app)
    return app
