"""WebSocket relayed through the gateway: messages both ways, subprotocols, close codes, pings."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.gateway.test_metrics import scrape
from tests.helpers import one_service, wait_for


@dataclass
class Seen:
    """What the upstream WebSocket endpoint observed."""

    headers: Any = None
    offered: list[str] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    close_code: int | None = None
    closed: bool = False


@pytest.fixture
async def ws_gateway(make_gateway: Any, make_upstream: Any) -> tuple[Any, Seen]:
    """A gateway in front of an echo endpoint that also greets, answers pings and can close."""
    seen = Seen()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        seen.headers = request.headers
        seen.offered = request.headers.getall("Sec-WebSocket-Protocol", [])
        ws = web.WebSocketResponse(protocols=("v1.chat",), autoping=False)
        await ws.prepare(request)
        await ws.send_str("welcome")
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data == "close please":
                await ws.close(code=4002, message=b"closed by upstream")
            elif msg.type is WSMsgType.TEXT:
                seen.messages.append(msg.data)
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is WSMsgType.BINARY:
                seen.messages.append(msg.data)
                await ws.send_bytes(b"echo:" + msg.data)
            elif msg.type is WSMsgType.PING:
                seen.pings.append(msg.data)
                await ws.pong(b"upstream:" + msg.data)
        seen.close_code = ws.close_code
        seen.closed = True
        return ws

    upstream = await make_upstream(endpoint)
    return await make_gateway(one_service(upstream.url, prefix="/ws")), seen


async def connect(client: Any, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/ws/room", **kwargs)
    greeting = await ws.receive(timeout=5)
    assert (greeting.type, greeting.data) == (WSMsgType.TEXT, "welcome")
    return ws


async def test_text_messages_cross_both_ways(ws_gateway: tuple[Any, Seen]) -> None:
    client, seen = ws_gateway
    ws = await connect(client)

    await ws.send_str("hello ✓")
    reply = await ws.receive(timeout=5)

    assert (reply.type, reply.data) == (WSMsgType.TEXT, "echo:hello ✓")
    assert seen.messages == ["hello ✓"]
    await ws.close()


async def test_binary_messages_cross_both_ways(ws_gateway: tuple[Any, Seen]) -> None:
    client, seen = ws_gateway
    ws = await connect(client)
    payload = bytes(range(256)) * 1000

    await ws.send_bytes(payload)
    reply = await ws.receive(timeout=5)

    assert (reply.type, reply.data) == (WSMsgType.BINARY, b"echo:" + payload)
    assert seen.messages == [payload]
    await ws.close()


async def test_subprotocol_is_negotiated_with_the_upstream(ws_gateway: tuple[Any, Seen], caplog: Any) -> None:
    client, seen = ws_gateway

    with caplog.at_level(logging.WARNING, logger="aiohttp.websocket"):
        ws = await connect(client, protocols=("v2.chat", "v1.chat"))

    assert ws.protocol == "v1.chat"
    assert [p.strip() for value in seen.offered for p in value.split(",")] == ["v2.chat", "v1.chat"]
    # The gateway's checks are no reason for a warning per session ("don't overlap").
    assert not [r for r in caplog.records if r.name == "aiohttp.websocket" and "overlap" in r.getMessage()]
    await ws.close()


async def test_no_subprotocol_when_the_client_offers_none(ws_gateway: tuple[Any, Seen]) -> None:
    client, seen = ws_gateway

    ws = await connect(client)

    assert ws.protocol is None
    assert seen.offered == []
    await ws.close()


async def test_close_code_from_the_client_reaches_the_upstream(ws_gateway: tuple[Any, Seen]) -> None:
    client, seen = ws_gateway
    ws = await connect(client)

    await ws.close(code=4001, message=b"bye")

    await wait_for(lambda: seen.closed, what="the upstream to see the close")
    assert seen.close_code == 4001


async def test_close_code_from_the_upstream_reaches_the_client(ws_gateway: tuple[Any, Seen]) -> None:
    client, _ = ws_gateway
    ws = await connect(client)

    await ws.send_str("close please")
    closing = await ws.receive(timeout=5)

    assert closing.type is WSMsgType.CLOSE
    assert closing.data == 4002
    assert closing.extra == "closed by upstream"
    assert ws.close_code == 4002


async def test_client_ping_is_answered_by_the_upstream_pong(ws_gateway: tuple[Any, Seen]) -> None:
    client, seen = ws_gateway
    ws = await connect(client, autoping=False)

    await ws.ping(b"are you there")
    reply = await ws.receive(timeout=5)

    assert reply.type is WSMsgType.PONG
    assert reply.data == b"upstream:are you there"
    assert seen.pings == [b"are you there"]
    await ws.close()


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_upgrade_refused_by_the_upstream_keeps_its_status(
    make_gateway: Any, make_upstream: Any, status: int
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=status, text="no websockets for you")

    client = await make_gateway(one_service((await make_upstream(refuse)).url, prefix="/ws"))

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/room")

    assert refused.value.status == status


_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


async def test_upgrade_refused_by_the_upstream_passes_through_as_sent(
    make_gateway: Any, make_upstream: Any
) -> None:
    # The contract: an upstream's own answer, error or not, passes through untouched. A refused
    # upgrade is such an answer; its body and headers say why (which token, which realm).
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(
            status=401,
            body=b'{"error": "token expired"}',
            content_type="application/vnd.realtime+json",
            headers={"WWW-Authenticate": 'Bearer realm="realtime"', "X-Backend": "realtime-streaming"},
        )

    client = await make_gateway(one_service((await make_upstream(refuse)).url, prefix="/ws"))

    response = await client.get("/ws/room", headers=_UPGRADE)

    assert response.status == 401
    assert await response.read() == b'{"error": "token expired"}'
    assert response.headers["Content-Type"] == "application/vnd.realtime+json"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="realtime"'
    assert response.headers["X-Backend"] == "realtime-streaming"
    assert "x-request-id" in response.headers
    # aiohttp parses nothing more on a connection that asked to upgrade: it is closed.
    assert response.headers["Connection"] == "close"


async def test_a_refusal_too_large_to_keep_gets_the_gateways_error_with_its_status(
    make_gateway: Any, make_upstream: Any
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, body=b"x" * (1024 * 1024))

    client = await make_gateway(one_service((await make_upstream(refuse)).url, prefix="/ws"))

    response = await client.get("/ws/room", headers=_UPGRADE)

    assert response.status == 403
    assert (await response.json())["detail"] == "Upstream refused the WebSocket upgrade"


async def test_upstream_answering_without_upgrade_gives_502(make_gateway: Any, make_upstream: Any) -> None:
    client = await make_gateway(one_service((await make_upstream()).url, prefix="/ws"))

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/room")

    assert refused.value.status == 502


async def test_unreachable_websocket_upstream_gives_502(make_gateway: Any, refused_url: str) -> None:
    client = await make_gateway(one_service(refused_url, prefix="/ws"))

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/room")

    assert refused.value.status == 502


async def test_handshake_carries_forwarding_headers_and_drops_client_identity(
    ws_gateway: tuple[Any, Seen],
) -> None:
    client, seen = ws_gateway

    ws = await connect(client, headers={"X-Custom": "kept", "X-Auth-Subject": "admin"})
    await ws.close()

    assert seen.headers.getall("X-Custom") == ["kept"]
    assert "X-Auth-Subject" not in seen.headers
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["Via"] == "1.1 gateway"


async def test_a_finished_session_is_counted_as_101_not_as_a_client_error(
    ws_gateway: tuple[Any, Seen],
) -> None:
    """Every proxied session ends with its handler cancelled when the connection goes: that is
    not a client giving up (499), it is a 101 that ran its course."""
    client, seen = ws_gateway
    ws = await connect(client)
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "echo:hi"
    await ws.close()
    await wait_for(lambda: seen.closed, what="the upstream side to close")

    async def counted() -> dict[str, float]:
        samples = await scrape(client)
        return {
            dict(labels)["status"]: count
            for labels, count in samples["gateway_requests_total"].items()
            if dict(labels)["route"] == "/ws"
        }

    deadline = asyncio.get_running_loop().time() + 5
    while (statuses := await counted()) == {}:
        assert asyncio.get_running_loop().time() < deadline, "the session was never counted"
        await asyncio.sleep(0.02)  # poll interval
    assert statuses == {"1xx": 1.0}


async def test_a_message_larger_than_the_read_buffer_reaches_the_upstream(
    ws_gateway: tuple[Any, Seen],
) -> None:
    """Over 512 KiB a message fills aiohttp's WebSocket queue, which pauses reading the client.
    The gateway's one-request-at-a-time parser had left the connection marked as plain HTTP, so
    that pause failed inside aiohttp and the session was closed with a 1000 as if it had ended."""
    client, seen = ws_gateway
    ws = await connect(client)
    payload = b"x" * (1024 * 1024)

    await ws.send_bytes(payload)
    reply = await ws.receive(timeout=5)

    assert reply.type is WSMsgType.BINARY, reply
    assert reply.data == b"echo:" + payload
    assert seen.messages == [payload]
    await ws.close()
