"""Server-sent events cross the gateway as they happen, not when the stream ends."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import one_service


async def test_first_event_arrives_while_the_upstream_is_still_sending(
    make_gateway: Any, make_upstream: Any
) -> None:
    client_has_first_event = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"id: 1\ndata: first\n\n")
        # The second event is only sent once the client has the first one through the gateway:
        # a gateway that buffered the stream would deadlock here and the test would time out.
        await asyncio.wait_for(client_has_first_event.wait(), 10)
        await response.write(b"id: 2\ndata: second\n\n")
        await response.write_eof()
        return response

    client = await make_gateway(one_service((await make_upstream(events)).url, prefix="/api/v1/stream"))

    async with asyncio.timeout(5):
        response = await client.get("/api/v1/stream/events", headers={"Accept": "text/event-stream"})
        first = await response.content.readuntil(b"\n\n")
        client_has_first_event.set()
        rest = await response.content.read()

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert first == b"id: 1\ndata: first\n\n"
    assert rest == b"id: 2\ndata: second\n\n"


async def test_pause_between_events_shorter_than_the_read_timeout_keeps_the_stream(
    make_gateway: Any, make_upstream: Any
) -> None:
    """A pause between events shorter than the read timeout does not end the stream."""

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: a\n\n")
        await asyncio.sleep(0.3)  # simulates a quiet period on the stream
        await response.write(b"data: b\n\n")
        await response.write_eof()
        return response

    client = await make_gateway(one_service((await make_upstream(events)).url, timeout={"read": 2}))

    async with asyncio.timeout(5):
        response = await client.get("/events")
        body = await response.read()

    assert body == b"data: a\n\ndata: b\n\n"


@pytest.mark.parametrize("heartbeat", [False, True], ids=["silent", "heartbeat"])
async def test_a_stream_quiet_for_longer_than_the_read_timeout_is_cut_unless_it_sends_heartbeats(
    make_gateway: Any, make_upstream: Any, heartbeat: bool
) -> None:
    """The read timeout is the longest silence between two reads (nginx's proxy_read_timeout),
    not a deadline for the whole stream: a stream quiet for longer is cut off, its client told so
    by a missing last chunk; comment lines (": ping") keep it open as long as they come."""
    read_timeout = 0.3

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: a\n\n")
        for _ in range(5):  # 2.5 read timeouts between the two events
            await asyncio.sleep(read_timeout / 2)  # the stream's quiet period
            if heartbeat:
                await response.write(b": ping\n\n")
        await response.write(b"data: b\n\n")
        await response.write_eof()
        return response

    upstream = await make_upstream(events)
    client = await make_gateway(one_service(upstream.url, timeout={"read": read_timeout}))

    async with asyncio.timeout(5):
        response = await client.get("/events")
        assert await response.content.readuntil(b"\n\n") == b"data: a\n\n"
        if heartbeat:
            assert (await response.read()).endswith(b": ping\n\ndata: b\n\n")
        else:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
