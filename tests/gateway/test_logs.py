"""The access log of a real ``python -m gateway`` process: one JSON line per request, no secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.logs import JsonFormatter, _TextFormatter
from gateway.settings import load_settings
from tests.helpers import free_port, one_service, running_gateway, wait_for

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
        "/api/items", "/nowhere", "/api/fetch/http://***@example.com/x", "/api/hang"
    ]  # fmt: skip
    proxied, missing, _, abandoned = access
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
