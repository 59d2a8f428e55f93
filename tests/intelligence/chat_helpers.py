"""Helpers shared by the chat tests (not fixtures: those are in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient

from intelligence.keys import cache_key, pool_key, service_key
from tests.helpers import PrivateRedis  # noqa: F401  (re-exported for the chat tests)

ROOT = Path(__file__).resolve().parents[2]

PG_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_HINT = (
    "PostgreSQL is needed at 127.0.0.1:5432 (user postgres, database test). Start it with:\n"
    "    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
)
REDIS_HINT = (
    "Redis is needed at 127.0.0.1:6379. Start it with:\n"
    '    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


Client = TestClient[web.Request, web.Application]


def service(client: Client) -> Any:
    return client.app[service_key]


def cache(client: Client) -> Any:
    return client.app[cache_key]


def pool(client: Client) -> Any:
    return client.app[pool_key]


def headers(user: str) -> dict[str, str]:
    return {"x-auth-subject": user}


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not an operation timeout
    what: str = "condition",
    explain: Callable[[], str] | None = None,
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds, with ``explain()`` (a
    process's log, say) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout} s waiting for {what}" + (f":\n{explain()}" if explain else "")
            )
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """``python -m intelligence`` as a subprocess of the test, on a free port, logging to a file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "REDIS_"))},
            **env, "INTELLIGENCE_PORT": str(self.port), "LOG_FORMAT": "text", "PYTHONPATH": str(ROOT),
        }  # fmt: skip
        self.log = tempfile.NamedTemporaryFile(prefix="chat-service-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> subprocess.Popen[bytes]:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "intelligence"], cwd=ROOT, env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self.process

    async def serving(self) -> subprocess.Popen[bytes]:
        """Start it and wait until it answers ``/health`` (failing with its output if it dies)."""
        process = self.start()

        async def up() -> bool:
            self.assert_running()
            try:
                async with aiohttp.ClientSession() as http, http.get(self.url + "/health") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(up, timeout=20, what="python -m intelligence to listen")
        return process

    def assert_running(self) -> None:
        """Fail with its exit code and the end of its output if it has exited."""
        code = self.process.poll() if self.process is not None else None
        assert code is None, f"python -m intelligence exited with {code}:\n{self.output()[-3000:]}"

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        self.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


class PostgresProxy:
    """A TCP proxy on loopback in front of PostgreSQL, to break the network where a test says.

    ``cut_after(pattern)``: the next query containing ``pattern`` reaches the server, and its
    connection is cut before the answer comes back (the server commits, the client never hears).
    ``gate``: while it is clear, new connections wait before they reach the server.
    ``refusing``: while true, new connections are closed at once, as by a server that is gone.
    ``answering``: while it is clear, nothing the server sends reaches the client (a server that
    hung, holding its connections).
    """

    def __init__(self, dsn: str) -> None:
        self._params = dict(p.split("=", 1) for p in dsn.split())
        self._server: asyncio.Server | None = None
        self._pattern: bytes | None = None
        self.cuts = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0  # new connections that waited at the gate
        self.refusing = False
        self.answering = asyncio.Event()
        self.answering.set()
        self._tasks: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> PostgresProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.gate.set()
        self.answering.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def dsn(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return " ".join(f"{k}={v}" for k, v in {**self._params, "host": "127.0.0.1", "port": port}.items())

    def cut_after(self, pattern: bytes) -> None:
        self._pattern = pattern

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_w.close()
            return
        if not self.gate.is_set():
            self.held += 1
            await self.gate.wait()
        server_r, server_w = await asyncio.open_connection(
            self._params.get("host", "127.0.0.1"), int(self._params.get("port", "5432"))
        )
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self._pattern is not None and self._pattern in data:
                    self._pattern = None
                    cut.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if cut.is_set():
                    self.cuts += 1
                    return
                await self.answering.wait()
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, server_w):
                writer.close()


def redis_sync(url: str = REDIS_URL) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        pytest.fail(f"{REDIS_HINT}\n({exc})", pytrace=False)
    return client
