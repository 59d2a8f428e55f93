"""/health, /health/ready and /health/detailed against real backends, Redis and a /health/db.

Backends are real aiohttp servers on loopback (healthy, failing with 500, hanging, refusing);
Redis is the local one or a private redis-server the test stops; PostgreSQL is seen the way the
gateway sees it, through the intelligence engine's ``/health/db``: the real engine on a database of
the test's own, reached through a relay the test cuts, and a stub for the engine's error answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from aiohttp import web

from gateway.health import CACHE_SECONDS, CHECK_TIMEOUT, health_checker_key
from gateway.keys import lifecycle_key
from intelligence.app import create_app as create_intelligence_app
from intelligence.schema import apply_migrations
from intelligence.settings import CacheSettings, IntelligenceSettings, PostgresSettings
from tests.conftest import REDIS_URL
from tests.helpers import PrivateRedis

ENGINE = "intelligence-engine"


def config(backends: dict[str, str | list[str]], engine_url: str) -> dict[str, Any]:
    services: dict[str, Any] = {
        name: ({"urls": url} if isinstance(url, list) else {"url": url}) for name, url in backends.items()
    }
    services[ENGINE] = {"url": engine_url}
    return {
        "services": services,
        "routes": [{"prefix": "/", "service": ENGINE, "auth": "none"}],
    }


async def db_ok(request: web.Request) -> web.Response:
    if request.path == "/health/db":
        return web.json_response({"status": "healthy", "latency_ms": 0.7})
    return web.json_response({"status": "healthy"})


async def failing(request: web.Request) -> web.Response:
    return web.json_response({"status": "broken"}, status=500)


@pytest.fixture
def hang() -> Iterator[Callable[[web.Request], Awaitable[web.Response]]]:
    """A handler that never answers until the test ends."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    yield handler
    release.set()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def detailed(client: Any, **headers: str) -> tuple[int, dict[str, Any], str]:
    response = await client.get("/health/detailed", headers=headers)
    return response.status, await response.json(content_type=None), response.content_type


async def test_liveness_touches_nothing(make_gateway: Any, make_upstream: Any, refused_url: str) -> None:
    client = await make_gateway(config({"svc": refused_url}, refused_url))
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "healthy"}


async def test_ready_is_503_while_starting_and_draining(make_gateway: Any, refused_url: str) -> None:
    client = await make_gateway(config({"svc": refused_url}, refused_url))
    lifecycle = client.app[lifecycle_key]
    assert (await client.get("/health/ready")).status == 200
    lifecycle.ready = False
    response = await client.get("/health/ready")
    assert (response.status, (await response.json())["status"]) == (503, "starting")
    lifecycle.ready, lifecycle.draining = True, True
    response = await client.get("/health/ready")
    assert (response.status, (await response.json())["status"]) == (503, "draining")


async def test_all_healthy(make_gateway: Any, make_upstream: Any, redis_client: Any) -> None:
    backend = await make_upstream()
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": backend.url}, engine.url), {"REDIS_URL": REDIS_URL})
    status, body, content_type = await detailed(client)
    assert (status, content_type) == (200, "application/json")
    assert body["status"] == "healthy"
    assert set(body["components"]) == {"svc", ENGINE, "redis", "postgresql"}
    for name, entry in body["components"].items():
        assert entry["status"] == "healthy", name
        assert isinstance(entry["latency_ms"], int | float) and entry["latency_ms"] >= 0
        assert "error" not in entry
    assert body["components"]["postgresql"]["database_latency_ms"] == 0.7
    assert isinstance(body["uptime_seconds"], int)
    assert [r.raw_path for r in backend.requests] == ["/health"]


async def test_health_path_of_each_backend_is_used(make_gateway: Any, make_upstream: Any) -> None:
    backend = await make_upstream()
    engine = await make_upstream(db_ok)
    cfg = config({"svc": backend.url}, engine.url)
    cfg["services"]["svc"]["health_path"] = "/internal/ready"
    client = await make_gateway(cfg)
    await detailed(client)
    assert [r.raw_path for r in backend.requests] == ["/internal/ready"]


async def test_failing_backend_is_unhealthy_and_overall_degraded(
    make_gateway: Any, make_upstream: Any
) -> None:
    backend = await make_upstream(failing)
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    status, body, _ = await detailed(client)
    assert status == 200  # degraded still answers 200: see gateway/health.py
    assert body["status"] == "degraded"
    assert body["components"]["svc"]["status"] == "unhealthy"
    assert "HTTP 500" in body["components"]["svc"]["error"]
    assert body["components"][ENGINE]["status"] == "healthy"


async def test_refusing_backend_is_unhealthy(make_gateway: Any, make_upstream: Any, refused_url: str) -> None:
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": refused_url}, engine.url))
    _, body, _ = await detailed(client)
    assert body["status"] == "degraded"
    assert body["components"]["svc"]["status"] == "unhealthy"
    assert "cannot connect" in body["components"]["svc"]["error"]


async def test_hanging_backend_answer_within_two_seconds(
    make_gateway: Any, make_upstream: Any, hang: Any
) -> None:
    backend = await make_upstream(hang)
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    started = time.monotonic()
    status, body, _ = await detailed(client)
    elapsed = time.monotonic() - started
    assert status == 200
    assert elapsed < 2.0, f"took {elapsed:.2f}s"
    assert elapsed >= CHECK_TIMEOUT * 0.9  # it did wait for the hanging one, then gave up
    entry = body["components"]["svc"]
    assert entry["status"] == "unhealthy"
    assert "timed out" in entry["error"]
    # The others were checked concurrently, not after the hanging one.
    assert body["components"][ENGINE]["latency_ms"] < CHECK_TIMEOUT * 1000 / 2


async def test_each_target_of_a_service_is_reported(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    good = await make_upstream()
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": [good.url, refused_url]}, engine.url))
    _, body, _ = await detailed(client)
    entry = body["components"]["svc"]
    assert entry["status"] == "healthy"  # one target is enough to serve
    assert entry["targets"][good.url]["status"] == "healthy"
    assert entry["targets"][refused_url]["status"] == "unhealthy"
    assert "cannot connect" in entry["targets"][refused_url]["error"]

    client2 = await make_gateway(config({"svc": [refused_url, refused_url + "/x"]}, engine.url))
    _, body, _ = await detailed(client2)
    assert body["components"]["svc"]["status"] == "unhealthy"
    assert body["components"]["svc"]["error"] == "no target is healthy"


async def test_postgresql_down_behind_the_engine(make_gateway: Any, make_upstream: Any) -> None:
    async def db_down(request: web.Request) -> web.Response:
        if request.path == "/health/db":
            return web.json_response(
                {"status": "unhealthy", "latency_ms": 3.1, "error": "connection refused"}, status=503
            )
        return web.json_response({"status": "healthy"})

    backend = await make_upstream()
    engine = await make_upstream(db_down)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    _, body, _ = await detailed(client)
    assert body["status"] == "degraded"
    assert body["components"]["postgresql"]["status"] == "unhealthy"
    assert "HTTP 503" in body["components"]["postgresql"]["error"]
    assert body["components"][ENGINE]["status"] == "healthy"


async def test_postgresql_is_judged_through_every_engine_target(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    """One engine replica down is the engine's problem, not the database's: another replica's
    healthy /health/db decides; with none healthy, the replica that answered speaks for it."""

    async def db_down(request: web.Request) -> web.Response:
        if request.path == "/health/db":
            return web.json_response({"status": "unhealthy", "error": "connection refused"}, status=503)
        return web.json_response({"status": "healthy"})

    backend = await make_upstream()
    engine = await make_upstream(db_ok)
    cfg = config({"svc": backend.url}, engine.url)
    cfg["services"][ENGINE] = {"urls": [refused_url, engine.url]}
    client = await make_gateway(cfg)
    _, body, _ = await detailed(client)
    assert body["components"]["postgresql"]["status"] == "healthy", body["components"]["postgresql"]
    assert body["components"]["postgresql"]["database_latency_ms"] == 0.7
    assert body["status"] == "healthy"

    down = await make_upstream(db_down)
    cfg["services"][ENGINE] = {"urls": [refused_url, down.url]}
    client = await make_gateway(cfg)
    _, body, _ = await detailed(client)
    assert body["components"]["postgresql"]["status"] == "unhealthy"
    assert "HTTP 503" in body["components"]["postgresql"]["error"]

    # The replica listed first cannot reach the database (its own network, its own pool) and says
    # so; another reaches it: the database is up.
    cfg["services"][ENGINE] = {"urls": [down.url, engine.url]}
    client = await make_gateway(cfg)
    _, body, _ = await detailed(client)
    assert body["components"]["postgresql"]["status"] == "healthy", body["components"]["postgresql"]


async def streaming(request: web.Request) -> web.StreamResponse:
    """A health answer that says 200 at once and never ends (a health_path on a stream or a
    large download)."""
    response = web.StreamResponse()
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        while True:
            await response.write(b"x" * 65536)
    return response


async def test_a_health_answer_that_streams_is_judged_by_its_status(
    make_gateway: Any, make_upstream: Any
) -> None:
    backend = await make_upstream(streaming)
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    _, body, _ = await detailed(client)
    entry = body["components"]["svc"]
    # Not read (and buffered) until the check times out: its status said it all.
    assert entry["status"] == "healthy", entry
    assert entry["latency_ms"] < CHECK_TIMEOUT * 1000 / 2


async def not_json(request: web.Request) -> web.Response:
    return web.Response(text="<html>up</html>")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (streaming, "answered more than 65536 bytes"),
        (not_json, "answered something other than JSON"),
    ],
    ids=["endless", "not-json"],
)
async def test_a_db_health_answer_that_is_not_a_report_says_so_at_once(
    make_gateway: Any, make_upstream: Any, answer: Any, error: str
) -> None:
    async def engine_reply(request: web.Request) -> web.StreamResponse:
        if request.path == "/health/db":
            return await answer(request)
        return web.json_response({"status": "healthy"})

    backend = await make_upstream()
    engine = await make_upstream(engine_reply)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    _, body, _ = await detailed(client)
    entry = body["components"]["postgresql"]
    assert entry["status"] == "unhealthy"
    assert entry["error"] == f"RuntimeError: {ENGINE} /health/db {error}"
    assert entry["latency_ms"] < CHECK_TIMEOUT * 1000 / 2


async def test_postgresql_without_an_engine_is_unhealthy(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    engine = await make_upstream(db_ok)
    cfg = config({"svc": engine.url}, engine.url)
    del cfg["services"][ENGINE]
    cfg["routes"][0]["service"] = "svc"
    client = await make_gateway(cfg)
    _, body, _ = await detailed(client)
    assert body["components"]["postgresql"]["status"] == "unhealthy"
    assert ENGINE in body["components"]["postgresql"]["error"]


async def test_redis_down_is_unhealthy_and_recovers(
    make_gateway: Any, make_upstream: Any, private_redis: PrivateRedis
) -> None:
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({}, engine.url), {"REDIS_URL": private_redis.url})
    _, body, _ = await detailed(client)
    assert body["components"]["redis"]["status"] == "healthy"

    private_redis.stop()
    client.app[health_checker_key].invalidate()
    started = time.monotonic()
    _, body, _ = await detailed(client)
    assert time.monotonic() - started < 2.0
    assert body["status"] == "degraded"
    assert body["components"]["redis"]["status"] == "unhealthy"
    assert body["components"]["redis"]["error"]

    private_redis.start()
    client.app[health_checker_key].invalidate()
    _, body, _ = await detailed(client)
    assert body["components"]["redis"]["status"] == "healthy"


async def test_without_redis_url_redis_is_disabled_not_unhealthy(
    make_gateway: Any, make_upstream: Any
) -> None:
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({}, engine.url))
    _, body, _ = await detailed(client)
    assert body["components"]["redis"]["status"] == "disabled"
    assert body["status"] == "healthy"


async def test_a_burst_of_1000_costs_one_probe_per_component(make_gateway: Any, make_upstream: Any) -> None:
    backend = await make_upstream()
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    checker = client.app[health_checker_key]

    # In process: 1000 callers at once share one round of probes.
    reports = await asyncio.gather(*(checker.report() for _ in range(1000)))
    assert len(backend.requests) == 1
    assert [r.raw_path for r in engine.requests].count("/health/db") == 1
    assert all(report is reports[0][0] for report, _ in reports)

    # Over HTTP: 1000 concurrent clients; at most one probe per component per cache interval.
    checker.invalidate()
    before_backend = len(backend.requests)
    started = time.monotonic()
    responses = await asyncio.gather(*(detailed(client) for _ in range(1000)))
    elapsed = time.monotonic() - started
    assert all(status == 200 for status, _, _ in responses)
    allowed = 1 + int(elapsed / CACHE_SECONDS)
    probes = len(backend.requests) - before_backend
    assert 1 <= probes <= allowed, f"{probes} probes in {elapsed:.2f}s"
    db_probes = [r.raw_path for r in engine.requests].count("/health/db") - 1
    assert 1 <= db_probes <= allowed
    # Most answers came from the cache, and say how old they are.
    ages = [body["age_seconds"] for _, body, _ in responses]
    assert all(0 <= age < CACHE_SECONDS for age in ages)


async def test_cached_answer_says_its_age(make_gateway: Any, make_upstream: Any) -> None:
    backend = await make_upstream()
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    started = time.monotonic()
    _, first, _ = await detailed(client)
    assert first["age_seconds"] == 0  # probed for this caller
    _, second, _ = await detailed(client)
    since = time.monotonic() - started  # the probes ended within this window
    assert len(backend.requests) == 1  # from the cache
    assert second["components"] == first["components"]
    assert 0 <= second["age_seconds"] <= since + 0.001


async def test_health_json_for_clients_that_ask(make_gateway: Any, make_upstream: Any) -> None:
    backend = await make_upstream(failing)
    engine = await make_upstream(db_ok)
    client = await make_gateway(config({"svc": backend.url}, engine.url))
    status, body, content_type = await detailed(client, Accept="application/health+json")
    assert (status, content_type) == (200, "application/health+json")
    assert body["status"] == "warn"
    assert body["serviceId"] == "gateway"
    assert isinstance(body["uptime"], int)
    svc = body["checks"]["svc:responseTime"][0]
    assert svc["status"] == "fail"
    assert svc["componentType"] == "component"
    assert svc["observedUnit"] == "ms"
    assert "HTTP 500" in svc["output"]
    assert body["checks"]["postgresql:responseTime"][0]["componentType"] == "datastore"
    assert body["checks"]["redis:responseTime"][0]["status"] == "pass"  # disabled: not a failure


# -- PostgreSQL through the real intelligence engine ---------------------------------------------

PG_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture
def pg_database() -> Iterator[dict[str, str]]:
    """A fresh database of this test's own on the local PostgreSQL (fails, never skips, when down)."""
    try:
        admin = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed at {PG_ADMIN_DSN!r}; start it with:\n  {PG_START}\n({exc})")
    admin.autocommit = True
    name = f"test_ops_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    parts = dict(p.split("=", 1) for p in PG_ADMIN_DSN.split())
    yield {**parts, "dbname": name}
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


class Relay:
    """A TCP relay to PostgreSQL that the test can cut: to the engine, the database goes away."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()  # new connections are refused
        for writer in self.writers:
            writer.close()  # open ones are dropped
        await self.server.wait_closed()


async def test_postgresql_through_the_real_engine_healthy_then_down(
    make_gateway: Any, aiohttp_server: Any, pg_database: dict[str, str]
) -> None:
    direct = " ".join(f"{k}={v}" for k, v in pg_database.items())
    await apply_migrations(direct)
    relay = Relay(pg_database["host"], int(pg_database["port"]))
    port = await relay.start()
    dsn = " ".join(f"{k}={v}" for k, v in {**pg_database, "port": str(port)}.items())
    engine = await aiohttp_server(
        create_intelligence_app(
            IntelligenceSettings(postgres=PostgresSettings(dsn=dsn, connect_timeout=1), cache=CacheSettings())
        )
    )
    engine_url = f"http://127.0.0.1:{engine.port}"
    client = await make_gateway(config({}, engine_url))
    _, body, _ = await detailed(client)
    assert body["components"]["postgresql"]["status"] == "healthy"
    assert body["components"]["postgresql"]["database_latency_ms"] >= 0

    await relay.cut()
    client.app[health_checker_key].invalidate()
    started = time.monotonic()
    _, body, _ = await detailed(client)
    assert time.monotonic() - started < 2.0
    assert body["status"] == "degraded"
    assert body["components"]["postgresql"]["status"] == "unhealthy"
    assert "HTTP 503" in body["components"]["postgresql"]["error"]
    assert body["components"][ENGINE]["status"] == "healthy"  # the engine itself is up
