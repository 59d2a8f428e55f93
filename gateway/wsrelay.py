"""A proxied WebSocket session once both handshakes are done: messages, pings and the close
handshake relayed between the client and the upstream, an idle timeout, and going away on drain.

Each side's frames reach the other as that side sent them, as Envoy and nginx relay the bytes of
an upgraded connection; the gateway answers nothing itself (aiohttp's autoping and autoclose are
off on both sides):

    data, ping, pong   passed on, payload as sent (a message over MAX_MESSAGE: 1009 both ways)
    Close(code, why)   passed on as sent, an empty one empty (1005 is never put on the wire);
                       the other side's reply, its own code and reason, goes back as the answer
    Close(1006)        a code no endpoint may send (aiohttp itself fails 1005 and 1015): 1002 to
                       both sides, as for any protocol error
    no reply in time   CLOSE_TIMEOUT after the first Close, the gateway answers a side itself,
                       echoing its code (RFC 6455 section 5.5.1), and drops both connections
    connection lost    the other side gets 1001 (going away)
    idle               no frame either way for the service's read timeout: 1001 to both sides
    drain (SIGTERM)    1001 to both sides at once; their replies are awaited within the drain

nginx (``proxy_read_timeout``, re-armed by traffic either way) and Envoy (the stream idle timeout)
end an idle upgraded connection by closing its sockets; reading frames anyway, the gateway closes
it with a Close frame, so each side learns why rather than seeing the connection drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from struct import Struct

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

__all__ = ["CLOSE_TIMEOUT", "MAX_MESSAGE", "Session"]

log = logging.getLogger("gateway.proxy")

# The largest WebSocket message relayed either way; a larger one closes the session with 1009 on
# both sides. Each message is held whole in memory on its way through, so this bounds a session's
# memory; Envoy and Traefik, which relay frames without reading them, have no such limit.
MAX_MESSAGE = 16 * 1024 * 1024
# How long a close handshake may take with either side before its connection is dropped.
CLOSE_TIMEOUT = 10.0

# Close codes that only report what happened locally and that no endpoint may send (RFC 6455
# section 7.4.1): no status (1005), no close frame (1006), TLS failure (1015).
_UNSENDABLE = frozenset({1005, 1006, 1015})
_CODE = Struct("!H")

_WSLike = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class _Side:
    """One end of the session and where its close handshake stands."""

    __slots__ = ("close_sent", "received", "ws")

    def __init__(self, ws: _WSLike) -> None:
        self.ws = ws
        self.close_sent = False  # the gateway sent it a Close: no more data goes to it
        self.received: tuple[int, str] | None = None  # the code (0: none) and reason it closed with


class Session:
    """Relay one WebSocket session between ``client`` and ``upstream`` until both have closed.

    ``relayed`` adds up the message bytes that crossed, client to upstream and back, for the
    access log. ``idle_timeout`` (seconds, ``None`` for none) closes a session with no frame
    either way for that long."""

    def __init__(
        self,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
        *,
        relayed: list[int],
        idle_timeout: float | None,
    ) -> None:
        self._client = _Side(client)
        self._upstream = _Side(upstream)
        self._relayed = relayed
        self._idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._last_frame = self._loop.time()
        self._closing = asyncio.Event()  # a Close went out or came in, or a connection was lost

    async def run(self) -> None:
        client, upstream = self._client, self._upstream
        pumps = (
            asyncio.create_task(self._pump(client, upstream, 0)),
            asyncio.create_task(self._pump(upstream, client, 1)),
        )
        for pump in pumps:  # one that fails unexpectedly ends the session too
            pump.add_done_callback(lambda _: self._closing.set())
        idle = asyncio.create_task(self._watch_idle()) if self._idle_timeout else None
        try:
            await self._closing.wait()
            if idle is not None:
                idle.cancel()  # a close handshake under way is not interrupted
        finally:
            try:
                # Also when this handler is cancelled because the client's connection ended: the
                # pumps are tasks of their own, and the upstream is still told (1001) and its
                # reply read.
                done, _ = await asyncio.wait(pumps, timeout=CLOSE_TIMEOUT)
                for task in done:
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        log.error("WebSocket relay failed", exc_info=exc)
            finally:
                for task in (*pumps, *((idle,) if idle is not None else ())):
                    task.cancel()
                await self._finish()

    async def go_away(self, reason: str) -> None:
        """Send both sides a Close with 1001 (going away); their replies end the session."""
        await self._send_close(self._client, WSCloseCode.GOING_AWAY, reason)
        await self._send_close(self._upstream, WSCloseCode.GOING_AWAY, reason)

    async def _pump(self, source: _Side, sink: _Side, direction: int) -> None:
        """Relay ``source``'s frames to ``sink`` until ``source`` is done (closed or gone)."""
        receive, loop, relayed = source.ws.receive, self._loop, self._relayed
        while True:
            msg = await receive()
            kind = msg.type
            if kind is WSMsgType.CLOSE:
                if msg.data in _UNSENDABLE:
                    # 1006, which aiohttp's reader lets through (it rejects 1005 and 1015): a
                    # protocol error, answered with 1002 and passed on as one (RFC 6455 section
                    # 7.4.1), as the reader's own errors are.
                    await self._send_close(source, WSCloseCode.PROTOCOL_ERROR)
                    await self._send_close(sink, WSCloseCode.PROTOCOL_ERROR)
                    return
                source.received = (msg.data, msg.extra or "")
                await self._send_close(sink, msg.data, msg.extra or "")
                return
            if kind is WSMsgType.ERROR:
                # The source broke the protocol or sent too much (1002, 1007, 1009): aiohttp closed
                # it with that code, and the other side is told the same.
                source.close_sent = True
                error = msg.data
                code = error.code if isinstance(error, aiohttp.WebSocketError) else WSCloseCode.INTERNAL_ERROR
                await self._send_close(sink, code)
                return
            if kind is WSMsgType.CLOSED or kind is WSMsgType.CLOSING:
                # Gone without a Close of its own (the connection was lost).
                source.close_sent = True  # nothing can be sent to it any more
                await self._send_close(sink, WSCloseCode.GOING_AWAY)
                return
            self._last_frame = loop.time()
            if sink.close_sent:
                continue  # nothing may follow a Close (RFC 6455 section 5.5.1)
            try:
                if kind is WSMsgType.TEXT:
                    text = msg.data
                    relayed[direction] += len(text) if text.isascii() else len(text.encode())
                    await sink.ws.send_str(text)
                elif kind is WSMsgType.BINARY:
                    relayed[direction] += len(msg.data)
                    await sink.ws.send_bytes(msg.data)
                elif kind is WSMsgType.PING:
                    await sink.ws.ping(msg.data)
                elif kind is WSMsgType.PONG:
                    await sink.ws.pong(msg.data)
            except (ConnectionError, aiohttp.ClientConnectionError):
                # The sink's connection is gone: its own pump sees that and tells this source.
                sink.close_sent = True

    async def _send_close(self, side: _Side, code: int, reason: str = "") -> None:
        """Send ``side`` a Close frame with ``code`` and ``reason``, once; code 0: an empty one.

        Written to aiohttp's frame writer: its ``close()`` sends a code always, and then reads the
        reply itself, keeping its code and dropping its reason, which the other side must get."""
        self._closing.set()
        if side.close_sent:
            return
        side.close_sent = True
        if code in _UNSENDABLE:
            code = WSCloseCode.GOING_AWAY
        payload = _CODE.pack(code) + reason.encode()[:123] if code else b""
        # A side whose connection is gone: its pump sees that and ends.
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionError):
            await side.ws._writer.send_frame(payload, WSMsgType.CLOSE)  # type: ignore[union-attr]

    async def _finish(self) -> None:
        """Answer a side whose Close went unanswered, then close both connections."""
        for side in (self._client, self._upstream):
            if not side.close_sent:
                code, reason = side.received or (WSCloseCode.GOING_AWAY, "")
                await self._send_close(side, code, reason)
        # aiohttp would send a Close of its own when the handler returns, and when it is released.
        # The client's connection is closed by aiohttp once the handler returns (a server closes
        # the TCP connection first: RFC 6455 section 7.1.1).
        self._client.ws._set_closed()
        upstream = self._upstream.ws
        upstream._set_closed()
        upstream._response.close()

    async def _watch_idle(self) -> None:
        timeout, loop = self._idle_timeout, self._loop
        assert timeout is not None
        # One timer per session, moved on only when it fires: frames just stamp the time. (A
        # deadline that frames move, not a poll.)
        while (left := self._last_frame + timeout - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)
        log.info("WebSocket session idle; closing it with 1001", extra={"idle_timeout_s": timeout})
        await self.go_away("idle timeout")
