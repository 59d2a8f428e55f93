"""A proxied WebSocket's life after the handshake: the close handshake crossing whole (codes,
reasons, empty Close frames), pings both ways, the idle timeout, and going away on drain."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSCloseCode, WSMsgType, web

from tests.helpers import one_service, wait_for
from tests.wsframes import (
    CLOSE,
    TEXT,
    close_payload,
    frame,
    raw_client,
    raw_upstream,
    read_frame,
    read_until_eof,
)


@dataclass
class Ended:
    """How the upstream's side of a session ended."""

    close: tuple[int, str] | None = None  # the Close it received: code (0: none) and reason
    reply_code: int | None = None  # the code of the reply to its own Close
    pongs: list[bytes] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def first_close_received(self, request: web.Request) -> web.StreamResponse:
        """An upstream endpoint that waits for the session's first frame, a Close, and keeps it."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        msg = await ws.receive()
        self.close = (msg.data, msg.extra)
        self.done.set()
        return ws


async def test_the_clients_close_reaches_the_upstream_and_the_upstreams_reply_the_client(
    make_gateway: Any, make_upstream: Any
) -> None:
    """The client got a 1000 at once, from the gateway, whatever the upstream then answered."""
    ended = Ended()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        msg = await ws.receive()
        ended.close = (msg.data, msg.extra)
        await ws.close(code=4003, message=b"see you later")
        ended.done.set()
        return ws

    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))
    async with raw_client(client.port) as (reader, writer):
        writer.write(frame(CLOSE, close_payload(4001, b"bye now"), masked=True))

        reply = await read_frame(reader)

        assert reply == (CLOSE, close_payload(4003, b"see you later"))
        assert await read_until_eof(reader) == b""  # and then the connection ends
    assert ended.close == (4001, "bye now")


@pytest.mark.parametrize("code", [WSCloseCode.INTERNAL_ERROR, 4002])
async def test_the_upstreams_close_reaches_the_client_and_the_clients_reply_the_upstream(
    make_gateway: Any, make_upstream: Any, code: int
) -> None:
    """The upstream got a 1000 at once, from the gateway, whatever the client then answered."""
    ended = Ended()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=code, message=b"restarting")  # waits for the reply
        ended.reply_code = ws.close_code
        ended.done.set()
        return ws

    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))
    async with raw_client(client.port) as (reader, writer):
        closing = await read_frame(reader)
        assert closing == (CLOSE, close_payload(code, b"restarting"))

        writer.write(frame(CLOSE, close_payload(4005, b"ok"), masked=True))

        async with asyncio.timeout(5):
            await ended.done.wait()
    assert ended.reply_code == 4005


async def test_a_close_without_a_code_stays_without_one_both_ways(make_gateway: Any) -> None:
    """An empty Close went on as 1000; 1005 ("no status") must never be put on the wire either."""
    received: list[bytes] = []

    async def answer_empty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, payload = await read_frame(reader)
        received.append(payload)
        writer.write(frame(CLOSE, b"", masked=False))
        await writer.drain()
        await reader.read()

    async with raw_upstream(then=answer_empty) as url:
        client = await make_gateway(one_service(url, prefix="/ws"))
        async with raw_client(client.port) as (reader, writer):
            writer.write(frame(CLOSE, b"", masked=True))

            reply = await read_frame(reader)

    assert received == [b""]
    assert reply == (CLOSE, b"")


async def test_a_clients_close_with_1006_is_a_protocol_error_on_both_sides(make_gateway: Any) -> None:
    """1006 is for reporting a lost connection and no endpoint may send it (RFC 6455 section
    7.4.1); aiohttp's reader lets it through, and the gateway answered the upstream's reply (1000)
    and told the upstream 1001 (Autobahn case 7.9.5)."""
    received: list[bytes] = []

    async def answer_in_kind(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, payload = await read_frame(reader)
        received.append(payload)
        writer.write(frame(CLOSE, close_payload(WSCloseCode.OK), masked=False))
        await writer.drain()
        await reader.read()

    async with raw_upstream(then=answer_in_kind) as url:
        client = await make_gateway(one_service(url, prefix="/ws"))
        async with raw_client(client.port) as (reader, writer):
            writer.write(frame(CLOSE, close_payload(WSCloseCode.ABNORMAL_CLOSURE), masked=True))

            reply = await read_frame(reader)

            assert reply == (CLOSE, close_payload(WSCloseCode.PROTOCOL_ERROR))
            await wait_for(lambda: received != [], what="the Close upstream")
    assert received == [close_payload(WSCloseCode.PROTOCOL_ERROR)]


async def test_an_upstreams_close_with_1006_is_a_protocol_error_on_both_sides(make_gateway: Any) -> None:
    replies: list[bytes] = []

    async def close_with_1006(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frame(CLOSE, close_payload(WSCloseCode.ABNORMAL_CLOSURE), masked=False))
        await writer.drain()
        _, payload = await read_frame(reader)
        replies.append(payload)
        await reader.read()

    async with raw_upstream(then=close_with_1006) as url:
        client = await make_gateway(one_service(url, prefix="/ws"))
        async with raw_client(client.port) as (reader, writer):
            closing = await read_frame(reader)

            assert closing == (CLOSE, close_payload(WSCloseCode.PROTOCOL_ERROR))
            writer.write(frame(CLOSE, close_payload(WSCloseCode.PROTOCOL_ERROR), masked=True))
            await wait_for(lambda: replies != [], what="the gateway's answer upstream")
    assert replies == [close_payload(WSCloseCode.PROTOCOL_ERROR)]


async def test_pings_cross_both_ways_and_their_pongs_come_back(make_gateway: Any, make_upstream: Any) -> None:
    """The gateway answers no ping itself: each side's liveness check reaches the other side."""
    ended = Ended()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.ping(b"upstream heartbeat 1")
        async for msg in ws:
            if msg.type is WSMsgType.PONG:
                ended.pongs.append(msg.data)
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data + b" (answered upstream)")
        return ws

    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))
    ws = await client.ws_connect("/ws/room", autoping=False)

    ping = await ws.receive(timeout=5)
    assert (ping.type, ping.data) == (WSMsgType.PING, b"upstream heartbeat 1")
    await ws.pong(ping.data)
    await ws.ping(b"client heartbeat")
    pong = await ws.receive(timeout=5)

    assert (pong.type, pong.data) == (WSMsgType.PONG, b"client heartbeat (answered upstream)")
    await wait_for(lambda: ended.pongs == [b"upstream heartbeat 1"], what="the client's pong upstream")
    await ws.close()


IDLE = {"timeout": {"connect": 2, "read": 0.3}}


async def test_a_session_with_no_frame_either_way_for_the_read_timeout_is_closed_with_1001(
    make_gateway: Any, make_upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """It lived for ever, holding a socket at each end and two in the gateway."""
    ended = Ended()
    endpoint = ended.first_close_received
    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws", **IDLE))
    with caplog.at_level(logging.INFO, logger="gateway"):
        ws = await client.ws_connect("/ws/room")

        closing = await ws.receive(timeout=5)

        assert (closing.type, closing.data, closing.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
        async with asyncio.timeout(5):
            await ended.done.wait()
    assert ended.close == (1001, "idle timeout")
    assert [r for r in caplog.records if "idle" in r.getMessage() and r.idle_timeout_s == 0.3]


async def test_nothing_follows_the_gateways_close_to_a_side(make_gateway: Any) -> None:
    """The gateway closed the session (idle timeout; draining does the same): a message the
    client sent before it saw that Close is not passed on to the upstream, which has had the
    gateway's Close already. After a Close, an endpoint sends no more data frames (RFC 6455
    section 5.5.1), and an upstream may take one that comes anyway for a protocol error."""
    frames: list[tuple[int, bytes]] = []
    after_close: list[bytes] = []  # what the upstream read after the Close, up to the end

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            opcode, payload = await read_frame(reader)
            frames.append((opcode, payload))
            if opcode == CLOSE:
                writer.write(frame(CLOSE, payload, masked=False))  # the reply, at once
                break
        after_close.append(await read_until_eof(reader))

    async with raw_upstream(then=record) as url:
        client = await make_gateway(one_service(url, prefix="/ws", **IDLE))
        async with raw_client(client.port) as (reader, writer):
            idle_close = close_payload(1001, b"idle timeout")
            assert await read_frame(reader) == (CLOSE, idle_close)
            writer.write(frame(TEXT, b"late", masked=True))  # sent before it read the Close
            writer.write(frame(CLOSE, idle_close, masked=True))

            assert await read_until_eof(reader) == b""  # the session ended
            await wait_for(lambda: bool(after_close), what="the upstream's connection to end")
    assert frames == [(CLOSE, idle_close)]
    assert after_close == [b""]


async def test_pings_keep_a_session_alive_past_the_read_timeout(
    make_gateway: Any, make_upstream: Any
) -> None:
    """A backend that pings its clients (socket.io, Phoenix, graphql-ws) keeps its sessions."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for _ in range(20):  # 1 s of heartbeats, over three times the read timeout
            await ws.ping(b"hb")
            await asyncio.sleep(0.05)  # the heartbeat's own pace
        await ws.send_str("still here")
        await ws.receive()
        return ws

    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws", **IDLE))
    ws = await client.ws_connect("/ws/room")  # answers the pings itself (autoping)

    message = await ws.receive(timeout=5)

    assert (message.type, message.data) == (WSMsgType.TEXT, "still here")
    await ws.close()


async def test_draining_closes_both_sides_with_1001(make_gateway: Any, make_upstream: Any) -> None:
    ended = Ended()
    endpoint = ended.first_close_received
    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))
    ws = await client.ws_connect("/ws/room")

    await client.app.shutdown()  # what SIGTERM runs (on_shutdown) before connections are closed

    closing = await ws.receive(timeout=5)
    assert (closing.type, closing.data) == (WSMsgType.CLOSE, WSCloseCode.GOING_AWAY)
    async with asyncio.timeout(5):
        await ended.done.wait()
    assert ended.close is not None and ended.close[0] == WSCloseCode.GOING_AWAY


async def test_a_client_that_never_answers_the_close_is_let_go(
    make_gateway: Any, make_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream's Close was passed on; with no reply within the close timeout, the gateway
    answers the upstream itself (its own code echoed) and drops both connections."""
    from gateway import wsrelay

    monkeypatch.setattr(wsrelay, "CLOSE_TIMEOUT", 0.2)
    ended = Ended()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=4002, message=b"bye")
        ended.reply_code = ws.close_code
        ended.done.set()
        return ws

    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))
    async with raw_client(client.port) as (reader, _):
        assert await read_frame(reader) == (CLOSE, close_payload(4002, b"bye"))

        assert await read_until_eof(reader) == b""  # dropped, not left open

        async with asyncio.timeout(5):
            await ended.done.wait()
    assert ended.reply_code == 4002


async def test_a_client_that_vanishes_has_the_upstream_told_1001(
    make_gateway: Any, make_upstream: Any
) -> None:
    ended = Ended()
    endpoint = ended.first_close_received
    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))
    ws = await client.ws_connect("/ws/room")

    ws._response.connection.transport.abort()  # no Close: the client's network is gone

    async with asyncio.timeout(5):
        await ended.done.wait()
    assert ended.close is not None and ended.close[0] == WSCloseCode.GOING_AWAY


async def test_messages_from_the_upstream_still_reach_a_client_that_has_closed(
    make_gateway: Any, make_upstream: Any
) -> None:
    """Between a client's Close and the upstream's reply, what the upstream had in flight is
    still the client's (RFC 6455 section 1.4: a side may send until it has sent its Close)."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        await ws.receive()  # the Close
        await ws.send_str("last words")
        await ws.close(code=1000)
        return ws

    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))
    async with raw_client(client.port) as (reader, writer):
        writer.write(frame(CLOSE, close_payload(1000), masked=True))

        assert await read_frame(reader) == (0x1, b"last words")
        assert await read_frame(reader) == (CLOSE, close_payload(1000))
