"""Draining a real ``python -m gateway`` on SIGTERM: within the bound the operator set, and with
a WebSocket close frame rather than a dropped connection. With ``GATEWAY_WORKERS=2``, no worker
outlives its supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from gateway.keys import lifecycle_key
from tests.helpers import ROOT, free_port, one_service, running_gateway, signals_in, wait_for
from tests.wsframes import CLOSE, close_payload, raw_client, read_frame

SHUTDOWN_TIMEOUT = 1.5  # seconds; the drain waits it out (a stuck request), so it is kept short


async def test_sigterm_drains_within_the_timeout_and_closes_websockets_with_1001(
    make_upstream: Any, tmp_path: Path
) -> None:
    never, stuck_arrived = asyncio.Event(), asyncio.Event()

    async def upstream_handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(msg.data)
            return ws
        stuck_arrived.set()
        await never.wait()  # a request that outlasts the drain
        return web.Response()

    upstream = await make_upstream(upstream_handler, read_body=False)
    try:
        async with (
            running_gateway(
                one_service(upstream.url),
                tmp_path,
                GATEWAY_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
                LOG_LEVEL="WARNING",
            ) as gateway,
            aiohttp.ClientSession() as session,
        ):
            ws = await session.ws_connect(f"{gateway.base}/ws")
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            stuck = asyncio.create_task(session.get(f"{gateway.base}/stuck"))
            async with asyncio.timeout(5):
                await stuck_arrived.wait()

            gateway.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            closing = await ws.receive(timeout=10)
            assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
            assert ws.close_code == 1001  # going away: the client knows to reconnect elsewhere

            async with asyncio.timeout(4 * SHUTDOWN_TIMEOUT):
                assert await gateway.process.wait() == 0
            # aiohttp alone waited the timeout for the stuck request, then as long again after
            # cancelling it.
            assert time.monotonic() - started < 1.7 * SHUTDOWN_TIMEOUT
            try:
                response = await stuck
                assert response.status >= 500  # if it was answered at all, not as a success
            except aiohttp.ClientError:
                pass  # cut off: the drain bound ran out
    finally:
        never.set()


async def test_a_websocket_client_that_never_answers_the_close_does_not_hold_the_drain(
    make_upstream: Any, tmp_path: Path
) -> None:
    """Both sides get 1001; the client's reply, which never comes, is awaited within the drain
    bound only (the close timeout is 10 s), and the process exits."""
    upstream_close: list[int | None] = []

    async def upstream_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        upstream_close.append(ws.close_code)
        return ws

    upstream = await make_upstream(upstream_handler, read_body=False)
    async with running_gateway(
        one_service(upstream.url), tmp_path, GATEWAY_SHUTDOWN_TIMEOUT="1", LOG_LEVEL="WARNING"
    ) as gateway:
        async with raw_client(gateway.port, "/ws") as (reader, _):  # reads nothing until the end
            gateway.process.send_signal(signal.SIGTERM)

            async with asyncio.timeout(5):  # the 1 s bound, and the process's own start and stop
                assert await gateway.process.wait() == 0
            assert await read_frame(reader) == (CLOSE, close_payload(1001, b"gateway shutting down"))
    assert upstream_close == [1001]


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


async def test_workers_stop_when_their_supervisor_is_killed(make_upstream: Any, tmp_path: Path) -> None:
    upstream = await make_upstream()
    async with running_gateway(
        one_service(upstream.url), tmp_path, GATEWAY_WORKERS="2", LOG_LEVEL="WARNING"
    ) as gateway:
        supervisor = gateway.process.pid
        await wait_for(lambda: len(children_of(supervisor)) == 2, what="both workers")
        workers = children_of(supervisor)
        try:
            gateway.process.kill()  # SIGKILL: the supervisor can pass nothing on
            await gateway.process.wait()
            # Orphans would go on serving the port, beside whatever is started on it next.
            await wait_for(lambda: all(gone(pid) for pid in workers), 10, "the orphaned workers to stop")
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("again", ["SIGTERM", "SIGINT"])
async def test_stop_signals_that_keep_coming_after_the_drain_leave_the_exit_code_0(
    make_upstream: Any, tmp_path: Path, workers: str, again: str
) -> None:
    """An impatient second Ctrl-C, or a second `kill`: after the drain, with the loop's handlers
    gone, they met the default actions (-15, or a KeyboardInterrupt traceback and -2)."""
    upstream = await make_upstream()
    async with running_gateway(
        one_service(upstream.url), tmp_path, GATEWAY_WORKERS=workers, LOG_LEVEL="WARNING"
    ) as gateway:
        gateway.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while gateway.process.returncode is None:
            assert time.monotonic() < deadline, gateway.log.read_text()
            # os.kill, not send_signal: that polls (waitpid) first, and when it reaped the exited
            # process asyncio's child watcher reported 255 ("Unknown child process").
            with contextlib.suppress(ProcessLookupError):
                os.kill(gateway.process.pid, getattr(signal, again))
            with contextlib.suppress(TimeoutError):  # the pace of the signals, not a wait for anything
                await asyncio.wait_for(gateway.process.wait(), 0.002)
        log = gateway.log.read_text()
        assert gateway.process.returncode == 0, log
        assert "Traceback" not in log, log


# A supervisor whose worker ends as soon as it has said it serves, every time: a worker that
# crashes on its first request.
_A_WORKER_THAT_KEEPS_DYING = """
import sys
from gateway.logs import configure_logging
from gateway.server import run_workers

def target(ready):
    configure_logging("WARNING", "json")  # its own writer thread: the parent's is not forked
    ready()

configure_logging("WARNING", "json")
sys.exit(run_workers(1, target))
"""


async def test_a_worker_that_keeps_dying_is_replaced_at_most_once_a_second(tmp_path: Path) -> None:
    """Replaced at once every time, it was forked in a tight loop, burning a CPU and the log."""
    script = tmp_path / "supervisor.py"
    script.write_text(_A_WORKER_THAT_KEEPS_DYING)
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=out
        )

    def restarts() -> list[datetime]:
        lines = [line for line in log.read_text().splitlines() if '"worker exited; restarting"' in line]
        return [datetime.fromisoformat(json.loads(line)["ts"]) for line in lines]

    try:
        await wait_for(lambda: len(restarts()) >= 3, 10, "three restarts")
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    times = restarts()
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.999 for gap in gaps), gaps


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_gateway_started_with_sigint_ignored_keeps_it_ignored(
    make_upstream: Any, tmp_path: Path, workers: str
) -> None:
    """A shell starts a background job (`python -m gateway &` in a script) with SIGINT ignored:
    the terminal's Ctrl-C goes to the whole process group and is not for it. The gateway caught
    it anyway and drained, workers and all. SIGTERM still stops it."""
    upstream = await make_upstream()
    async with running_gateway(
        one_service(upstream.url), tmp_path, sigint_ignored=True, GATEWAY_WORKERS=workers, LOG_LEVEL="WARNING"
    ) as gateway:
        supervisor = gateway.process.pid
        if workers == "2":
            await wait_for(lambda: len(children_of(supervisor)) == 2, what="both workers")
        pids = [supervisor, *children_of(supervisor)]
        # Serving: each has its SIGTERM handler (a worker's, serve()'s; the supervisor's, forward).
        await wait_for(
            lambda: all(signal.SIGTERM in signals_in(pid, "SigCgt") for pid in pids), what="the handlers"
        )
        for pid in pids:
            assert signal.SIGINT in signals_in(pid, "SigIgn"), pid
            assert signal.SIGINT not in signals_in(pid, "SigCgt"), pid
            os.kill(pid, signal.SIGINT)
        async with aiohttp.ClientSession() as session, session.get(f"{gateway.base}/health/ready") as ready:
            assert ready.status == 200
        gateway.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 15) == 0, gateway.log.read_text()


# A supervisor whose every fork is followed at once by a SIGTERM to itself: the stop comes while
# a worker is being started, before the supervisor has it in its list.
_STOPPED_AS_A_WORKER_IS_FORKED = """
import os, signal, sys
from aiohttp import web
from gateway.server import Listener, run, run_workers, serve

port, every_fork = int(sys.argv[1]), sys.argv[2] == "every"
forks = 0

def stop_after_fork():
    global forks
    forks += 1
    if every_fork or forks == 1:
        os.kill(os.getpid(), signal.SIGTERM)

os.register_at_fork(after_in_parent=stop_after_fork)

def target(ready):
    listener = Listener(web.Application(), "127.0.0.1", port, "gateway")
    run(serve([listener], shutdown_timeout=1, reuse_port=True, on_started=lambda _: ready()))

sys.exit(run_workers(2, target))
"""


@pytest.mark.parametrize("when", ["every", "first"])
async def test_a_stop_that_comes_while_a_worker_is_forked_stops_it_too(tmp_path: Path, when: str) -> None:
    """The worker it missed served on, and the supervisor waited for it forever (a SIGTERM soon
    after `python -m gateway` started with GATEWAY_WORKERS=8 hung it one time in two). "first":
    one stop, after the first fork, so the second worker is forked after it with no signal to
    come: the supervisor itself must stop it."""
    script = tmp_path / "supervisor.py"
    script.write_text(_STOPPED_AS_A_WORKER_IS_FORKED)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(free_port()), when, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            _, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert b"Traceback" not in err, err.decode()
    finally:
        if process.returncode is None:
            for pid in children_of(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


async def test_each_worker_logs_the_requests_it_drained_before_it_exits(
    make_upstream: Any, tmp_path: Path
) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.wait_for(release.wait(), 15)
        return web.Response(text="finished")

    upstream = await make_upstream(slow)
    async with (
        running_gateway(one_service(upstream.url), tmp_path, GATEWAY_WORKERS="2") as gateway,
        aiohttp.ClientSession() as session,
    ):
        # Both serving: one still starting up would stop at once, logging nothing.
        await wait_for(lambda: gateway.log.read_text().count('"listening"') == 2, what="both workers")
        in_flight = asyncio.create_task(session.get(f"{gateway.base}/slow"))
        async with asyncio.timeout(5):
            await arrived.wait()
        gateway.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: '"draining"' in gateway.log.read_text(), what="the drain")
        release.set()
        async with asyncio.timeout(10):
            assert (await in_flight).status == 200
            assert await gateway.process.wait() == 0
    # A worker ends in os._exit: what its log thread had not written yet was lost with it.
    lines = gateway.log.read_text().splitlines()
    assert [line for line in lines if '"path": "/slow"' in line and '"status": 200' in line]
    assert sum('"msg": "stopped"' in line for line in lines) == 2


async def test_answers_given_while_draining_tell_the_client_the_connection_closes(
    make_gateway: Any, make_upstream: Any
) -> None:
    client = await make_gateway(one_service((await make_upstream()).url))
    response = await client.get("/x")
    assert response.status == 200 and "Connection" not in response.headers

    client.app[lifecycle_key].draining = True  # what SIGTERM sets before connections are closed

    # Else a keep-alive client sends its next request on a connection about to close: reset, unanswered.
    for path, status in (("/x", 200), ("/health/ready", 503), ("/health", 200)):
        response = await client.get(path)
        assert (response.status, response.headers.get("Connection")) == (status, "close"), path
