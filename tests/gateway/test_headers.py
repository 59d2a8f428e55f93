"""Header rules in both directions: hop-by-hop never crosses, forwarding headers are the gateway's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import one_service, raw_exchange

# (headers the client sends, header names the upstream must not see)
REQUEST_HOP_BY_HOP = [
    pytest.param([("Keep-Alive", "timeout=5, max=100")], ["keep-alive"], id="keep-alive"),
    pytest.param([("TE", "trailers")], ["te"], id="te"),
    pytest.param([("Trailer", "X-Checksum")], ["trailer"], id="trailer"),
    pytest.param([("Upgrade", "h2c")], ["upgrade"], id="upgrade"),
    pytest.param([("Proxy-Connection", "keep-alive")], ["proxy-connection"], id="proxy-connection"),
    pytest.param([("Proxy-Authorization", "Basic dTpw")], ["proxy-authorization"], id="proxy-authorization"),
    pytest.param([("Proxy-Authenticate", "Basic")], ["proxy-authenticate"], id="proxy-authenticate"),
    pytest.param([("HTTP2-Settings", "AAMAAABkAAQAAP__")], ["http2-settings"], id="http2-settings"),
    pytest.param([("Connection", "keep-alive")], ["connection"], id="connection"),
    pytest.param(
        [("Connection", "X-Hop-Secret"), ("X-Hop-Secret", "1")],
        ["connection", "x-hop-secret"],
        id="header-named-by-connection",
    ),
    pytest.param(
        [("Connection", "x-a ,X-B"), ("X-A", "1"), ("X-B", "2")],
        ["connection", "x-a", "x-b"],
        id="several-named-by-connection",
    ),
    pytest.param(
        [("Connection", "X-A"), ("Connection", "X-B"), ("X-A", "1"), ("X-B", "2")],
        ["connection", "x-a", "x-b"],
        id="repeated-connection-headers",
    ),
    pytest.param(
        [("X-Auth-Subject", "admin"), ("X-Auth-Scopes", "everything")],
        ["x-auth-subject", "x-auth-scopes"],
        id="client-sent-identity",
    ),
    pytest.param(
        [("x-auth-subject", "admin"), ("X-AUTH-SCOPES", "everything"), ("X-Auth-Subject", "root")],
        ["x-auth-subject", "x-auth-scopes"],
        id="client-sent-identity-any-case-repeated",
    ),
]

# (header lines the upstream answers with, header names the client must not see)
RESPONSE_HOP_BY_HOP = [
    pytest.param([("Keep-Alive", "timeout=5")], ["keep-alive"], id="keep-alive"),
    pytest.param([("TE", "trailers")], ["te"], id="te"),
    pytest.param([("Trailer", "X-Checksum")], ["trailer"], id="trailer"),
    pytest.param([("Upgrade", "h2c")], ["upgrade"], id="upgrade"),
    pytest.param([("Proxy-Connection", "keep-alive")], ["proxy-connection"], id="proxy-connection"),
    pytest.param([("Proxy-Authenticate", "Basic realm=x")], ["proxy-authenticate"], id="proxy-authenticate"),
    pytest.param([("Proxy-Authorization", "Basic dTpw")], ["proxy-authorization"], id="proxy-authorization"),
    pytest.param([("Connection", "keep-alive")], ["connection"], id="connection"),
    pytest.param(
        [("Connection", "X-Hop-Secret"), ("X-Hop-Secret", "1")],
        ["connection", "x-hop-secret"],
        id="header-named-by-connection",
    ),
    pytest.param(
        [("Connection", "X-A, x-b"), ("X-A", "1"), ("X-B", "2")],
        ["connection", "x-a", "x-b"],
        id="several-named-by-connection",
    ),
]


def header_names(raw: bytes) -> dict[str, list[str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    found: dict[str, list[str]] = {}
    for line in head:
        name, _, value = line.partition(":")
        found.setdefault(name.strip().lower(), []).append(value.strip())
    return found


@pytest.fixture
async def recording_gateway(make_gateway: Any, make_upstream: Any) -> tuple[Any, Any]:
    upstream = await make_upstream()
    return await make_gateway(one_service(upstream.url)), upstream


@pytest.mark.parametrize(("sent", "absent"), REQUEST_HOP_BY_HOP)
async def test_hop_by_hop_request_headers_do_not_reach_the_upstream(
    recording_gateway: tuple[Any, Any], sent: list[tuple[str, str]], absent: list[str]
) -> None:
    client, upstream = recording_gateway
    lines = "".join(f"{name}: {value}\r\n" for name, value in sent)
    # Raw bytes: aiohttp's client would add or merge some of these itself.
    request = f"GET /x HTTP/1.1\r\nHost: gw.test\r\n{lines}X-Kept: yes\r\nConnection: close\r\n\r\n"

    raw = await raw_exchange(client.port, request.encode())

    assert raw.startswith(b"HTTP/1.1 200 ")
    [received] = upstream.requests
    assert received.names().isdisjoint(absent)
    assert received.values("X-Kept") == ["yes"]


@pytest.mark.parametrize("body_size", [10, 200_000], ids=["buffered", "streamed"])
@pytest.mark.parametrize(("sent", "absent"), RESPONSE_HOP_BY_HOP)
async def test_hop_by_hop_response_headers_do_not_reach_the_client(
    make_gateway: Any,
    make_raw_upstream: Callable[..., Awaitable[str]],
    sent: list[tuple[str, str]],
    absent: list[str],
    body_size: int,
) -> None:
    lines = "".join(f"{name}: {value}\r\n" for name, value in sent)
    response = f"HTTP/1.1 200 OK\r\nContent-Length: {body_size}\r\n{lines}X-Kept: yes\r\n\r\n"

    async def answer(reader: Any, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response.encode() + b"b" * body_size)
        await writer.drain()

    client = await make_gateway(one_service(await make_raw_upstream(answer)))

    # HTTP/1.1 without Connection: close, so the gateway has no reason to add a Connection header.
    async with client.session.get(client.make_url("/x")) as reply:
        body = await reply.read()

    assert reply.status == 200
    assert len(body) == body_size
    assert {name.lower() for name in reply.headers}.isdisjoint(absent)
    assert reply.headers.getall("X-Kept") == ["yes"]


async def test_x_forwarded_for_is_set_to_the_client_address(recording_gateway: tuple[Any, Any]) -> None:
    client, upstream = recording_gateway
    await client.get("/x")
    assert upstream.requests[0].values("X-Forwarded-For") == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param([("X-Forwarded-For", "203.0.113.7")], "203.0.113.7, 127.0.0.1", id="one"),
        pytest.param(
            [("X-Forwarded-For", "203.0.113.7, 198.51.100.2")],
            "203.0.113.7, 198.51.100.2, 127.0.0.1",
            id="list",
        ),
        pytest.param(
            [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.2")],
            "203.0.113.7, 198.51.100.2, 127.0.0.1",
            id="repeated-header",
        ),
    ],
)
async def test_x_forwarded_for_is_appended_to_the_existing_chain(
    recording_gateway: tuple[Any, Any], sent: list[tuple[str, str]], expected: str
) -> None:
    client, upstream = recording_gateway
    lines = "".join(f"{name}: {value}\r\n" for name, value in sent)

    await raw_exchange(
        client.port, f"GET /x HTTP/1.1\r\nHost: a\r\n{lines}Connection: close\r\n\r\n".encode()
    )

    assert upstream.requests[0].values("X-Forwarded-For") == [expected]


@pytest.mark.parametrize(
    "named",
    ["X-Forwarded-For", "x-forwarded-proto", "X-Forwarded-Host", "Via", "X-Forwarded-For, Via, X-Other"],
)
async def test_connection_header_cannot_remove_forwarding_headers(
    recording_gateway: tuple[Any, Any], named: str
) -> None:
    client, upstream = recording_gateway
    request = (
        f"GET /x HTTP/1.1\r\nHost: gw.test\r\nX-Forwarded-For: 203.0.113.7\r\nVia: 1.0 edge\r\n"
        f"Connection: {named}\r\nConnection: close\r\n\r\n"
    )

    await raw_exchange(client.port, request.encode())

    [received] = upstream.requests
    assert received.values("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert received.values("X-Forwarded-Proto") == ["http"]
    assert received.values("X-Forwarded-Host") == ["gw.test"]
    assert received.values("Via") == ["1.0 edge, 1.1 gateway"]


async def test_x_forwarded_proto_and_host_describe_the_client_request(
    recording_gateway: tuple[Any, Any],
) -> None:
    client, upstream = recording_gateway
    await client.get("/x", headers={"Host": "api.example.test:8443"})

    [received] = upstream.requests
    assert received.values("X-Forwarded-Proto") == ["http"]
    assert received.values("X-Forwarded-Host") == ["api.example.test:8443"]


async def test_client_sent_x_forwarded_proto_and_host_are_replaced(
    recording_gateway: tuple[Any, Any],
) -> None:
    client, upstream = recording_gateway
    await client.get(
        "/x",
        headers={"Host": "real.test", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "spoofed.test"},
    )

    [received] = upstream.requests
    assert received.values("X-Forwarded-Proto") == ["http"]
    assert received.values("X-Forwarded-Host") == ["real.test"]


@pytest.mark.parametrize(
    ("sent", "proto", "host"),
    [
        pytest.param(
            {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.test"},
            "https",
            "api.example.test",
            id="kept",
        ),
        pytest.param({"X-Forwarded-Proto": "HTTPS"}, "https", "real.test", id="proto-only"),
        pytest.param(
            {"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "bad host"}, "http", "real.test", id="invalid"
        ),
        pytest.param({"X-Forwarded-Proto": "https, http"}, "http", "real.test", id="a-list"),
    ],
)
async def test_x_forwarded_proto_and_host_from_a_trusted_proxy_are_kept(
    make_gateway: Any, make_upstream: Any, sent: dict[str, str], proto: str, host: str
) -> None:
    # Behind a load balancer that terminates TLS, the backend must hear "https" to build its links.
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url), {"TRUSTED_PROXIES": "127.0.0.1/32"})
    await client.get("/x", headers={"Host": "real.test", **sent})

    [received] = upstream.requests
    assert received.values("X-Forwarded-Proto") == [proto]
    assert received.values("X-Forwarded-Host") == [host]


CLIENT_ADDRESS_HEADERS = {
    "Forwarded": "for=203.0.113.9;host=spoofed.test;proto=https",
    "X-Real-IP": "203.0.113.9",
    "True-Client-IP": "203.0.113.9",
    "X-Client-IP": "203.0.113.9",
    "X-Cluster-Client-IP": "203.0.113.9",
    "X_Real_IP": "203.0.113.9",
}


async def test_a_clients_word_for_its_own_address_does_not_reach_the_upstream(
    recording_gateway: tuple[Any, Any],
) -> None:
    # A backend behind nginx's realip or Spring's ForwardedHeaderFilter would take it as true.
    client, upstream = recording_gateway
    await client.get("/x", headers={"Host": "real.test", **CLIENT_ADDRESS_HEADERS})

    [received] = upstream.requests
    assert not [name for name in CLIENT_ADDRESS_HEADERS if received.values(name)]
    assert received.values("X-Forwarded-Host") == ["real.test"]


async def test_a_trusted_proxys_client_address_headers_reach_the_upstream(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url), {"TRUSTED_PROXIES": "127.0.0.1/32"})
    sent = {name: value for name, value in CLIENT_ADDRESS_HEADERS.items() if "_" not in name}
    await client.get("/x", headers=sent)

    [received] = upstream.requests
    assert {name: received.values(name) for name in sent} == {name: [value] for name, value in sent.items()}


async def test_host_header_names_the_target(recording_gateway: tuple[Any, Any]) -> None:
    client, upstream = recording_gateway
    await client.get("/x", headers={"Host": "api.example.test"})
    assert upstream.requests[0].values("Host") == [upstream.url.removeprefix("http://")]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (None, "1.1 gateway"),
        ("1.0 edge", "1.0 edge, 1.1 gateway"),
        ("1.1 a, 1.1 b", "1.1 a, 1.1 b, 1.1 gateway"),
    ],
)
async def test_via_is_added(recording_gateway: tuple[Any, Any], sent: str | None, expected: str) -> None:
    client, upstream = recording_gateway
    await client.get("/x", headers={"Via": sent} if sent else {})
    assert upstream.requests[0].values("Via") == [expected]


async def test_via_names_the_protocol_the_gateway_received(recording_gateway: tuple[Any, Any]) -> None:
    """RFC 9110 section 7.6.3: Via's received-protocol is the version of the message as received;
    an HTTP/1.0 request was announced upstream as 1.1."""
    client, upstream = recording_gateway
    await raw_exchange(client.port, b"GET /x HTTP/1.0\r\nVia: 1.0 edge\r\n\r\n")
    await raw_exchange(client.port, b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert [q.values("Via") for q in upstream.requests] == [["1.0 edge, 1.0 gateway"], ["1.1 gateway"]]


async def test_end_to_end_headers_reach_the_upstream_unchanged(recording_gateway: tuple[Any, Any]) -> None:
    client, upstream = recording_gateway
    sent = [
        ("Authorization", "Bearer abc.def"),
        ("Accept", "application/json"),
        ("Cookie", "a=1; b=2"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
    ]
    lines = "".join(f"{name}: {value}\r\n" for name, value in sent)

    await raw_exchange(
        client.port, f"GET /x HTTP/1.1\r\nHost: a\r\n{lines}Connection: close\r\n\r\n".encode()
    )

    [received] = upstream.requests
    for name, _ in sent:
        assert received.values(name) == [v for n, v in sent if n == name]


async def test_expect_100_continue_is_answered_by_the_gateway_not_forwarded(
    recording_gateway: tuple[Any, Any],
) -> None:
    client, upstream = recording_gateway
    response = await client.post("/x", data=b"payload", headers={"Expect": "100-continue"})

    assert response.status == 200
    [received] = upstream.requests
    assert "expect" not in received.names()
    assert received.body == b"payload"


async def test_upstream_end_to_end_response_headers_reach_the_client(
    make_gateway: Any, make_upstream: Any
) -> None:
    async def reply(request: web.Request) -> web.Response:
        response = web.Response(text="ok", headers={"Cache-Control": "max-age=60", "ETag": '"v1"'})
        response.headers.add("X-Multi", "1")
        response.headers.add("X-Multi", "2")
        return response

    client = await make_gateway(one_service((await make_upstream(reply)).url))

    response = await client.get("/x")

    assert response.headers["Cache-Control"] == "max-age=60"
    assert response.headers["ETag"] == '"v1"'
    assert response.headers.getall("X-Multi") == ["1", "2"]


# Header values are bytes: RFC 9110 section 5.5 allows obs-text (0x80-0xFF) in them, and Latin-1
# file names and legacy cookies carry it. aiohttp decodes such bytes with surrogateescape and its
# C serialiser drops them; the gateway must hand on what it received, byte for byte.
OBS_TEXT = b"caf\xe9 \xff\xfe"
UTF8 = "café ✓".encode()


@pytest.mark.parametrize("body_size", [10, 200_000], ids=["buffered", "streamed"])
async def test_header_bytes_that_are_not_utf8_cross_unchanged_both_ways(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]], body_size: int
) -> None:
    received: list[bytes] = []

    async def answer(reader: Any, writer: Any) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        received.append(head)
        length = int(header_names(head).get("content-length", ["0"])[0])
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Odd: %s\r\nX-Utf: %s\r\n\r\n"
            % (body_size, OBS_TEXT, UTF8)
            + b"b" * body_size
        )
        await writer.drain()

    client = await make_gateway(one_service(await make_raw_upstream(answer)))
    body = b"u" * body_size
    raw = await raw_exchange(
        client.port,
        b"POST /x HTTP/1.1\r\nHost: a\r\nX-Latin: %s\r\nX-Utf: %s\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (OBS_TEXT, UTF8, len(body), body),
    )

    [head] = received
    assert b"\r\nX-Latin: " + OBS_TEXT + b"\r\n" in head
    assert b"\r\nX-Utf: " + UTF8 + b"\r\n" in head
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nX-Odd: " + OBS_TEXT + b"\r\n" in raw
    assert b"\r\nX-Utf: " + UTF8 + b"\r\n" in raw
    assert raw.endswith(b"\r\n\r\n" + b"b" * body_size)


async def test_a_control_character_in_a_header_the_gateway_writes_is_still_refused() -> None:
    from multidict import CIMultiDict

    from gateway.headers import serialize_head

    for value in ("a\r\nX-Injected: 1", "caf\udce9\r\nX-Injected: 1", "\udce9\x00"):
        with pytest.raises(ValueError, match="control character"):
            serialize_head("GET / HTTP/1.1", CIMultiDict({"X-Subject": value}))
    assert serialize_head("GET / HTTP/1.1", CIMultiDict({"X-Tab": "a\tb\udce9"})) == (
        b"GET / HTTP/1.1\r\nX-Tab: a\tb\xe9\r\n\r\n"
    )


async def test_no_server_banner_is_added_and_an_upstreams_own_server_header_stays(
    make_gateway: Any, make_raw_upstream: Callable[..., Awaitable[str]]
) -> None:
    async def answer(reader: Any, writer: Any) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        server = b"Server: Python/3.11 aiohttp/3.14.5\r\n" if b"/own" in head else b""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + server + b"\r\nok")
        await writer.drain()

    client = await make_gateway(one_service(await make_raw_upstream(answer), prefix="/api"))

    bare = await raw_exchange(client.port, b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    own = await raw_exchange(client.port, b"GET /api/own HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    ours = await raw_exchange(client.port, b"GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")

    assert bare.startswith(b"HTTP/1.1 200 ")
    assert "server" not in header_names(bare)
    # An upstream's header is relayed whatever it says, even the very string aiohttp would add.
    assert header_names(own)["server"] == ["Python/3.11 aiohttp/3.14.5"]
    assert ours.startswith(b"HTTP/1.1 404 ")
    assert "server" not in header_names(ours)


@pytest.mark.parametrize(
    ("method", "sent", "forwarded"),
    [
        ("TRACE", "3", "2"),
        ("OPTIONS", "1", "0"),
        ("OPTIONS", "99999999999999999999", "255"),
        ("GET", "0", "0"),
    ],
)
async def test_max_forwards_is_counted_down_on_trace_and_options(
    recording_gateway: tuple[Any, Any], method: str, sent: str, forwarded: str
) -> None:
    """RFC 9110 section 7.6.2: an intermediary passes Max-Forwards on TRACE and OPTIONS one lower
    (other methods may ignore it, and do); it used to pass it on unchanged."""
    client, upstream = recording_gateway
    response = await client.request(method, "/x", headers={"Max-Forwards": sent})
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.values("Max-Forwards") == [forwarded]


async def test_options_with_max_forwards_zero_is_answered_by_the_gateway(
    recording_gateway: tuple[Any, Any],
) -> None:
    client, upstream = recording_gateway
    response = await client.options("/x", headers={"Max-Forwards": "0"})
    assert response.status == 200 and await response.read() == b""
    assert "OPTIONS" in response.headers["Allow"]
    assert upstream.requests == []


async def test_trace_with_max_forwards_zero_reflects_the_request_without_credentials(
    recording_gateway: tuple[Any, Any],
) -> None:
    """The gateway is then the final recipient: it reflects the request as message/http and,
    as RFC 9110 section 9.3.8 asks, leaves out the fields likely to carry credentials."""
    client, upstream = recording_gateway
    request = (
        b"TRACE /x?q=1 HTTP/1.1\r\nHost: gw\r\nMax-Forwards: 0\r\nAuthorization: Bearer s3cret\r\n"
        b"Cookie: session=s3cret\r\nX-Probe: 1\r\nConnection: close\r\n\r\n"
    )
    data = await raw_exchange(client.port, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: message/http" in head
    assert body.startswith(b"TRACE /x?q=1 HTTP/1.1\r\n")
    assert b"X-Probe: 1\r\n" in body and b"Max-Forwards: 0\r\n" in body
    assert b"s3cret" not in body
    assert upstream.requests == []


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "\u0661"])
async def test_a_malformed_max_forwards_on_trace_or_options_is_a_400(
    recording_gateway: tuple[Any, Any], value: str
) -> None:
    client, upstream = recording_gateway
    response = await client.options("/x", headers={"Max-Forwards": value})
    assert response.status == 400 and "Max-Forwards" in (await response.json())["detail"]
    assert upstream.requests == []
