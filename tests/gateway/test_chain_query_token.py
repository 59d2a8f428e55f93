"""The ``access_token`` query parameter (RFC 6750 section 2.3): how a browser's WebSocket and
EventSource, which cannot send an Authorization header, authenticate through the gateway."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.gateway.chain import AUTH_ENV, bearer, service, token


def routes() -> list[dict[str, Any]]:
    return [
        {"prefix": "/required", "rate_limit": "2/minute"},
        {"prefix": "/open", "auth": "none"},
    ]


@pytest.fixture
async def upstream(make_upstream: Any) -> Any:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"{request.headers['x-auth-subject']}:{msg.data}")
            return ws
        return web.json_response({"subject": request.headers.get("x-auth-subject")})

    return await make_upstream(reply)


@pytest.fixture
async def client(make_gateway: Any, upstream: Any) -> Any:
    return await make_gateway(service(upstream.url, routes()), AUTH_ENV)


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        ("?access_token={t}", ""),
        ("?a=1&access_token={t}&b=%20+x&a=2", "?a=1&b=%20+x&a=2"),
        ("?access_token={t}&q=%2F", "?q=%2F"),
        ("?x_access_token=keep&access_token={t}", "?x_access_token=keep"),
    ],
)
async def test_a_token_in_the_query_authenticates_and_is_not_forwarded(client, upstream, query, forwarded):
    response = await client.get(URL("/required/things" + query.format(t=token("carol")), encoded=True))

    assert response.status == 200
    assert await response.json() == {"subject": "carol"}
    [received] = upstream.requests
    # The rest of the query byte for byte; the credential stops at the gateway.
    assert received.raw_path == "/required/things" + forwarded


async def test_a_browser_websocket_authenticates_with_the_query_token(client, upstream):
    async with client.ws_connect(f"/required/ws?access_token={token('dana')}") as ws:
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "dana:ping"
    assert upstream.requests[0].raw_path == "/required/ws"


async def test_a_websocket_without_any_token_is_refused(client, upstream):
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect("/required/ws"):
            pass
    assert refused.value.status == 401
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("path", "headers", "status", "error"),
    [
        # RFC 6750 section 2: one way of sending the token per request.
        ("/required/x?access_token={t}", "header", 400, "invalid_request"),
        ("/required/x?access_token={t}&access_token={t}", None, 400, "invalid_request"),
        ("/required/x?access_token=not.a.token", None, 401, "invalid_token"),
        ("/required/x?access_token=", None, 401, "invalid_token"),
    ],
)
async def test_query_tokens_that_cannot_be_taken_are_refused(client, upstream, path, headers, status, error):
    sent = bearer("erin") if headers == "header" else {}
    response = await client.get(path.format(t=token("erin")), headers=sent)

    assert response.status == status
    assert f'error="{error}"' in response.headers["WWW-Authenticate"]
    assert upstream.requests == []


async def test_a_query_token_is_taken_on_get_and_head_only(client, upstream):
    # Anything with a body sends the header: a token in a form's action URL is a token in
    # every log and history on the way.
    response = await client.post(f"/required/x?access_token={token('fay')}", json={})

    assert response.status == 401
    assert upstream.requests == []


async def test_a_route_without_auth_forwards_the_query_untouched(client, upstream):
    query = f"?access_token={token('gus')}&a=1"
    response = await client.get("/open/x" + query)

    assert response.status == 200
    assert await response.json() == {"subject": None}
    assert upstream.requests[0].raw_path == "/open/x" + query


async def test_query_token_requests_are_limited_per_subject_not_per_address(client, upstream):
    # The route allows 2 a minute. Three subjects from one address: each is charged to itself, as
    # with the header; the address stage charges only tokens that turn out bad.
    statuses = [
        (await client.get(f"/required/x?access_token={token(name)}")).status for name in ("h", "i", "j")
    ]
    assert statuses == [200, 200, 200]
    same = [(await client.get(f"/required/x?access_token={token('k')}")).status for _ in range(3)]
    assert same == [200, 200, 429]
