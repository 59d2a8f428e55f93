"""The network between the gateway and its peers misbehaving: a black-holed target, an upstream
that stops reading an upload or answers before it has read it, a client that shuts its side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.gateway.test_faults import _held_connections_to
from tests.helpers import one_service, wait_for

READ_TIMEOUT = 0.4
CHUNK = b"u" * 65536


async def _upload(chunks: int) -> AsyncIterator[bytes]:
    for _ in range(chunks):
        yield CHUNK
        await asyncio.sleep(0)  # a client that keeps sending, as fast as it is let


def _port(url: str) -> int:
    return int(url.rpartition(":")[2])


async def test_a_black_holed_target_is_ejected_and_any_request_goes_to_the_other(
    make_gateway: Any, make_upstream: Any, unaccepting_url: str
) -> None:
    """SYNs dropped: the connect times out, nothing reached the target, so even a POST is sent to
    the other target; the silent one sits out its cooldown and costs nothing after."""
    healthy = await make_upstream()
    client = await make_gateway(
        one_service([unaccepting_url, healthy.url], timeout={"connect": 0.2, "read": 5}, eject_seconds=60)
    )

    started = time.monotonic()
    statuses = [(await client.post("/p", data=b"{}")).status, (await client.get("/g")).status]
    assert statuses == [200, 200]
    assert time.monotonic() - started < 1.5  # one connect timeout at most, then never again
    assert [(r.method, r.body) for r in healthy.requests] == [("POST", b"{}"), ("GET", b"")]


async def test_an_upload_the_upstream_stops_reading_gets_504_within_the_read_timeout(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    """The upstream took the head, then read nothing more (a stalled process, a link gone
    silent): the body backs up and the wait for it is bounded by the read timeout, as nginx's
    proxy_send_timeout bounds it. It used to wait for good, the client with it."""
    head_read = asyncio.Event()

    async def stops_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head_read.set()
        await asyncio.sleep(30)  # never reads again; cancelled at teardown

    url = await make_raw_upstream(stops_reading)
    client = await make_gateway(one_service(url, timeout={"connect": 1, "read": READ_TIMEOUT}))

    started = time.monotonic()
    async with asyncio.timeout(5):
        response = await client.post("/upload", data=_upload(1000))
        body = await response.json()
    assert response.status == 504, body
    assert head_read.is_set()
    assert time.monotonic() - started < READ_TIMEOUT + 2
    await wait_for(lambda: _held_connections_to(_port(url)) == 0, 5.0, "the upstream connection dropped")


@pytest.mark.parametrize("status", [200, 413])
async def test_an_answer_the_upstream_gives_before_reading_the_upload_is_relayed_whole(
    make_gateway: Any, make_raw_upstream: Any, status: int
) -> None:
    """The upstream answers (a 413, a 401, or a streamed 200) before it read the whole body: the
    rest of the upload is not sent, but its answer is relayed to its end. The body was cut
    after its first packet and the client's read then hung for good."""
    size = 1_000_000

    async def answers_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(1000)
        writer.write(b"HTTP/1.1 %d Early\r\nContent-Length: %d\r\n\r\n" % (status, size))
        for _ in range(size // 10_000):
            writer.write(b"a" * 10_000)
            await writer.drain()
        await reader.read()  # until the gateway drops the connection

    url = await make_raw_upstream(answers_early)
    client = await make_gateway(one_service(url, timeout={"connect": 1, "read": 2}))

    async with asyncio.timeout(5):
        response = await client.post("/upload", data=_upload(100))
        body = await response.read()
    assert response.status == status
    assert len(body) == size
    await wait_for(lambda: _held_connections_to(_port(url)) == 0, 5.0, "the upstream connection dropped")


async def test_an_early_answer_from_an_upstream_that_no_longer_reads_frees_its_connection(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    """Unsent body bytes were still queued when the upstream's early answer ended: a graceful
    close waits to send them, and the upstream never read them, so the socket (and a file
    descriptor) stayed open for as long as the upstream kept its end."""

    async def rejects_without_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # the gateway's send buffers fill meanwhile
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        await writer.drain()
        await asyncio.sleep(30)  # keeps its end open, reading nothing; cancelled at teardown

    url = await make_raw_upstream(rejects_without_reading)
    client = await make_gateway(one_service(url, timeout={"connect": 1, "read": 2}))

    async with asyncio.timeout(5):
        response = await client.post("/upload", data=_upload(3000))
        assert response.status == 413
        assert await response.read() == b"too big!"
    await wait_for(lambda: _held_connections_to(_port(url)) == 0, 2.0, "the upstream connection dropped")


async def test_a_fin_in_the_middle_of_a_request_body_still_ends_the_request(
    make_gateway: Any, make_upstream: Any
) -> None:
    """A FIN before the body is whole: nothing more can come, so the request ends and no
    truncated body is taken for a whole one."""
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\nshort")
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
    assert not data.startswith(b"HTTP/1.1 200 "), data
    assert upstream.requests == []
