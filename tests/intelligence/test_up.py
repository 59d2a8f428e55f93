"""``python -m gateway up`` as a new user runs it: embedded PostgreSQL, chats survive a restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from chat_helpers import wait_until

from tests.helpers import free_port, ignore_sigint, refusal, run_program, signals_in, wait_ready

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data dir for an embedded PostgreSQL, outside pytest's temporary tree. Run as root,
    pgserver opens each directory above its data to the user it runs PostgreSQL as; a pytest
    session that starts meanwhile (`tox -p`, two runs at once) closes its tree again (0700), and
    a server starting then could not reach its data ("could not open lock file")."""
    with tempfile.TemporaryDirectory(prefix="gateway-up-test-", ignore_cleanup_errors=True) as root:
        yield Path(root, "data")


def _env(data_dir: Path, port: int, chat_port: int, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_PORT": str(port),
        "INTELLIGENCE_PORT": str(chat_port),
        "LOG_LEVEL": "WARNING",
        **extra,
    }


async def _start(
    data_dir: Path, port: int, chat_port: int, log: Path, *, sigint_ignored: bool = False, **extra: str
) -> tuple[asyncio.subprocess.Process, str]:
    env = _env(data_dir, port, chat_port, **extra)
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "up", cwd=ROOT, env=env, stdout=out, stderr=out,
            preexec_fn=ignore_sigint if sigint_ignored else None,
        )  # fmt: skip
    await wait_ready(f"http://127.0.0.1:{port}", process, log, deadline_s=90)
    match = None
    for _ in range(500):  # the banner follows readiness by a moment (5 s at most)
        match = re.findall(r"export TOKEN=(\S+)", log.read_text())
        if match:
            break
        await asyncio.sleep(0.01)
    assert match, log.read_text()
    return process, match[-1]


async def _stop(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await process.wait() == 0


async def test_up_keeps_chats_with_tool_calls_across_a_restart(tmp_path: Path, data_dir: Path) -> None:
    log = tmp_path / "up.log"
    port, chat_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}/api/v1/chat"
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "top_nodes", "arguments": "{}"}}
        ],
    }
    process, token = await _start(data_dir, port, chat_port, log)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(f"{base}/sessions", json={"title": "survives"}) as response:
                assert response.status == 201, await response.text()
                session_id = (await response.json())["id"]
            async with session.post(f"{base}/sessions/{session_id}/messages", json=message) as response:
                assert response.status == 201, await response.text()
                written = await response.json()
        await _stop(process)

        process, token = await _start(data_dir, port, chat_port, log)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            async with session.get(f"{base}/sessions/{session_id}/messages") as response:
                assert response.status == 200
                assert (await response.json())["data"] == [written]
        await _stop(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_up_started_with_sigint_ignored_keeps_it_ignored_while_serving(
    tmp_path: Path, data_dir: Path
) -> None:
    """`python -m gateway up &` from a script: the terminal's Ctrl-C is not for a background job.
    Ignored while starting, it was caught once serving, and drained the gateway and the chat API."""
    port = free_port()
    process, _ = await _start(data_dir, port, free_port(), tmp_path / "up.log", sigint_ignored=True)
    try:
        assert signal.SIGTERM in signals_in(process.pid, "SigCgt")
        assert signal.SIGINT in signals_in(process.pid, "SigIgn")
        assert signal.SIGINT not in signals_in(process.pid, "SigCgt")
        process.send_signal(signal.SIGINT)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health/ready") as ready:
                assert ready.status == 200
        await _stop(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_ups_first_start_at_the_default_log_level_shows_the_banner_not_pgservers_chatter(
    tmp_path: Path, data_dir: Path
) -> None:
    """A new user's first `up` (no LOG_LEVEL, a new data dir): the embedded server's command lines
    and initdb's output are not printed at INFO, where they were most of the screen before the
    banner; `up`'s own lines and the banner are; Ctrl-C ends it with 0."""
    port = free_port()
    log = tmp_path / "up.log"
    env = _env(data_dir, port, free_port())
    del env["LOG_LEVEL"]
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "up", cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        text = await _banner(process, log, deadline_s=90)
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await process.wait() == 0, log.read_text()
    text = log.read_text()
    assert '"msg": "starting embedded PostgreSQL"' in text, text
    assert '"msg": "applied migrations"' in text, text
    assert "export TOKEN=" in text, text
    chatter = [line for line in text.splitlines() if '"logger": "pgserver"' in line or "initdb" in line]
    assert chatter == [], text


async def test_up_says_which_directories_pgserver_opened_to_every_user(
    tmp_path: Path, data_dir: Path
) -> None:
    """Run as root, pgserver runs PostgreSQL as a user of its own and adds g+rx,o+rx to every
    directory above the data dir (a home directory included), silently. `up` says which, once;
    as another user nothing is opened and nothing is said."""
    closed = data_dir.parent / "private"
    closed.mkdir(mode=0o700)
    log = tmp_path / "up.log"
    process, _ = await _start(closed / "data", free_port(), free_port(), log)
    try:
        await _stop(process)
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        said = [line for line in lines if "pgserver made these directories" in line["msg"]]
        if os.geteuid() == 0:
            assert stat.S_IMODE(closed.stat().st_mode) == 0o755
            assert [line["level"] for line in said] == ["warning"]
            assert str(closed) in said[0]["directories"]
            assert str(closed / "data") not in said[0]["directories"]  # made by up, for pgserver
        else:
            assert stat.S_IMODE(closed.stat().st_mode) == 0o700
            assert said == []
        process, _ = await _start(closed / "data", free_port(), free_port(), log)
        await _stop(process)
        again = [line for line in log.read_text().splitlines() if "pgserver made these directories" in line]
        assert len(again) == len(said)  # opened already: nothing new to say
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _postmaster(data_dir: Path) -> int | None:
    """The pid of the embedded PostgreSQL running on ``data_dir``, or None."""
    try:
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):  # absent, or being written
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


async def _stopped_by(process: asyncio.subprocess.Process, signum: signal.Signals, log: Path) -> str:
    """Send ``signum``: `up` must exit 0, without a traceback. Returns its log."""
    process.send_signal(signum)
    async with asyncio.timeout(30):
        code = await process.wait()
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    return text


async def _clean_up(process: asyncio.subprocess.Process, data_dir: Path) -> None:
    """Kill `up` if it still runs, and stop the PostgreSQL it left behind (the failure these tests
    look for), if it did."""
    if process.returncode is None:
        process.kill()
        await process.wait()
    pid = _postmaster(data_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_a_stop_signal_while_the_embedded_postgres_starts_stops_it_too(
    tmp_path: Path, data_dir: Path, signum: signal.Signals
) -> None:
    """Ctrl-C, SIGTERM or a terminal's hangup while `up` starts its PostgreSQL: `up` exits 0
    without a traceback, and the server it started is stopped, not left running with nothing to
    stop it (SIGTERM and SIGHUP ended `up` at once; Ctrl-C raised KeyboardInterrupt in pgserver)."""
    log = tmp_path / "up.log"
    env = _env(data_dir, free_port(), free_port(), LOG_LEVEL="INFO")
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "up", cwd=ROOT, env=env, stdout=out, stderr=out
        )

    def started() -> bool:
        assert process.returncode is None, f"up exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        return _postmaster(data_dir) is not None

    try:
        await wait_until(
            started,
            timeout=60,
            what="the postmaster to start",
            explain=lambda: f"up's output:\n{log.read_text()[-3000:]}",
        )
        text = await _stopped_by(process, signum, log)
        assert f'"msg": "stopped while starting", "signal": "{signum.name}"' in text, text
        assert _postmaster(data_dir) is None, "up exited and left its PostgreSQL running"
    finally:
        await _clean_up(process, data_dir)


async def test_a_terminals_hangup_drains_up_and_stops_its_postgres(tmp_path: Path, data_dir: Path) -> None:
    """SIGHUP (the terminal closed) while `up` serves: it drains and exits 0 as on Ctrl-C, and its
    PostgreSQL stops with it. It was SIGHUP's default action: no drain, the server left running."""
    log = tmp_path / "up.log"
    process, _ = await _start(data_dir, free_port(), free_port(), log, LOG_LEVEL="INFO")
    try:
        assert _postmaster(data_dir) is not None
        text = await _stopped_by(process, signal.SIGHUP, log)
        assert '"msg": "draining"' in text and '"msg": "stopped"' in text, text
        assert _postmaster(data_dir) is None, "up exited and left its PostgreSQL running"
    finally:
        await _clean_up(process, data_dir)


async def test_an_up_after_one_that_was_killed_still_stops_the_postgres_they_shared(
    tmp_path: Path, data_dir: Path
) -> None:
    """`up` killed with SIGKILL leaves its PostgreSQL running (nothing can stop it then); the next
    `up` takes that server over. pgserver stops a server only when the exiting process is the last
    one on its list, where the killed one stayed for good: no `up` on that data dir ever stopped
    its PostgreSQL again."""
    log = tmp_path / "up.log"
    port, chat_port = free_port(), free_port()
    process, _ = await _start(data_dir, port, chat_port, log)
    try:
        process.kill()
        await process.wait()
        postmaster = _postmaster(data_dir)
        assert postmaster is not None

        process, _ = await _start(data_dir, port, chat_port, log, LOG_LEVEL="INFO")
        assert _postmaster(data_dir) == postmaster  # taken over, not started again
        await _stop(process)
        assert _postmaster(data_dir) is None, f"up exited and left its PostgreSQL running:\n{log.read_text()}"
    finally:
        await _clean_up(process, data_dir)


async def test_up_reports_the_chat_apis_spans_under_the_gateways(
    tmp_path: Path, database: str, aiohttp_server: Any
) -> None:
    """`up` hands the chat API the same ZIPKIN_URL: its spans nest under the gateway's."""
    spans: list[dict[str, Any]] = []

    async def collect(request: web.Request) -> web.Response:
        spans.extend(await request.json())
        return web.Response(status=202)

    collector = web.Application()
    collector.router.add_post("/api/v2/spans", collect)
    zipkin = await aiohttp_server(collector)
    port, chat_port = free_port(), free_port()
    process, token = await _start(
        tmp_path, port, chat_port, tmp_path / "up.log",
        POSTGRES_DSN=database, ZIPKIN_URL=str(zipkin.make_url("/api/v2/spans")),
    )  # fmt: skip
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        headers = {"Authorization": f"Bearer {token}", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"http://127.0.0.1:{port}/api/v1/chat/sessions") as response:
                assert response.status == 200, await response.text()

        def by(service: str, kind: str) -> list[dict[str, Any]]:
            return [
                s for s in spans
                if s["traceId"] == trace_id and s["localEndpoint"]["serviceName"] == service and s.get("kind") == kind
            ]  # fmt: skip

        # Two reporters, each posting on its own clock.
        await wait_until(
            lambda: by("intelligence-engine", "SERVER") and by("gateway", "CLIENT"), what="both apps' spans"
        )
        (chat_server,) = by("intelligence-engine", "SERVER")
        (gateway_client,) = by("gateway", "CLIENT")
        assert chat_server["parentId"] == gateway_client["id"]
    finally:
        await _stop(process)


async def _banner(process: asyncio.subprocess.Process, log: Path, deadline_s: float = 60) -> str:
    """The banner ``up`` prints once both apps listen (``up`` is serving from then on)."""
    deadline = time.monotonic() + deadline_s
    while "/health/detailed" not in (text := log.read_text(errors="replace")):
        assert process.returncode is None, text
        assert time.monotonic() < deadline, f"no banner within {deadline_s} s:\n{text}"
        await asyncio.sleep(0.01)
    return text


@pytest.mark.parametrize(
    ("gateway_host", "chat_host", "chat_port", "base_host"),
    [
        ("::1", "::1", None, "[::1]"),
        ("::", "::", None, "[::1]"),
        ("", "", None, "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1", "0", "127.0.0.1"),
    ],
    ids=["ipv6-loopback", "ipv6-wildcard", "every-interface", "ephemeral-chat-port"],
)
async def test_ups_printed_curl_lines_work_and_route_chats_on_any_listen_address(
    tmp_path: Path, database: str, gateway_host: str, chat_host: str, chat_port: str | None, base_host: str
) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    env = _env(
        tmp_path,
        port,
        free_port(),
        POSTGRES_DSN=database,
        GATEWAY_HOST=gateway_host,
        INTELLIGENCE_HOST=chat_host,
    )
    if chat_port is not None:
        env["INTELLIGENCE_PORT"] = chat_port
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "up", cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        text = await _banner(process, log)
        token = re.findall(r"export TOKEN=(\S+)", text)[-1]
        (create_url,) = re.findall(r"-d '\{\"title\": \"first chat\"\}' (\S+)", text)
        (health_url,) = re.findall(r"curl (http\S+)", text)
        (chat_api,) = re.findall(r"chat API on (http\S+),", text)
        assert create_url == f"http://{base_host}:{port}/api/v1/chat/sessions", text
        assert ":0," not in text and not chat_api.endswith(":0"), text

        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            async with session.post(create_url, data='{"title": "first chat"}', headers=headers) as response:
                assert response.status == 201, await response.text()
            async with session.get(health_url) as response:
                components = (await response.json())["components"]
                assert components["intelligence-engine"]["status"] == "healthy", components
            async with session.get(f"{chat_api}/health") as response:  # the address printed is the chat API's
                assert response.status == 200
    finally:
        await _stop(process)


def test_up_stops_with_one_line_on_a_bad_chat_setting(tmp_path: Path, database: str) -> None:
    env = _env(tmp_path, free_port(), free_port(), POSTGRES_DSN=database, CHAT_CACHE_TTL="soon")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("gateway: configuration error: CHAT_CACHE_TTL")
    assert "Traceback" not in done.stderr


def test_up_with_an_unreachable_database_names_it_without_the_password(tmp_path: Path) -> None:
    port = free_port()
    dsn = f"postgresql://chat:pw-{tmp_path.name}@127.0.0.1:{port}/chats"
    env = _env(tmp_path, free_port(), free_port(), POSTGRES_DSN=dsn, LOG_LEVEL="ERROR")

    assert refusal(run_program("gateway", "up", env=env)) == (
        f"gateway: cannot prepare the chat database at 127.0.0.1:{port} (database chats, user chat): "
        "Connection refused. Is the server running on that host and accepting TCP/IP connections?"
    )


def test_up_on_a_port_in_use_stops_with_one_line(tmp_path: Path, database: str, busy_port: int) -> None:
    env = _env(tmp_path, busy_port, free_port(), POSTGRES_DSN=database, LOG_LEVEL="ERROR")

    assert refusal(run_program("gateway", "up", env=env)) == (
        f"gateway: cannot listen on 127.0.0.1:{busy_port}: address already in use "
        "(GATEWAY_HOST, GATEWAY_PORT)"
    )


def test_up_with_a_data_dir_that_is_a_file_stops_with_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("")
    env = _env(data_dir, free_port(), free_port(), LOG_LEVEL="ERROR")

    assert refusal(run_program("gateway", "up", env=env)) == (
        f"gateway: configuration error: GATEWAY_DATA_DIR: cannot keep the development secret in {data_dir}: "
        "not a directory"
    )
