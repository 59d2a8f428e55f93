"""The gateway's own endpoints for probes: liveness, readiness and the aggregated view.

``/health/detailed`` checks every backend (each target of each), Redis (PING) and PostgreSQL
(through the intelligence engine's ``/health/db``, on each of its targets: one healthy answer will
do, since one engine replica down says nothing about the database) concurrently, each under its own timeout, so
the answer comes within ~2 s even when something hangs; a check never raises. Callers arriving
together share one round of probes (single flight), and an answer is reused for
``CACHE_SECONDS``: a burst of a thousand callers costs one probe per component. ``age_seconds``
says how old the answer is.

Status code: 200 for ``healthy`` and ``degraded`` alike. A load balancer or Kubernetes probe
pointed here must not take the gateway out of rotation because one backend is down (that would
turn a partial outage into a total one); ``/health/ready`` is the endpoint for that. Clients that
ask for ``application/health+json`` (IETF draft-inadarei-api-health-check) get that format.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from .httpserver import expect_continue
from .keys import http_client_key, lifecycle_key, limiter_key, route_table_key, settings_key
from .metrics import metrics_key
from .middleware.tracing import inject_trace_headers
from .pool import tls_reason
from .redisrefusal import describe, refusal_fix, user_of
from .upstream import Target, Upstream

__all__ = ["CACHE_SECONDS", "CHECK_TIMEOUT", "HealthChecker", "health_checker_key", "setup_health_routes"]

CHECK_TIMEOUT = 1.5  # per component; the whole answer stays within ~2 s
CACHE_SECONDS = 1.0
# The most of a health answer's body that is read: a health check answers in a few bytes, and a
# health_path that streams (or serves a large file) must neither fill memory nor keep the check
# reading until it times out after the status already said it all.
MAX_HEALTH_BODY = 64 * 1024
POSTGRES_VIA = "intelligence-engine"
HEALTH_JSON = "application/health+json"

Component = dict[str, Any]


def _component(status: str, started: float, error: str | None = None) -> Component:
    entry: Component = {"status": status, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
    if error:
        entry["error"] = error
    return entry


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake failed: {tls_reason(exc)}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


async def _read_at_most(response: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None once it runs past ``MAX_HEALTH_BODY`` (the rest is left unread, and the
    connection is closed rather than reused)."""
    body = bytearray()
    while chunk := await response.content.readany():
        body += chunk
        if len(body) > MAX_HEALTH_BODY:
            return None
    return bytes(body)


async def _timed(check: Callable[[], Awaitable[Component | None]]) -> Component:
    """Run one check under the timeout; whatever happens, come back with a component entry."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            result = await check()
    except TimeoutError:
        return _component("unhealthy", started, f"timed out after {CHECK_TIMEOUT:g}s")
    except Exception as exc:  # a check must never take the endpoint down
        return _component("unhealthy", started, _describe(exc))
    entry = _component("healthy", started)
    if result:
        entry.update(result)
    return entry


# Components probed whatever the route table says, after the services.
_BUILT_IN = ("redis", "postgresql")


class HealthChecker:
    def __init__(self, app: web.Application, *, redis: aioredis.Redis | None) -> None:
        self._app = app
        self._redis = redis
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._inflight: asyncio.Future[dict[str, Any]] | None = None
        # Each component's status in the latest report, for gateway_component_up: kept when the
        # cached report is invalidated (a reload), which must not make the gauge disappear.
        self._last: dict[str, str] = {}

    async def report(self) -> tuple[dict[str, Any], float]:
        """The latest report and its age in seconds; at most one round of probes at a time."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < CACHE_SECONDS:
            return self._cached[1], now - self._cached[0]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._probe())
            self._inflight.add_done_callback(self._done)
        report = await asyncio.shield(self._inflight)
        return report, 0.0

    def last_statuses(self) -> dict[str, str]:
        """Each component's status in the latest report (empty before the first)."""
        return self._last

    def invalidate(self) -> None:
        """Forget the cached report (the set of components changed): the next one probes again.

        The last known statuses stay for the components still configured, so that a reload does
        not make ``gateway_component_up`` vanish (resolving an alert on a backend still down)
        until someone asks ``/health/detailed``; services the reload removed are dropped.
        """
        self._cached = None
        services = self._app[route_table_key].current.upstreams
        self._last = {
            name: status for name, status in self._last.items() if name in services or name in _BUILT_IN
        }

    def _done(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self._inflight = None
        if not future.cancelled() and future.exception() is None:
            report = future.result()
            self._cached = (time.monotonic(), report)
            self._last = {name: entry["status"] for name, entry in report.items()}

    async def _probe(self) -> dict[str, Any]:
        upstreams = self._app[route_table_key].current.upstreams
        names = list(upstreams)
        checks = [self._check_service(upstreams[name]) for name in names]
        checks.append(self._check_redis())
        checks.append(self._check_postgres(upstreams.get(POSTGRES_VIA)))
        results = await asyncio.gather(*checks)
        return dict(zip([*names, *_BUILT_IN], results, strict=True))

    async def _get(self, target: Target, path: str) -> int:
        session = self._app[http_client_key]
        async with session.get(
            target.url + path,
            ssl=target.pool.ssl or True,
            allow_redirects=False,
            headers=inject_trace_headers(),
        ) as response:
            await _read_at_most(response)  # read to its end, when short, so the connection is kept
            return response.status

    async def _check_target(self, upstream: Upstream, target: Target) -> Component:
        async def check() -> None:
            status = await self._get(target, upstream.service.health_path)
            if status >= 500:
                raise RuntimeError(f"health check returned HTTP {status}")

        entry = await _timed(check)
        if not upstream.healthy(target):
            entry["ejected"] = True  # passive health took it out of the rotation for now
        return entry

    async def _check_service(self, upstream: Upstream) -> Component:
        results = await asyncio.gather(*(self._check_target(upstream, t) for t in upstream.targets))
        if len(results) == 1:
            return results[0]
        healthy = [r for r in results if r["status"] == "healthy"]
        entry: Component = {
            "status": "healthy" if healthy else "unhealthy",
            "latency_ms": min(
                (r["latency_ms"] for r in healthy), default=max(r["latency_ms"] for r in results)
            ),
            "targets": {t.url: r for t, r in zip(upstream.targets, results, strict=True)},
        }
        if not healthy:
            entry["error"] = "no target is healthy"
        return entry

    async def _check_redis(self) -> Component:
        redis = self._redis
        if redis is None:
            return {
                "status": "disabled",
                "latency_ms": 0.0,
                "note": "REDIS_URL is not set: in-process limits",
            }

        async def check() -> Component:
            try:
                await redis.ping()
            except RedisError as exc:
                fix = refusal_fix(exc, user_of(redis))
                if fix is None:
                    raise
                return {"status": "unhealthy", "error": describe(exc), "fix": fix}
            return {}

        entry = await _timed(check)
        entry.update(self._fallback_state())
        refusal = getattr(self._app.get(limiter_key), "refusal", None)
        if refusal is not None and entry["status"] == "healthy":
            # PING passes for a user whose ACL refuses the rate-limit script: Redis answers, and
            # the gateway cannot use it.
            entry.update(status="unhealthy", error=f"rate limits: {refusal[0]}", fix=refusal[1])
        return entry

    def _fallback_state(self) -> Component:
        limiter = self._app.get(limiter_key)
        return {"rate_limit_fallback": bool(getattr(limiter, "fallback_active", False))}

    async def _check_postgres(self, upstream: Upstream | None) -> Component:
        if upstream is None:
            return {
                "status": "unhealthy",
                "latency_ms": 0.0,
                "error": f"no {POSTGRES_VIA} service configured",
            }
        # PostgreSQL is one database behind every replica of the engine: one replica that is down
        # says nothing about it. Each is asked at once; a healthy answer from any of them decides,
        # and otherwise the first replica that did answer (say, 503: the database is down) speaks
        # for it, before one that could not be reached at all.
        results = await asyncio.gather(*(self._check_postgres_via(t) for t in upstream.targets))
        healthy = [entry for entry, _ in results if entry["status"] == "healthy"]
        if healthy:
            return min(healthy, key=lambda entry: entry["latency_ms"])
        answered = [entry for entry, reached in results if reached]
        return answered[0] if answered else results[0][0]

    async def _check_postgres_via(self, target: Target) -> tuple[Component, bool]:
        """The check through one replica of the engine, and whether that replica answered."""
        reached = False

        async def check() -> Component | None:
            nonlocal reached
            session = self._app[http_client_key]
            url = target.url + "/health/db"
            async with session.get(
                url, ssl=target.pool.ssl or True, allow_redirects=False, headers=inject_trace_headers()
            ) as response:
                reached = True
                if response.status >= 300:
                    raise RuntimeError(f"{POSTGRES_VIA} /health/db returned HTTP {response.status}")
                raw = await _read_at_most(response)
            if raw is None:
                raise RuntimeError(f"{POSTGRES_VIA} /health/db answered more than {MAX_HEALTH_BODY} bytes")
            try:
                body = json.loads(raw)
            except ValueError:  # UnicodeDecodeError included
                raise RuntimeError(f"{POSTGRES_VIA} /health/db answered something other than JSON") from None
            if isinstance(body, dict) and isinstance(body.get("latency_ms"), int | float):
                return {"database_latency_ms": body["latency_ms"]}
            return None

        entry = await _timed(check)
        return entry, reached


health_checker_key = web.AppKey("health_checker", HealthChecker)


async def health_ctx(app: web.Application) -> AsyncIterator[None]:
    url = app[settings_key].redis_url
    redis = (
        aioredis.Redis.from_url(
            url, socket_timeout=CHECK_TIMEOUT, socket_connect_timeout=CHECK_TIMEOUT, retry=None
        )
        if url
        else None
    )
    checker = app[health_checker_key] = HealthChecker(app, redis=redis)
    if metrics_key in app:
        app[metrics_key].components = checker.last_statuses
    try:
        yield
    finally:
        if redis is not None:
            await redis.aclose()


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


async def ready(request: web.Request) -> web.Response:
    lifecycle = request.app[lifecycle_key]
    if lifecycle.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not lifecycle.ready:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready"})


async def detailed(request: web.Request) -> web.Response:
    components, age = await request.app[health_checker_key].report()
    bad = [c for c in components.values() if c["status"] == "unhealthy"]
    overall = "degraded" if bad else "healthy"
    uptime = int(request.app[lifecycle_key].uptime)
    if HEALTH_JSON in request.headers.get("Accept", ""):
        return web.json_response(_health_json(overall, components, uptime), content_type=HEALTH_JSON)
    return web.json_response(
        {"status": overall, "components": components, "uptime_seconds": uptime, "age_seconds": round(age, 3)}
    )


def _health_json(overall: str, components: dict[str, Any], uptime: int) -> dict[str, Any]:
    status = {"healthy": "pass", "degraded": "warn", "unhealthy": "fail", "disabled": "pass"}
    checks: dict[str, list[dict[str, Any]]] = {}
    for name, entry in components.items():
        check = {
            "componentType": "datastore" if name in ("redis", "postgresql") else "component",
            "observedValue": entry.get("latency_ms"),
            "observedUnit": "ms",
            "status": status[entry["status"]],
        }
        if "error" in entry:
            check["output"] = entry["error"]
        checks[f"{name}:responseTime"] = [check]
    return {
        "status": status[overall],
        "serviceId": "gateway",
        "description": "platform API gateway",
        "checks": checks,
        "uptime": uptime,
    }


def setup_health_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(health_ctx)
    app.router.add_get("/health", health, expect_handler=expect_continue)
    app.router.add_get("/health/ready", ready, expect_handler=expect_continue)
    app.router.add_get("/health/detailed", detailed, expect_handler=expect_continue)
