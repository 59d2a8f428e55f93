"""One chat request through the gateway is one trace: gateway -> intelligence engine -> database."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.keys import tracing_key
from intelligence.app import create_app as create_chat_app
from intelligence.settings import IntelligenceSettings, PostgresSettings
from tests.helpers import Collector

SECRET = "trace-test-secret-" + "x" * 32


async def test_chat_request_is_one_trace_through_gateway_chat_api_and_database(
    aiohttp_server: Any, make_gateway: Any, database: str
) -> None:
    collector = Collector()
    zipkin = web.Application()
    zipkin.router.add_post("/api/v2/spans", collector.handle)
    zipkin_url = str((await aiohttp_server(zipkin)).make_url("/api/v2/spans"))

    chat_settings = IntelligenceSettings(postgres=PostgresSettings(dsn=database), zipkin_url=zipkin_url)
    chat_server = await aiohttp_server(create_chat_app(chat_settings))
    gateway = await make_gateway(
        {
            "services": {"intelligence-engine": {"url": f"http://127.0.0.1:{chat_server.port}"}},
            "routes": [{"prefix": "/api/v1/chat", "service": "intelligence-engine"}],
        },
        env={"ZIPKIN_URL": zipkin_url, "AUTH_JWT_SECRET": SECRET},
    )
    from gateway.devauth import mint_token
    from gateway.settings import load_settings

    token = mint_token(load_settings({"AUTH_JWT_SECRET": SECRET}), subject="tracer", scopes=[], ttl=60)
    response = await gateway.post(
        "/api/v1/chat/sessions",
        json={"title": "traced"},
        headers={
            "Authorization": f"Bearer {token}",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        },
    )
    assert response.status == 201, await response.text()

    await gateway.app[tracing_key].reporter.flush()
    await chat_server.app[tracing_key].reporter.flush()
    spans = collector.spans
    assert {s["traceId"] for s in spans} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    by_id = {s["id"]: s for s in spans}
    gateway_server = next(
        s for s in spans if s["localEndpoint"]["serviceName"] == "gateway" and s["kind"] == "SERVER"
    )
    gateway_client = next(
        s for s in spans if s["localEndpoint"]["serviceName"] == "gateway" and s["kind"] == "CLIENT"
    )
    chat_server_span = next(
        s
        for s in spans
        if s["localEndpoint"]["serviceName"] == "intelligence-engine" and s["kind"] == "SERVER"
    )
    db_spans = [s for s in spans if s.get("remoteEndpoint", {}).get("serviceName") == "postgresql"]
    assert gateway_server["parentId"] == "00f067aa0ba902b7"
    assert gateway_client["parentId"] == gateway_server["id"]
    assert chat_server_span["parentId"] == gateway_client["id"]
    assert db_spans, "the database call is a span of its own"
    assert all(by_id[s["parentId"]] is chat_server_span for s in db_spans)
    assert db_spans[0]["name"] == "db create_session"
