"""The application factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

from functools import partial

from aiohttp import web

from .errors import error_middleware
from .health import setup_health_routes
from .keys import lifecycle_key, route_table_key, settings_key, tracing_key, upstreams_key
from .middleware.request_id import stamp_request_id
from .middleware.tracing import Tracing, tracing_ctx, tracing_middleware
from .proxy import http_client_ctx, proxy_handler, routing_middleware
from .routing import RouteTable
from .settings import Settings
from .state import Lifecycle
from .upstream import Upstream

__all__ = ["create_app"]


def create_app(settings: Settings) -> web.Application:
    tracing = Tracing(
        service_name="gateway", zipkin_url=settings.zipkin_url, sample_rate=settings.trace_sample_rate
    )
    # Outer to inner. Why each sits where it does:
    #   tracing     first, so that every answer, even an error from a later layer, has a span and
    #               a request id, and the span's duration is the whole request;
    #   errors      renders ApiError and anything unexpected in the contract's JSON envelope;
    #   routing     resolves the route once; every later layer reads request[route_key].
    middlewares = [
        tracing_middleware(tracing),
        error_middleware,
        routing_middleware(proxy=proxy_handler),
    ]
    # client_max_size only limits request.read(); the proxy streams, and reads whole bodies only
    # when they are declared small.
    app = web.Application(middlewares=middlewares, client_max_size=1024**2)
    app[settings_key] = settings
    app[route_table_key] = RouteTable(settings.routes)
    app[upstreams_key] = {name: Upstream(service) for name, service in settings.services.items()}
    app[lifecycle_key] = Lifecycle()
    app[tracing_key] = tracing
    app.cleanup_ctx.append(http_client_ctx)
    app.cleanup_ctx.append(partial(tracing_ctx, tracing=tracing))
    app.on_response_prepare.append(stamp_request_id)
    app.on_startup.append(_mark_ready)
    app.on_shutdown.append(_mark_draining)

    setup_health_routes(app)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


async def _mark_ready(app: web.Application) -> None:
    app[lifecycle_key].ready = True


async def _mark_draining(app: web.Application) -> None:
    app[lifecycle_key].draining = True
