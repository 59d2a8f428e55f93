"""Upstream faults over real sockets: what the client gets, that other routes keep working, that
connections are released afterwards, and that no traceback leaks."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.keys import route_table_key
from tests.helpers import one_service, wait_for

READ_TIMEOUT = 0.4
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _held_connections_to(port: int) -> int:
    """Sockets to ``port`` still held open by someone: ESTABLISHED, or CLOSE_WAIT (the peer
    closed but the socket was never closed on our side: a leak)."""
    held = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] in ("01", "08"):
                held += 1
    return held


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
async def gateway_for(make_gateway: Any, make_upstream: Any, make_raw_upstream: Any) -> Any:
    """``gateway_for(handler)``: /bad -> a raw upstream running ``handler``, /good -> a sane one."""

    async def make(handler: RawHandler | None = None, *, bad_url: str | None = None, **env: str) -> Any:
        good = await make_upstream()
        url = bad_url or await make_raw_upstream(handler)
        config = {
            "services": {
                "bad": {"url": url, "timeout": {"connect": 1, "read": READ_TIMEOUT}, "eject_seconds": 0},
                "good": {"url": good.url},
            },
            "routes": [
                {"prefix": "/bad", "service": "bad", "auth": "none"},
                {"prefix": "/good", "service": "good", "auth": "none"},
            ],
        }
        client = await make_gateway(config, env)
        return client, good

    return make


async def _assert_gateway_error(response: aiohttp.ClientResponse, status: int) -> None:
    body = await response.read()
    assert response.status == status, body
    assert response.content_type == "application/json"
    assert response.headers.get("X-Request-ID")
    assert b"Traceback" not in body and b'File "' not in body
    assert set(await response.json()) <= {"detail", "errors"}


async def _assert_released(client: Any, good: Any, baseline: int) -> None:
    """The good route still answers; no connection to the bad upstream is held open and the
    process's open fds are back where they were (the keep-alive pools were warmed up before)."""
    response = await client.get("/good/x")
    assert response.status == 200
    port = client.app[route_table_key].current.upstreams["bad"].service.urls[0].rpartition(":")[2]
    await wait_for(
        lambda: _held_connections_to(int(port)) == 0, 5.0, "connections to the bad upstream released"
    )
    await wait_for(lambda: _open_fds() <= baseline, 5.0, f"fds back to {baseline} (now {_open_fds()})")


async def _baseline(client: Any) -> int:
    # Warm the client's and the gateway's keep-alive pools on the good route, two wide (the
    # tests send two requests at once).
    responses = await asyncio.gather(client.get("/good/warm"), client.get("/good/warm"))
    assert [r.status for r in responses] == [200, 200]
    return _open_fds()


async def test_upstream_that_never_answers_gets_504_within_the_read_timeout(gateway_for: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        await reader.read()  # until the gateway gives up and closes

    client, good = await gateway_for(silent)
    baseline = await _baseline(client)
    started = time.monotonic()
    responses = await asyncio.gather(client.get("/bad/x"), client.get("/good/y"))
    assert time.monotonic() - started < READ_TIMEOUT + 1.5
    await _assert_gateway_error(responses[0], 504)
    assert responses[1].status == 200
    await _assert_released(client, good, baseline)


@pytest.mark.parametrize(
    "interim", [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"]
)
async def test_an_upstream_silent_after_an_interim_answer_gets_504_within_the_read_timeout(
    gateway_for: Any, interim: bytes
) -> None:
    async def interim_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(interim)
        await writer.drain()
        await reader.read()

    client, good = await gateway_for(interim_then_silence)
    baseline = await _baseline(client)
    started = time.monotonic()
    async with asyncio.timeout(READ_TIMEOUT + 2):  # it used to wait for ever
        response = await client.get("/bad/x")
    await _assert_gateway_error(response, 504)
    assert time.monotonic() - started < READ_TIMEOUT + 1
    await _assert_released(client, good, baseline)


async def test_a_final_answer_after_an_interim_one_is_relayed(gateway_for: Any) -> None:
    async def interim_then_final(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_head(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(READ_TIMEOUT / 4)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    client, _ = await gateway_for(interim_then_final)
    for _ in range(2):  # the second on the pooled connection: no timer left over from the first
        response = await client.get("/bad/x")
        assert response.status == 200 and await response.read() == b"ok"


async def test_upstream_killed_before_the_head_gets_502(gateway_for: Any) -> None:
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.close()

    client, good = await gateway_for(dies)
    baseline = await _baseline(client)
    await _assert_gateway_error(await client.post("/bad/x", json={}), 502)
    await _assert_gateway_error(await client.get("/bad/x"), 502)  # retried once, then 502
    await _assert_released(client, good, baseline)


async def test_upstream_resetting_the_connection_gets_502(gateway_for: Any) -> None:
    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        _reset(writer)

    client, good = await gateway_for(resets)
    baseline = await _baseline(client)
    for _ in range(3):
        await _assert_gateway_error(await client.get("/bad/x"), 502)
    await _assert_released(client, good, baseline)


async def test_upstream_resetting_on_accept_gets_502(gateway_for: Any) -> None:
    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _reset(writer)

    client, good = await gateway_for(resets)
    baseline = await _baseline(client)
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    await _assert_released(client, good, baseline)


async def test_upstream_killed_mid_body_of_a_small_response_gets_502(gateway_for: Any) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 100
        )
        await writer.drain()
        writer.close()

    client, good = await gateway_for(short)
    baseline = await _baseline(client)
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    await _assert_released(client, good, baseline)


async def test_upstream_silent_mid_body_of_a_small_response_gets_504(gateway_for: Any) -> None:
    """The head came, then nothing within the read timeout: a timeout (504), not a hang-up (502)."""

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await reader.read()

    client, good = await gateway_for(stalls)
    baseline = await _baseline(client)
    response = await client.get("/bad/x")
    await _assert_gateway_error(response, 504)
    assert "timed out" in (await response.json())["detail"]
    await _assert_released(client, good, baseline)


@pytest.mark.parametrize(
    ("method", "status_line"),
    [("HEAD", b"200 OK"), ("GET", b"204 No Content"), ("GET", b"304 Not Modified")],
    ids=["head", "204", "304"],
)
async def test_a_body_after_a_head_that_has_none_is_dropped_with_its_connection(
    gateway_for: Any, method: str, status_line: bytes
) -> None:
    """An application that answers HEAD as GET (or sends a body with a 204/304) in one write: the
    head is relayed, the stray bytes never become a next answer, the connection is not reused."""
    connections = 0

    async def sends_a_body_anyway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await _read_head(reader):
            writer.write(b"HTTP/1.1 " + status_line + b"\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello")
            await writer.drain()

    client, good = await gateway_for(sends_a_body_anyway)
    baseline = await _baseline(client)
    for _ in range(2):
        response = await client.request(method, "/bad/x")
        assert response.status == int(status_line[:3]) and response.headers["X-Up"] == "1"
        assert await response.read() == b""
    assert connections == 2
    await _assert_released(client, good, baseline)


async def test_an_upgrade_the_client_did_not_ask_for_gets_502(gateway_for: Any) -> None:
    async def switches(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n")
        await writer.drain()
        await reader.read()

    client, good = await gateway_for(switches)
    baseline = await _baseline(client)
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    await _assert_released(client, good, baseline)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n186a0\r\n",
    ],
    ids=["content-length", "chunked"],
)
@pytest.mark.parametrize("kill", ["close", "reset"])
async def test_upstream_killed_mid_body_of_a_streamed_response_cuts_the_client_off(
    gateway_for: Any, head: bytes, kill: str
) -> None:
    async def dies_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(head + b"x" * 70_000)
        await writer.drain()
        if kill == "reset":
            _reset(writer)
        else:
            writer.close()

    client, good = await gateway_for(dies_mid_body)
    baseline = await _baseline(client)
    response = await client.get("/bad/x")
    assert response.status == 200  # the head was relayed before the upstream died
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()  # a short body or a missing last chunk, never a clean end
    await _assert_released(client, good, baseline)


class _Recorder(AbstractAccessLogger):
    lines: list[tuple[int, int]] = []

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.lines.append((response.status, response.body_length))


async def test_a_streamed_answer_the_upstream_cut_off_is_logged_with_what_went_out(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    async def dies_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"x" * 4096 + b"\r\n")
        await writer.drain()
        writer.close()

    _Recorder.lines = []
    client = await make_gateway(
        one_service(await make_raw_upstream(dies_mid_body)),
        server_kwargs={"access_log_class": _Recorder, "access_log": logging.getLogger("test.access")},
    )
    response = await client.get("/x")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await wait_for(lambda: bool(_Recorder.lines), what="the access line")
    ((status, bytes_out),) = _Recorder.lines
    assert status == 200 and bytes_out > 4096  # the head and the chunk that went out


async def test_a_name_that_does_not_resolve_gets_502(gateway_for: Any) -> None:
    client, good = await gateway_for(bad_url="http://upstream.invalid:9")
    baseline = await _baseline(client)
    started = time.monotonic()
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    assert time.monotonic() - started < 3
    await _assert_released(client, good, baseline)


async def test_a_refused_connection_gets_502(gateway_for: Any, refused_url: str) -> None:
    client, good = await gateway_for(bad_url=refused_url)
    baseline = await _baseline(client)
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    await _assert_released(client, good, baseline)


async def test_garbage_instead_of_a_response_gets_502(gateway_for: Any) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.0\r\n\r\n")
        await writer.drain()
        await reader.read()

    client, good = await gateway_for(garbage)
    baseline = await _baseline(client)
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    await _assert_released(client, good, baseline)


@pytest.mark.parametrize("collector", ["refused", "silent"])
async def test_a_dead_zipkin_collector_does_not_affect_requests(
    gateway_for: Any, make_raw_upstream: Any, refused_url: str, collector: str
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    base = refused_url if collector == "refused" else await make_raw_upstream(silent)
    client, good = await gateway_for(bad_url=refused_url, ZIPKIN_URL=base + "/api/v2/spans")
    started = time.monotonic()
    for _ in range(20):
        assert (await client.get("/good/x")).status == 200
    assert time.monotonic() - started < 2
    assert len(good.requests) == 20


async def test_an_unsolicited_extra_response_never_answers_the_next_request(gateway_for: Any) -> None:
    served = 0

    async def desync(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            await _read_head(reader)
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nreal-%d" % (served % 10))
            # A second, unrequested response right behind the first, on the same keep-alive connection.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
            await writer.drain()

    client, good = await gateway_for(desync)
    baseline = await _baseline(client)
    bodies = []
    for _ in range(3):
        response = await client.get("/bad/x")
        bodies.append(await response.read())
    assert b"EVIL" not in b"".join(bodies)
    assert bodies == [b"real-1", b"real-2", b"real-3"]
    await _assert_released(client, good, baseline)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    ],
    ids=[
        "length and chunked",
        "two lengths",
        "bad status",
        "NUL in a header",
        "negative length",
        "bad chunk size",
        "gzip transfer coding",
        "gzip then chunked",
        "chunked twice",
        "two chunked fields",
    ],
)
async def test_an_ambiguous_upstream_response_gets_502(gateway_for: Any, head: bytes) -> None:
    async def ambiguous(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(head)
        await writer.drain()
        await reader.read()

    client, good = await gateway_for(ambiguous)
    baseline = await _baseline(client)
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    await _assert_released(client, good, baseline)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nX-B: b\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["bare LF", "obs-fold"],
)
async def test_a_lenient_upstream_response_head_is_relayed_normalised(gateway_for: Any, head: bytes) -> None:
    """Bare LF line ends and obs-fold in a response are read as RFC 9112 allows (obs-fold becomes
    a space) and re-serialised by the gateway: the client never sees them."""

    async def lenient(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(head)
        await writer.drain()
        await reader.read()

    client, _ = await gateway_for(lenient)
    response = await client.get("/bad/x")
    assert response.status == 200 and await response.read() == b"ok"
    assert response.headers["X-B"] == "b"
    assert response.headers["X-A"] in ("a", "a b")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(5000))
        + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["huge header", "endless headers"],
)
async def test_an_oversized_upstream_head_gets_502(gateway_for: Any, head: bytes) -> None:
    async def oversized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(head)
        await writer.drain()
        await reader.read()

    client, good = await gateway_for(oversized)
    baseline = await _baseline(client)
    started = time.monotonic()
    await _assert_gateway_error(await client.get("/bad/x"), 502)
    assert time.monotonic() - started < READ_TIMEOUT + 1
    await _assert_released(client, good, baseline)
