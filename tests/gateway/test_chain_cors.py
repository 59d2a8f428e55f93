"""CORS through the whole chain: preflights at the door, the gateway's headers on every answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.gateway.chain import AUTH_ENV, bearer

ORIGIN = "https://app.example.com"
CORS_ENV = {**AUTH_ENV, "CORS_ALLOW_ORIGINS": f"{ORIGIN},https://admin.example.com"}
MUST_EXPOSE = {"x-request-id", "ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining",
               "ratelimit-reset", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
               "retry-after"}  # fmt: skip
BACKEND_CORS = {
    "Access-Control-Allow-Origin": "https://evil.example",
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Expose-Headers": "X-Secret",
    "Access-Control-Allow-Methods": "TRACE",
}


@pytest.fixture
async def hang() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()


@pytest.fixture
async def upstream(make_upstream: Any, hang: asyncio.Event) -> Any:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/ws"):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"echo:{msg.data}")
            return ws
        if request.path.startswith("/open/vary"):
            response = web.json_response({})
            for line in request.query.getall("vary"):
                response.headers.add("Vary", line)
            return response
        if request.path.endswith("/stream"):
            response = web.StreamResponse(headers=BACKEND_CORS)
            await response.prepare(request)
            await response.write(b"chunk-1,")
            await response.write(b"chunk-2")
            await response.write_eof()
            return response
        if request.path.startswith("/slow"):
            await hang.wait()
        return web.json_response({"method": request.method}, headers={**BACKEND_CORS, "Vary": "Accept"})

    return await make_upstream(reply)


def config(url: str, dead_url: str) -> dict[str, Any]:
    return {
        "services": {
            "svc": {"url": url},
            "slow": {"url": url, "timeout": {"connect": 1, "read": 0.2}},
            "dead": {"url": dead_url, "eject_seconds": 30},
        },
        "routes": [
            {"prefix": "/api", "service": "svc"},
            {"prefix": "/open", "service": "svc", "auth": "none", "content_types": ["*/*"]},
            {"prefix": "/scoped", "service": "svc", "scopes": ["admin"]},
            {"prefix": "/tiny", "service": "svc", "auth": "none", "max_body": "16B"},
            {"prefix": "/once", "service": "svc", "auth": "none", "rate_limit": "1/minute"},
            {"prefix": "/api/v1/clusters", "service": "svc"},
            {"prefix": "/slow", "service": "slow", "auth": "none"},
            {"prefix": "/dead", "service": "dead", "auth": "none"},
            {"prefix": "/ws", "service": "svc", "auth": "none"},
        ],
    }


@pytest.fixture
async def make_client(make_gateway: Any, upstream: Any, refused_url: str) -> Any:
    async def make(env: dict[str, str] = CORS_ENV) -> Any:
        return await make_gateway(config(upstream.url, refused_url), env)

    return make


@pytest.fixture
async def client(make_client: Any) -> Any:
    return await make_client()


def preflight(method: str = "PUT", headers: str | None = "authorization, content-type") -> dict[str, str]:
    out = {"Origin": ORIGIN, "Access-Control-Request-Method": method}
    if headers:
        out["Access-Control-Request-Headers"] = headers
    return out


def assert_cors(response: Any, origin: str = ORIGIN) -> None:
    headers = response.headers
    assert headers.getall("Access-Control-Allow-Origin") == [origin]
    assert headers.getall("Access-Control-Allow-Credentials") == ["true"]
    exposed = {name.strip().lower() for name in headers["Access-Control-Expose-Headers"].split(",")}
    assert MUST_EXPOSE <= exposed
    assert "x-secret" not in exposed
    assert "Access-Control-Allow-Methods" not in headers  # the backend's, on an actual response
    assert "origin" in headers["Vary"].lower()


# -- preflights ----------------------------------------------------------------------------------


async def test_preflight_on_an_auth_required_route_needs_no_token(client, upstream):
    response = await client.options("/api/things/1", headers=preflight())

    assert response.status == 204
    headers = response.headers
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")} >= {"GET", "PUT", "DELETE"}
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert headers["Access-Control-Max-Age"] == "600"
    # The answer echoes what the preflight asked for: a cache in front must key it on all three.
    vary = {token.strip().lower() for token in headers["Vary"].split(",")}
    assert vary == {"origin", "access-control-request-method", "access-control-request-headers"}
    assert "RateLimit" not in headers  # answered before the rate limits
    assert upstream.requests == []


async def test_preflight_from_a_disallowed_origin_gets_no_allow_origin(client, upstream):
    response = await client.options("/api/things", headers={**preflight(), "Origin": "https://evil.example"})

    assert response.status == 403
    assert not any(name.lower().startswith("access-control-") for name in response.headers)
    assert upstream.requests == []


async def test_plain_options_without_request_method_is_proxied(client, upstream):
    response = await client.options("/open/things", headers={"Origin": ORIGIN})

    assert response.status == 200
    assert await response.json() == {"method": "OPTIONS"}
    assert [r.method for r in upstream.requests] == ["OPTIONS"]
    assert_cors(response)


# -- CORS headers on every answer ---------------------------------------------------------------


async def _error_answers(client: Any) -> dict[int, Any]:
    origin = {"Origin": ORIGIN}
    answers = {
        401: await client.get("/api/x", headers=origin),
        403: await client.get("/scoped/x", headers={**origin, **bearer()}),
        413: await client.post(
            "/tiny", data=b"x" * 17, headers={**origin, "Content-Type": "application/json"}
        ),
        415: await client.post(
            "/api/x", data=b"{}", headers={**origin, "Content-Type": "text/plain", **bearer()}
        ),
        422: await client.post(
            "/api/v1/clusters", data=b"{}", headers={**origin, "Content-Type": "application/json", **bearer()}
        ),
        502: await client.get("/dead/x", headers=origin),
        503: await client.get("/dead/x", headers=origin),  # the target was ejected by the 502
        504: await client.get("/slow/x", headers=origin),
    }
    await client.get("/once", headers=origin)
    answers[429] = await client.get("/once", headers=origin)
    return answers


async def test_every_error_answer_carries_the_cors_headers(client):
    answers = await _error_answers(client)

    for status, response in answers.items():
        assert response.status == status, (status, await response.text())
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.headers["X-Request-ID"]
        assert_cors(response)
    assert "Retry-After" in answers[429].headers


async def test_streamed_response_carries_the_gateways_cors_headers_not_the_backends(client):
    response = await client.get("/open/stream", headers={"Origin": ORIGIN})

    assert response.status == 200
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert await response.read() == b"chunk-1,chunk-2"
    assert_cors(response)


async def test_backend_cors_headers_are_replaced_by_the_gateways(client):
    response = await client.get("/open/x", headers={"Origin": "https://admin.example.com"})

    assert response.status == 200
    assert_cors(response, "https://admin.example.com")
    assert [v.strip().lower() for v in response.headers["Vary"].split(",")] == ["accept", "origin"]


@pytest.mark.parametrize("origin", [None, "https://evil.example"])
async def test_backend_cors_headers_never_leak_to_other_origins(client, origin):
    headers = {"Origin": origin} if origin else {}
    response = await client.get("/open/x", headers=headers)

    assert response.status == 200
    assert not any(name.lower().startswith("access-control-") for name in response.headers)
    assert [v.strip().lower() for v in response.headers["Vary"].split(",")] == ["accept", "origin"]


def vary_tokens(response: Any) -> list[str]:
    return [token.strip().lower() for line in response.headers.getall("Vary") for token in line.split(",")]


@pytest.mark.parametrize("origin", [ORIGIN, None])
@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (["Accept", "Accept-Encoding"], ["accept", "accept-encoding", "origin"]),
        (["X-Origin-Region"], ["x-origin-region", "origin"]),
        (["Accept-Encoding", "Origin"], ["accept-encoding", "origin"]),
    ],
)
async def test_every_vary_line_of_the_backend_is_kept_and_origin_added_once(client, origin, sent, expected):
    query = "&".join(f"vary={name}" for name in sent)
    response = await client.get(f"/open/vary?{query}", headers={"Origin": origin} if origin else {})

    assert response.status == 200
    assert vary_tokens(response) == expected


# -- WebSocket ----------------------------------------------------------------------------------


def websocket_handshake(origin: str) -> dict[str, str]:
    """What Chromium sends for ``new WebSocket("ws://gateway/ws/feed")`` from a page at ``origin``."""
    return {
        "Origin": origin,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
    }


async def test_websocket_from_a_disallowed_origin_is_refused_before_the_backend(client, upstream):
    # Browsers apply no CORS to WebSockets: any page may open one, and reads what comes back.
    response = await client.get("/ws/feed", headers=websocket_handshake("https://evil.example"))
    try:
        assert response.status == 403
        assert await response.json() == {"detail": "CORS: origin 'https://evil.example' is not allowed"}
    finally:
        response.close()  # an accepted upgrade would leave the relay open
    assert response.headers["X-Request-ID"]
    assert not any(name.lower().startswith("access-control-") for name in response.headers)
    assert upstream.requests == []


@pytest.mark.parametrize("origin", [ORIGIN, None, "same-host", "same-host-other-case"])
async def test_websocket_from_an_allowed_origin_same_host_or_no_browser_is_relayed(client, origin):
    headers = {}
    if origin == "same-host":  # a page served through the gateway itself
        origin = f"http://{client.server.host}:{client.server.port}"
    elif origin == "same-host-other-case":  # host names are case-insensitive (RFC 3986 3.2.2)
        origin = f"https://gateway.example:{client.server.port}"
        headers["Host"] = f"Gateway.Example:{client.server.port}"
    ws = await client.ws_connect("/ws/feed", origin=origin, headers=headers)

    await ws.send_str("ping")
    reply = await ws.receive(timeout=5)

    assert (reply.type, reply.data) == (WSMsgType.TEXT, "echo:ping")
    await ws.close()


async def test_websocket_from_a_disallowed_origin_fails_the_handshake(client):
    try:
        ws = await client.ws_connect("/ws/feed", origin="https://evil.example")
    except aiohttp.WSServerHandshakeError as refused:
        status = refused.status
    else:
        await ws.close()
        status = 101

    assert status == 403


# -- the wildcard ------------------------------------------------------------------------------


async def test_wildcard_origin_never_allows_credentials(make_client, upstream):
    client = await make_client({**AUTH_ENV, "CORS_ALLOW_ORIGINS": "*"})
    anywhere = "https://anywhere.example"

    pre = await client.options("/api/x", headers={**preflight(), "Origin": anywhere})
    actual = await client.get("/open/x", headers={"Origin": anywhere})
    refused = await client.get("/api/x", headers={"Origin": anywhere})
    ws = await client.ws_connect("/ws/feed", origin=anywhere)
    await ws.close()

    assert (pre.status, actual.status, refused.status) == (204, 200, 401)
    for response in (pre, actual, refused):
        assert response.headers.getall("Access-Control-Allow-Origin") == ["*"]
        assert "Access-Control-Allow-Credentials" not in response.headers
    for response in (actual, refused):
        exposed = {
            name.strip().lower() for name in response.headers["Access-Control-Expose-Headers"].split(",")
        }
        assert MUST_EXPOSE <= exposed
    assert json.loads(await actual.text()) == {"method": "GET"}
