"""Zipkin v2 spans in every way a request can end, reported to a real collector on loopback.

Every batch the gateway posts is checked by ``tests.helpers.Collector``: the official Zipkin v2
schema (``zipkin2-api.yaml``, whole, patterns anchored) plus what a Zipkin server would refuse or
misread (ids of the right length and not zero, epoch microseconds, a duration, a kind, a named
local endpoint). Here each scenario also checks how the spans link up: the gateway's SERVER span
is the caller's child, its CLIENT span the SERVER span's child, and the backend is told that the
CLIENT span called it (``traceparent`` parent, ``x-b3-spanid``; ``x-b3-parentspanid`` the SERVER
span). And that sampling decisions are honoured: a deny reports nothing, debug reports with
``debug: true``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiozipkin as az
import pytest
import yaml
import yarl
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiozipkin.helpers import TraceContext as ZipkinContext
from aiozipkin.record import Record

from gateway.app import create_app
from gateway.keys import tracing_key
from gateway.settings import load_settings
from gateway.zipkin import ZipkinReporter
from tests.conftest import GatewayTestServer
from tests.gateway.chain import AUTH_ENV, bearer
from tests.helpers import Collector, get_request, one_service, parse_responses, send_raw_path, wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
TRACEPARENT = {"traceparent": f"00-{TRACE}-{CALLER}-01"}
# What every CLIENT span of a "GET /x" on the route "/" carries, whatever became of the call.
CALL_TAGS = {"http.method": "GET", "http.path": "/x"}


@pytest.fixture
def traced(make_gateway: Any, collector: tuple[Collector, str]) -> Callable[..., Awaitable[TestClient]]:
    """``traced(config, **env)``: the gateway for ``config``, reporting to the collector."""

    async def make(config: dict[str, Any], **env: str) -> TestClient:
        return await make_gateway(config, {"ZIPKIN_URL": collector[1], **env})

    return make


async def reported(client: TestClient, collector: Collector, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """Flush the gateway's reporter until spans of ``kinds`` (one each) have arrived: a request
    whose client left is still being finished when the client sees the connection close."""

    async def arrived() -> bool:
        await client.app[tracing_key].reporter.flush()
        return sorted(s["kind"] for s in collector.spans) == sorted(kinds)

    deadline = asyncio.get_running_loop().time() + 5
    while not await arrived():
        assert asyncio.get_running_loop().time() < deadline, f"spans: {collector.spans}"
        await asyncio.sleep(0.01)  # poll interval while the handler finishes
    return collector.spans


def one(spans: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (span,) = [s for s in spans if s["kind"] == kind]
    return span


def assert_linked(
    spans: list[dict[str, Any]], upstream_headers: Any = None, *, caller: str | None = CALLER
) -> None:
    """SERVER child of the caller, CLIENT child of SERVER, inside it in time, and the backend
    told that the CLIENT span called it."""
    server, client = one(spans, "SERVER"), one(spans, "CLIENT")
    assert server["traceId"] == client["traceId"]
    assert server.get("parentId") == caller
    assert client["parentId"] == server["id"] != client["id"]
    assert server["localEndpoint"] == client["localEndpoint"] == {"serviceName": "gateway"}
    assert client["remoteEndpoint"]["serviceName"] == "svc"  # the address: test_*_remote_endpoint_*
    assert server["timestamp"] <= client["timestamp"]
    assert client["timestamp"] + client["duration"] <= server["timestamp"] + server["duration"]
    if upstream_headers is not None:
        _, trace_id, parent_id, _ = upstream_headers["traceparent"].split("-")
        assert (trace_id, parent_id) == (server["traceId"], client["id"])
        assert upstream_headers["x-b3-spanid"] == client["id"]
        assert upstream_headers["x-b3-parentspanid"] == server["id"]


def headers_of(upstream: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in upstream.requests[-1].headers}


async def test_200_is_a_server_span_with_a_client_child(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url, prefix="/api"))
    assert (await client.get("/api/x", headers=TRACEPARENT)).status == 200
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert_linked(spans, headers_of(upstream))
    server, call = one(spans, "SERVER"), one(spans, "CLIENT")
    assert server["name"] == "GET /api" and call["name"] == "GET /api"
    assert server["tags"]["http.status_code"] == call["tags"]["http.status_code"] == "200"
    assert call["tags"]["peer.target"] == upstream.url
    assert "error" not in server["tags"] and "error" not in call["tags"]


@pytest.mark.parametrize(
    ("config", "env", "method", "path", "kwargs", "status", "route"),
    [
        pytest.param({"prefix": "/api"}, {}, "GET", "/elsewhere", {}, 404, None, id="404-no-route"),
        pytest.param({"prefix": "/api", "auth": "required"}, AUTH_ENV, "GET", "/api/x", {}, 401, "/api",
                     id="401-no-token"),
        pytest.param({"prefix": "/api", "auth": "required", "scopes": ["admin"]}, AUTH_ENV, "GET", "/api/x",
                     {"headers": bearer()}, 403, "/api", id="403-scope"),
        pytest.param({"prefix": "/api", "max_body": 16}, {}, "POST", "/api/x", {"data": b"x" * 64}, 413, "/api",
                     id="413-declared-length"),
        pytest.param({"prefix": "/api", "content_types": ["application/json"]}, {}, "POST", "/api/x",
                     {"data": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "/api", id="415"),
    ],
)  # fmt: skip
async def test_a_request_the_gateway_refuses_is_a_server_span_alone(
    traced: Any,
    collector: Any,
    make_upstream: Any,
    config: dict[str, Any],
    env: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    route: str | None,
) -> None:
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url, **config), **env)
    headers = {**kwargs.pop("headers", {}), **TRACEPARENT}
    response = await client.request(method, path, headers=headers, **kwargs)
    assert response.status == status
    (server,) = await reported(client, collector[0], ("SERVER",))
    assert (server["traceId"], server["parentId"]) == (TRACE, CALLER)
    assert server["tags"]["http.status_code"] == str(status)
    assert server["tags"]["request_id"] == response.headers["X-Request-ID"]
    assert "error" not in server["tags"]  # the client's mistake, not the gateway's
    assert server["tags"].get("http.route") == route
    assert server["name"] == (f"{method} {route}" if route else method)
    assert upstream.requests == []


async def test_429_is_a_server_span_alone(traced: Any, collector: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url, prefix="/api", rate_limit="1/minute"))
    assert (await client.get("/api/x")).status == 200
    await reported(client, collector[0], ("SERVER", "CLIENT"))
    collector[0].spans.clear()
    assert (await client.get("/api/x", headers=TRACEPARENT)).status == 429
    (server,) = await reported(client, collector[0], ("SERVER",))
    assert (server["traceId"], server["parentId"]) == (TRACE, CALLER)
    assert server["tags"]["http.status_code"] == "429"


async def test_502_upstream_refused_marks_both_spans_as_errors(
    traced: Any, collector: Any, refused_url: str
) -> None:
    client = await traced(one_service(refused_url))
    assert (await client.get("/x", headers=TRACEPARENT)).status == 502
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert_linked(spans)
    server, call = one(spans, "SERVER"), one(spans, "CLIENT")
    assert server["tags"]["error"] == server["tags"]["http.status_code"] == "502"
    # What went wrong, why, and where: not the name of an exception class.
    error = "Upstream 'svc' is unreachable: Connection refused"
    assert call["tags"] == {**CALL_TAGS, "error": error, "peer.target": refused_url}
    assert [a["value"] for a in call["annotations"]] == [f"connect {refused_url}"]


async def test_504_upstream_timeout_marks_both_spans_as_errors(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()  # answers only after the gateway gave up
        return web.Response(text="too late")

    upstream = await make_upstream(stall)
    client = await traced(one_service(upstream.url, timeout={"read": 0.2}))
    try:
        assert (await client.get("/x", headers=TRACEPARENT)).status == 504
        spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    finally:
        release.set()
    assert_linked(spans, headers_of(upstream))
    server, call = one(spans, "SERVER"), one(spans, "CLIENT")
    assert server["tags"]["error"] == server["tags"]["http.status_code"] == "504"
    error = "Upstream 'svc' timed out: Timeout on reading data from socket"
    assert call["tags"] == {**CALL_TAGS, "error": error, "peer.target": upstream.url}
    assert [a["value"] for a in call["annotations"]] == [f"timeout {upstream.url}"]
    assert call["duration"] >= 200_000


async def test_a_retry_on_another_target_is_one_call_to_the_target_that_answered(
    traced: Any, collector: Any, make_upstream: Any, refused_url: str
) -> None:
    upstream = await make_upstream()
    client = await traced(one_service([refused_url, upstream.url], eject_seconds=0))
    for _ in range(2):  # round robin: one of the two starts with the refused target
        assert (await client.get("/x", headers=TRACEPARENT)).status == 200
    await client.app[tracing_key].reporter.flush()
    spans = collector[0].spans
    assert len(spans) == 4 and len({s["id"] for s in spans}) == 4
    retried = 0
    for server in [s for s in spans if s["kind"] == "SERVER"]:
        (call,) = [s for s in spans if s.get("parentId") == server["id"]]
        assert_linked([server, call])
        assert call["tags"] == {**CALL_TAGS, "http.status_code": "200", "peer.target": upstream.url}
        # A refused attempt is an annotation on the span of the request it delayed.
        attempts = [a["value"] for a in call.get("annotations", [])]
        assert attempts in ([], [f"connect {refused_url}"])
        retried += len(attempts)
    assert retried >= 1
    # Each request told the upstream its own CLIENT span.
    told = {dict((k.lower(), v) for k, v in r.headers)["x-b3-spanid"] for r in upstream.requests}
    assert told == {s["id"] for s in spans if s["kind"] == "CLIENT"}


async def test_a_websocket_upgrade_retried_elsewhere_is_one_call_to_the_target_that_switched(
    traced: Any, collector: Any, make_upstream: Any, refused_url: str
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    upstream = await make_upstream(echo)
    client = await traced(one_service([refused_url, upstream.url], eject_seconds=60))
    # The round-robin starts with the refused target: this upgrade is the retried one.
    async with client.ws_connect("/ws", headers=TRACEPARENT) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "hi"

    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert_linked(spans)
    call = one(spans, "CLIENT")
    assert call["tags"] == {
        "http.method": "GET",
        "http.path": "/ws",
        "http.status_code": "101",
        "peer.target": upstream.url,
    }
    assert [a["value"] for a in call["annotations"]] == [f"connect {refused_url}"]


async def test_an_sse_stream_is_one_call_as_long_as_the_stream(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(0.2)  # the stream lasts a while: the spans must cover it
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    upstream = await make_upstream(events)
    client = await traced(one_service(upstream.url, prefix="/api/v1/stream"))
    response = await client.get("/api/v1/stream/events", headers=TRACEPARENT)
    assert await response.read() == b"data: first\n\ndata: second\n\n"
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert_linked(spans, headers_of(upstream))
    assert one(spans, "CLIENT")["duration"] >= 200_000
    assert one(spans, "SERVER")["tags"]["http.status_code"] == "200"


@pytest.mark.parametrize("cut", ["closed", "stalled"])
async def test_a_stream_the_upstream_cuts_off_is_an_error_on_both_spans(
    traced: Any, collector: Any, make_raw_upstream: Any, cut: str
) -> None:
    """The head went out as a 200 before the upstream failed: the client sees a short body, and
    the trace must not show a clean 200."""
    stop = asyncio.Event()

    async def dies_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"x" * 4096 + b"\r\n")
        await writer.drain()
        if cut == "stalled":
            await stop.wait()  # silent past the read timeout
        writer.close()

    url = await make_raw_upstream(dies_mid_body)
    client = await traced(one_service(url, timeout={"read": 0.2}))
    try:
        response = await client.get("/x", headers=TRACEPARENT)
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    finally:
        stop.set()
    assert_linked(spans)
    server, call = one(spans, "SERVER"), one(spans, "CLIENT")
    detail = (
        "Upstream timed out mid-response"
        if cut == "stalled"
        else "Upstream closed the connection mid-response"
    )
    assert server["tags"]["http.status_code"] == call["tags"]["http.status_code"] == "200"
    assert server["tags"]["error"] == call["tags"]["error"] == detail


async def test_a_client_that_leaves_is_a_499_and_not_an_error(
    traced: Any, collector: Any, make_raw_upstream: Any
) -> None:
    arrived = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read(1)  # until the gateway closes the connection

    url = await make_raw_upstream(slow)
    client = await traced(one_service(url))
    _, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET /x HTTP/1.1\r\nHost: a\r\ntraceparent: {TRACEPARENT['traceparent']}\r\n\r\n".encode())
    await asyncio.wait_for(arrived.wait(), 5)
    writer.close()  # the client goes away before any answer
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert_linked(spans)
    server, call = one(spans, "SERVER"), one(spans, "CLIENT")
    assert server["tags"]["http.status_code"] == "499"
    assert "error" not in server["tags"]
    assert call["tags"] == {**CALL_TAGS, "peer.target": url}  # no answer, no status; not the call's error


async def test_a_websocket_session_spans_validate_and_link(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    handshakes: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.WebSocketResponse:
        handshakes.append({k.lower(): v for k, v in request.headers.items()})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    upstream = await make_upstream(echo, read_body=False)
    client = await traced(one_service(upstream.url, prefix="/ws"))
    ws = await client.ws_connect("/ws/live", headers=TRACEPARENT)
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "hi"
    await ws.close()
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert_linked(spans, handshakes[0])
    server, call = one(spans, "SERVER"), one(spans, "CLIENT")
    assert server["tags"]["http.status_code"] == call["tags"]["http.status_code"] == "101"
    assert call["tags"]["peer.target"] == upstream.url
    assert call["remoteEndpoint"] == _endpoint_of(upstream.url)


# -- sampling ------------------------------------------------------------------------------------

B3 = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN = "e457b5a2e4d86bd1"


@pytest.mark.parametrize(
    ("rate", "headers", "report", "debug", "caller"),
    [
        pytest.param("1.0", {}, True, False, None, id="new-trace-sampled-by-rate"),
        pytest.param("0", {}, False, False, None, id="new-trace-denied-by-rate"),
        pytest.param("1.0", {"traceparent": f"00-{TRACE}-{CALLER}-00"}, False, False, None, id="w3c-deny"),
        pytest.param("0", {"traceparent": f"00-{TRACE}-{CALLER}-01"}, True, False, CALLER, id="w3c-accept"),
        pytest.param("0", {"traceparent": f"00-{TRACE}-{CALLER}-03"}, True, False, CALLER, id="w3c-accept-random"),
        pytest.param("1.0", {"X-B3-TraceId": B3, "X-B3-SpanId": B3_SPAN, "X-B3-Sampled": "0"}, False, False,
                     None, id="x-b3-deny"),
        pytest.param("0", {"X-B3-TraceId": B3, "X-B3-SpanId": B3_SPAN, "X-B3-Sampled": "1"}, True, False,
                     B3_SPAN, id="x-b3-accept"),
        pytest.param("0", {"X-B3-TraceId": B3, "X-B3-SpanId": B3_SPAN}, False, False, None, id="x-b3-defer-rate-0"),
        pytest.param("1.0", {"X-B3-TraceId": B3, "X-B3-SpanId": B3_SPAN}, True, False, B3_SPAN,
                     id="x-b3-defer-rate-1"),
        pytest.param("0", {"X-B3-TraceId": B3, "X-B3-SpanId": B3_SPAN, "X-B3-Flags": "1"}, True, True, B3_SPAN,
                     id="x-b3-debug"),
        pytest.param("1.0", {"X-B3-Sampled": "0"}, False, False, None, id="x-b3-deny-only"),
        pytest.param("1.0", {"b3": "0"}, False, False, None, id="b3-deny-only"),
        pytest.param("1.0", {"b3": f"{B3}-{B3_SPAN}-0"}, False, False, None, id="b3-deny"),
        pytest.param("0", {"b3": f"{B3}-{B3_SPAN}-1"}, True, False, B3_SPAN, id="b3-accept"),
        pytest.param("0", {"b3": f"{B3}-{B3_SPAN}-d"}, True, True, B3_SPAN, id="b3-debug"),
        pytest.param("0", {"b3": "d"}, True, True, None, id="b3-debug-only"),
        pytest.param("0", {"X-B3-Flags": "1"}, True, True, None, id="x-b3-debug-only"),
        pytest.param("0", {"X-B3-TraceId": B3, "X-B3-SpanId": B3_SPAN, "X-B3-Sampled": "0", "X-B3-Flags": "1"},
                     True, True, B3_SPAN, id="x-b3-debug-over-deny"),
        pytest.param("0", {"traceparent": f"00-{TRACE}-{CALLER}-00", "X-B3-TraceId": TRACE,
                           "X-B3-SpanId": CALLER, "X-B3-Flags": "1"}, True, True, CALLER, id="w3c-and-b3-debug"),
        pytest.param("1.0", {"b3": "0", "X-B3-TraceId": B3, "X-B3-SpanId": B3_SPAN, "X-B3-Sampled": "1"}, False,
                     False, None, id="b3-deny-over-x-b3"),
    ],
)  # fmt: skip
async def test_sampling_decisions_are_honoured(
    traced: Any,
    collector: Any,
    make_upstream: Any,
    rate: str,
    headers: dict[str, str],
    report: bool,
    debug: bool,
    caller: str | None,
) -> None:
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url), TRACE_SAMPLE_RATE=rate)
    assert (await client.get("/x", headers=headers)).status == 200
    sent = headers_of(upstream)
    if not report:
        await client.app[tracing_key].reporter.flush()
        assert collector[0].spans == []
        assert sent["x-b3-sampled"] == "0" and sent["traceparent"].endswith("-00")
        return
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert_linked(spans, sent, caller=caller)
    assert all(s.get("debug", False) is debug for s in spans)
    assert sent.get("x-b3-flags") == ("1" if debug else None)


async def test_the_collector_sees_only_whole_batches_of_valid_spans(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    """Many requests, several batches: nothing the collector refuses, nothing dropped."""
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url))
    async with asyncio.TaskGroup() as group:
        for n in range(40):
            group.create_task(client.get(f"/x/{n}", headers={"x-request-id": f"req-{n}"}))
    reporter = client.app[tracing_key].reporter
    await wait_for(lambda: len(reporter.buffer) + reporter.sent >= 80, what="80 spans finished")
    await reporter.flush()
    assert len(collector[0].spans) == 80 and reporter.dropped == 0
    servers = [s for s in collector[0].spans if s["kind"] == "SERVER"]
    assert sorted(s["tags"]["request_id"] for s in servers) == sorted(f"req-{n}" for n in range(40))


@pytest.mark.parametrize(
    ("span", "problem"),
    [
        pytest.param({"timestamp": 1_700_000_000_000.0}, "integer", id="float-timestamp"),
        pytest.param({"timestamp": 1_700_000_000_000}, "microseconds", id="milliseconds"),
        pytest.param({"duration": 0}, "minimum", id="zero-duration"),
        pytest.param({"kind": "server"}, "is not one of", id="lowercase-kind"),
        pytest.param({"tags": {"http.status_code": 200}}, "is not of type 'string'", id="int-tag"),
        pytest.param({"id": "00F067AA0BA902B7"}, "does not match", id="uppercase-id"),
        pytest.param({"traceId": TRACE[:20]}, "neither 16 nor 32", id="trace-id-20"),
        pytest.param({"parentId": "0" * 16}, "all zero", id="zero-parent"),
        pytest.param({"localEndpoint": {"serviceName": "gw", "ipv4": "300.0.0.1"}}, "ipv4", id="bad-ipv4"),
        pytest.param({"remoteEndpoint": {"port": "80"}}, "is not of type 'integer'", id="port-as-text"),
        pytest.param({"parentId": None}, "None is not of type", id="null-parent"),
        pytest.param(
            {"annotations": [{"timestamp": 1}]}, "'value' is a required property", id="bad-annotation"
        ),
    ],
)
async def test_the_collector_refuses_what_zipkin_would(
    collector: Any, span: dict[str, Any], problem: str
) -> None:
    """The checks above are only as good as the collector's: it refuses a batch for any one flaw."""
    now = int(time.time() * 1_000_000)
    good = {"traceId": TRACE, "id": CALLER, "kind": "SERVER", "timestamp": now, "duration": 5,
            "localEndpoint": {"serviceName": "gw"}, "tags": {"a": "b"}}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(collector[1], json=[good]) as response:
            assert response.status == 202
        async with session.post(collector[1], json=[good, {**good, **span}]) as response:
            assert response.status == 400
    assert collector[0].refused and problem in collector[0].refused[0]
    with pytest.raises(AssertionError):
        collector[0].spans  # noqa: B018 - reading it is what fails


# -- remote endpoints ----------------------------------------------------------------------------


async def _get_from(
    host: str, port: int, path: str, headers: list[tuple[str, str]] | None = None
) -> tuple[int, int]:
    """GET ``path`` on a connection of its own: the status, and the client's own port."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(host, port)
        client_port = writer.get_extra_info("sockname")[1]
        try:
            writer.write(get_request(path, headers or []))
            await writer.drain()
            (response,) = parse_responses(await reader.read())
        finally:
            writer.close()
            await writer.wait_closed()
    return response.status, client_port


async def test_a_server_span_names_the_client_as_its_remote_endpoint(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    """Brave and Envoy record the caller's address and port on a SERVER span; operators search by it."""
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url))
    status, port = await _get_from("127.0.0.1", client.port, "/x")
    assert status == 200
    server = one(await reported(client, collector[0], ("SERVER", "CLIENT")), "SERVER")
    assert server["remoteEndpoint"] == {"ipv4": "127.0.0.1", "port": port}


async def test_an_ipv6_client_is_named_in_the_ipv6_field(
    aiohttp_client: Any, tmp_path: Path, collector: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(one_service(upstream.url)))
    settings = load_settings({"GATEWAY_CONFIG": str(path), "ZIPKIN_URL": collector[1]})
    client = await aiohttp_client(GatewayTestServer(create_app(settings), host="::1"))
    status, port = await _get_from("::1", client.port, "/x")
    assert status == 200
    server = one(await reported(client, collector[0], ("SERVER", "CLIENT")), "SERVER")
    assert server["remoteEndpoint"] == {"ipv6": "::1", "port": port}


@pytest.mark.parametrize(
    ("trusted", "forwarded", "endpoint"),
    [
        pytest.param("127.0.0.1", "203.0.113.7", {"ipv4": "203.0.113.7"}, id="trusted-proxy-ipv4"),
        pytest.param("127.0.0.1", "2001:db8::7, 198.51.100.1", {"ipv4": "198.51.100.1"}, id="last-untrusted-hop"),
        pytest.param("127.0.0.0/8", "2001:db8::7, 127.0.0.9", {"ipv6": "2001:db8::7"}, id="trusted-proxy-ipv6"),
        pytest.param("", "203.0.113.7", None, id="untrusted-peer-cannot-choose"),
    ],
)  # fmt: skip
async def test_behind_a_trusted_proxy_the_remote_endpoint_is_the_forwarded_client(
    traced: Any,
    collector: Any,
    make_upstream: Any,
    trusted: str,
    forwarded: str,
    endpoint: dict[str, Any] | None,
) -> None:
    """The client the gateway believes (the rate limiter's): a forwarded address has no port."""
    upstream = await make_upstream()
    env = {"TRUSTED_PROXIES": trusted} if trusted else {}
    client = await traced(one_service(upstream.url), **env)
    status, port = await _get_from("127.0.0.1", client.port, "/x", [("X-Forwarded-For", forwarded)])
    assert status == 200
    server = one(await reported(client, collector[0], ("SERVER", "CLIENT")), "SERVER")
    assert server["remoteEndpoint"] == (endpoint or {"ipv4": "127.0.0.1", "port": port})


async def test_a_request_the_parser_refuses_names_its_peer(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url))
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        port = writer.get_extra_info("sockname")[1]
        writer.write(b"GARBAGE\r\n\r\n")
        await reader.read()
        writer.close()
    (server,) = await reported(client, collector[0], ("SERVER",))
    assert server["remoteEndpoint"] == {"ipv4": "127.0.0.1", "port": port}


def _endpoint_of(url: str) -> dict[str, Any]:
    """The remote endpoint Zipkin expects for a loopback target: its address in the field of its
    family, and its port."""
    parsed = yarl.URL(url)
    field = "ipv6" if ":" in parsed.host else "ipv4"
    return {"serviceName": "svc", field: parsed.host, "port": parsed.port}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_client_span_names_the_target_as_its_remote_endpoint(
    traced: Any, collector: Any, make_upstream: Any, host: str
) -> None:
    upstream = await make_upstream(host=host)
    client = await traced(one_service(upstream.url))
    assert (await client.get("/x")).status == 200
    call = one(await reported(client, collector[0], ("SERVER", "CLIENT")), "CLIENT")
    assert call["remoteEndpoint"] == _endpoint_of(upstream.url)


async def test_a_host_name_target_is_named_by_the_address_it_resolved_to(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    """Zipkin's endpoint has no field for a host name: the address the connection reached."""
    upstream = await make_upstream()
    url = upstream.url.replace("127.0.0.1", "localhost")
    client = await traced(one_service(url))
    assert (await client.get("/x")).status == 200
    call = one(await reported(client, collector[0], ("SERVER", "CLIENT")), "CLIENT")
    assert call["remoteEndpoint"] in (
        _endpoint_of(upstream.url),
        _endpoint_of(f"http://[::1]:{upstream.server.port}"),
    )
    assert call["tags"]["peer.target"] == url


async def test_a_target_that_refused_the_connection_is_still_the_remote_endpoint(
    traced: Any, collector: Any, refused_url: str
) -> None:
    client = await traced(one_service(refused_url))
    assert (await client.get("/x")).status == 502
    call = one(await reported(client, collector[0], ("SERVER", "CLIENT")), "CLIENT")
    assert call["remoteEndpoint"] == _endpoint_of(refused_url)


# -- batches and collector limits ----------------------------------------------------------------


@pytest.fixture
async def limited_collector(aiohttp_server: Any) -> Callable[[int], Awaitable[tuple[Collector, str]]]:
    """``limited_collector(max_body)``: a collector answering 413 to bodies over ``max_body`` bytes."""

    async def make(max_body: int) -> tuple[Collector, str]:
        stub = Collector(max_body)
        app = web.Application()
        app.router.add_post("/api/v2/spans", stub.handle)
        server = await aiohttp_server(app)
        return stub, str(server.make_url("/api/v2/spans"))

    return make


async def _spans_dropped(client: TestClient) -> float:
    text = await (await client.get("/metrics")).text()
    (line,) = [line for line in text.splitlines() if line.startswith("gateway_spans_dropped_total ")]
    return float(line.split()[1])


async def _flushed_until(reporter: Any, done: Callable[[], bool], deadline_s: float = 5.0) -> None:
    """Flush until ``done``: the last request's spans may still be finishing when its client has
    the answer (the response is sent before the SERVER span ends)."""
    deadline = time.monotonic() + deadline_s
    while True:
        await reporter.flush()
        if done() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.01)


async def test_a_batch_the_collector_refuses_as_too_large_is_split_until_it_fits(
    make_gateway: Any, limited_collector: Any, make_upstream: Any
) -> None:
    """A 413 dropped the whole batch: forty spans lost for a limit any one of them fits."""
    collector, url = await limited_collector(8192)
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url), {"ZIPKIN_URL": url})
    long = "/x/" + "a" * 1500  # each SERVER span about 2 KB
    for n in range(20):
        assert (await client.get(f"{long}/{n}", headers={"x-request-id": f"req-{n}"})).status == 200
    reporter = client.app[tracing_key].reporter
    await _flushed_until(reporter, lambda: len(collector.spans) >= 40)
    assert collector.too_large >= 1
    assert len(collector.spans) == 40 and reporter.dropped == 0
    servers = [s for s in collector.spans if s["kind"] == "SERVER"]
    assert sorted(s["tags"]["request_id"] for s in servers) == sorted(f"req-{n}" for n in range(20))
    # What the collector took is remembered: later batches are not refused first.
    refused = collector.too_large
    for n in range(20):
        assert (await client.get(f"{long}/{n}")).status == 200
    await _flushed_until(reporter, lambda: len(collector.spans) >= 80)
    assert collector.too_large == refused and len(collector.spans) == 80
    assert await _spans_dropped(client) == 0


async def test_only_a_span_the_collector_takes_in_no_batch_is_dropped_and_counted(
    make_gateway: Any, limited_collector: Any, make_upstream: Any
) -> None:
    collector, url = await limited_collector(4096)
    upstream = await make_upstream()
    # A target with a long base path: in the CLIENT span's tags twice, over 12 KB; the SERVER span
    # shows the path the client sent, "/x".
    target = upstream.url + "/" + "a" * 6000
    client = await make_gateway(one_service(target), {"ZIPKIN_URL": url})
    assert (await client.get("/x")).status == 200
    reporter = client.app[tracing_key].reporter
    await reporter.flush()
    assert [s["kind"] for s in collector.spans] == ["SERVER"]
    assert reporter.dropped == 1
    assert await _spans_dropped(client) == 1


async def test_batches_stay_under_a_collectors_usual_body_limit(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    """500 spans of 7 KB are 3.5 MB: over the 1 MiB an nginx (or this aiohttp stub) in front of a
    collector takes by default. Batches are bounded in bytes too, so none is refused at all."""
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url))
    long = "/x/" + "a" * 7000
    async with asyncio.TaskGroup() as group:
        for n in range(160):
            group.create_task(client.get(f"{long}/{n}"))
    reporter = client.app[tracing_key].reporter
    await wait_for(lambda: len(reporter.buffer) + reporter.sent >= 320, what="320 spans finished")
    await reporter.flush()
    assert collector[0].too_large == 0
    assert len(collector[0].spans) == 320 and reporter.dropped == 0
    assert collector[0].posts >= 2


def test_the_span_buffer_is_bounded_in_bytes_too() -> None:
    """While the collector is down, spans of a few KB each must not fill memory up to the count."""
    reporter = ZipkinReporter("http://127.0.0.1:9/api/v2/spans", max_buffer_bytes=100_000)
    for n in range(100):
        context = ZipkinContext(TRACE, None, f"{n + 1:016x}", True, False, False)
        record = Record(context, az.create_endpoint("gateway")).start(1).finish(2)
        reporter.send(record.set_tag("http.path", "/" + "a" * 5000))
    assert 0 < reporter.buffered_bytes <= 100_000
    assert len(reporter.buffer) + reporter.dropped == 100 and reporter.dropped >= 80


# -- tags ----------------------------------------------------------------------------------------


async def test_an_upstream_5xx_marks_the_call_as_an_error_too(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    """Envoy marks an upstream span answered 5xx as an error, as the gateway did on its SERVER span
    only: a search for errors found the request but not the call that failed."""

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"detail": "down"}, status=503)

    upstream = await make_upstream(broken)
    client = await traced(one_service(upstream.url))
    assert (await client.get("/x")).status == 503
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    server, call = one(spans, "SERVER"), one(spans, "CLIENT")
    assert server["tags"]["error"] == call["tags"]["error"] == "503"
    assert call["tags"]["http.status_code"] == "503"


async def test_a_4xx_from_the_upstream_is_no_error_of_the_call(
    traced: Any, collector: Any, make_upstream: Any
) -> None:
    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"detail": "no such cluster"}, status=404)

    upstream = await make_upstream(missing)
    client = await traced(one_service(upstream.url))
    assert (await client.get("/x")).status == 404
    spans = await reported(client, collector[0], ("SERVER", "CLIENT"))
    assert all("error" not in s["tags"] for s in spans)


@pytest.mark.parametrize(
    ("raw_path", "shown"),
    [
        pytest.param("/api/a%2Fb?token=secret", "/api/a%2Fb", id="as-sent-without-query"),
        pytest.param("/api/fetch/http://user:s3cret@example.com/x", "/api/fetch/http://***@example.com/x",
                     id="password-in-a-url-in-the-path"),
    ],
)  # fmt: skip
async def test_http_path_is_the_path_as_sent_without_secrets(
    traced: Any, collector: Any, make_upstream: Any, raw_path: str, shown: str
) -> None:
    """``http.path`` was the decoded path: ``%2F`` shown as the ``/`` the table did not match on,
    and the password of a URL in the path sent to the tracing backend the access log hides it from."""
    upstream = await make_upstream()
    client = await traced(one_service(upstream.url, prefix="/api"))
    assert (await send_raw_path(client, raw_path)).status == 200
    server = one(await reported(client, collector[0], ("SERVER", "CLIENT")), "SERVER")
    assert server["tags"]["http.path"] == shown
    assert server["name"] == "GET /api" and server["tags"]["http.route"] == "/api"
