"""Shared fixtures: real upstream servers on loopback and a gateway built from a YAML config.

make_upstream(handler=None)   an aiohttp server that records every request it receives
make_raw_upstream(handler)    an asyncio socket server for byte-level misbehaviour
make_gateway(config, env)     the gateway app for ``config`` behind an aiohttp test client
refused_url                   a loopback URL whose port is bound but not listening
unaccepting_url               a loopback URL that takes no connection: a connect there times out
redis_client                  the local Redis (fails, never skips, when it is down)
run_in_process(program, *args, **env)  ``python -m PROGRAM ARGS`` run in this process, as run_program
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.httpserver import GatewayRunner
from gateway.settings import load_settings
from tests.helpers import ROOT, Collector, program_env

UpstreamHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def pytest_configure(config: pytest.Config) -> None:
    # A run started in the background by a non-interactive shell (`.ci/run &`, a script's job)
    # inherits SIGINT ignored, and so would every program the tests start; the programs keep a
    # signal ignored at start (gateway/startsignals.py), as a background job should, and each
    # test that stops one with SIGINT, standing in for a terminal's Ctrl-C, timed out. A handler
    # in this process is reset to the default action in each program it starts (exec).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_finish(session: pytest.Session) -> None:
    # What the run keeps to its end (the collected items, hypothesis, schemathesis, the modules) is
    # left out of later collections, as the gateway's tune_gc does for its start-up objects: every
    # full collection walked it again. Garbage the tests make is collected as before.
    gc.collect()
    gc.freeze()


@dataclass
class Received:
    """What one request looked like when it reached an upstream."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Upstream:
    server: TestServer
    requests: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        host = self.server.host
        return f"http://[{host}]:{self.server.port}" if ":" in host else f"http://{host}:{self.server.port}"


async def _default_reply(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


def record_of(request: web.Request, body: bytes) -> Received:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    return Received(request.method, request.raw_path, headers, body)


@pytest.fixture
async def make_upstream(aiohttp_server: Any) -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """An upstream that records each request as it arrived (a compressed body stays compressed),
    then answers with ``handler`` (JSON ok by default).

    With ``read_body=False`` the handler gets the request unread and records nothing itself.
    ``sock`` serves on an already bound socket (a target that comes back on the same port);
    ``host="::1"`` listens on the IPv6 loopback (its ``url`` is ``http://[::1]:PORT``).
    """
    servers: list[TestServer] = []

    async def make(
        handler: UpstreamHandler | None = None,
        *,
        read_body: bool = True,
        sock: socket.socket | None = None,
        host: str = "127.0.0.1",
    ) -> Upstream:
        reply = handler or _default_reply
        upstream: Upstream

        async def recording(request: web.Request) -> web.StreamResponse:
            if read_body:
                upstream.requests.append(record_of(request, await request.read()))
            return await reply(request)

        # What arrived on the wire: a compressed body is recorded compressed. More header fields
        # than the gateway takes (128), as it adds its own (forwarding, ids, trace context).
        app = web.Application(
            client_max_size=16 * 1024**2, handler_args={"auto_decompress": False, "max_headers": 256}
        )
        app.router.add_route("*", "/{tail:.*}", recording)
        if sock is None:
            upstream = Upstream(await aiohttp_server(app, host=host))
        else:
            server = TestServer(app, port=sock.getsockname()[1], socket_factory=lambda *_: sock.dup())
            await server.start_server()
            servers.append(server)
            upstream = Upstream(server)
        return upstream

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def make_raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def make(handler: RawHandler) -> str:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tasks.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(guarded, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield make
    for server in servers:
        server.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


@pytest.fixture
def bound_socket() -> Iterator[Callable[[], socket.socket]]:
    """Loopback sockets bound to a port but not listening: connecting to them is refused."""
    sockets: list[socket.socket] = []

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another socket is listening on, as when a second copy is started."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def refused_url(bound_socket: Callable[[], socket.socket]) -> str:
    return f"http://127.0.0.1:{bound_socket().getsockname()[1]}"


@pytest.fixture
def unaccepting_url() -> Iterator[str]:
    """A loopback listener whose accept queue is full: the kernel drops further SYNs, so a
    connect neither succeeds nor is refused (Linux with ``tcp_abort_on_overflow=0``)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.2)
    try:
        probe.connect(address)
    except TimeoutError:
        pass
    else:
        pytest.skip("this kernel completes connections to a full accept queue")
    finally:
        probe.close()
    yield f"http://127.0.0.1:{address[1]}"
    for sock in [*fillers, listener]:
        sock.close()


class GatewayTestServer(TestServer):
    """A test server on the production runner: same limits and error answers as ``serve``."""

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", **runner_kwargs: Any) -> None:
        super().__init__(app, host=host)
        self._runner_kwargs = runner_kwargs

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, **{**kwargs, **self._runner_kwargs})


@pytest.fixture
async def collector(aiohttp_server: Any) -> tuple[Collector, str]:
    """A Zipkin v2 collector stub on loopback (``tests.helpers.Collector``) and its spans URL."""
    stub = Collector()
    app = web.Application()
    app.router.add_post("/api/v2/spans", stub.handle)
    server = await aiohttp_server(app)
    return stub, str(server.make_url("/api/v2/spans"))


@pytest.fixture
async def make_gateway(
    aiohttp_client: Any, tmp_path: Path
) -> Callable[..., Awaitable[TestClient[web.Request, web.Application]]]:
    """Write ``config`` as the YAML file, build the real app and return a client for it.

    ``env`` adds environment variables (SERVICE_*_URL and the like); ``server_kwargs`` go to the
    runner (``keepalive_timeout=...``); extra keyword arguments go to the client session
    (``auto_decompress=False``, ...).
    """
    count = 0

    async def make(
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        *,
        server_kwargs: dict[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> TestClient[web.Request, web.Application]:
        nonlocal count
        count += 1
        path = tmp_path / f"gateway-{count}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        settings = load_settings({"GATEWAY_CONFIG": str(path), **(env or {})})
        # TestServer.start_server runs the app with handler_cancellation=True, as server.py does:
        # a client that goes away cancels its handler.
        server = GatewayTestServer(create_app(settings), **(server_kwargs or {}))
        return await aiohttp_client(server, **client_kwargs)

    return make


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


@pytest.fixture
def run_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_in_process(program, *args, **env)``: what ``run_program(program, *args,
    env=program_env(**env))`` gives (exit code, stdout, stderr), from the program's ``main`` in this
    process, without the ~0.7 s of starting an interpreter and importing the gateway. For commands
    that end without configuring logging or serving (``check-config``, ``token``, refusals by the
    settings); each command keeps a test through ``run_program``, so its real entry point stays
    covered."""

    def run(program: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        variables = program_env(**env)
        for name in list(os.environ):
            monkeypatch.delenv(name)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(ROOT)
        main = importlib.import_module(f"{program}.cli").main
        capsys.readouterr()
        caplog.clear()
        try:
            code = main(list(args))
        except SystemExit as exc:  # as the interpreter turns it into an exit code
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        out, err = capsys.readouterr()
        # Logging has no handler of the program's here (pytest's took its place): what logging's
        # last resort would have written to the program's stderr is added, so it still counts.
        err += "".join(f"{r.getMessage()}\n" for r in caplog.records if r.levelno >= logging.WARNING)
        return subprocess.CompletedProcess([program, *args], code, out, err)

    return run
