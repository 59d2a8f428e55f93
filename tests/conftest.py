"""Shared fixtures: real services on loopback, never mocks of them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    """The local Redis; a test that needs it fails (never skips) when it is down."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc!r}); start it with:\n  {REDIS_START}")
    yield client
    await client.aclose()
