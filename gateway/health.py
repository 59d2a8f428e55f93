"""The gateway's own endpoints for probes: liveness, readiness and the aggregated view."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from .keys import http_client_key, lifecycle_key, upstreams_key
from .middleware.tracing import inject_trace_headers
from .upstream import Target, Upstream

__all__ = ["CHECK_TIMEOUT", "setup_health_routes"]

CHECK_TIMEOUT = 1.5  # per component; the whole answer stays within ~2 s


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


async def ready(request: web.Request) -> web.Response:
    lifecycle = request.app[lifecycle_key]
    if lifecycle.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not lifecycle.ready:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready"})


async def _check_target(session: aiohttp.ClientSession, upstream: Upstream, target: Target) -> dict[str, Any]:
    started = time.perf_counter()
    url = target.url + upstream.service.health_path
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            async with session.get(url, allow_redirects=False, headers=inject_trace_headers()) as response:
                await response.read()
                status = response.status
    except TimeoutError:
        return _component("unhealthy", started, f"timed out after {CHECK_TIMEOUT:g}s")
    except aiohttp.ClientError as exc:
        return _component("unhealthy", started, _describe(exc))
    if status >= 500:
        return _component("unhealthy", started, f"health check returned HTTP {status}")
    return _component("healthy", started)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def _component(status: str, started: float, error: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": status, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
    if error:
        entry["error"] = error
    return entry


async def _check_service(session: aiohttp.ClientSession, upstream: Upstream) -> dict[str, Any]:
    results = await asyncio.gather(*(_check_target(session, upstream, t) for t in upstream.targets))
    if len(results) == 1:
        return results[0]
    healthy = [r for r in results if r["status"] == "healthy"]
    entry: dict[str, Any] = {
        "status": "healthy" if healthy else "unhealthy",
        "latency_ms": min((r["latency_ms"] for r in healthy), default=max(r["latency_ms"] for r in results)),
        "targets": {t.url: r for t, r in zip(upstream.targets, results, strict=True)},
    }
    if not healthy:
        entry["error"] = "no target is healthy"
    return entry


async def detailed(request: web.Request) -> web.Response:
    session = request.app[http_client_key]
    upstreams = request.app[upstreams_key]
    names = list(upstreams)
    results = await asyncio.gather(*(_check_service(session, upstreams[n]) for n in names))
    components = dict(zip(names, results, strict=True))
    overall = "healthy" if all(c["status"] == "healthy" for c in components.values()) else "degraded"
    return web.json_response(
        {
            "status": overall,
            "components": components,
            "uptime_seconds": int(request.app[lifecycle_key].uptime),
        }
    )


def setup_health_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/health/detailed", detailed)
