"""Request framing under hostile bytes: the gateway and its upstreams never disagree about where a
request ends. Every case sends raw bytes over a socket with a second request pipelined behind
the first, then compares what the client got with what each upstream actually received."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import httpserver
from gateway.keys import request_id_key
from tests.helpers import fuzz_examples, parse_responses, raw_exchange

SMUGGLED = b"GET /b/smuggled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
HOST = b"Host: x\r\n"


async def _echo(request: web.Request, *, name: str) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"method": request.method, "path": request.raw_path, "body": body.decode("latin-1")},
        headers={"X-Upstream": name},
    )


@pytest.fixture
async def two_routes(make_gateway: Any, make_upstream: Any) -> tuple[Any, Any, Any]:
    """Gateway with /a -> upstream A and /b -> upstream B; both echo what they received."""
    upstreams = []
    for name in ("a", "b"):
        upstreams.append(await make_upstream(functools.partial(_echo, name=name)))
    a, b = upstreams
    config = {
        "services": {"svc-a": {"url": a.url}, "svc-b": {"url": b.url}},
        "routes": [
            {"prefix": p, "service": s, "auth": "none", "content_types": ["*/*"], "max_body": "unlimited"}
            for p, s in (("/a", "svc-a"), ("/b", "svc-b"))
        ],
    }
    return await make_gateway(config), a, b


def assert_gateway_error(response: Any, status: int) -> None:
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers.get("X-Request-ID")
    body = response.json()
    assert set(body) <= {"detail", "errors"} and body["detail"]


def assert_upstreams_agree(responses: list[Any], *upstreams: Any) -> None:
    """Each upstream answer the client got matches one request an upstream saw, and no upstream
    saw a request the client got no upstream answer for."""
    answered = [
        (r.headers["X-Upstream"], r.json()["method"], r.json()["path"], r.json()["body"])
        for r in responses
        if "X-Upstream" in r.headers
    ]
    seen = [
        (name, q.method, q.raw_path, q.body.decode("latin-1"))
        for name, upstream in zip("ab", upstreams, strict=True)
        for q in upstream.requests
    ]
    assert sorted(answered) == sorted(seen)


REFUSED = {
    "content-length and transfer-encoding": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding and content-length": b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n",
    "duplicate content-length, same value": b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "duplicate content-length, different": b"Content-Length: 3\r\nContent-Length: 10\r\n\r\nabc",
    "content-length list": b"Content-Length: 3, 3\r\n\r\nabc",
    "content-length with sign": b"Content-Length: +3\r\n\r\nabc",
    "negative content-length": b"Content-Length: -1\r\n\r\nabc",
    "hex content-length": b"Content-Length: 0x3\r\n\r\nabc",
    "content-length overflow": b"Content-Length: 99999999999999999999999\r\n\r\nabc",
    "transfer-encoding 'chunked,'": b"Transfer-Encoding: chunked,\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding 'chunked<TAB>'": b"Transfer-Encoding: chunked\t\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding 'chunked, gzip'": b"Transfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding 'xchunked'": b"Transfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding identity with length": b"Transfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc",
    "bare LF inside the headers": b"X-A: a\nContent-Length: 3\r\nContent-Length: 0\r\n\r\nabc",
    "bare CR in a header value": b"X-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "obs-fold hiding transfer-encoding": b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\nabc",
    "whitespace before the colon (length)": b"Content-Length : 3\r\n\r\nabc",
    "whitespace before the colon (encoding)": b"Transfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
    "chunk extension ended by bare LF": b"Transfer-Encoding: chunked\r\n\r\n3;foo\nabc\r\n0\r\n\r\n",
    "junk after the chunk size": b"Transfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n0\r\n\r\n",
    "hex prefix on the chunk size": b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunks ended by bare LF": b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    "content-length in the trailers": b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n",
    "NUL in a header value": b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "space in a header name": b"X A: 1\r\nContent-Length: 0\r\n\r\n",
    "empty header name": b": 1\r\nContent-Length: 0\r\n\r\n",
    "second Host": b"Host: y\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("tail", REFUSED.values(), ids=REFUSED.keys())
async def test_ambiguous_framing_is_refused_and_nothing_reaches_an_upstream(
    two_routes: tuple[Any, Any, Any], tail: bytes
) -> None:
    client, a, b = two_routes
    data = await raw_exchange(client.port, b"POST /a/x HTTP/1.1\r\n" + HOST + tail + SMUGGLED)
    responses = parse_responses(data)
    # One answer, then the connection is closed: the pipelined request is never parsed.
    assert len(responses) == 1
    assert_gateway_error(responses[0], 400)
    assert a.requests == [] and b.requests == []


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /a/x HTTP/1.2\r\n" + HOST,
        b"GET /a/x HTTP/1.1\r\n",  # no Host
        b"GET /a/x\xff HTTP/1.1\r\n" + HOST,
        b"GET /a/x HTTP/1.1 extra\r\n" + HOST,
        b"G@T /a/x HTTP/1.1\r\n" + HOST,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello on the plain port
    ],
    ids=["version 1.2", "no host", "non-ascii target", "extra token", "bad method", "h2 preface", "tls"],
)
async def test_unparseable_request_heads_get_a_json_400(
    two_routes: tuple[Any, Any, Any], request_line: bytes
) -> None:
    client, a, b = two_routes
    data = await raw_exchange(client.port, request_line + b"\r\n" + SMUGGLED)
    responses = parse_responses(data)
    assert len(responses) == 1
    assert_gateway_error(responses[0], 400)
    assert b"smuggled" not in data and a.requests == [] and b.requests == []
    # In the HTTP/1.1 this connection speaks (aiohttp answered these in HTTP/1.0), saying it closes.
    assert data.startswith(b"HTTP/1.1 400 ") and responses[0].headers["Connection"] == "close"


@pytest.mark.parametrize("method", [b"BREW", b"FOO-BAR", b"get", b"X_CUSTOM.1"])
async def test_a_method_the_parser_does_not_know_gets_a_json_501_not_a_400(
    two_routes: tuple[Any, Any, Any], method: bytes
) -> None:
    """A request in good form with an unregistered method (RFC 9110 section 9.1: 501). The ones
    llhttp knows (PROPFIND, PURGE, QUERY, ...) are forwarded like any other."""
    client, a, b = two_routes
    data = await raw_exchange(client.port, method + b" /a/x HTTP/1.1\r\n" + HOST + b"\r\n" + SMUGGLED)
    (response,) = parse_responses(data)
    assert_gateway_error(response, 501)
    assert data.startswith(b"HTTP/1.1 501 ") and response.headers["Connection"] == "close"
    assert a.requests == [] and b.requests == []


@pytest.mark.parametrize("method", ["PROPFIND", "PURGE", "QUERY", "MKCOL", "LINK"])
async def test_registered_methods_beyond_the_common_ones_are_forwarded(
    two_routes: tuple[Any, Any, Any], method: str
) -> None:
    client, a, _ = two_routes
    data = await raw_exchange(
        client.port, f"{method} /a/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    (response,) = parse_responses(data)
    assert response.status == 200 and response.json()["method"] == method
    assert len(a.requests) == 1


async def test_an_http_2_request_line_gets_an_http_1_1_answer_and_a_closed_connection(
    two_routes: tuple[Any, Any, Any],
) -> None:
    client, a, b = two_routes
    data = await raw_exchange(client.port, b"GET /a/x HTTP/2.0\r\n" + HOST + b"\r\n")
    (response,) = parse_responses(data)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert_gateway_error(response, 400)
    assert response.headers["Connection"] == "close"
    assert a.requests == [] and b.requests == []


async def test_a_malformed_request_is_answered_without_a_server_banner(
    two_routes: tuple[Any, Any, Any],
) -> None:
    client, _, _ = two_routes
    data = await raw_exchange(client.port, b"GARBAGE\r\n\r\n")
    (response,) = parse_responses(data)
    assert_gateway_error(response, 400)
    assert "Server" not in response.headers


async def test_a_malformed_request_closes_its_connection_even_when_more_follows(
    two_routes: tuple[Any, Any, Any],
) -> None:
    """After a head the parser refused, where the next request starts cannot be known: the 400
    says `Connection: close` and the connection ends there. Kept open, the bytes after the bad
    head were read as a request of their own (what request smuggling rides on)."""
    client, a, b = two_routes
    data = await raw_exchange(client.port, b"GARBAGE\r\n\r\nGET /a/x HTTP/1.1\r\n" + HOST + b"\r\n")
    (response,) = parse_responses(data)
    assert_gateway_error(response, 400)
    assert response.headers["Connection"] == "close"
    assert a.requests == [] and b.requests == []


async def test_parser_errors_do_not_echo_the_request_bytes(two_routes: tuple[Any, Any, Any]) -> None:
    client, _, _ = two_routes
    data = await raw_exchange(client.port, b"GET /a/x HTTP/1.1\r\n" + HOST + b"X-Secret: s3cr3t\x00\r\n\r\n")
    (response,) = parse_responses(data)
    assert_gateway_error(response, 400)
    assert b"s3cr3t" not in data and b"Traceback" not in data


def assert_closed_after_a_chunked_request(responses: list[Any], b: Any) -> None:
    """A chunked request is answered and its connection closed: what the client pipelined behind
    it is neither answered nor forwarded (the client sends it again on a new connection)."""
    assert [r.status for r in responses] == [200]
    assert responses[0].headers["Connection"] == "close"
    assert b.requests == []


ACCEPTED = {
    # (request head tail + body, the body the upstream must see)
    "content-length with trailing space": (b"Content-Length: 3 \r\n\r\nabc", "abc"),
    "transfer-encoding in capitals": (b"Transfer-Encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "abc"),
    "chunk extensions": (b"Transfer-Encoding: chunked\r\n\r\n3;a=b;c\r\nabc\r\n0;x=y\r\n\r\n", "abc"),
    "long chunk extension": (
        b"Transfer-Encoding: chunked\r\n\r\n3;" + b"x" * 60_000 + b"\r\nabc\r\n0\r\n\r\n",
        "abc",
    ),
    "many tiny chunks": (
        b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 500 + b"0\r\n\r\n",
        "a" * 500,
    ),
    "trailer fields": (b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", "abc"),
    "body that looks like a request": (
        b"Content-Length: 19\r\n\r\nGET /b/x HTTP/1.1\r\n",
        "GET /b/x HTTP/1.1\r\n",
    ),
}


@pytest.mark.parametrize(("tail", "expected"), ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_well_framed_variants_reach_the_upstream_exactly_as_the_gateway_parsed_them(
    two_routes: tuple[Any, Any, Any], tail: bytes, expected: str
) -> None:
    client, a, b = two_routes
    data = await raw_exchange(client.port, b"POST /a/x HTTP/1.1\r\n" + HOST + tail + SMUGGLED)
    responses = parse_responses(data)
    assert [q.body.decode() for q in a.requests] == [expected]
    assert_upstreams_agree(responses, a, b)
    if b"chunked" in tail.lower():
        assert_closed_after_a_chunked_request(responses, b)
    else:
        assert [r.status for r in responses] == [200, 200]
        assert [r.json()["body"] for r in responses] == [expected, ""]
        assert [q.raw_path for q in b.requests] == ["/b/smuggled"]
    # The gateway frames what it forwards itself; the client's framing never crosses.
    (forwarded,) = a.requests
    assert forwarded.values("Transfer-Encoding") in ([], ["chunked"])
    assert not (forwarded.values("Transfer-Encoding") and forwarded.values("Content-Length"))


@pytest.mark.parametrize(
    "first",
    [
        b"GET /a/first HTTP/1.1\r\n" + HOST + b"\r\n",
        b"POST /a/first HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc",
        b"GET /a/first HTTP/1.1\r\n" + HOST + b"\r\nGET /b/second HTTP/1.1\r\n" + HOST + b"\r\n",
    ],
    ids=["get", "post with a body", "two gets"],
)
async def test_pipelined_requests_before_a_malformed_one_are_answered_in_order(
    two_routes: tuple[Any, Any, Any], first: bytes
) -> None:
    """Sent in one write, the requests before a malformed one used to be lost: the 400 went out
    as the answer to the first of them, which the upstream never saw."""
    client, a, b = two_routes
    malformed = b"GET /a/x HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"
    data = await raw_exchange(client.port, first + malformed + SMUGGLED)
    *answered, refused = parse_responses(data)
    expected = [("a", "/a/first")] + ([("b", "/b/second")] if b"second" in first else [])
    assert [(r.headers["X-Upstream"], r.json()["path"]) for r in answered] == expected
    assert_upstreams_agree(answered, a, b)
    assert_gateway_error(refused, 400)


async def test_bytes_after_a_connection_close_request_do_not_cost_it_its_answer(
    two_routes: tuple[Any, Any, Any],
) -> None:
    """llhttp takes anything after a ``Connection: close`` request for an error; with both in one
    write, that error used to be the only answer. The request is answered, the rest ignored
    (RFC 9112 section 9.6)."""
    client, a, b = two_routes
    data = await raw_exchange(
        client.port, b"GET /a/x HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n" + SMUGGLED
    )
    (response,) = parse_responses(data)
    assert response.status == 200 and response.headers["Connection"] == "close"
    assert [q.raw_path for q in a.requests] == ["/a/x"] and b.requests == []


async def test_a_body_split_across_packets_is_framed_once(two_routes: tuple[Any, Any, Any]) -> None:
    client, a, b = two_routes
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        for piece in (
            b"POST /a/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhel",
            b"lo\r\n0\r\n",
            b"\r\n" + SMUGGLED,
        ):
            writer.write(piece)
            await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
    responses = parse_responses(data)
    assert [r.json()["body"] for r in responses] == ["hello"]
    assert_upstreams_agree(responses, a, b)
    assert_closed_after_a_chunked_request(responses, b)


async def test_a_broken_chunk_after_the_head_never_becomes_a_whole_request_upstream(
    two_routes: tuple[Any, Any, Any],
) -> None:
    client, a, b = two_routes
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"POST /a/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        writer.write(b"zz\r\n" + SMUGGLED)
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
    (response,) = parse_responses(data)
    assert_gateway_error(response, 400)
    # The upstream got a truncated body at most, never a complete request, nor the pipelined one.
    assert a.requests == [] and b.requests == []


H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"


async def test_h2c_upgrade_is_answered_in_http1_and_the_connection_closed(
    two_routes: tuple[Any, Any, Any],
) -> None:
    client, a, b = two_routes
    # raw_exchange reads until EOF: before the fix this waited for the keep-alive timeout.
    data = await raw_exchange(client.port, b"GET /a/x HTTP/1.1\r\n" + HOST + H2C + b"\r\n" + SMUGGLED, 3)
    (response,) = parse_responses(data)
    assert response.status == 200 and response.headers["Connection"] == "close"
    (forwarded,) = a.requests
    assert not forwarded.names() & {"upgrade", "http2-settings", "connection"}
    assert b.requests == []


async def test_h2c_upgrade_with_a_body_never_splits_the_body_into_a_request(
    two_routes: tuple[Any, Any, Any],
) -> None:
    client, a, b = two_routes
    body = b"GET /b/inner HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"POST /a/x HTTP/1.1\r\n" + HOST + H2C + b"Content-Length: %d\r\n\r\n" % len(body)
    data = await raw_exchange(client.port, head + body + SMUGGLED, 3)
    responses = parse_responses(data)
    assert len(responses) == 1
    assert b.requests == []
    assert_upstreams_agree(responses, a, b)


@pytest.mark.parametrize(
    "coding", [b"gzip, chunked", b"deflate, chunked", b"identity, chunked", b"chunked, chunked"]
)
async def test_transfer_codings_other_than_chunked_are_refused(
    two_routes: tuple[Any, Any, Any], coding: bytes
) -> None:
    client, a, b = two_routes
    head = b"POST /a/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: " + coding + b"\r\n\r\n"
    data = await raw_exchange(client.port, head + b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED)
    responses = parse_responses(data)
    assert_gateway_error(responses[0], 400)
    assert a.requests == []
    assert_upstreams_agree(responses, a, b)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"TRACE"])
@pytest.mark.parametrize(
    "framing", [b"Content-Length: 3\r\n\r\nabc", b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"]
)
async def test_a_body_on_get_head_or_trace_is_refused(
    two_routes: tuple[Any, Any, Any], method: bytes, framing: bytes
) -> None:
    client, a, b = two_routes
    data = await raw_exchange(client.port, method + b" /a/x HTTP/1.1\r\n" + HOST + framing + SMUGGLED)
    responses = parse_responses(data) if method != b"HEAD" else []
    if responses:
        assert_gateway_error(responses[0], 400)
    else:
        assert data.startswith(b"HTTP/1.1 400 ")
    assert a.requests == []
    assert [q.raw_path for q in b.requests] in ([], ["/b/smuggled"])


async def test_get_with_an_empty_content_length_is_forwarded(two_routes: tuple[Any, Any, Any]) -> None:
    client, a, _ = two_routes
    data = await raw_exchange(
        client.port, b"GET /a/x HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    (response,) = parse_responses(data)
    assert response.status == 200 and [q.method for q in a.requests] == ["GET"]


@pytest.mark.parametrize("method", [b"DELETE", b"OPTIONS"])
async def test_a_chunked_body_on_delete_is_forwarded_with_framing_the_upstream_agrees_on(
    two_routes: tuple[Any, Any, Any], method: bytes
) -> None:
    client, a, b = two_routes
    head = method + b" /a/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
    data = await raw_exchange(client.port, head + b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED)
    responses = parse_responses(data)
    assert [r.json()["body"] for r in responses] == ["abc"]
    assert_upstreams_agree(responses, a, b)
    assert_closed_after_a_chunked_request(responses, b)


async def test_a_request_trailer_never_becomes_a_header_of_the_next_request(
    make_gateway: Any, make_upstream: Any
) -> None:
    """aiohttp's C parser hands the last trailer field of a chunked body to the next request on
    the connection; behind a proxy that shares connections, that request is another client's."""
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        return web.Response(text="ok")

    upstream = await make_upstream(record)
    client = await make_gateway(
        {
            "services": {"s": {"url": upstream.url}},
            "routes": [{"prefix": "/", "service": "s", "auth": "none", "content_types": ["*/*"]}],
        }
    )
    first = b"POST /one HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    trailer = b"X-Leak: from-the-trailer\r\n\r\n"
    second = b"GET /two HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    # Pipelined in one write, and in two: the next request parsed on the same connection either way.
    statuses = []
    for pieces in ((first + trailer + second,), (first + trailer, second)):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
            async with asyncio.timeout(5):
                data = await reader.read()
        finally:
            writer.close()
        statuses.append([r.status for r in parse_responses(data)])
    assert [h.get("X-Leak") for h in seen if "X-Leak" in h] == []
    assert statuses == [[200], [200]]  # the connection closed after the chunked request


async def test_an_http_0_9_request_is_refused(two_routes: tuple[Any, Any, Any]) -> None:
    client, a, b = two_routes
    data = await raw_exchange(client.port, b"GET /a/x\r\n\r\n")
    (response,) = parse_responses(data)
    assert_gateway_error(response, 400)
    assert a.requests == [] and b.requests == []


# -- mutation fuzzing: whatever the bytes, gateway and upstreams agree ---------------------------

INSERTS = [b"\r", b"\n", b" ", b"\t", b"\r\n", b"\x00", b",", b";", b"0\r\n\r\n", b"\r\n\r\n",
           b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n", b"Content-Length: 5\r\n",
           b"Content-Length: 0\r\n", b"Connection: upgrade\r\nUpgrade: h2c\r\n", b"Expect: 100-continue\r\n"]  # fmt: skip
BASES = [
    b"POST /a/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    b"POST /a/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED,
]


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(BASES))
    start = data.index(b"\r\n") + 2  # keep the first request line: mutate headers, body, and on
    for _ in range(draw(st.integers(1, 3))):
        line_starts = [i + 2 for i in range(start, len(data)) if data[i : i + 2] == b"\r\n"]
        at = draw(st.one_of(st.integers(start, len(data)), st.sampled_from(line_starts or [start])))
        if draw(st.integers(0, 3)):
            data = data[:at] + draw(st.sampled_from(INSERTS)) + data[at:]
        else:
            data = data[:at] + data[at + 1 :]
    return data


@settings(
    max_examples=fuzz_examples(60), deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(data=mutated_requests())
async def test_mutated_requests_never_desynchronise_gateway_and_upstreams(
    make_gateway: Any, make_upstream: Any, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    monkeypatch.setattr(httpserver, "BODY_IDLE_TIMEOUT", 0.2)
    a = await make_upstream(functools.partial(_echo, name="a"))
    b = await make_upstream(functools.partial(_echo, name="b"))
    config = {
        "services": {"svc-a": {"url": a.url}, "svc-b": {"url": b.url}},
        "routes": [
            {"prefix": p, "service": s, "auth": "none", "content_types": ["*/*"], "max_body": "unlimited"}
            for p, s in (("/a", "svc-a"), ("/b", "svc-b"))
        ],
    }
    client = await make_gateway(config, server_kwargs={"keepalive_timeout": 0.3, "lingering_time": 0.05})
    received = await raw_exchange(client.port, data, 5)
    assert b"Traceback" not in received
    responses = parse_responses(received.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b""))
    for response in responses:
        assert response.status < 500, response
        if response.status != 200:
            assert response.headers["Content-Type"] == "application/json"
    assert_upstreams_agree([r for r in responses if r.status == 200], a, b)


def test_the_strict_c_parser_is_the_one_in_use() -> None:
    # Every test above relies on llhttp; the pure-Python fallback is more lenient.
    assert httpserver.STRICT_PARSER


@pytest.mark.parametrize("target", [b"/health", b"/a/x"])
@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_an_unspoken_http_version_is_a_400_in_http_1_1_on_every_path(
    two_routes: tuple[Any, Any, Any], target: bytes, version: bytes
) -> None:
    client, a, _ = two_routes
    data = await raw_exchange(client.port, b"GET " + target + b" " + version + b"\r\n" + HOST + b"\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data[:60]
    (response,) = parse_responses(data)
    assert_gateway_error(response, 400)
    assert a.requests == []


async def test_an_http_1_0_keep_alive_client_gets_a_streamed_answer_ended_by_the_close(
    make_gateway: Any, make_upstream: Any
) -> None:
    """HTTP/1.0 has no chunks: an answer of unknown length ends where the connection does. Left
    open, the client would wait for more, and take the next answer for part of this body."""

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no length: chunked to the gateway
        await response.prepare(request)
        await response.write(b"streamed-body")
        await response.write_eof()
        return response

    upstream = await make_upstream(streamed)
    client = await make_gateway(
        {
            "services": {"s": {"url": upstream.url}},
            "routes": [{"prefix": "/", "service": "s", "auth": "none"}],
        }
    )
    keep_alive = HOST + b"Connection: keep-alive\r\n\r\n"
    data = await raw_exchange(
        client.port, b"GET /one HTTP/1.0\r\n" + keep_alive + b"GET /two HTTP/1.0\r\n" + keep_alive
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"Transfer-Encoding" not in head and b"keep-alive" not in head.lower()
    assert body == b"streamed-body"  # and nothing after it: the connection closed
    assert [r.raw_path for r in upstream.requests] == ["/one"]


class _Lines(AbstractAccessLogger):
    seen: list[tuple[int, str | None]] = []

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.seen.append((response.status, request.get(request_id_key)))


async def test_a_request_the_parser_refuses_is_logged_with_the_id_its_answer_carries(
    make_gateway: Any, make_upstream: Any
) -> None:
    _Lines.seen = []
    upstream = await make_upstream()
    client = await make_gateway(
        {
            "services": {"s": {"url": upstream.url}},
            "routes": [{"prefix": "/", "service": "s", "auth": "none"}],
        },
        server_kwargs={"access_log_class": _Lines, "access_log": logging.getLogger("test.access")},
    )
    data = await raw_exchange(client.port, b"GARBAGE\r\n\r\n")
    (response,) = parse_responses(data)
    assert_gateway_error(response, 400)
    assert _Lines.seen == [(400, response.headers["X-Request-ID"])]
