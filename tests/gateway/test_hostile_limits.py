"""Oversized heads, slowloris and slow bodies: bounded answers and timeouts, and other clients
are served meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway import httpserver
from tests.helpers import one_service, parse_responses, raw_exchange

HOST = b"Host: x\r\n"
HEAD_TIMEOUT = 0.5  # the test gateway's keep-alive (request head) timeout


@pytest.fixture
async def gateway(make_gateway: Any, make_upstream: Any) -> tuple[Any, Any]:
    upstream = await make_upstream()
    client = await make_gateway(
        one_service(upstream.url),
        server_kwargs={"keepalive_timeout": HEAD_TIMEOUT, "lingering_time": 0.2},
    )
    return client, upstream


async def _closed_within(reader: asyncio.StreamReader, deadline_s: float) -> bytes:
    async with asyncio.timeout(deadline_s):
        return await reader.read()


async def _served(client: Any) -> float:
    started = time.monotonic()
    response = await client.get("/ok")
    assert response.status == 200
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"X-Big: " + b"a" * 9000 + b"\r\n", 431),
        (b"Cookie: " + b"session=abcdef; " * 600 + b"\r\n", 431),
        (b"".join(b"X-H-%d: 1\r\n" % i for i in range(200)), 431),
        (b"X" * 9000 + b": 1\r\n", 431),
    ],
    ids=["long header", "huge cookie", "too many headers", "long header name"],
)
async def test_oversized_request_heads_get_a_json_431(
    gateway: tuple[Any, Any], headers: bytes, status: int
) -> None:
    client, upstream = gateway
    data = await raw_exchange(
        client.port, b"GET /x HTTP/1.1\r\n" + HOST + headers + b"Connection: close\r\n\r\n"
    )
    (response,) = parse_responses(data)
    assert response.status == status
    assert response.headers["Content-Type"] == "application/json" and response.json()["detail"]
    assert b"aaaa" not in response.body and b"session" not in response.body
    assert upstream.requests == []
    await _served(client)


async def test_headers_at_the_limits_are_forwarded(gateway: tuple[Any, Any]) -> None:
    client, upstream = gateway
    value = "v" * (httpserver.MAX_FIELD_SIZE - len("X-Big: ") - 10)
    response = await client.get("/x", headers={"X-Big": value})
    assert response.status == 200
    assert upstream.requests[0].values("X-Big") == [value]


async def test_a_head_of_max_headers_fields_is_forwarded_and_one_more_gets_431(
    gateway: tuple[Any, Any],
) -> None:
    client, upstream = gateway
    fields = [b"X-H-%d: 1\r\n" % i for i in range(httpserver.MAX_HEADERS - 2)]  # with Host, Connection

    data = await raw_exchange(
        client.port, b"GET /x HTTP/1.1\r\n" + HOST + b"".join(fields) + b"Connection: close\r\n\r\n"
    )
    (at_limit,) = parse_responses(data)
    data = await raw_exchange(
        client.port,
        b"GET /x HTTP/1.1\r\n" + HOST + b"".join(fields) + b"X-One-More: 1\r\nConnection: close\r\n\r\n",
    )
    (over,) = parse_responses(data)

    assert at_limit.status == 200
    assert upstream.requests[0].values(f"X-H-{httpserver.MAX_HEADERS - 3}") == ["1"]
    assert over.status == 431 and over.json()["detail"] == "Too many header fields"
    assert len(upstream.requests) == 1


async def test_a_trickled_request_head_is_cut_off_and_others_are_served_meanwhile(
    gateway: tuple[Any, Any],
) -> None:
    client, upstream = gateway
    attackers = [await asyncio.open_connection("127.0.0.1", client.port) for _ in range(20)]
    started = time.monotonic()
    head = b"GET /slow HTTP/1.1\r\n" + HOST + b"X-Pad: " + b"a" * 40
    try:
        for i, byte in enumerate(head):
            for _, writer in attackers:
                writer.write(bytes([byte]))
            if i % 10 == 0:
                # Every attacker holds an open, half-sent request: a real client still gets in.
                assert await _served(client) < HEAD_TIMEOUT
            if time.monotonic() - started > HEAD_TIMEOUT * 0.6:
                break
            await asyncio.sleep(0.02)  # the attack's pace, not a wait for a result
        for reader, _ in attackers:
            # Trickling does not extend the deadline: closed, with nothing answered.
            assert await _closed_within(reader, HEAD_TIMEOUT * 3) == b""
        assert time.monotonic() - started < HEAD_TIMEOUT * 3
    finally:
        for _, writer in attackers:
            writer.close()
    assert [r.raw_path for r in upstream.requests] == ["/ok"] * len(upstream.requests)


async def test_an_idle_connection_is_closed_after_the_head_timeout(gateway: tuple[Any, Any]) -> None:
    client, _ = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    started = time.monotonic()
    try:
        assert await _closed_within(reader, HEAD_TIMEOUT * 4) == b""
    finally:
        writer.close()
    assert HEAD_TIMEOUT * 0.8 <= time.monotonic() - started


async def test_the_production_head_timeout_is_finite_and_documented() -> None:
    assert 0 < httpserver.KEEPALIVE_TIMEOUT <= 120
    assert "KEEPALIVE_TIMEOUT" in (httpserver.__doc__ or "")
    assert 0 < httpserver.BODY_IDLE_TIMEOUT <= 120
    assert "BODY_IDLE_TIMEOUT" in (httpserver.__doc__ or "")


BODY_TIMEOUT = 0.5


@pytest.fixture
def short_body_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "BODY_IDLE_TIMEOUT", BODY_TIMEOUT)


@pytest.mark.parametrize(
    ("framing", "first_part"),
    [
        (b"Content-Length: 100\r\n", b"0123456789"),  # small declared body: buffered
        (b"Content-Length: 200000\r\n", b"0123456789"),  # large declared body: streamed
        (b"Transfer-Encoding: chunked\r\n", b"a\r\n0123456789\r\n"),  # unknown length: streamed
    ],
    ids=["buffered", "streamed", "chunked"],
)
async def test_a_stalled_body_gets_408_and_the_upstream_no_complete_request(
    gateway: tuple[Any, Any], short_body_timeout: None, framing: bytes, first_part: bytes
) -> None:
    client, upstream = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    started = time.monotonic()
    try:
        writer.write(b"POST /upload HTTP/1.1\r\n" + HOST + framing + b"\r\n" + first_part)
        await writer.drain()
        assert await _served(client) < BODY_TIMEOUT  # others are served while it stalls
        data = await _closed_within(reader, BODY_TIMEOUT + 3)
    finally:
        writer.close()
    (response,) = parse_responses(data)
    assert response.status == 408 and response.json()["detail"]
    assert response.headers.get("X-Request-ID")
    assert time.monotonic() - started < BODY_TIMEOUT + 2
    assert [r.raw_path for r in upstream.requests] == ["/ok"]


async def test_a_slow_but_steady_body_is_not_cut_off(
    gateway: tuple[Any, Any], short_body_timeout: None
) -> None:
    client, upstream = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for _ in range(6):  # 6 x 0.1 s: longer than the idle timeout in total, never idle that long
            writer.write(b"2\r\nab\r\n")
            await writer.drain()
            await asyncio.sleep(BODY_TIMEOUT / 3)  # the client's pace
        writer.write(b"0\r\n\r\n")
        data = await _closed_within(reader, 5)
    finally:
        writer.close()
    (response,) = parse_responses(data)
    assert response.status == 200
    assert [r.body for r in upstream.requests] == [b"ab" * 6]
