"""Tracing end to end: client -> gateway -> upstream, spans checked at a real Zipkin-API collector."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiozipkin as az
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiozipkin.helpers import TraceContext as ZipkinContext
from aiozipkin.record import Record

from gateway.app import create_app
from gateway.keys import tracing_key
from gateway.middleware.tracing import Tracing, inject_trace_headers, tracing_middleware
from gateway.settings import load_settings
from gateway.zipkin import ZipkinReporter
from tests.helpers import Collector, one_service, parse_responses, raw_exchange, wait_for

INCOMING_TRACE = "0af7651916cd43dd8448eb211c80319c"
INCOMING_PARENT = "b7ad6b7169203331"


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[list[dict[str, str]], str]:
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        status = int(request.query.get("status", "200"))
        return web.json_response({"ok": True}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    return seen, str(server.make_url("")).rstrip("/")


async def _gateway(tmp_path: Path, upstream_url: str, **env: str) -> TestClient:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "services": {"backend": {"url": upstream_url}},
                "routes": [{"prefix": "/api/v1/clusters", "service": "backend", "auth": "none"}],
            }
        )
    )
    app = create_app(load_settings({"GATEWAY_CONFIG": str(config), **env}))
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def traced(tmp_path: Path, collector: Any, upstream: Any) -> Any:
    clients: list[TestClient] = []

    async def make(**env: str) -> TestClient:
        env.setdefault("ZIPKIN_URL", collector[1])
        client = await _gateway(tmp_path, upstream[1], **env)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def _flush(client: TestClient) -> None:
    reporter = client.app[tracing_key].reporter
    assert reporter is not None
    await reporter.flush()


async def test_traceparent_reaches_backend_with_same_trace_and_new_parent(traced: Any, upstream: Any) -> None:
    client = await traced()
    traceparent = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"
    response = await client.get("/api/v1/clusters", headers={"traceparent": traceparent})
    assert response.status == 200
    seen = upstream[0][-1]
    version, trace_id, parent_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", INCOMING_TRACE, "01")
    assert parent_id != INCOMING_PARENT and re.fullmatch(r"[0-9a-f]{16}", parent_id)
    # B3 agrees with W3C: same trace, the calling span is the traceparent's parent.
    assert seen["x-b3-traceid"] == INCOMING_TRACE
    assert seen["x-b3-spanid"] == parent_id
    assert seen["x-b3-sampled"] == "1"
    assert "b3" not in seen


async def test_server_and_client_spans_form_parent_and_child(
    traced: Any, collector: Any, upstream: Any
) -> None:
    client = await traced()
    await client.get(
        "/api/v1/clusters/abc", headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"}
    )
    await _flush(client)
    spans = collector[0]
    (server,) = spans.by_kind("SERVER")
    (child,) = spans.by_kind("CLIENT")
    assert server["traceId"] == child["traceId"] == INCOMING_TRACE
    assert server["parentId"] == INCOMING_PARENT
    assert child["parentId"] == server["id"]
    # The backend was told that the CLIENT span called it.
    assert upstream[0][-1]["traceparent"].split("-")[2] == child["id"]
    assert upstream[0][-1]["x-b3-parentspanid"] == server["id"]
    assert server["name"] == "GET /api/v1/clusters"
    assert server["tags"]["http.route"] == "/api/v1/clusters"
    assert server["tags"]["http.path"] == "/api/v1/clusters/abc"
    assert server["tags"]["http.status_code"] == "200"
    assert child["remoteEndpoint"]["serviceName"] == "backend"
    assert child["tags"]["http.method"] == "GET"
    assert child["tags"]["http.path"] == "/api/v1/clusters/abc"
    # The client span lies within the server span.
    assert server["timestamp"] <= child["timestamp"]
    assert child["timestamp"] + child["duration"] <= server["timestamp"] + server["duration"]


async def test_request_without_context_starts_a_new_trace(traced: Any, collector: Any, upstream: Any) -> None:
    client = await traced()
    await client.get("/api/v1/clusters")
    await _flush(client)
    (server,) = collector[0].by_kind("SERVER")
    assert "parentId" not in server
    assert re.fullmatch(r"[0-9a-f]{32}", server["traceId"])
    assert upstream[0][-1]["traceparent"].split("-")[1] == server["traceId"]


async def test_rejected_request_still_gets_a_span_with_its_status(traced: Any, collector: Any) -> None:
    client = await traced()
    response = await client.get("/nowhere/7f3a")
    assert response.status == 404
    await _flush(client)
    (server,) = collector[0].by_kind("SERVER")
    assert server["tags"]["http.status_code"] == "404"
    assert "error" not in server["tags"]
    # No route: named by the method alone, so that paths clients invent do not each make a name.
    assert server["name"] == "GET" and "http.route" not in server["tags"]
    assert server["tags"]["http.path"] == "/nowhere/7f3a"


async def test_a_request_the_parser_refuses_gets_a_server_span_of_its_own(
    make_gateway: Any, make_upstream: Any, collector: Any
) -> None:
    # Its head was not parsed: no caller context, method or path to name it by.
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url), {"ZIPKIN_URL": collector[1]})
    (response,) = parse_responses(await raw_exchange(client.port, b"GARBAGE\r\n\r\n"))
    assert response.status == 400
    await _flush(client)
    (server,) = collector[0].spans
    assert server["kind"] == "SERVER" and "parentId" not in server
    assert server["name"] == "HTTP"
    assert server["tags"]["http.status_code"] == "400"
    assert server["tags"]["request_id"] == response.headers["X-Request-ID"]
    assert "error" not in server["tags"]


async def test_the_gateways_own_endpoints_are_named_by_their_paths(traced: Any, collector: Any) -> None:
    client = await traced()
    assert (await client.get("/health")).status == 200
    await _flush(client)
    (server,) = collector[0].by_kind("SERVER")
    assert server["name"] == "GET /health" and server["tags"]["http.route"] == "/health"


@pytest.mark.parametrize(("status", "error"), [(500, "500"), (503, "503"), (499, None)])
async def test_upstream_5xx_marks_the_span_as_error(
    traced: Any, collector: Any, status: int, error: str | None
) -> None:
    client = await traced()
    response = await client.get(f"/api/v1/clusters?status={status}")
    assert response.status == status
    await _flush(client)
    (server,) = collector[0].by_kind("SERVER")
    assert server["tags"].get("error") == error


async def test_incoming_not_sampled_is_honoured(traced: Any, collector: Any, upstream: Any) -> None:
    client = await traced(TRACE_SAMPLE_RATE="1.0")
    await client.get("/api/v1/clusters", headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-00"})
    await _flush(client)
    assert collector[0].spans == []
    seen = upstream[0][-1]
    assert seen["traceparent"].endswith("-00")
    assert seen["x-b3-sampled"] == "0"


async def test_sample_rate_zero_reports_nothing_but_still_propagates(
    traced: Any, collector: Any, upstream: Any
) -> None:
    client = await traced(TRACE_SAMPLE_RATE="0")
    await client.get("/api/v1/clusters")
    await _flush(client)
    assert collector[0].spans == []
    assert upstream[0][-1]["traceparent"].endswith("-00")


async def test_b3_debug_is_propagated_as_flags(traced: Any, upstream: Any) -> None:
    client = await traced()
    await client.get("/api/v1/clusters", headers={"b3": f"{INCOMING_TRACE}-{INCOMING_PARENT}-d"})
    seen = upstream[0][-1]
    assert seen["x-b3-flags"] == "1"
    assert "x-b3-sampled" not in seen
    assert seen["traceparent"].endswith("-01")


async def test_tracestate_passes_on_unchanged(traced: Any, upstream: Any) -> None:
    client = await traced()
    await client.get(
        "/api/v1/clusters",
        headers={
            "traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01",
            "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        },
    )
    assert upstream[0][-1]["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("0f9c2e1a-5b7d-4c1e-9a3f-2b8d6e4c1a7f", True),
        ("x" * 129, False),
        ("bad id with spaces", False),
        ("evil\u00e9", False),
    ],
)
async def test_request_id_is_kept_when_sane_and_echoed_upstream_and_on_span(
    traced: Any, collector: Any, upstream: Any, sent: str, kept: bool
) -> None:
    client = await traced()
    response = await client.get(
        "/api/v1/clusters", headers={"x-request-id": sent.encode("utf-8").decode("latin-1")}
    )
    request_id = response.headers["x-request-id"]
    assert (request_id == sent) is kept
    assert upstream[0][-1]["x-request-id"] == request_id
    await _flush(client)
    (server,) = collector[0].by_kind("SERVER")
    assert server["tags"]["request_id"] == request_id


async def test_every_gateway_error_carries_a_request_id(traced: Any) -> None:
    client = await traced()
    response = await client.get("/nowhere")
    assert response.status == 404
    assert response.content_type == "application/json"
    assert len(response.headers["x-request-id"]) >= 16


async def test_collector_down_never_fails_a_request(
    tmp_path: Path, upstream: Any, unused_tcp_port: int
) -> None:
    client = await _gateway(
        tmp_path, upstream[1], ZIPKIN_URL=f"http://127.0.0.1:{unused_tcp_port}/api/v2/spans"
    )
    try:
        for _ in range(3):
            response = await client.get("/api/v1/clusters")
            assert response.status == 200
        reporter = client.app[tracing_key].reporter
        await reporter.flush()
        assert reporter.dropped == 6  # 3 requests x (SERVER + CLIENT)
        assert reporter.sent == 0
    finally:
        await client.close()


async def _collector(aiohttp_server: Any, handler: Callable[[web.Request], Awaitable[web.Response]]) -> str:
    """A Zipkin collector answering ``handler`` on loopback: its spans URL."""
    app = web.Application()
    app.router.add_post("/api/v2/spans", handler)
    return str((await aiohttp_server(app)).make_url("/api/v2/spans"))


def _span(n: int) -> Record:
    """A finished SERVER span with id ``n``, of the shape the gateway reports (``Collector`` checks)."""
    context = ZipkinContext(INCOMING_TRACE, None, f"{n:016x}", True, False, False)
    now = int(time.time() * 1_000_000)
    return (
        Record(context, az.create_endpoint("gateway"))
        .name("GET /x")
        .kind(az.SERVER)
        .start(now)
        .finish(now + 1000)
    )


def test_span_buffer_is_bounded_and_counts_drops() -> None:
    reporter = ZipkinReporter("http://127.0.0.1:9/api/v2/spans", max_buffer=4, batch_size=1000)
    for n in range(10):
        reporter.send(_span(n + 1))
    assert len(reporter.buffer) == 4
    assert reporter.dropped == 6


async def test_the_span_buffers_byte_bound_is_on_what_waits_not_on_all_ever_sent(
    collector: tuple[Collector, str],
) -> None:
    # The reporter's task sends a batch whenever two spans wait (batch_size), one post at a time.
    stub, url = collector
    reporter = ZipkinReporter(url, batch_size=2, interval=3600, max_buffer_bytes=2000)
    await reporter.start()
    try:
        for n in range(1, 41):  # 7.5 KB of spans in all (189 bytes each), never more than a batch waiting
            reporter.send(_span(n))
            await wait_for(lambda: not reporter.buffer or len(reporter.buffer) == 1, what="a batch sent")
        await wait_for(lambda: reporter.sent == 40, what="all forty sent")
        assert (reporter.dropped, reporter.buffered_bytes) == (0, 0)
        reporter.send(_span(41))  # the last request before a stop: less than a batch, left waiting
    finally:
        await reporter.close()
    assert [span["id"] for span in stub.spans] == [f"{n:016x}" for n in range(1, 42)]  # all, in order
    assert reporter.dropped == 0


async def test_a_collector_failure_loses_the_batch_it_refused_and_no_other(
    collector: tuple[Collector, str],
) -> None:
    stub, url = collector
    stub.unavailable = 1
    reporter = ZipkinReporter(url, batch_size=2, interval=3600)
    await reporter.start()
    try:
        for n in range(1, 5):
            reporter.send(_span(n))
        # The task's round: the first batch fails and is dropped; the second waits for the next.
        await wait_for(lambda: reporter.dropped == 2, what="the refused batch dropped")
        assert len(reporter.buffer) == 2 and stub.spans == []
        await reporter.flush()
        assert [span["id"] for span in stub.spans] == [f"{n:016x}" for n in (3, 4)]
    finally:
        await reporter.close()


async def test_closing_sends_what_is_left_within_one_timeout_in_all(aiohttp_server: Any) -> None:
    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.1)  # a collector that takes its time over every batch
        return web.Response(status=202)

    url = await _collector(aiohttp_server, slow)
    reporter = ZipkinReporter(url, batch_size=1, interval=3600, timeout=0.3)
    await reporter.start()
    for n in range(20):
        reporter.send(_span(n + 1))
    started = time.monotonic()
    await reporter.close()
    elapsed = time.monotonic() - started
    # One batch at a time, the twenty would take two seconds: the stop waits for one timeout.
    assert elapsed < 1.0, f"close took {elapsed:.2f}s"
    assert not reporter.buffer
    assert reporter.sent < 20
    assert reporter.sent + reporter.dropped == 20  # what was not sent is counted


async def test_a_collector_that_hangs_costs_one_timeout_and_the_reporter_goes_on(aiohttp_server: Any) -> None:
    """A collector that takes the batch and never answers: the post gives up after the
    reporter's timeout, the batch is counted as dropped, and the next one is delivered."""
    release = asyncio.Event()
    posts = 0

    async def collector(request: web.Request) -> web.Response:
        nonlocal posts
        await request.read()
        posts += 1
        if posts == 1:
            await release.wait()
        return web.Response(status=202)

    url = await _collector(aiohttp_server, collector)
    reporter = ZipkinReporter(url, batch_size=1, interval=3600, timeout=0.3)
    await reporter.start()
    try:
        reporter.send(_span(1))  # a full batch: the reporter sends it at once
        await wait_for(lambda: reporter.dropped == 1, what="the unanswered batch to be given up")
        reporter.send(_span(2))
        await wait_for(lambda: reporter.sent == 1, what="the next batch to be delivered")
    finally:
        release.set()
        await reporter.close()
    assert (reporter.sent, reporter.dropped) == (1, 1)


async def test_a_collector_coming_back_is_logged_once_after_its_failure(
    aiohttp_server: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.zipkin")
    answers = [503, 202, 202]

    async def collector(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=answers.pop(0))

    url = await _collector(aiohttp_server, collector)
    reporter = ZipkinReporter(url, interval=3600)
    await reporter.start()
    try:
        for n in range(3):
            reporter.send(_span(n + 1))
            await reporter.flush()
    finally:
        await reporter.close()
    news = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.zipkin"]
    assert news == [
        ("WARNING", "zipkin collector unavailable; dropping spans"),
        ("INFO", "zipkin collector available again"),
    ]
    assert (reporter.sent, reporter.dropped) == (2, 1)


def test_inject_trace_headers_outside_a_request_returns_headers_unchanged() -> None:
    assert inject_trace_headers({"a": "b"}) == {"a": "b"}
    assert inject_trace_headers() == {}


async def test_inject_trace_headers_replaces_the_context_in_headers_it_is_given(
    aiohttp_client: Any, upstream: Any
) -> None:
    """The seed's usage from a handler that passes on the caller's headers: the next hop gets the
    current span's context alone, not the caller's stale b3 (which outranks x-b3-*), its debug
    flag or its tracestate next to it, nor two spellings of one header."""
    stale = {
        "Accept": "application/json",
        "Traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01",
        "TraceState": "congo=t61rcWkgMzE",
        "b3": f"{INCOMING_TRACE}-{INCOMING_PARENT}-1",
        "X-B3-Flags": "1",
        "X-Request-ID": "stale-id",
    }
    sent: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        headers = inject_trace_headers(stale)
        sent.append(headers)
        async with aiohttp.ClientSession() as session, session.get(upstream[1], headers=headers) as r:
            await r.read()
        return web.Response()

    tracing = Tracing(service_name="caller", zipkin_url=None, sample_rate=1.0)
    app = web.Application(middlewares=[tracing_middleware(tracing)])
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    response = await client.get("/", headers={"x-request-id": "incoming-1"})
    assert response.status == 200
    (headers,) = sent
    names = [name.lower() for name in headers]
    assert len(names) == len(set(names))
    assert headers["Accept"] == "application/json"
    seen = upstream[0][-1]
    trace_id = seen["traceparent"].split("-")[1]
    assert trace_id != INCOMING_TRACE and seen["x-b3-traceid"] == trace_id
    assert seen["x-b3-sampled"] == "1"
    assert not {"b3", "x-b3-flags", "tracestate"} & seen.keys()
    assert seen["x-request-id"] == "incoming-1"


async def test_a_collector_that_never_answers_does_not_hold_up_requests(
    tmp_path: Path, upstream: Any, aiohttp_server: Any
) -> None:
    stuck = asyncio.Event()
    posts: list[int] = []

    async def never(request: web.Request) -> web.Response:
        posts.append(1)
        await stuck.wait()  # answers only when the test ends
        return web.Response(status=202)

    url = await _collector(aiohttp_server, never)
    client = await _gateway(tmp_path, upstream[1], ZIPKIN_URL=url)
    try:
        reporter = client.app[tracing_key].reporter
        first = await client.get("/api/v1/clusters")
        assert first.status == 200
        flushing = asyncio.create_task(reporter.flush())  # the reporter is now stuck on the collector
        await wait_for(lambda: bool(posts), what="the collector to receive a batch")
        for _ in range(5):  # requests keep flowing while a send is stuck
            response = await client.get("/api/v1/clusters")
            assert response.status == 200
        assert not flushing.done()
    finally:
        stuck.set()
        await flushing
        await client.close()


async def test_health_probes_to_backends_carry_the_trace(traced: Any, upstream: Any) -> None:
    client = await traced()
    response = await client.get(
        "/health/detailed", headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"}
    )
    assert response.status == 200
    probe = upstream[0][-1]
    assert probe["traceparent"].split("-")[1] == INCOMING_TRACE
    assert probe["x-b3-traceid"] == INCOMING_TRACE
    assert probe["x-request-id"] == response.headers["x-request-id"]


async def test_a_websocket_session_is_a_server_span_with_a_client_child(
    tmp_path: Path, collector: Any, aiohttp_server: Any
) -> None:
    """As for any call to a backend: a CLIENT span names the service, and the backend is told
    that span called it."""
    seen: list[str] = []

    async def echo(request: web.Request) -> web.WebSocketResponse:
        seen.append(request.headers["traceparent"])
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    backend = await aiohttp_server(app)
    client = await _gateway(tmp_path, str(backend.make_url("")).rstrip("/"), ZIPKIN_URL=collector[1])
    try:
        ws = await client.ws_connect(
            "/api/v1/clusters/watch", headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"}
        )
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "hi"
        await ws.close()

        def both() -> bool:
            return bool(collector[0].by_kind("SERVER")) and bool(collector[0].by_kind("CLIENT"))

        async def flushed() -> bool:
            await _flush(client)
            return both()

        deadline = asyncio.get_running_loop().time() + 5
        while not await flushed():
            assert asyncio.get_running_loop().time() < deadline, "no spans for the session"
            await asyncio.sleep(0.02)  # poll interval: the session ends after the close is answered
        (server,) = collector[0].by_kind("SERVER")
        (child,) = collector[0].by_kind("CLIENT")
        assert server["tags"]["http.status_code"] == "101" and "error" not in server["tags"]
        assert child["parentId"] == server["id"] and child["remoteEndpoint"]["serviceName"] == "backend"
        assert child["tags"]["http.status_code"] == "101" and "error" not in child["tags"]
        assert seen[0].split("-")[2] == child["id"]
    finally:
        await client.close()


async def test_a_refused_websocket_upgrade_tags_its_client_span_with_the_refusal(
    tmp_path: Path, collector: Any, aiohttp_server: Any
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"detail": "no"}, status=403)

    app = web.Application()
    app.router.add_get("/{tail:.*}", refuse)
    backend = await aiohttp_server(app)
    client = await _gateway(tmp_path, str(backend.make_url("")).rstrip("/"), ZIPKIN_URL=collector[1])
    try:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect("/api/v1/clusters/watch")
        await _flush(client)
        (child,) = collector[0].by_kind("CLIENT")
        assert child["tags"]["http.status_code"] == "403" and child["tags"]["peer.target"]
    finally:
        await client.close()


async def test_a_client_span_names_the_call_as_the_backend_received_it_without_the_query(
    tmp_path: Path, collector: Any, upstream: Any
) -> None:
    config = tmp_path / "stripped.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "services": {"backend": {"url": upstream[1] + "/base"}},
                "routes": [
                    {"prefix": "/api/v1/clusters", "service": "backend", "auth": "none", "strip_prefix": True}
                ],
            }
        )
    )
    app = create_app(load_settings({"GATEWAY_CONFIG": str(config), "ZIPKIN_URL": collector[1]}))
    async with TestClient(TestServer(app)) as client:
        response = await client.delete("/api/v1/clusters/abc/nodes?access_token=secret&x=1")
        assert response.status == 200
        await _flush(client)
    (server,) = collector[0].by_kind("SERVER")
    (call,) = collector[0].by_kind("CLIENT")
    assert server["tags"]["http.path"] == "/api/v1/clusters/abc/nodes"
    assert call["tags"]["http.method"] == "DELETE"
    assert call["tags"]["http.path"] == "/base/abc/nodes"
    assert "secret" not in json.dumps(collector[0].spans)
