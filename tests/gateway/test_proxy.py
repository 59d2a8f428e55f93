"""The proxy's HTTP behaviour against real upstreams: what passes untouched, bodies, failures."""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import io
import logging
import os
import resource
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.settings import load_settings
from tests.conftest import GatewayTestServer
from tests.helpers import one_service, raw_exchange, wait_for

MB = 1024 * 1024
BUFFER_BOUNDARY = 64 * 1024  # the proxy reads bodies up to this size whole; larger ones stream
SMALL, LARGE = 10, 200_000  # one body on each side of the boundary


def split_response(raw: bytes) -> tuple[str, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


async def assert_contract_error(response: aiohttp.ClientResponse, status: int) -> None:
    assert response.status == status
    assert response.content_type == "application/json"
    assert response.headers.get("X-Request-ID")
    body = await response.json()
    assert isinstance(body.get("detail"), str) and body["detail"]


# -- what passes through untouched --------------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["buffered", "streamed"])
async def test_content_encoding_and_compressed_bytes_pass_untouched(
    make_gateway: Any, make_upstream: Any, size: int
) -> None:
    compressed = gzip.compress(os.urandom(size), mtime=0)

    async def reply(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream = await make_upstream(reply)
    client = await make_gateway(one_service(upstream.url), auto_decompress=False)

    response = await client.get("/x", headers={"Accept-Encoding": "gzip"})

    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Type"] == "application/json"
    assert await response.read() == compressed
    assert upstream.requests[0].values("Accept-Encoding") == ["gzip"]


async def test_gateway_adds_no_accept_encoding_or_user_agent(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url))

    await raw_exchange(client.port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")

    assert upstream.requests[0].names().isdisjoint({"accept-encoding", "user-agent", "accept"})


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["buffered", "streamed"])
async def test_several_set_cookie_headers_stay_several(
    make_gateway: Any, make_upstream: Any, size: int
) -> None:
    cookies = ["a=1; Path=/; HttpOnly", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT", "c=3; Secure"]

    async def reply(request: web.Request) -> web.Response:
        response = web.Response(body=b"x" * size)
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)
        return response

    client = await make_gateway(one_service((await make_upstream(reply)).url))

    response = await client.get("/x")

    assert response.headers.getall("Set-Cookie") == cookies
    assert len(await response.read()) == size


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["buffered", "streamed"])
async def test_missing_content_type_is_not_invented(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]], size: int
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + b"z" * size)
        await writer.drain()

    client = await make_gateway(one_service(await make_raw_upstream(answer)))

    response = await client.get("/x")

    assert len(await response.read()) == size
    assert "Content-Type" not in response.headers


# (request line and headers, status line version, Connection header, connection kept open)
CLIENT_CONNECTIONS = [
    pytest.param("GET /x HTTP/1.1\r\n", "HTTP/1.1", None, True, id="1.1"),
    pytest.param("GET /x HTTP/1.1\r\nConnection: close\r\n", "HTTP/1.1", "close", False, id="1.1-close"),
    pytest.param("GET /x HTTP/1.0\r\n", "HTTP/1.0", None, False, id="1.0"),
    pytest.param(
        "GET /x HTTP/1.0\r\nConnection: keep-alive\r\n", "HTTP/1.0", "keep-alive", True, id="1.0-keep-alive"
    ),
]


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["buffered", "streamed"])
@pytest.mark.parametrize(("request_head", "version", "connection", "kept"), CLIENT_CONNECTIONS)
async def test_relayed_answers_follow_the_clients_connection_semantics(
    make_gateway: Any,
    make_raw_upstream: Callable[..., Awaitable[str]],
    size: int,
    request_head: str,
    version: str,
    connection: str | None,
    kept: bool,
) -> None:
    # The upstream sends neither Date nor Content-Type: the gateway adds the first (RFC 9110
    # 6.6.1: a proxy adds Date when it is missing) and never invents the second.
    async def answer(reader: Any, writer: Any) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Up: 1\r\n\r\n" % size + b"u" * size)
            await writer.drain()

    client = await make_gateway(one_service(await make_raw_upstream(answer)))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        async with asyncio.timeout(5):
            for _ in range(2 if kept else 1):  # a kept connection must carry a second exchange
                writer.write(f"{request_head}Host: a\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers, _ = split_response(head)
                body = await reader.readexactly(int(headers["content-length"][0]))
                assert status == f"{version} 200 OK"
                assert headers.get("connection") == ([connection] if connection else None)
                assert headers["x-up"] == ["1"]
                assert len(headers["date"]) == 1
                assert "content-type" not in headers
                assert "server" not in headers
                assert body == b"u" * size
            if not kept:
                assert await reader.read() == b""  # closed by the gateway
    finally:
        writer.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", ["/elsewhere?a=1&b=%2F", "http://127.0.0.1:1/other#frag"])
async def test_redirects_are_returned_not_followed(
    make_gateway: Any, make_upstream: Any, status: int, location: str
) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})

    upstream = await make_upstream(reply)
    client = await make_gateway(one_service(upstream.url))

    response = await client.get("/x", allow_redirects=False)

    assert response.status == status
    assert response.headers["Location"] == location
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["small", "large"])
async def test_head_keeps_the_upstream_content_length_and_sends_no_body(
    make_gateway: Any, make_upstream: Any, size: int
) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * size, content_type="text/plain")

    upstream = await make_upstream(reply)
    client = await make_gateway(one_service(upstream.url))

    raw = await raw_exchange(client.port, b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")

    status, headers, body = split_response(raw)
    assert status.startswith("HTTP/1.1 200")
    assert headers["content-length"] == [str(size)]
    assert body == b""
    assert upstream.requests[0].method == "HEAD"


@pytest.mark.parametrize(
    ("status", "request_headers"),
    [(204, ""), (304, 'If-None-Match: "v1"\r\n')],
)
async def test_bodyless_statuses_have_no_body(
    make_gateway: Any, make_upstream: Any, status: int, request_headers: str
) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"ETag": '"v1"', "X-From": "upstream"})

    client = await make_gateway(one_service((await make_upstream(reply)).url))

    raw = await raw_exchange(
        client.port, f"GET /x HTTP/1.1\r\nHost: a\r\n{request_headers}Connection: close\r\n\r\n".encode()
    )

    status_line, headers, body = split_response(raw)
    assert status_line.startswith(f"HTTP/1.1 {status}")
    assert headers["etag"] == ['"v1"']
    assert headers["x-from"] == ["upstream"]
    assert "transfer-encoding" not in headers
    assert body == b""


@pytest.mark.parametrize(
    ("status", "reason", "content_type", "body", "extra"),
    [
        (400, "Bad Request", "application/problem+json", b'{"title": "nope"}', {}),
        (
            401,
            "Unauthorized",
            "text/plain; charset=utf-8",
            b"who?",
            {"WWW-Authenticate": 'Bearer realm="up"'},
        ),
        (404, "Not Found", "text/html", b"<h1>missing</h1>", {}),
        (418, "I'm a teapot", "text/plain", b"short and stout", {}),
        (429, "Slow Down", "application/json", b'{"detail": "upstream says wait"}', {"Retry-After": "7"}),
        (500, "Internal Server Error", "text/plain", b"boom", {"X-Upstream-Trace": "abc"}),
        (502, "Bad Gateway", "application/json", b'{"detail": "the upstream own 502"}', {}),
        (503, "Service Unavailable", "text/plain", b"maintenance", {"Retry-After": "120"}),
        (504, "Gateway Timeout", "text/plain", b"upstream's own timeout", {}),
        (500, "Boom", "application/octet-stream", os.urandom(LARGE), {}),
    ],
    ids=["400", "401", "404", "418", "429", "500", "502", "503", "504", "500-streamed"],
)
async def test_upstream_errors_pass_through_untouched(
    make_gateway: Any,
    make_upstream: Any,
    status: int,
    reason: str,
    content_type: str,
    body: bytes,
    extra: dict[str, str],
) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(
            status=status, reason=reason, body=body, headers={"Content-Type": content_type, **extra}
        )

    client = await make_gateway(one_service((await make_upstream(reply)).url))

    response = await client.get("/x")

    assert response.status == status
    assert response.reason == reason
    assert response.headers["Content-Type"] == content_type
    assert await response.read() == body
    for name, value in extra.items():
        assert response.headers[name] == value


# -- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, BUFFER_BOUNDARY - 1, BUFFER_BOUNDARY, BUFFER_BOUNDARY + 1, MB, 8 * MB]
)
async def test_request_body_with_content_length_arrives_intact(
    make_gateway: Any, make_upstream: Any, size: int
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url, max_body="unlimited", content_types=["*/*"]))
    body = os.urandom(size)

    # BytesIO: aiohttp warns about large raw bytes bodies; the request still has a Content-Length.
    response = await client.post(
        "/x", data=io.BytesIO(body), headers={"Content-Type": "application/octet-stream"}
    )

    assert response.status == 200
    [received] = upstream.requests
    assert received.body == body
    assert received.values("Content-Length") == [str(size)]
    assert "transfer-encoding" not in received.names()


@pytest.mark.parametrize("size", [0, 1, BUFFER_BOUNDARY, BUFFER_BOUNDARY + 1, MB, 8 * MB])
async def test_response_body_with_content_length_arrives_intact(
    make_gateway: Any, make_upstream: Any, size: int
) -> None:
    body = os.urandom(size)

    async def reply(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    client = await make_gateway(one_service((await make_upstream(reply)).url))

    response = await client.get("/x")

    assert response.headers["Content-Length"] == str(size)
    assert await response.read() == body


@pytest.mark.parametrize("chunk_sizes", [[5, 7, 1], [100_000, 1, 300_000]], ids=["small", "large"])
async def test_chunked_upload_without_content_length_arrives_intact(
    make_gateway: Any, make_upstream: Any, chunk_sizes: list[int]
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url, max_body="unlimited", content_types=["*/*"]))
    chunks = [os.urandom(n) for n in chunk_sizes]

    async def produce() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    response = await client.post("/x", data=produce(), headers={"Content-Type": "application/octet-stream"})

    assert response.status == 200
    [received] = upstream.requests
    assert received.body == b"".join(chunks)
    assert received.values("Transfer-Encoding") == ["chunked"]
    assert "content-length" not in received.names()


async def test_chunked_download_arrives_intact(make_gateway: Any, make_upstream: Any) -> None:
    chunks = [os.urandom(n) for n in (3, 70_000, 1, 250_000)]

    async def reply(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    client = await make_gateway(one_service((await make_upstream(reply)).url))

    response = await client.get("/x")

    assert await response.read() == b"".join(chunks)
    assert response.headers.getall("Transfer-Encoding") == ["chunked"]


HUGE_CHUNK = MB
HUGE_CHUNKS = 101  # 101 MiB, more than 100 MB


def huge_body() -> Iterator[bytes]:
    """101 MiB of distinct 1 MiB chunks, generated on the fly (never held whole)."""
    base = os.urandom(HUGE_CHUNK)
    for index in range(HUGE_CHUNKS):
        yield index.to_bytes(8, "big") + base[8:]


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_huge_upload_is_streamed_to_the_upstream(make_gateway: Any, make_upstream: Any) -> None:
    first_bytes_arrived = asyncio.Event()

    async def count(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            first_bytes_arrived.set()
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    upstream = await make_upstream(count, read_body=False)
    client = await make_gateway(one_service(upstream.url, max_body="unlimited", content_types=["*/*"]))
    sent = hashlib.sha256()
    chunks = huge_body()

    async def produce() -> AsyncIterator[bytes]:
        first = next(chunks)
        sent.update(first)
        yield first
        # A gateway that buffered the upload would never let the upstream see a byte of it now.
        await asyncio.wait_for(first_bytes_arrived.wait(), 10)
        for chunk in chunks:
            sent.update(chunk)
            yield chunk

    rss_before = max_rss_mb()
    async with asyncio.timeout(60):
        response = await client.post(
            "/x", data=produce(), headers={"Content-Type": "application/octet-stream"}
        )
        result = await response.json()

    assert response.status == 200
    assert result == {"size": HUGE_CHUNKS * HUGE_CHUNK, "sha256": sent.hexdigest()}
    assert max_rss_mb() - rss_before < 64


async def test_huge_download_is_streamed_to_the_client(make_gateway: Any, make_upstream: Any) -> None:
    client_has_first_chunk = asyncio.Event()
    sent = hashlib.sha256()

    async def generate(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        chunks = huge_body()
        first = next(chunks)
        sent.update(first)
        await response.write(first)
        # A gateway that buffered the response would never deliver the first chunk now.
        await asyncio.wait_for(client_has_first_chunk.wait(), 10)
        for chunk in chunks:
            sent.update(chunk)
            await response.write(chunk)
        await response.write_eof()
        return response

    client = await make_gateway(one_service((await make_upstream(generate)).url))
    received, size = hashlib.sha256(), 0

    rss_before = max_rss_mb()
    async with asyncio.timeout(60):
        response = await client.get("/x")
        async for chunk in response.content.iter_chunked(MB):
            client_has_first_chunk.set()
            received.update(chunk)
            size += len(chunk)

    assert response.status == 200
    assert size == HUGE_CHUNKS * HUGE_CHUNK
    assert received.hexdigest() == sent.hexdigest()
    assert max_rss_mb() - rss_before < 64


# -- compressed request bodies: relayed as the bytes on the wire ---------------------------------

PLAIN_JSON = b'{"title":"hello"}'
CODED_BODIES = {
    "gzip": ("gzip", gzip.compress(PLAIN_JSON, mtime=0)),
    "deflate": ("deflate", zlib.compress(PLAIN_JSON)),
    "deflate, not valid": ("deflate", b"\x00 these bytes inflate to nothing"),
    "br": ("br", b"\x8b\x07\x80" + PLAIN_JSON + b"\x03"),  # the gateway never decodes, so any bytes
    "gzip, gzip": ("gzip, gzip", gzip.compress(gzip.compress(PLAIN_JSON, mtime=0), mtime=0)),
}


async def _chunks(body: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize(("coding", "body"), CODED_BODIES.values(), ids=CODED_BODIES)
async def test_a_compressed_request_body_reaches_the_upstream_as_sent(
    make_gateway: Any, make_upstream: Any, coding: str, body: bytes, framing: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url))

    response = await client.post(
        "/x",
        data=body if framing == "length" else _chunks(body),
        headers={"Content-Encoding": coding, "Content-Type": "application/json"},
    )

    assert response.status == 200
    [received] = upstream.requests
    assert received.body == body
    assert received.values("Content-Encoding") == [coding]
    if framing == "length":
        assert received.values("Content-Length") == [str(len(body))]
    else:
        assert received.values("Transfer-Encoding") == ["chunked"]
        assert received.values("Content-Length") == []


def gzip_members(plain_size: int, members: int) -> bytes:
    """``members`` gzip members of ``plain_size`` zero bytes each: a decompression bomb."""
    packer = zlib.compressobj(9, wbits=31)
    one = packer.compress(bytes(plain_size)) + packer.flush()
    return one * members


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_compressed_body_is_counted_against_max_body_as_sent_not_inflated(
    make_gateway: Any, make_upstream: Any, framing: str
) -> None:
    bomb = gzip_members(64 * MB, 16)  # 1 GiB of zeros in about 1 MB
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url, max_body="2MB"))

    async with asyncio.timeout(30):
        response = await client.post(
            "/x",
            data=bomb if framing == "length" else _chunks(bomb, 256 * 1024),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        )

    assert response.status == 200
    [received] = upstream.requests
    assert received.body == bomb


def stored_gzip(blocks: int) -> Iterator[bytes]:
    """A valid gzip stream of ``blocks`` MiB of random bytes, made chunk by chunk (stored, level 0:
    as large on the wire as the data, and cheap to make)."""
    packer = zlib.compressobj(0, wbits=31)
    base = os.urandom(MB)
    for index in range(blocks):
        yield packer.compress(index.to_bytes(8, "big") + base[8:])
    yield packer.flush()


async def test_a_large_compressed_upload_is_streamed_through_as_sent(
    make_gateway: Any, make_upstream: Any
) -> None:
    first_bytes_arrived = asyncio.Event()

    async def count(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            first_bytes_arrived.set()
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {"size": size, "sha256": digest.hexdigest(), "coding": request.headers.get("Content-Encoding")}
        )

    upstream = await make_upstream(count, read_body=False)
    client = await make_gateway(one_service(upstream.url))
    sent, sent_size = hashlib.sha256(), 0
    chunks = stored_gzip(64)

    async def produce() -> AsyncIterator[bytes]:
        nonlocal sent_size
        for index, chunk in enumerate(chunks):
            sent.update(chunk)
            sent_size += len(chunk)
            yield chunk
            if index == 1:
                # A gateway that buffered the upload would never let the upstream see a byte now.
                await asyncio.wait_for(first_bytes_arrived.wait(), 10)

    rss_before = max_rss_mb()
    async with asyncio.timeout(60):
        response = await client.post(
            "/x", data=produce(), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )
        result = await response.json()

    assert response.status == 200
    assert result == {"size": sent_size, "sha256": sent.hexdigest(), "coding": "gzip"}
    assert sent_size > 64 * MB
    assert max_rss_mb() - rss_before < 64


# -- failures -----------------------------------------------------------------------------------


async def test_connection_refused_gives_502(make_gateway: Any, refused_url: str) -> None:
    client = await make_gateway(one_service(refused_url))
    await assert_contract_error(await client.get("/x"), 502)


async def test_connect_timeout_gives_504(make_gateway: Any, unaccepting_url: str) -> None:
    client = await make_gateway(one_service(unaccepting_url, timeout={"connect": 0.2, "read": 5}))

    started = time.monotonic()
    response = await client.get("/x")

    await assert_contract_error(response, 504)
    assert time.monotonic() - started < 2


async def test_read_timeout_gives_504(make_gateway: Any, make_upstream: Any) -> None:
    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(5)  # simulates an upstream slower than the read timeout
        return web.Response(text="too late")

    client = await make_gateway(one_service((await make_upstream(stall)).url, timeout={"read": 0.2}))

    started = time.monotonic()
    response = await client.get("/x")

    await assert_contract_error(response, 504)
    assert time.monotonic() - started < 2


async def test_read_timeout_mid_body_cuts_the_client_response(make_gateway: Any, make_upstream: Any) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(LARGE)})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(5)  # simulates an upstream that stops sending
        return response

    client = await make_gateway(one_service((await make_upstream(stall)).url, timeout={"read": 0.2}))

    async with asyncio.timeout(3):
        response = await client.get("/x")
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_upstream_closing_before_headers_gives_502(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]], method: str
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    client = await make_gateway(one_service(await make_raw_upstream(hang_up)))

    await assert_contract_error(await client.request(method, "/x"), 502)


async def test_upstream_sending_garbage_gives_502(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]]
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    client = await make_gateway(one_service(await make_raw_upstream(garbage)))

    await assert_contract_error(await client.get("/x"), 502)


def cut_short(
    head: bytes, body: bytes
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        await writer.drain()

    return answer


async def test_short_small_body_before_headers_are_sent_gives_502(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]]
) -> None:
    # Declared small enough to be read whole, so the gateway still can answer with its own error.
    url = await make_raw_upstream(cut_short(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 10))
    client = await make_gateway(one_service(url))

    async with asyncio.timeout(5):
        await assert_contract_error(await client.get("/x"), 502)


@pytest.mark.parametrize(
    ("head", "body"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"x" * 100_000, id="content-length"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\n6\r\n world\r\n",
            id="chunked-without-final-chunk",
        ),
    ],
)
async def test_upstream_closing_mid_body_fails_the_client_read(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]], head: bytes, body: bytes
) -> None:
    client = await make_gateway(one_service(await make_raw_upstream(cut_short(head, body))))

    async with asyncio.timeout(5):
        response = await client.get("/x")
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_client_going_away_mid_response_stops_the_upstream(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream_stopped: list[str] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(1000):  # about 5 s of data: a broken gateway must not hang the suite
                await response.write(b"x" * 16_384)
                await asyncio.sleep(0.005)  # simulates a slow producer
        except asyncio.CancelledError:
            upstream_stopped.append("cancelled")
            raise
        except ConnectionError:
            upstream_stopped.append("connection closed")
        else:
            upstream_stopped.append("sent everything")
        return response

    client = await make_gateway(one_service((await make_upstream(endless, read_body=False)).url))

    response = await client.get("/x")
    assert len(await response.content.readany()) > 0
    response.close()

    await wait_for(lambda: bool(upstream_stopped), deadline_s=10, what="the upstream handler to end")
    assert upstream_stopped[0] in ("cancelled", "connection closed")


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["buffered", "streamed"])
async def test_a_client_gone_when_the_answer_starts_is_not_an_error(
    aiohttp_client: Any,
    make_upstream: Any,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
    size: int,
) -> None:
    """Under load a client can hang up while its upstream answers, so that writing the response
    head fails: a normal event, not an "unhandled error" with a traceback, and the upstream
    connection must not be pooled half-read."""

    async def reply(request: web.Request) -> web.Response:
        return web.Response(body=b"r" * size)

    upstream = await make_upstream(reply)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(one_service(upstream.url)))
    app = create_app(load_settings({"GATEWAY_CONFIG": str(config)}))
    gone: list[str] = []

    async def hang_up(request: web.Request, response: web.StreamResponse) -> None:
        if request.path == "/gone" and request.transport is not None:
            request.transport.close()  # the client's connection, just before the head is written
            gone.append(request.path)

    app.on_response_prepare.append(hang_up)
    client = await aiohttp_client(GatewayTestServer(app))

    with caplog.at_level(logging.INFO, logger="gateway"):
        with pytest.raises(aiohttp.ClientError):
            await (await client.get("/gone")).read()
        response = await client.get("/after")  # the gateway and its pool carry on
        assert response.status == 200
        assert len(await response.read()) == size

    assert gone == ["/gone"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records
    ]
    assert [r.raw_path for r in upstream.requests] == ["/gone", "/after"]


async def test_a_client_gone_before_the_upstream_answers_closes_the_upstream_connection(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]]
) -> None:
    """The handler is cancelled while it waits for the response head: the upstream connection it
    holds must be closed then, not left open (with whatever the upstream sends next buffered in
    it) until the garbage collector happens to find it."""
    arrived = asyncio.Event()
    closed = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        if await reader.read(1) == b"":  # EOF: the gateway closed this connection
            closed.set()

    client = await make_gateway(one_service(await make_raw_upstream(slow)))
    gc.disable()  # only an explicit close may count
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(arrived.wait(), 5)
        writer.close()  # the client goes away before any answer
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        gc.enable()
