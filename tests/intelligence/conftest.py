"""Fixtures for the chat API: a fresh PostgreSQL database per run, a fresh Redis key prefix per test.

Nothing is mocked. A test that needs PostgreSQL or Redis and cannot reach it fails, saying how
to start it; private servers for fault tests (redis-server, pgserver) are started by the tests.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import psycopg2
import pytest
from chat_helpers import PG_ADMIN_DSN, PG_HINT, REDIS_URL, Client, PrivateRedis, Service, redis_sync

from intelligence.app import create_app
from intelligence.schema import apply_migrations
from intelligence.settings import CacheSettings, IntelligenceSettings, PostgresSettings


def _admin() -> Any:
    try:
        conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"{PG_HINT}\n({str(exc).strip()})", pytrace=False)
    conn.autocommit = True
    return conn


def _dsn_for(name: str) -> str:
    parts = dict(p.split("=", 1) for p in PG_ADMIN_DSN.split())
    parts["dbname"] = name
    return " ".join(f"{k}={v}" for k, v in parts.items())


class Databases:
    """Creates databases named test_chat_<random> and drops them all at the end of the run."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        conn = _admin()
        name = f"test_chat_{secrets.token_hex(6)}"
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        self.names.append(name)
        return _dsn_for(name)

    def drop_all(self) -> None:
        if not self.names:
            return
        conn = _admin()
        with conn.cursor() as cur:
            for name in self.names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def databases() -> Iterator[Databases]:
    dbs = Databases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def database(databases: Databases) -> str:
    """One migrated database shared by the run; tests isolate themselves by user id."""
    dsn = databases.create()
    asyncio.run(apply_migrations(dsn))
    return dsn


@pytest.fixture
def empty_database(databases: Databases) -> str:
    return databases.create()


@pytest.fixture
def cache_prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    client = redis_sync()
    prefix = f"test:chat:{secrets.token_hex(6)}:"
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def make_settings(dsn: str, redis_url: str | None, prefix: str, **cache: Any) -> IntelligenceSettings:
    return IntelligenceSettings(
        postgres=PostgresSettings(dsn=dsn, pool_max=20, connect_timeout=2, statement_timeout=5),
        cache=replace(CacheSettings(url=redis_url, prefix=prefix, retry_after=0.2), **cache),
    )


@pytest.fixture
def user() -> str:
    return f"user-{secrets.token_hex(4)}"


AppFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: Any, database: str, cache_prefix: str) -> AppFactory:
    """Build a real app (own pool, own Redis client) and a test client for it."""

    async def factory(
        *, dsn: str | None = None, redis_url: str | None = REDIS_URL, prefix: str | None = None, **cache: Any
    ) -> Client:
        if redis_url == REDIS_URL:
            redis_sync()  # fail with the hint instead of silently running without a cache
            # The shared Redis is up: a call that outlasts production's 150 ms is the test machine
            # stalling (two test workers on two cores), and would mark the cache stale under a test
            # about something else. Tests of a Redis that hangs or goes away use a private one,
            # with production's timeout.
            cache.setdefault("socket_timeout", 2.0)
        settings = make_settings(dsn or database, redis_url, prefix or cache_prefix, **cache)
        return await aiohttp_client(create_app(settings))

    return factory


@pytest.fixture
async def client(make_client: AppFactory) -> Client:
    return await make_client()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def service_process() -> Iterator[Callable[[dict[str, str]], Service]]:
    started: list[Service] = []

    def factory(env: dict[str, str]) -> Service:
        svc = Service(env)
        started.append(svc)
        return svc

    yield factory
    for svc in started:
        svc.close()
