"""WebSocket relayed through the gateway: messages both ways, subprotocols, close codes, pings."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web

from gateway import wsrelay
from tests.gateway.test_metrics import scrape
from tests.helpers import one_service, open_slow_reader, wait_for
from tests.wsframes import raw_upstream


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


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ("v1.chat", "v9.evil"),  # not among the client's
        (None, "v1.chat"),  # the client offered none
        ("v1.chat, v2.chat", "v1.chat, v2.chat"),  # more than one
    ],
)
async def test_an_upstream_choosing_a_subprotocol_the_client_did_not_offer_gives_502(
    make_gateway: Any, offered: str | None, chosen: str
) -> None:
    """RFC 6455 section 4.1: the client must fail such a connection. aiohttp's client ignored the
    choice, so the client got a 101 without it, to a backend that speaks the protocol it chose."""
    async with raw_upstream(f"Sec-WebSocket-Protocol: {chosen}\r\n") as url:
        client = await make_gateway(one_service(url, prefix="/ws"))
        headers = {**_UPGRADE, **({"Sec-WebSocket-Protocol": offered} if offered else {})}

        response = await client.get("/ws/room", headers=headers)

        assert response.status == 502
        body = await response.json()
    assert body["detail"] == "Upstream chose a WebSocket subprotocol the client did not offer"


async def test_an_upstream_accepting_an_extension_nobody_offered_gives_502(make_gateway: Any) -> None:
    """The gateway offers no extension upstream; a 101 that agrees to permessage-deflate anyway
    would send compressed frames that neither the gateway nor the client agreed to read."""
    async with raw_upstream("Sec-WebSocket-Extensions: permessage-deflate\r\n") as url:
        client = await make_gateway(one_service(url, prefix="/ws"))

        response = await client.get(
            "/ws/room", headers={**_UPGRADE, "Sec-WebSocket-Extensions": "permessage-deflate"}
        )

        assert response.status == 502
        body = await response.json()
    assert body["detail"] == "Upstream accepted a WebSocket extension that was not offered"


async def test_a_browser_offering_permessage_deflate_gets_no_extension_and_its_messages_cross(
    ws_gateway: tuple[Any, Seen],
) -> None:
    """The upstream (aiohttp, which accepts permessage-deflate when offered) is not offered it,
    and the client is not granted it: each side reads the frames the other sends."""
    client, seen = ws_gateway

    ws = await connect(client, compress=15)  # what a browser offers
    await ws.send_str("a" * 10_000)
    reply = await ws.receive(timeout=5)

    assert ws.compress == 0
    assert "Sec-WebSocket-Extensions" not in seen.headers
    assert (reply.type, reply.data) == (WSMsgType.TEXT, "echo:" + "a" * 10_000)
    await ws.close()


async def test_the_upstreams_own_headers_on_its_101_reach_the_client(
    make_gateway: Any, make_upstream: Any
) -> None:
    """A sticky-session cookie set on the 101 (socket.io behind a load balancer) or any header of
    the backend's was dropped: the client got the gateway's own 101. nginx and Envoy pass them."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("v1.chat",))
        ws.set_cookie("affinity", "node-7")
        ws.headers["X-Backend"] = "realtime-streaming"
        await ws.prepare(request)
        await ws.receive()
        return ws

    client = await make_gateway(one_service((await make_upstream(endpoint)).url, prefix="/ws"))

    ws = await client.ws_connect("/ws/room", protocols=("v1.chat",))

    headers = ws._response.headers
    assert headers["Set-Cookie"].startswith("affinity=node-7")
    assert headers["X-Backend"] == "realtime-streaming"
    assert len(headers.getall("Sec-WebSocket-Accept")) == 1  # the gateway's, for the client's key
    assert headers.getall("Sec-WebSocket-Protocol") == ["v1.chat"]
    assert "x-request-id" in headers
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


async def test_upstream_answering_200_instead_of_101_has_its_answer_relayed(
    make_gateway: Any, make_upstream: Any
) -> None:
    """It was a 502 from the gateway. nginx and Envoy switch protocols only on a 101 and pass any
    other answer on as sent: a page saying where WebSockets are served is the upstream's to give."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(status=200, text="use /ws/v2 instead", headers={"X-Backend": "realtime"})

    client = await make_gateway(one_service((await make_upstream(page)).url, prefix="/ws"))

    response = await client.get("/ws/room", headers=_UPGRADE)

    assert response.status == 200
    assert await response.text() == "use /ws/v2 instead"
    assert response.headers["X-Backend"] == "realtime"
    assert response.headers["Connection"] == "close"
    assert "Upgrade" not in response.headers


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_answering_the_upgrade_is_relayed_not_followed(
    make_gateway: Any, make_upstream: Any, status: int
) -> None:
    """aiohttp's ws_connect followed it: the gateway opened the session wherever the upstream
    pointed (any host), with the client's identity headers, and the client never knew."""
    elsewhere = await make_upstream()

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{elsewhere.url}/ws"}, text="moved")

    client = await make_gateway(one_service((await make_upstream(redirect)).url, prefix="/ws"))

    response = await client.get("/ws/room", headers=_UPGRADE, allow_redirects=False)

    assert response.status == status
    assert response.headers["Location"] == f"{elsewhere.url}/ws"
    assert await response.text() == "moved"
    assert elsewhere.requests == []


async def test_unreachable_websocket_upstream_gives_502(make_gateway: Any, refused_url: str) -> None:
    client = await make_gateway(one_service(refused_url, prefix="/ws"))

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws/room")

    assert refused.value.status == 502


# -- several targets: which one an upgrade goes to ------------------------------------------------


async def _echo(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(f"echo:{msg.data}")
    return ws


async def _echoes_through(client: Any) -> None:
    async with client.ws_connect("/ws/room") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"


async def test_an_upgrade_whose_connect_was_refused_goes_to_another_target(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    """Nothing was sent: the upgrade is tried once more elsewhere, as a proxied request is (and as
    nginx's ``proxy_next_upstream error`` and Envoy do for upgrades). It was a 502."""
    healthy = await make_upstream(_echo)
    client = await make_gateway(one_service([refused_url, healthy.url], prefix="/ws", eject_seconds=60))

    for _ in range(2):  # whichever target the round-robin starts with
        await _echoes_through(client)

    assert len(healthy.requests) == 2


async def test_an_upgrade_whose_connect_timed_out_goes_to_another_target(
    make_gateway: Any, make_upstream: Any, unaccepting_url: str
) -> None:
    healthy = await make_upstream(_echo)
    client = await make_gateway(
        one_service(
            [unaccepting_url, healthy.url],
            prefix="/ws",
            timeout={"connect": 0.3, "read": 30},
            eject_seconds=60,
        )
    )

    for _ in range(2):
        await _echoes_through(client)

    assert len(healthy.requests) == 2


async def test_an_upgrade_is_tried_on_two_targets_at_most(
    make_gateway: Any, make_upstream: Any, bound_socket: Any
) -> None:
    """One retry, as for a proxied request: two refusing targets are a 502, the third is not
    tried (an outage does not multiply each upgrade's connects by the number of targets)."""
    healthy = await make_upstream(_echo)
    refusing = [f"http://127.0.0.1:{bound_socket().getsockname()[1]}" for _ in range(2)]
    client = await make_gateway(one_service([*refusing, healthy.url], prefix="/ws", eject_seconds=60))

    response = await client.get("/ws/room", headers=_UPGRADE)

    assert response.status == 502
    assert (await response.json())["detail"] == "Upstream 'svc' is unreachable"
    assert healthy.requests == []
    await _echoes_through(client)  # both refusing targets sit out their cooldown now


async def _closes_unanswered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the upgrade arrived; a backend restarting ends here
    writer.close()


async def test_an_upgrade_whose_connection_closed_unanswered_goes_to_another_target(
    make_gateway: Any, make_raw_upstream: Any, make_upstream: Any
) -> None:
    """The upgrade is a GET: closed before any answer, it is tried once more elsewhere, as a
    proxied GET is (and nginx's ``proxy_next_upstream error``). It was a 502."""
    closing = await make_raw_upstream(_closes_unanswered)
    healthy = await make_upstream(_echo)
    client = await make_gateway(one_service([closing, healthy.url], prefix="/ws", eject_seconds=60))

    for _ in range(2):  # whichever target the round-robin starts with
        await _echoes_through(client)
    assert len(healthy.requests) == 2

    alone = await make_gateway(one_service(closing, prefix="/ws", eject_seconds=60))
    for _ in range(2):  # not ejected: it took the connection, and is up
        response = await alone.get("/ws/room", headers=_UPGRADE)
        assert response.status == 502
        assert (await response.json())["detail"] == "Upstream 'svc' closed the connection"


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # takes the connection and the upgrade, says nothing until the peer leaves


async def test_an_upgrade_never_answered_gets_504_and_keeps_its_target(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    """The target accepted the connection: it is up, and one endpoint is slow, as with a proxied
    request's read timeout. It was ejected, so the next request got 503 "No healthy target"."""
    silent = await make_raw_upstream(_never_answers)
    client = await make_gateway(
        one_service(silent, prefix="/ws", timeout={"connect": 5, "read": 0.3}, eject_seconds=60)
    )

    for _ in range(2):
        response = await client.get("/ws/room", headers=_UPGRADE)
        assert response.status == 504
        assert (await response.json())["detail"] == "Upstream 'svc' timed out"


async def test_an_upgrade_never_answered_is_not_sent_to_another_target(
    make_gateway: Any, make_raw_upstream: Any, make_upstream: Any
) -> None:
    """The upgrade reached the upstream, which may have acted on it: as a proxied request after a
    read timeout, it is not sent again."""
    silent = await make_raw_upstream(_never_answers)
    healthy = await make_upstream(_echo)
    client = await make_gateway(
        one_service(
            [silent, healthy.url], prefix="/ws", timeout={"connect": 5, "read": 0.3}, eject_seconds=60
        )
    )

    statuses = []
    for _ in range(2):  # whichever target the round-robin starts with
        try:
            await _echoes_through(client)
        except aiohttp.WSServerHandshakeError as refused:
            statuses.append(refused.status)
        else:
            statuses.append(101)

    assert sorted(statuses) == [101, 504]
    assert len(healthy.requests) == 1


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


@dataclass
class Feed:
    """A push-only upstream: it sends and never reads, as a price or log feed does."""

    ended: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None


@pytest.fixture
async def feed_gateway(make_gateway: Any, make_upstream: Any, monkeypatch: Any) -> tuple[Any, Feed]:
    monkeypatch.setattr(wsrelay, "CLOSE_TIMEOUT", 0.2)
    feed = Feed()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            while True:
                await ws.send_str("tick")
                await asyncio.sleep(0.02)  # the feed's own pace
        except ConnectionError:
            pass
        finally:
            feed.ended.set()
        return ws

    upstream = await make_upstream(endpoint)
    return await make_gateway(one_service(upstream.url, prefix="/ws")), feed


async def test_an_upstream_that_never_reads_is_let_go_when_the_client_closes(
    feed_gateway: tuple[Any, Feed],
) -> None:
    """aiohttp's client close() waits for the upstream's answering close frame with a timeout
    per message read: a feed that kept sending and never answered kept the session, the upstream
    connection and the gateway reading it, for good, after every client that left."""
    client, feed = feed_gateway
    ws = await client.ws_connect("/ws/feed")
    assert (await ws.receive(timeout=5)).data == "tick"

    await ws.close()

    await wait_for(feed.ended.is_set, what="the gateway to drop the feed's connection")


async def test_an_upstream_that_never_reads_is_let_go_when_the_client_vanishes(
    feed_gateway: tuple[Any, Feed],
) -> None:
    client, feed = feed_gateway
    ws = await client.ws_connect("/ws/feed")
    assert (await ws.receive(timeout=5)).data == "tick"

    ws._response.connection.transport.abort()  # no close frame: the client's network is gone

    await wait_for(feed.ended.is_set, what="the gateway to drop the feed's connection")


@pytest.fixture
async def small_limit_gateway(make_gateway: Any, make_upstream: Any, monkeypatch: Any) -> tuple[Any, Seen]:
    """An echo upstream that can send a large message, behind a gateway with a 1000-byte limit."""
    monkeypatch.setattr(wsrelay, "MAX_MESSAGE", 1000)
    seen = Seen()

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data == "send a large one":
                await ws.send_bytes(b"x" * 2000)
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        seen.close_code = ws.close_code
        seen.closed = True
        return ws

    upstream = await make_upstream(endpoint)
    return await make_gateway(one_service(upstream.url, prefix="/ws")), seen


async def test_a_client_message_over_the_limit_closes_both_sides_with_1009(
    small_limit_gateway: tuple[Any, Seen],
) -> None:
    client, seen = small_limit_gateway
    ws = await client.ws_connect("/ws/room")

    await ws.send_bytes(b"x" * 2000)
    closing = await ws.receive(timeout=5)

    assert (closing.type, closing.data) == (WSMsgType.CLOSE, WSCloseCode.MESSAGE_TOO_BIG)
    await wait_for(lambda: seen.closed, what="the upstream to see the close")
    assert seen.close_code == WSCloseCode.MESSAGE_TOO_BIG


async def test_an_upstream_message_over_the_limit_closes_both_sides_with_1009(
    small_limit_gateway: tuple[Any, Seen],
) -> None:
    """It was a 1011 (internal error) to the client, which reads as a fault of the gateway's."""
    client, seen = small_limit_gateway
    ws = await client.ws_connect("/ws/room")

    await ws.send_str("send a large one")
    closing = await ws.receive(timeout=5)

    assert (closing.type, closing.data) == (WSMsgType.CLOSE, WSCloseCode.MESSAGE_TOO_BIG)
    await wait_for(lambda: seen.closed, what="the upstream to see the close")
    assert seen.close_code == WSCloseCode.MESSAGE_TOO_BIG


async def test_messages_up_to_the_limit_cross(small_limit_gateway: tuple[Any, Seen]) -> None:
    client, _ = small_limit_gateway
    ws = await client.ws_connect("/ws/room")

    await ws.send_str("y" * 1000)

    assert (await ws.receive(timeout=5)).data == "y" * 1000
    await ws.close()


async def test_a_close_frame_without_a_code_reaches_the_upstream_without_one(
    ws_gateway: tuple[Any, Seen],
) -> None:
    """A close frame may carry no status code. Passed on as code 0, which no endpoint may send,
    the upstream saw a protocol error (1002) instead of the client's ordinary goodbye; then it
    was made a 1000. It stays empty (aiohttp reports that as 0): test_websocket_lifecycle.py."""
    client, seen = ws_gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"GET /ws/room HTTP/1.1\r\nHost: gw\r\n" + _raw_upgrade_headers() + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        writer.write(b"\x88\x80" + b"\x00\x00\x00\x00")  # FIN + close, masked, empty payload

        await wait_for(lambda: seen.closed, what="the upstream to see the close")
    finally:
        writer.close()
    assert seen.close_code == 0


def _raw_upgrade_headers() -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in _UPGRADE.items())


async def test_a_client_that_stops_reading_pauses_the_upstream_and_is_cut_off(
    make_gateway: Any, make_upstream: Any, monkeypatch: Any
) -> None:
    """Backpressure crosses the gateway: the upstream's sends block once the buffers between
    it and a client that reads nothing are full, and after the send timeout the client is cut
    off and the upstream let go, as for a streamed HTTP answer."""
    monkeypatch.setattr(wsrelay, "CLOSE_TIMEOUT", 0.2)
    sent_when_blocked: list[int] = []
    ended = asyncio.Event()

    async def flood(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        loop, sent = asyncio.get_running_loop(), 0
        try:
            while True:
                started = loop.time()
                await ws.send_bytes(b"x" * 65536)
                if loop.time() - started > 0.1 and not sent_when_blocked:  # waited for the peer
                    sent_when_blocked.append(sent)
                sent += 65536
        except ConnectionError:
            pass
        finally:
            ended.set()
        return ws

    upstream = await make_upstream(flood)
    client = await make_gateway(one_service(upstream.url, prefix="/ws"), server_kwargs={"send_timeout": 0.5})
    _, writer = await open_slow_reader(client.port)
    try:
        writer.write(b"GET /ws/feed HTTP/1.1\r\nHost: gw\r\n" + _raw_upgrade_headers() + b"\r\n")

        await wait_for(ended.is_set, what="the gateway to let the upstream go")
    finally:
        writer.close()
    # Socket buffers and a message or two in aiohttp's queues, not the GB/s of a loopback.
    assert sent_when_blocked and sent_when_blocked[0] < 16 * 1024 * 1024
