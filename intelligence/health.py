"""``GET /health`` (liveness, touches nothing) and ``GET /health/db`` (a ``SELECT 1``)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from .keys import service_key, settings_key
from .models import DatabaseUnavailable

__all__ = ["setup_health_routes"]


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy", "latency_ms": 0.0})


async def health_db(request: web.Request) -> web.Response:
    timeout = request.app[settings_key].postgres.health_timeout
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await request.app[service_key].ping()
    except (DatabaseUnavailable, TimeoutError) as exc:
        error = str(exc) if isinstance(exc, DatabaseUnavailable) else f"no answer within {timeout:g} s"
        return web.json_response(
            {"status": "unhealthy", "latency_ms": _ms(started), "error": error}, status=503
        )
    return web.json_response({"status": "healthy", "latency_ms": _ms(started)})


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def setup_health_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/health/db", health_db)
