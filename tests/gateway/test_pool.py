"""The upstream keep-alive pool, against a real upstream on loopback."""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import functools
import gc
import socket
import struct
import subprocess
import sys
import termios
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway.pool import TargetPool, exchange, keep_alive_limit
from tests.helpers import wait_for


def _request(
    pool: TargetPool, protocol: Any, method: str = "GET", path: str = "/x", read_timeout: float = 5.0
) -> Any:
    """A request without a body on ``protocol``: the exchange, to await (head and payload)."""
    return exchange(
        protocol,
        method=method,
        target=path,
        headers=CIMultiDict({"Host": pool.host_header}),
        body=None,
        chunked=False,
        read_timeout=read_timeout,
    )


async def _send(pool: TargetPool, method: str = "GET", path: str = "/x") -> tuple[Any, Any, Any]:
    """One request on a pooled connection: the connection, the response head, its payload."""
    protocol = await pool.acquire(2.0)
    message, payload = await _request(pool, protocol, method, path)
    return protocol, message, payload


async def _read(payload: Any) -> bytes:
    """The body: read from its payload, or the bytes themselves when the answer came whole."""
    return payload if isinstance(payload, bytes) else await payload.read()


async def _get(pool: TargetPool, path: str = "/x") -> Any:
    protocol, message, payload = await _send(pool, path=path)
    await _read(payload)
    pool.release(protocol)
    return protocol, message


async def _upstream(aiohttp_server: Any) -> tuple[Any, list[Any]]:
    peers: list[Any] = []

    async def reply(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        if request.path == "/close":
            return web.Response(text="bye", headers={"Connection": "close"})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reply)
    return await aiohttp_server(app), peers


async def test_a_released_connection_is_reused(aiohttp_server: Any) -> None:
    server, peers = await _upstream(aiohttp_server)
    pool = TargetPool(f"http://127.0.0.1:{server.port}")
    first, _ = await _get(pool)
    second, message = await _get(pool)
    assert message.code == 200
    assert first is second
    assert peers[0] == peers[1]
    pool.close()


async def test_a_connection_the_upstream_closes_is_not_reused(aiohttp_server: Any) -> None:
    server, peers = await _upstream(aiohttp_server)
    pool = TargetPool(f"http://127.0.0.1:{server.port}")
    first, _ = await _get(pool, "/close")
    second, _ = await _get(pool)
    assert first is not second
    assert peers[0] != peers[1]
    pool.close()


async def test_upstream_connections_send_small_writes_at_once(aiohttp_server: Any) -> None:
    """TCP_NODELAY: with Nagle's algorithm a request head written after a body chunk, or a
    small write behind an unacknowledged one, waits for the peer's delayed ACK (about 40 ms)."""
    server, _ = await _upstream(aiohttp_server)
    pool = TargetPool(f"http://127.0.0.1:{server.port}")
    protocol, message = await _get(pool)
    sock = protocol.transport.get_extra_info("socket")
    assert message.code == 200
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    pool.close()


async def test_idle_connections_are_closed_by_the_sweep_after_the_idle_timeout(aiohttp_server: Any) -> None:
    server, _ = await _upstream(aiohttp_server)
    pool = TargetPool(f"http://127.0.0.1:{server.port}", idle_timeout=0.05)
    protocol, _ = await _get(pool)
    assert protocol.is_connected()

    def swept() -> bool:
        pool.sweep()
        return not protocol.is_connected()

    await wait_for(swept, what="the idle connection to be closed")
    # The next request opens a fresh connection.
    fresh, message = await _get(pool)
    assert message.code == 200 and fresh is not protocol
    pool.close()


async def _hinting_upstream(aiohttp_server: Any, keep_alive: str) -> tuple[Any, list[Any]]:
    """An upstream that says how long it keeps idle connections, as Node.js does."""
    peers: list[Any] = []

    async def reply(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok", headers={"Keep-Alive": keep_alive})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reply)
    return await aiohttp_server(app), peers


async def test_an_upstream_keep_alive_timeout_shortens_the_idle_time(aiohttp_server: Any) -> None:
    # Node.js closes an idle connection after 5 s and says so; kept for the pool's 15 s, the
    # connection could be reused just as the upstream's close is on its way: a 502 for a POST.
    server, peers = await _hinting_upstream(aiohttp_server, "timeout=2, max=100")
    pool = TargetPool(f"http://127.0.0.1:{server.port}", idle_timeout=15.0)
    first, _ = await _get(pool)
    second, _ = await _get(pool)
    assert first is second and peers[0] == peers[1]  # reused within the upstream's time
    released = time.monotonic()

    def swept() -> bool:
        pool.sweep()
        return not second.is_connected()

    # The aiohttp upstream really keeps it for 75 s: only the hint can close it within the wait.
    await wait_for(swept, deadline_s=5.0, what="the pool to drop the connection before the hint's 2 s")
    assert time.monotonic() - released >= 0.9
    third, _ = await _get(pool)
    assert third is not second and peers[2] != peers[1]
    pool.close()


async def test_a_connection_past_its_own_idle_limit_is_not_reused_though_the_sweep_missed_it(
    aiohttp_server: Any,
) -> None:
    """The sweep expires idle connections from the cold end only; one with a shorter limit
    nearer the hot end is left to ``acquire``, which must close it rather than send on it."""
    peers: list[Any] = []

    async def reply(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        headers = {"Keep-Alive": "timeout=2"} if request.path == "/short" else {}
        return web.Response(text="ok", headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reply)
    server = await aiohttp_server(app)
    pool = TargetPool(f"http://127.0.0.1:{server.port}", idle_timeout=15.0)
    long_kept, short_kept = await pool.acquire(2.0), await pool.acquire(2.0)
    for protocol, path in ((long_kept, "/long"), (short_kept, "/short")):
        _, payload = await _request(pool, protocol, path=path)
        await _read(payload)
    pool.release(long_kept)  # the cold end: 15 s
    pool.release(short_kept)  # the hot end: the upstream's 2 s less the margin, 1 s
    released = time.monotonic()
    await wait_for(lambda: time.monotonic() - released > 1.05, what="the short limit to pass")
    pool.sweep()
    assert short_kept.is_connected()  # the sweep stopped at the cold end's live connection

    reused = await pool.acquire(2.0)

    assert reused is long_kept
    assert not short_kept.is_connected()
    pool.close()


async def test_an_upstream_keep_alive_timeout_too_short_to_trust_means_no_reuse(aiohttp_server: Any) -> None:
    server, peers = await _hinting_upstream(aiohttp_server, "timeout=1")
    pool = TargetPool(f"http://127.0.0.1:{server.port}")
    first, _ = await _get(pool)
    assert not first.is_connected()
    second, message = await _get(pool)
    assert message.code == 200 and second is not first and peers[0] != peers[1]
    pool.close()


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        ("timeout=5", 4.0),
        ("timeout=5, max=1000", 4.0),
        ("max=99, Timeout = 20", 19.0),
        ("timeout=0", 0.0),
        ("max=5", None),
        ("timeout=soon", None),
        ("timeout=-3", None),
        ("", None),
    ],
)
def test_the_keep_alive_header_is_read_for_its_timeout(value: str, limit: float | None) -> None:
    assert keep_alive_limit(value) == limit


async def test_at_most_max_idle_connections_are_kept(aiohttp_server: Any) -> None:
    server, _ = await _upstream(aiohttp_server)
    pool = TargetPool(f"http://127.0.0.1:{server.port}", max_idle=2)
    protocols = [await pool.acquire(2.0) for _ in range(3)]
    for protocol in protocols:
        protocol.set_response_params(read_timeout=5.0)  # fresh, unused: still reusable
        pool.release(protocol)
    assert [p.is_connected() for p in protocols] == [True, True, False]
    pool.close()
    assert not any(p.is_connected() for p in protocols)


async def test_one_connection_carries_responses_of_every_framing_in_turn(aiohttp_server: Any) -> None:
    # The response parser is made once per connection and reused; HEAD gets one of its own. Each
    # answer must still be framed by its own headers, whatever came before it on the connection.
    peers: list[Any] = []

    async def reply(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))
        kind = request.path.strip("/")
        if kind == "empty":
            return web.Response(status=204)
        if kind == "chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        return web.Response(body=b"x" * 1000)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reply)
    server = await aiohttp_server(app)
    pool = TargetPool(f"http://127.0.0.1:{server.port}")
    seen = []
    for method, path in [
        ("GET", "/sized"),
        ("HEAD", "/sized"),  # declares 1000 bytes and sends none
        ("GET", "/chunked"),
        ("GET", "/empty"),
        ("GET", "/sized"),
    ]:
        protocol, message, payload = await _send(pool, method, path)
        seen.append((method, path, message.code, await _read(payload)))
        pool.release(protocol)
    assert seen == [
        ("GET", "/sized", 200, b"x" * 1000),
        ("HEAD", "/sized", 200, b""),
        ("GET", "/chunked", 200, b"one,two,three"),
        ("GET", "/empty", 204, b""),
        ("GET", "/sized", 200, b"x" * 1000),
    ]
    assert len(set(peers)) == 1, "every request went over the one pooled connection"
    pool.close()


async def test_bytes_sent_to_an_idle_connection_keep_it_from_being_reused(make_raw_upstream: Any) -> None:
    # The response parser carries over from one response to the next on a connection; bytes the
    # upstream sends while no request is out (a half response to nothing) must not be taken as
    # the start of the next answer.
    stray = asyncio.Event()
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if first:
                await stray.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                await writer.drain()
                first = False

    pool = TargetPool(await make_raw_upstream(upstream))
    first, message = await _get(pool)
    assert message.code == 200 and not first.should_close
    stray.set()
    # At once: not when the read timer armed by the stray bytes runs out (5 s here).
    await wait_for(lambda: first.should_close, deadline_s=2.0, what="the stray bytes to mark the connection")

    second, message = await _get(pool)
    assert message.code == 200
    assert second is not first
    assert connections == 2
    pool.close()


async def test_a_response_trailer_never_becomes_a_header_of_the_next_response(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    """The C parser keeps the last trailer field of a chunked body for the next message it parses;
    the next response on a pooled connection (another client's, perhaps) must not carry it."""
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while head := await reader.readuntil(b"\r\n\r\n"):
            if head.startswith(b"GET /first "):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                    b"X-Checksum: 1\r\nSet-Cookie: session=first-client\r\n\r\n"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = await make_raw_upstream(upstream)
    client = await make_gateway(
        {"services": {"s": {"url": url}}, "routes": [{"prefix": "/", "service": "s", "auth": "none"}]}
    )
    first = await client.get("/first")
    assert await first.read() == b"abc"
    for _ in range(2):
        response = await client.get("/second")
        assert await response.read() == b"ok"
        assert "Set-Cookie" not in response.headers and "X-Checksum" not in response.headers
    assert connections == 1  # all three over one pooled connection


async def test_an_ipv6_target_gets_its_host_header_in_brackets(make_gateway: Any) -> None:
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    try:
        server = await asyncio.start_server(upstream, "::1", 0)
    except OSError as exc:  # pragma: no cover - the machines this runs on have IPv6 loopback
        pytest.fail(f"this test needs an IPv6 loopback (::1): {exc}")
    port = server.sockets[0].getsockname()[1]
    try:
        client = await make_gateway(
            {
                "services": {"s": {"url": f"http://[::1]:{port}"}},
                "routes": [{"prefix": "/", "service": "s", "auth": "none"}],
            }
        )
        assert (await client.get("/x")).status == 200
        # "Host: ::1:PORT" cannot be split into host and port; strict servers (nginx) answer 400.
        assert f"\r\nHost: [::1]:{port}\r\n".encode() in heads[0]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("url", ["http://[fe80::1%25lo]:8080", "http://[fe80::1%lo]:8080"])
def test_a_link_local_targets_zone_reaches_the_resolver_and_not_the_host_header(url: str) -> None:
    """RFC 6874 writes the zone %25-encoded in a URL; the resolver could not resolve "%25lo", so
    every request to such a target was a 502. The zone is this host's interface: it never goes
    out (section 4), so the Host header has none."""
    pool = TargetPool(url)

    ((*_, address),) = socket.getaddrinfo(pool.host, pool.port, type=socket.SOCK_STREAM)
    assert address == ("fe80::1", 8080, 0, socket.if_nametoindex("lo"))
    assert pool.host_header == "[fe80::1]:8080"


def _split_body(first: bytes, rest: bytes, *, then_close: bool) -> tuple[Any, asyncio.Event]:
    """A raw upstream answering one request with ``first`` (the head and part of the body), then,
    once the returned event is set, ``rest``; then it closes, or waits for the client to."""
    gate = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(first)
        await writer.drain()
        await gate.wait()
        writer.write(rest)
        await writer.drain()
        if not then_close:
            await reader.read()

    return upstream, gate


async def test_a_body_arriving_in_pieces_after_its_head_is_whole_and_the_connection_reused(
    make_raw_upstream: Any,
) -> None:
    # Past the head, a body of declared length is fed to the payload without the parser; the
    # next response on the connection must still be parsed from its first byte.
    gate = asyncio.Event()
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n0123456789")
        await writer.drain()
        await gate.wait()
        for piece in (b"abcdefghij", b"ABCDE", b"FGHIJ"):
            writer.write(piece)
            await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Second: yes\r\n\r\nnext")
        await writer.drain()
        await reader.read()

    pool = TargetPool(await make_raw_upstream(upstream))
    protocol, message, payload = await _send(pool)
    assert message.code == 200
    gate.set()
    assert await payload.read() == b"0123456789abcdefghijABCDEFGHIJ"
    pool.release(protocol)

    again, message, payload = await _send(pool)
    assert again is protocol and connections == 1
    assert (message.code, message.headers["X-Second"], await _read(payload)) == (201, "yes", b"next")
    pool.release(again)
    pool.close()


async def test_a_body_longer_than_declared_is_cut_at_its_length_and_the_connection_dropped(
    make_raw_upstream: Any,
) -> None:
    upstream, gate = _split_body(
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nabc", b"defgh and then some", then_close=False
    )
    pool = TargetPool(await make_raw_upstream(upstream))
    protocol, _, payload = await _send(pool)
    gate.set()
    assert await payload.read() == b"abcdefgh"
    assert protocol.should_close
    pool.release(protocol)
    assert not protocol.is_connected()
    pool.close()


async def test_an_upstream_closing_in_the_middle_of_a_body_fails_its_payload(make_raw_upstream: Any) -> None:
    # The connection closes 94 bytes short.
    upstream, gate = _split_body(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", b"def", then_close=True
    )
    pool = TargetPool(await make_raw_upstream(upstream))
    _, _, payload = await _send(pool)
    gate.set()
    with pytest.raises(aiohttp.ClientPayloadError):
        await payload.read()
    pool.close()


async def test_a_whole_body_read_after_the_upstream_closed_is_not_reported_short(
    make_raw_upstream: Any,
) -> None:
    # "Connection: close" after a body of declared length: the connection is gone before the
    # body is read. Every byte arrived, so reading it must not fail.
    upstream, gate = _split_body(
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nabc",
        b"defghijkl",
        then_close=True,
    )
    pool = TargetPool(await make_raw_upstream(upstream))
    protocol, _, payload = await _send(pool)
    gate.set()
    await wait_for(lambda: not protocol.is_connected() and protocol.transport is None, what="the close")
    assert await payload.read() == b"abcdefghijkl"
    pool.close()


async def test_a_closed_connection_with_an_unread_answer_is_freed_without_the_collector(
    aiohttp_server: Any,
) -> None:
    """A request cancelled while its answer arrives closes the connection with the answer parsed
    but unread; that answer's payload refers back to the connection, and the cycle used to hold
    the body's buffered bytes until the garbage collector came by."""
    server, _ = await _upstream(aiohttp_server)
    pool = TargetPool(f"http://127.0.0.1:{server.port}")
    protocol = await pool.acquire(2.0)
    protocol.begin(read_timeout=5.0, head=False)
    protocol.transport.write(b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % pool.host_header.encode())
    await wait_for(functools.partial(_has_unread_answer, protocol), what="the answer to be parsed")
    gc.disable()  # only reference counting may free it
    try:
        freed = weakref.ref(protocol)
        protocol.close()
        del protocol
        await wait_for(lambda: freed() is None, deadline_s=2, what="the closed connection to be freed")
    finally:
        gc.enable()


def _has_unread_answer(protocol: Any) -> bool:
    return bool(protocol._buffer)


_request_scoped: contextvars.ContextVar[Any] = contextvars.ContextVar("request_scoped")


async def test_a_pooled_connection_keeps_nothing_of_the_request_that_opened_it(aiohttp_server: Any) -> None:
    """A transport runs its callbacks, and the read timer re-arms itself, in the context they were
    made in: made in a request's, they kept that request's context variables (the gateway's trace
    span) alive for as long as the connection stayed in the pool."""
    server, _ = await _upstream(aiohttp_server)
    pool = TargetPool(f"http://127.0.0.1:{server.port}")

    class Span:
        pass

    span = Span()
    freed = weakref.ref(span)

    async def request(span: Span) -> Any:
        _request_scoped.set(span)
        protocol, _ = await _get(pool)
        return protocol

    first = await asyncio.create_task(request(span))  # as aiohttp runs each request: a task of its own
    del span
    # Polled: the loop step that resumed this test still holds the finished task until it ends.
    await wait_for(
        lambda: gc.collect() >= 0 and freed() is None, deadline_s=2, what="the request's span to be freed"
    )

    second, message = await _get(pool)  # and the connection is pooled as before
    assert second is first
    assert message.code == 200
    pool.close()


# -- The read timeout: silence, not duration -------------------------------------------------------

# Long enough that a busy machine's scheduling delays stay well inside each test's margins.
READ_TIMEOUT = 0.6


def _trickle(pieces: list[bytes], gap: float, *, answers: int = 1) -> Any:
    """A raw upstream answering ``answers`` requests on one connection, each with ``pieces``
    written ``gap`` seconds apart."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(answers):
            await reader.readuntil(b"\r\n\r\n")
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(gap)  # simulates an upstream that answers slowly
                writer.write(piece)
                await writer.drain()
        await reader.read()

    return upstream


async def _exchange(pool: TargetPool, protocol: Any, read_timeout: float = READ_TIMEOUT) -> Any:
    message, payload = await _request(pool, protocol, read_timeout=read_timeout)
    assert message.code == 200
    return payload


async def test_an_answer_that_keeps_arriving_outlasts_its_read_timeout(make_raw_upstream: Any) -> None:
    """Every gap is shorter than the read timeout, the whole answer takes longer: no timeout. The
    connection's one timer fires before the answer ends and must see that bytes came since."""
    gap = READ_TIMEOUT / 2.5
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"a", b"b", b"c", b"d", b"e"]
    pool = TargetPool(await make_raw_upstream(_trickle(pieces, gap)))
    protocol = await pool.acquire(2.0)

    started = time.monotonic()
    payload = await _exchange(pool, protocol)
    body = await payload.read()

    assert body == b"abcde"
    assert time.monotonic() - started >= 5 * gap > READ_TIMEOUT
    pool.close()


async def test_a_reused_connection_gives_each_request_its_whole_read_timeout(make_raw_upstream: Any) -> None:
    """The timer armed for the first answer is still pending during the second one, on the same
    connection; the second answer's silence is what counts."""
    gap = READ_TIMEOUT * 0.55  # two gaps per answer: each answer outlasts the timeout
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"o", b"k"]
    pool = TargetPool(await make_raw_upstream(_trickle(pieces, gap, answers=2)))

    first = await pool.acquire(2.0)
    assert await (await _exchange(pool, first)).read() == b"ok"
    pool.release(first)
    second = await pool.acquire(2.0)
    assert second is first
    assert await (await _exchange(pool, second)).read() == b"ok"
    pool.release(second)
    pool.close()


async def test_silence_after_some_of_the_body_times_out_one_read_timeout_after_the_last_bytes(
    make_raw_upstream: Any,
) -> None:
    gap = READ_TIMEOUT / 2
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"abc", b"def"]
    pool = TargetPool(await make_raw_upstream(_trickle(pieces, gap)))
    protocol = await pool.acquire(2.0)

    started = time.monotonic()
    payload = await _exchange(pool, protocol)
    with pytest.raises(aiohttp.ServerTimeoutError):
        async with asyncio.timeout(5):
            await payload.read()

    # The last bytes came 2 gaps in; the timeout counts from them, not from the request.
    assert time.monotonic() - started >= 2 * gap + READ_TIMEOUT
    pool.close()


async def test_a_shorter_read_timeout_on_a_reused_connection_is_kept(make_raw_upstream: Any) -> None:
    """The connection's timer, armed for a long timeout, must not hold off a shorter one."""

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()  # the second request is never answered

    pool = TargetPool(await make_raw_upstream(answer_once))
    protocol = await pool.acquire(2.0)
    assert await _read(await _exchange(pool, protocol, read_timeout=60.0)) == b"ok"
    pool.release(protocol)

    again = await pool.acquire(2.0)
    assert again is protocol
    started = time.monotonic()
    with pytest.raises(aiohttp.ServerTimeoutError):
        async with asyncio.timeout(5):
            await _exchange(pool, again)
    assert time.monotonic() - started < 30  # far below the first timeout, whatever the machine's load
    pool.close()


# Run in a fresh interpreter on uvloop, the production loop (the tests' own is asyncio's): nine
# read timeouts, each a fraction of a millisecond past a whole one; prints how often the
# connection's timer callback ran.
UVLOOP_TIMEOUTS = """
import asyncio, aiohttp, uvloop
from multidict import CIMultiDict
from gateway.pool import TargetPool, exchange, keep_alive_limit

async def silent(reader, writer):
    while await reader.read(65536):
        pass
    writer.close()

async def main():
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    checks = 0
    for tenths in range(1, 10):
        pool = TargetPool(url)
        protocol = await pool.acquire(2.0)
        check = protocol._check_deadline
        def counted(check=check):
            nonlocal checks
            checks += 1
            check()
        protocol._check_deadline = counted
        try:
            await exchange(protocol, method="GET", target="/x", headers=CIMultiDict({"Host": pool.host_header}),
                           body=None, chunked=False, read_timeout=0.010 + tenths / 10_000)
        except aiohttp.ServerTimeoutError:
            pass
        else:
            raise SystemExit("no timeout")
        pool.close()
    server.close()
    print(checks)

uvloop.run(main())
"""


def test_read_timeouts_off_uvloops_millisecond_clock_fire_without_spinning() -> None:
    """uvloop keeps time and rounds timers in whole milliseconds: a deadline a fraction of a
    millisecond past one was re-armed as an immediate callback, over and over (hundreds of times
    per timeout), until the clock ticked over."""
    out = subprocess.run(
        [sys.executable, "-c", UVLOOP_TIMEOUTS],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) <= 2 * 9, out.stdout


# -- Answers taken whole with their head (UpstreamProtocol._take_whole) ------------------------


async def test_an_answer_arriving_whole_comes_as_bytes_and_the_connection_is_reused(
    make_raw_upstream: Any,
) -> None:
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-One: 1\r\n\r\nhello")
            await writer.drain()

    pool = TargetPool(await make_raw_upstream(upstream))
    for _ in range(3):
        protocol, message, payload = await _send(pool)
        assert (message.code, message.headers["X-One"], payload) == (200, "1", b"hello")
        pool.release(protocol)
    assert connections == 1
    pool.close()


_SPLIT_ANSWER = (
    b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\nKeep-Alive: timeout=60\r\nX-Split: yes\r\n\r\nhello world"
)


async def test_an_answer_split_across_two_reads_at_any_byte_is_relayed_whole(make_raw_upstream: Any) -> None:
    """The first read of an answer holds its head or body cut short at every offset in turn: the
    answer takes the parser's way, and the answers after it on the connection start clean (the
    next through the parser, the one after taken whole again)."""
    asked, gate = asyncio.Event(), asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            asked.set()
            cut = int(head.split(b" ")[1].strip(b"/"))
            writer.write(_SPLIT_ANSWER[:cut])
            await writer.drain()
            if cut < len(_SPLIT_ANSWER):
                await gate.wait()
                gate.clear()
                writer.write(_SPLIT_ANSWER[cut:])
                await writer.drain()

    pool = TargetPool(await make_raw_upstream(upstream))
    whole = len(_SPLIT_ANSWER)
    for cut in range(1, whole):
        protocol = await pool.acquire(2.0, fresh=True)
        # Split, it takes the parser's way; so does the next one when the split answer's head was
        # parsed in vain (as an upstream that answers chunked must not have every head parsed
        # twice); the one after is taken whole.
        parsed_in_vain = cut >= _SPLIT_ANSWER.index(b"\r\n\r\n") + 4
        for path, taken_whole in ((cut, False), (whole, not parsed_in_vain), (whole, True)):
            answer = asyncio.create_task(
                exchange(
                    protocol,
                    method="GET",
                    target=f"/{path}",
                    headers=CIMultiDict({"Host": pool.host_header}),
                    body=None,
                    chunked=False,
                    read_timeout=5.0,
                )
            )
            if path == cut:
                await asked.wait()  # begin() has run: the first read of the answer clears this
                await wait_for(lambda p=protocol: not p._at_start, what=f"the first {cut} bytes to be read")
                gate.set()
            message, payload = await answer
            asked.clear()
            seen = (message.code, message.headers["X-Split"], await _read(payload), protocol.idle_limit)
            assert seen == (201, "yes", b"hello world", 59.0), f"cut at {cut}, then /{path}"
            assert isinstance(payload, bytes) is taken_whole, f"cut at {cut}, then /{path}"
            pool.release(protocol)
            assert await pool.acquire(2.0) is protocol, f"cut at {cut}: the connection was not reused"
        pool.release(protocol)
    pool.close()


@pytest.mark.parametrize(
    ("after", "first"),
    [
        (b"", b"ok"),
        (b"EXTRA", None),  # no answer at all: the parser fails the read, as it always did
        (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged", b"ok"),  # a whole second answer
        (b"HTTP/1.1 200 OK\r\nContent-Le", b"ok"),  # a second answer's first bytes
    ],
)
async def test_bytes_after_an_answer_in_the_same_read_are_never_the_next_answer(
    make_raw_upstream: Any, after: bytes, first: bytes | None
) -> None:
    """More than the answer declared, arriving with it: whatever they are, the next request must
    not get them (or a parser still holding them) for its answer; the connection is dropped."""
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        real = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + after if connections == 1 else real
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(reply)
            await writer.drain()
            reply = real

    pool = TargetPool(await make_raw_upstream(upstream))
    if first is None:
        with pytest.raises(HttpProcessingError):
            await _send(pool)  # the proxy closes such a connection (a 502)
    else:
        protocol, message, payload = await _send(pool)
        assert (message.code, await _read(payload)) == (200, first)
        pool.release(protocol)
    again, message, payload = await _send(pool)
    assert (message.code, await _read(payload)) == (200, b"real")
    assert connections == (1 if not after else 2)
    pool.release(again)
    pool.close()


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\nContent-Length: 4\n\n\r\n\r\nHTTP", b"\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\n\r\n\r\nHTTP", b"\r\n\r\n"),
        (b"HTTP/1.1 200 OK\nContent-Length: 4\n\nab\r\n\r\n", b"ab\r\n"),
        (b"HTTP/1.1 200 OK\nContent-Length: 19\n\nHTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"),
    ],
)
async def test_a_head_ended_by_bare_line_feeds_is_framed_where_the_parser_ends_it(
    make_raw_upstream: Any, answer: bytes, body: bytes
) -> None:
    """The parser ends a head at a blank line of bare LFs; a CRLFCRLF after it is body. Taken
    whole by the first CRLFCRLF, the answer would lose those bytes and keep later ones."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await reader.read()

    pool = TargetPool(await make_raw_upstream(upstream))
    protocol, message, payload = await _send(pool)
    assert (message.code, await _read(payload)) == (200, body)
    protocol.close()
    pool.close()


async def test_a_forged_answer_after_a_whole_one_never_reaches_the_next_client(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    """An upstream that sends a second answer's first bytes with the first (a response to nothing,
    or a desynchronised backend): the next request, perhaps another client's, gets its own answer
    on a new connection, not one begun by those bytes."""
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        forged = (
            b"HTTP/1.1 200 OK\r\nSet-Cookie: session=first-client\r\nContent-Le" if connections == 1 else b""
        )
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + forged)
            await writer.drain()
            forged = b""

    url = await make_raw_upstream(upstream)
    client = await make_gateway(
        {"services": {"s": {"url": url}}, "routes": [{"prefix": "/", "service": "s", "auth": "none"}]}
    )
    for _ in range(3):
        response = await client.get("/x")
        assert (response.status, await response.read()) == (200, b"ok")
        assert "Set-Cookie" not in response.headers
    assert connections == 2  # the first connection was dropped, the second kept


# -- Bytes after an answer that the response parser ended inside a read ------------------------

# A second answer's first bytes, cut inside a header value: left in a reused response parser, they
# begin the next answer on the connection, which takes the real one's status line for the value of
# X-Pad and the rest of its head and body for its own (response queue poisoning).
_FORGED = (
    b"HTTP/1.1 302 Found\r\nLocation: https://forged.example/\r\nSet-Cookie: session=first-client\r\nX-Pad: "
)
_LARGE = b"b" * (70 * 1024)  # more than WHOLE_LIMIT: never taken whole


def _scripted(answers: list[list[bytes]]) -> tuple[Any, asyncio.Queue[None]]:
    """A raw upstream answering its requests in turn with ``answers``, each a list of pieces; each
    piece is written when the test puts a token in the returned queue (see ``_in_reads``)."""
    go: asyncio.Queue[None] = asyncio.Queue()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for pieces in answers:
            await reader.readuntil(b"\r\n\r\n")
            for piece in pieces:
                await go.get()
                writer.write(piece)
                await writer.drain()
        await reader.read()

    return upstream, go


def _unread(fd: int) -> int:
    """Bytes waiting in the socket's receive queue."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


async def _in_reads(protocol: Any, go: asyncio.Queue[None], pieces: list[bytes]) -> None:
    """Each piece of an answer reaches the protocol in one read of its own, however large: the
    transport stops reading until the whole piece waits in the socket."""
    transport = protocol.transport
    fd = transport.get_extra_info("socket").fileno()
    for piece in pieces:
        transport.pause_reading()
        go.put_nowait(None)
        size = len(piece)
        await wait_for(lambda n=size: _unread(fd) == n, what=f"{size} bytes to arrive")
        transport.resume_reading()
        await wait_for(lambda: _unread(fd) == 0, what="the piece to be read")


async def _scripted_exchange(
    pool: TargetPool, go: asyncio.Queue[None], pieces: list[bytes]
) -> tuple[Any, Any, bytes]:
    protocol = await pool.acquire(2.0)
    answer = asyncio.create_task(_request(pool, protocol))
    await _in_reads(protocol, go, pieces)
    message, payload = await answer
    body = await _read(payload)
    pool.release(protocol)
    return protocol, message, body


# The next client's answer: chunked, so it goes through the response parser (an answer taken whole
# is parsed by a parser of its own, and would leave forged bytes lying for a later one).
_NEXT = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Next: yes\r\n\r\n4\r\nnext\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("answers", "body"),
    [
        pytest.param(
            [[b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 2\r\n\r\nok" + _FORGED]], b"ok", id="head-split"
        ),
        pytest.param(
            [[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", b"\r\nok" + _FORGED]],
            b"ok",
            id="head-split-at-blank",
        ),
        pytest.param(
            [[b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s%s" % (len(_LARGE), _LARGE, _FORGED)]],
            _LARGE,
            id="body-over-whole-limit",
        ),
        pytest.param(
            [
                [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
                [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + _FORGED],
            ],
            b"ok",
            id="after-a-chunked-answer",
        ),
        pytest.param(
            [[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + _FORGED]],
            b"ok",
            id="after-an-interim-answer",
        ),
        pytest.param([[b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok" + _FORGED]], b"ok", id="bare-lf-head"),
        pytest.param(
            [[b"HTTP/1.1 204 No Content\r\nX-A: 1", b"\r\n\r\n" + _FORGED]], b"", id="204-head-split"
        ),
        pytest.param(
            [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + _FORGED]],
            b"ok",
            id="chunked",
        ),
    ],
)
async def test_a_forged_answer_after_one_the_parser_ended_never_reaches_the_next_client(
    make_raw_upstream: Any, answers: list[list[bytes]], body: bytes
) -> None:
    """An answer that the response parser ends inside a read (not taken whole: its head came in
    two reads, its body is too large, it followed a chunked or an interim answer, ...) with a
    second answer's first bytes after it in the same read: the next request on the connection,
    perhaps another client's, gets its own answer, not one begun by those bytes."""
    upstream, go = _scripted([*answers, [_NEXT]])
    pool = TargetPool(await make_raw_upstream(upstream))
    for pieces in answers:
        protocol, message, seen = await _scripted_exchange(pool, go, pieces)
    assert (message.code, seen) == (200 if body else 204, body)
    again, message, seen = await _scripted_exchange(pool, go, [_NEXT])
    assert again is protocol  # the connection is kept: only the parser holding those bytes goes
    assert (message.code, message.headers.get("X-Next"), seen) == (200, "yes", b"next")
    assert "Set-Cookie" not in message.headers and "X-Pad" not in message.headers
    pool.close()
