"""One chat request through the gateway is one trace: gateway -> intelligence engine -> database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.devauth import mint_token
from gateway.keys import tracing_key
from gateway.settings import load_settings
from intelligence.app import create_app as create_chat_app
from intelligence.settings import IntelligenceSettings, PostgresSettings
from tests.helpers import Collector

SECRET = "trace-test-secret-" + "x" * 32
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"

Post = Callable[[dict[str, str]], Awaitable[list[dict[str, Any]]]]


@pytest.fixture
async def create_session(
    aiohttp_server: Any, make_gateway: Any, database: str, collector: tuple[Collector, str]
) -> Post:
    """POST a chat session through the gateway with extra ``headers``; every span both programs
    reported for it (each batch checked by the Zipkin collector stub)."""
    stub, zipkin_url = collector

    chat_settings = IntelligenceSettings(postgres=PostgresSettings(dsn=database), zipkin_url=zipkin_url)
    chat_server = await aiohttp_server(create_chat_app(chat_settings))
    gateway = await make_gateway(
        {
            "services": {"intelligence-engine": {"url": f"http://127.0.0.1:{chat_server.port}"}},
            "routes": [{"prefix": "/api/v1/chat", "service": "intelligence-engine"}],
        },
        env={"ZIPKIN_URL": zipkin_url, "AUTH_JWT_SECRET": SECRET},
    )
    token = mint_token(load_settings({"AUTH_JWT_SECRET": SECRET}), subject="tracer", scopes=[], ttl=60)

    async def post(headers: dict[str, str]) -> list[dict[str, Any]]:
        response = await gateway.post(
            "/api/v1/chat/sessions",
            json={"title": "traced"},
            headers={"Authorization": f"Bearer {token}", **headers},
        )
        assert response.status == 201, await response.text()
        # The chat API finished its spans before it answered, the gateway before its answer ended.
        await gateway.app[tracing_key].reporter.flush()
        await chat_server.app[tracing_key].reporter.flush()
        return stub.spans

    return post


def by_service(spans: list[dict[str, Any]], service: str, kind: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["localEndpoint"]["serviceName"] == service and s["kind"] == kind]


@pytest.mark.parametrize(
    ("headers", "debug"),
    [
        pytest.param({"traceparent": f"00-{TRACE}-{CALLER}-01"}, False, id="w3c-accept"),
        pytest.param({"b3": f"{TRACE}-{CALLER}-d"}, True, id="b3-debug"),
    ],
)
async def test_chat_request_is_one_trace_through_gateway_chat_api_and_database(
    create_session: Post, headers: dict[str, str], debug: bool
) -> None:
    spans = await create_session(headers)
    assert {s["traceId"] for s in spans} == {TRACE}
    by_id = {s["id"]: s for s in spans}
    (gateway_server,) = by_service(spans, "gateway", "SERVER")
    (gateway_client,) = by_service(spans, "gateway", "CLIENT")
    (chat_server_span,) = by_service(spans, "intelligence-engine", "SERVER")
    db_spans = [s for s in spans if s.get("remoteEndpoint", {}).get("serviceName") == "postgresql"]
    assert gateway_server["parentId"] == CALLER
    assert gateway_client["parentId"] == gateway_server["id"]
    assert chat_server_span["parentId"] == gateway_client["id"]
    assert db_spans, "the database call is a span of its own"
    assert all(by_id[s["parentId"]] is chat_server_span for s in db_spans)
    assert db_spans[0]["name"] == "db create_session"
    assert len(by_id) == len(spans)  # no id reported twice
    # The request id is one through both programs.
    assert gateway_server["tags"]["request_id"] == chat_server_span["tags"]["request_id"]
    # Debug is a property of the trace: every span of it, in every program, says so.
    assert all(s.get("debug", False) is debug for s in spans)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"traceparent": f"00-{TRACE}-{CALLER}-00"}, id="w3c-deny"),
        pytest.param({"b3": "0"}, id="b3-deny-only"),
        pytest.param({"X-B3-TraceId": TRACE, "X-B3-SpanId": CALLER, "X-B3-Sampled": "0"}, id="x-b3-deny"),
    ],
)
async def test_a_denied_trace_is_reported_by_neither_program(
    create_session: Post, headers: dict[str, str]
) -> None:
    assert await create_session(headers) == []
