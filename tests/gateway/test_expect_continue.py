"""``Expect: 100-continue``: the interim answer only for a request the gateway will read the body
of; a refusal the head already decides is the final answer, and the body is never uploaded."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.gateway.chain import AUTH_ENV, read_head, service, token

CLUSTER = json.dumps(
    {
        "name": "prod-eu-1",
        "api_server_url": "https://api.example.com",
        "provider": "eks",
        "environment": "production",
    }
).encode()
DEADLINE_S = 5.0


@pytest.fixture
async def upstream(make_upstream: Any) -> Any:
    return await make_upstream()


@pytest.fixture
async def client(make_gateway: Any, upstream: Any) -> Any:
    config = service(
        upstream.url,
        [
            {"prefix": "/api/v1/clusters"},  # auth required, JSON, 128KB, schema
            {"prefix": "/open", "auth": "none", "content_types": ["*/*"], "max_body": "1KB"},
            {"prefix": "/limited", "auth": "none", "content_types": ["*/*"], "rate_limit": "1/minute"},
        ],
    )
    return await make_gateway(config, AUTH_ENV)


def head(path: str, *lines: str, length: int) -> bytes:
    fields = "".join(f"{line}\r\n" for line in lines)
    return f"POST {path} HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n{fields}Content-Length: {length}\r\n\r\n".encode()


BEARER = f"Authorization: Bearer {token()}"
JSON = "Content-Type: application/json"
# The head alone decides each of these: the body is never asked for.
REFUSED_ON_THE_HEAD = {
    "401 no token": (401, head("/api/v1/clusters", JSON, length=len(CLUSTER))),
    "413 declared length": (413, head("/open/x", "Content-Type: text/plain", length=2048)),
    "413 on a schema route": (413, head("/api/v1/clusters", JSON, BEARER, length=200_000)),
    "415 content type": (415, head("/api/v1/clusters", "Content-Type: text/plain", BEARER, length=2)),
    "415 content encoding": (
        415,
        head("/api/v1/clusters", JSON, "Content-Encoding: gzip", BEARER, length=20),
    ),
    "404 no route": (404, head("/nowhere", JSON, length=2)),
}


async def _expect_final_answer(port: int, request: bytes, status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)  # the head only: a client waits for the 100 before its body
        await writer.drain()
        got, headers, body = await read_head(reader, DEADLINE_S)
        assert got == status, (got, body)
        assert headers["content-type"] == "application/json" and headers["x-request-id"]
        assert json.loads(body)["detail"]
        # The body was never asked for: the connection cannot be reused.
        assert headers["connection"] == "close"
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(("status", "request_head"), REFUSED_ON_THE_HEAD.values(), ids=REFUSED_ON_THE_HEAD)
async def test_a_refusal_the_head_decides_is_sent_instead_of_100_continue(
    client: Any, upstream: Any, status: int, request_head: bytes
) -> None:
    await _expect_final_answer(client.port, request_head, status)
    assert upstream.requests == []


async def test_a_rate_limited_request_gets_429_instead_of_100_continue(client: Any, upstream: Any) -> None:
    first = await client.post("/limited/x", data=b"ab")
    assert first.status == 200

    await _expect_final_answer(client.port, head("/limited/x", length=2), 429)
    assert len(upstream.requests) == 1


ACCEPTED = {
    "proxied": (head("/open/x", "Content-Type: text/plain", length=5), b"hello"),
    "validated": (head("/api/v1/clusters", JSON, BEARER, length=len(CLUSTER)), CLUSTER),
}


@pytest.mark.parametrize(("request_head", "body"), ACCEPTED.values(), ids=ACCEPTED)
async def test_an_admitted_request_gets_100_continue_before_it_sends_its_body(
    client: Any, upstream: Any, request_head: bytes, body: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(request_head)
        await writer.drain()
        async with asyncio.timeout(DEADLINE_S):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        status, headers, _ = await read_head(reader, DEADLINE_S)
        assert status == 200
        assert headers.get("connection") != "close"

        # Still a keep-alive connection: the next request on it is served.
        writer.write(b"GET /open/again HTTP/1.1\r\nHost: gw\r\n\r\n")
        status, _, _ = await read_head(reader, DEADLINE_S)
        assert status == 200
    finally:
        writer.close()
        await writer.wait_closed()
    assert [r.body for r in upstream.requests] == [body, b""]


async def test_a_request_without_a_body_gets_no_100_and_keeps_its_connection(
    client: Any, upstream: Any
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            b"POST /open/x HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n"
        )
        status, headers, _ = await read_head(reader, DEADLINE_S)
        assert status == 200
        assert headers.get("connection") != "close"
    finally:
        writer.close()
        await writer.wait_closed()
