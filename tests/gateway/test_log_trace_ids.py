"""JSON log lines lead to their trace: trace_id, span_id and request_id on the access line and on
any line logged while a request is handled."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import logs
from gateway.app import create_app
from gateway.logs import JsonAccessLogger, configure_logging
from gateway.settings import load_settings
from tests.conftest import GatewayTestServer
from tests.helpers import one_service, open_slow_reader, parse_responses, raw_exchange, wait_for


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The gateway's real logging set-up, writing to a buffer; the test's logging restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("INFO", "json")
    yield out
    assert logs._writer is not None
    logs._writer.stop()
    logs._writer = logs.access_entries = None
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


async def test_access_and_request_lines_carry_trace_ids(
    json_logs: io.StringIO, aiohttp_client: Any, make_raw_upstream: Any, tmp_path: Path
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # and close without an answer

    url = await make_raw_upstream(hang_up)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(one_service(url)))
    app = create_app(load_settings({"GATEWAY_CONFIG": str(path)}))
    server = TestServer(app)
    # As server.py runs it: the JSON access logger.
    await server.start_server(
        access_log_class=JsonAccessLogger, access_log=logging.getLogger("gateway.access")
    )
    client = await aiohttp_client(server)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await client.post(
        "/x?token=hunter2",
        data=b"{}",
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-ID": "req-42"},
    )
    assert response.status == 502

    def written() -> bool:
        return any(e.get("msg") == "request" for e in lines(json_logs))

    await wait_for(written, what="the access log line")
    entries = lines(json_logs)
    access = next(e for e in entries if e["msg"] == "request")
    assert access["trace_id"] == trace_id
    assert access["request_id"] == "req-42"
    assert len(access["span_id"]) == 16 and access["span_id"] != "00f067aa0ba902b7"
    assert access["path"] == "/x"  # never the query, which may carry secrets
    assert "hunter2" not in json_logs.getvalue()

    inside = next(e for e in entries if e["msg"] == "upstream disconnected")
    assert inside["trace_id"] == trace_id
    assert inside["request_id"] == "req-42"
    # Logged during the upstream call: the CLIENT span, a child of the request's span.
    assert len(inside["span_id"]) == 16 and inside["span_id"] != access["span_id"]


async def test_lines_outside_requests_have_no_trace_ids(json_logs: io.StringIO) -> None:
    logging.getLogger("gateway.test").warning("outside")
    await wait_for(lambda: "outside" in json_logs.getvalue(), what="the line")
    (entry,) = [e for e in lines(json_logs) if e["msg"] == "outside"]
    assert "trace_id" not in entry and "request_id" not in entry


async def test_an_error_quoting_a_non_utf8_header_has_the_access_lines_request_id(
    json_logs: io.StringIO, aiohttp_client: Any, make_upstream: Any, tmp_path: Path
) -> None:
    # Quoting these bytes back once failed the error's rendering; the runner's fallback 500
    # then carried a request id of its own, one no log line mentioned.
    upstream = await make_upstream()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(one_service(upstream.url, content_types=["application/json"])))
    server = GatewayTestServer(create_app(load_settings({"GATEWAY_CONFIG": str(path)})))
    await server.start_server(
        access_log_class=JsonAccessLogger, access_log=logging.getLogger("gateway.access")
    )
    data = await raw_exchange(
        server.port,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\xe9\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    await server.close()
    (response,) = parse_responses(data)
    assert response.status == 415

    await wait_for(lambda: any(e.get("msg") == "request" for e in lines(json_logs)), what="the access line")
    access = next(e for e in lines(json_logs) if e["msg"] == "request")
    assert access["status"] == 415
    assert access["request_id"] == response.headers["X-Request-ID"]
    assert not [e for e in lines(json_logs) if e["level"] in ("error", "critical")]


async def test_a_request_the_parser_refuses_is_logged_with_its_trace_ids(
    json_logs: io.StringIO, make_upstream: Any, tmp_path: Path
) -> None:
    upstream = await make_upstream()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(one_service(upstream.url)))
    server = GatewayTestServer(create_app(load_settings({"GATEWAY_CONFIG": str(path)})))
    await server.start_server(
        access_log_class=JsonAccessLogger, access_log=logging.getLogger("gateway.access")
    )
    data = await raw_exchange(server.port, b"GARBAGE\r\n\r\n")
    await server.close()
    (response,) = parse_responses(data)
    assert response.status == 400

    await wait_for(lambda: any(e.get("msg") == "request" for e in lines(json_logs)), what="the access line")
    entries = lines(json_logs)
    access = next(e for e in entries if e["msg"] == "request")
    refused = next(e for e in entries if e["msg"] == "malformed request")
    assert access["request_id"] == refused["request_id"] == response.headers["X-Request-ID"]
    assert len(access["trace_id"]) == 32 and access["trace_id"] == refused["trace_id"]
    assert access["span_id"] == refused["span_id"]


async def test_a_client_cut_off_for_not_reading_is_logged_with_its_trace_ids(
    json_logs: io.StringIO, make_gateway: Any, make_upstream: Any
) -> None:
    # The send timer fires outside the request's context, so the line would lead nowhere.
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            await response.write(b"x" * 65536)

    upstream = await make_upstream(endless)
    client = await make_gateway(one_service(upstream.url), server_kwargs={"send_timeout": 0.2})
    _, writer = await open_slow_reader(client.port)
    try:
        writer.write(b"GET /stream HTTP/1.1\r\nHost: gw\r\nX-Request-ID: stalled-reader-1\r\n\r\n")

        def cut_off() -> list[dict[str, Any]]:
            return [line for line in lines(json_logs) if line["msg"].startswith("client stopped reading")]

        await wait_for(lambda: bool(cut_off()), what="the cut-off line")
    finally:
        writer.close()
    [line] = cut_off()
    assert line["request_id"] == "stalled-reader-1"
    assert len(line["trace_id"]) == 32 and len(line["span_id"]) == 16
