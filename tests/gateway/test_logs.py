"""The access log of a real ``python -m gateway`` process: one JSON line per request, no secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import logs
from gateway.logs import JsonFormatter, _TextFormatter, configure_logging, lines_dropped
from gateway.settings import load_settings
from tests.helpers import ROOT, free_port, one_service, program_env, running_gateway, wait_for

SECRET_TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"


async def test_access_log_has_one_json_line_per_request_and_no_secrets(
    make_upstream: Any, tmp_path: Path
) -> None:
    never = asyncio.Event()
    hanging = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.path == "/api/hang":
            hanging.set()
            await never.wait()  # the client gives up first
        await asyncio.sleep(0.0125)  # an upstream that takes 12.5 ms to answer
        return web.json_response({"ok": True})

    upstream = await make_upstream(slow)
    async with running_gateway(
        one_service(upstream.url, prefix="/api"),
        tmp_path,
        LOG_FORMAT="json",
        AUTH_JWT_SECRET="a-development-secret-that-must-not-be-logged-xxxxxxxx",
        # A collector that refuses: its failure is logged with its URL, which carries a password.
        ZIPKIN_URL=f"http://zipkin-user:zipkin-password-not-logged@127.0.0.1:{free_port()}/api/v2/spans",
    ) as gateway:
        base, log_path = gateway.base, gateway.log
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/api/items?token={SECRET_TOKEN}",
                data=b'{"a": 1}',
                headers={
                    "Authorization": f"Bearer {SECRET_TOKEN}",
                    "Cookie": f"session={SECRET_TOKEN}",
                    "Content-Type": "application/json",
                    "X-Request-ID": "trace-me-123",
                },
            ) as response:
                assert response.status == 200
            async with session.get(f"{base}/nowhere") as response:
                assert response.status == 404
            async with session.get(
                f"{base}/api/fetch/http://user:path-password-not-logged@example.com/x"
            ) as response:
                assert response.status == 200
        # A quote and a backslash in the path, as sent (HTTP's parser lets both through): the line
        # must still be JSON.
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b'GET /api/q"uote\\back HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        await wait_for(lambda: "uote" in log_path.read_text(), what="the quoted path's line")
        writer.close()
        # A client that goes away while the upstream thinks: nginx logs 499, so does the gateway.
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /api/hang HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await hanging.wait()
        writer.close()
        await wait_for(lambda: "/api/hang" in log_path.read_text(), what="the abandoned request's line")
        await wait_for(
            lambda: "zipkin collector unavailable" in log_path.read_text(), what="the collector's failure"
        )
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0
    never.set()

    text = log_path.read_text()
    assert SECRET_TOKEN not in text
    assert "a-development-secret" not in text
    assert "zipkin-password-not-logged" not in text and "http://***@127.0.0.1:" in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [
        entry for entry in lines if entry.get("msg") == "request" and entry.get("path") != "/health/ready"
    ]
    assert "path-password-not-logged" not in text
    assert [entry["path"] for entry in access] == [
        "/api/items", "/nowhere", "/api/fetch/http://***@example.com/x", '/api/q"uote\\back', "/api/hang"
    ]  # fmt: skip
    proxied, missing, _, _, abandoned = access
    assert abandoned["status"] == 499 and abandoned["route"] == "/api"
    assert abandoned["upstream"] == upstream.url and abandoned["bytes_out"] == 0
    assert proxied["method"] == "POST"
    assert proxied["route"] == "/api"
    assert proxied["upstream"] == upstream.url
    assert proxied["status"] == 200
    assert proxied["bytes_in"] == 8
    assert proxied["bytes_out"] > 0
    assert 12.5 <= proxied["duration_ms"] < 10_000
    # Measured to the microsecond, not with the event loop's clock, which uvloop keeps in whole
    # milliseconds: with that, every duration is a whole number (here both would be; with a real
    # clock the chance is about one in a million).
    assert any(entry["duration_ms"] != int(entry["duration_ms"]) for entry in access)
    assert proxied["request_id"] == "trace-me-123"
    assert missing["status"] == 404 and missing["route"] is None
    assert len(missing["request_id"]) >= 16


async def test_a_websocket_sessions_line_counts_the_messages_that_crossed(
    make_upstream: Any, tmp_path: Path
) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
        return ws

    upstream = await make_upstream(echo)
    async with running_gateway(one_service(upstream.url, prefix="/ws"), tmp_path) as gateway:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{gateway.base}/ws/room") as ws:
            await ws.send_str("héllo")  # 6 bytes in UTF-8
            assert (await ws.receive(timeout=5)).data == "echo:héllo"
            await ws.send_bytes(b"x" * 1000)
            assert (await ws.receive(timeout=5)).data == b"echo:" + b"x" * 1000
        await wait_for(lambda: '"path": "/ws/room"' in gateway.log.read_text(), what="the session's line")

    (line,) = [
        json.loads(text) for text in gateway.log.read_text().splitlines() if '"path": "/ws/room"' in text
    ]
    assert line["status"] == 101
    assert line["bytes_in"] == 6 + 1000
    handshake = line["bytes_out"] - (11 + 1005)
    assert 0 < handshake < 1000, line


# What a URL keeps unescaped in its userinfo (RFC 3986's sub-delimiters), as settings store it.
PASSWORD = "it's-a-$ecret!(*)+,;=~"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_url_password_is_hidden_whatever_characters_it_holds(fmt: str) -> None:
    url = load_settings({"ZIPKIN_URL": f"http://user:{PASSWORD}@127.0.0.1:9411/api/v2/spans"}).zipkin_url
    assert url is not None and PASSWORD in url
    formatter = JsonFormatter() if fmt == "json" else _TextFormatter("%(message)s")
    record = logging.makeLogRecord(
        {"name": "gateway.zipkin", "levelname": "WARNING", "msg": "zipkin collector unavailable", "url": url}
    )
    line = formatter.format(record)
    assert "ecret" not in line and "it's" not in line
    assert "http://***@127.0.0.1:9411/api/v2/spans" in line


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize(
    "field",
    [
        "authorization",
        "Authorization",
        "auth_token",
        "postgres_dsn",
        "db_password",
        "set_cookie",
        "client_secret",
    ],
)
def test_a_field_whose_name_says_secret_is_redacted(fmt: str, field: str) -> None:
    """Whatever a log call passes in ``extra`` under such a name (a header, a setting, a DSN)."""
    formatter = JsonFormatter() if fmt == "json" else _TextFormatter("%(message)s")
    record = logging.makeLogRecord(
        {
            "name": "gateway.test",
            "levelname": "WARNING",
            "msg": "calling",
            field: "s3cr3t-value",
            "peer": "10.0.0.7",
        }
    )
    line = formatter.format(record)
    assert "s3cr3t-value" not in line
    assert "10.0.0.7" in line  # the rest of the line stays
    if fmt == "json":
        assert json.loads(line)[field] == "[redacted]"
    else:
        assert f"{field}=[redacted]" in line


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_every_url_password_in_a_line_is_hidden(fmt: str) -> None:
    formatter = JsonFormatter() if fmt == "json" else _TextFormatter("%(message)s")
    record = logging.makeLogRecord(
        {
            "name": "gateway.test",
            "levelname": "WARNING",
            "msg": "moved from http://a:first-pass@one.example/x to http://b:second-pass@two.example/y",
        }
    )
    line = formatter.format(record)
    assert "first-pass" not in line and "second-pass" not in line
    assert "http://***@one.example/x" in line and "http://***@two.example/y" in line


def test_text_lines_carry_the_same_timestamp_as_access_lines() -> None:
    formatter = _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.makeLogRecord({"name": "gateway", "levelname": "INFO", "msg": "listening"})
    record.created = 1_795_000_000.25
    access = formatter.format_entry({"ts": logs._timestamp(1_795_000_000.25), "level": "info",
                                     "logger": "gateway.access", "msg": "request"})  # fmt: skip
    stamp = "2026-11-18T11:06:40.250Z"
    assert formatter.format(record) == f"{stamp} INFO gateway: listening"
    assert access.startswith(f"{stamp} INFO gateway.access: request")


@contextlib.contextmanager
def _logging_to_a_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Any]]:
    """The gateway's real logging set-up, its stderr a pipe whose reading end the caller holds
    (non-blocking); the test's logging restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    stream = os.fdopen(write_fd, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", "json")
    try:
        yield read_fd, stream
    finally:
        # Whatever the test left unread is read now, so that the writer can stop.
        os.set_blocking(read_fd, True)
        reader = threading.Thread(target=_read_to_end, args=(read_fd,))
        reader.start()
        assert logs._writer is not None
        logs._writer.stop()
        logs._writer = logs.access_entries = None
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        stream.close()
        reader.join(timeout=10)
        os.close(read_fd)


@pytest.fixture
def unread_stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Any]]:
    with _logging_to_a_pipe(monkeypatch) as pipe:
        yield pipe


def _read_to_end(fd: int) -> None:
    while os.read(fd, 65536):
        pass


async def test_a_stderr_nobody_reads_holds_bounded_lines_and_the_loss_is_reported(
    unread_stderr: tuple[int, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_fd, _ = unread_stderr
    monkeypatch.setattr(logs, "MAX_PENDING", 100_000, raising=False)
    log = logging.getLogger("gateway.test")
    for n in range(1000):  # a megabyte of lines against a pipe that holds 64 KB
        log.warning("%d %s", n, "x" * 1000)
    # The rest are dropped, not queued without end.
    assert logs._writer is not None
    assert logs._writer.queue.qsize() <= 200
    assert lines_dropped() >= 800

    received = bytearray()

    def reported() -> bool:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_fd, 65536):
                received.extend(chunk)
        return b"log lines dropped" in received and logs._writer is not None and logs._writer.queue.empty()

    await wait_for(reported, what="the writer to catch up and report the loss")
    lines = [json.loads(line) for line in received.decode().splitlines()]
    # A line for many lost ones (once at once, then when the queue empties), not one each.
    reports = [line for line in lines if line["logger"] == "gateway.logs"]
    assert 1 <= len(reports) <= 2
    assert all(report["level"] == "warning" for report in reports)
    assert sum(report["dropped"] for report in reports) == lines_dropped()
    assert len(lines) - len(reports) + lines_dropped() == 1000


async def test_a_batch_of_access_lines_dropped_counts_every_line(
    unread_stderr: tuple[int, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "MAX_PENDING", 100_000, raising=False)
    log = logging.getLogger("gateway.test")
    for n in range(200):  # 200 KB against a pipe that holds 64 KB: the writer falls behind
        log.warning("%d %s", n, "x" * 1000)
    before = lines_dropped()
    assert before > 0
    for n in range(logs.ACCESS_BATCH):  # one full batch, handed over at once, and dropped
        logs._add_access(f'{{"msg": "request", "n": {n}}}')
    assert lines_dropped() - before == logs.ACCESS_BATCH


async def test_a_writer_that_keeps_up_drops_nothing_however_much_is_logged_in_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound is on lines not yet written: 20 rounds of 50 KB, each written before the next,
    are 1 MB in all against a bound of 100 KB, and nothing may be dropped."""
    monkeypatch.setattr(logs, "MAX_PENDING", 100_000, raising=False)
    with _logging_to_a_pipe(monkeypatch) as (read_fd, _):
        os.set_blocking(read_fd, True)
        reader = threading.Thread(target=_read_to_end, args=(read_fd,))  # stderr read as written
        reader.start()
        log = logging.getLogger("gateway.test")
        for _ in range(20):
            for n in range(50):
                log.warning("%d %s", n, "x" * 1000)
            logs.flush_logs()
        assert lines_dropped() == 0
    reader.join(timeout=10)


def test_access_lines_still_batched_when_the_process_exits_are_written() -> None:
    """A line is handed to the writer within 50 ms; one made just before the exit was lost."""
    script = (
        "import asyncio; from gateway import logs; logs.configure_logging('INFO', 'json')\n"
        'async def main(): logs._add_access(\'{"msg": "request", "path": "/the-last-one"}\')\n'
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=program_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert '"path": "/the-last-one"' in result.stderr


async def test_a_process_whose_stderr_nobody_reads_still_exits() -> None:
    script = (
        "import logging; from gateway import logs; logs.STOP_TIMEOUT = 0.5; logs.configure_logging(); "
        "[logging.getLogger('gateway.test').warning('x' * 1000) for _ in range(500)]"
    )
    read_fd, write_fd = os.pipe()  # never read: it fills after 64 KB
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, cwd=ROOT, env=program_env(), stderr=write_fd
        )
        os.close(write_fd)
        try:
            async with asyncio.timeout(15):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        os.close(read_fd)
