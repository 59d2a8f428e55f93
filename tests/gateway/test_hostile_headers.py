"""Header tricks: identity spoofing on every auth mode, Connection-named headers the gateway owns,
HTTP/2 upgrade headers. Everything is checked at a real upstream."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from tests.helpers import parse_responses, raw_exchange

SECRET = "hostile-test-secret-" + "x" * 32
OWNED = [
    "x-auth-subject",
    "x-auth-scopes",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "via",
    "traceparent",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
]


def _token(sub: str = "alice", scope: str = "read") -> str:
    return jwt.encode({"sub": sub, "scope": scope, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


def _config(url: str) -> dict[str, Any]:
    return {
        "services": {"svc": {"url": url}},
        "routes": [
            {"prefix": f"/{mode}", "service": "svc", "auth": mode, "content_types": ["*/*"]}
            for mode in ("required", "optional", "none")
        ],
    }


@pytest.fixture(params=["true", "false"], ids=["auth-enabled", "auth-disabled"])
async def gateway(request: Any, make_gateway: Any, make_upstream: Any) -> tuple[Any, Any, bool]:
    upstream = await make_upstream()
    enabled = request.param == "true"
    client = await make_gateway(
        _config(upstream.url), {"AUTH_ENABLED": request.param, "AUTH_JWT_SECRET": SECRET}
    )
    return client, upstream, enabled


SPOOF_VARIANTS = [
    [("X-Auth-Subject", "admin"), ("X-Auth-Scopes", "admin")],
    [("x-auth-subject", "admin"), ("X-AUTH-SUBJECT", "root")],
    [("X-Auth-Subject", "admin"), ("Connection", "x-auth-subject")],
    # CGI and WSGI backends read both as HTTP_X_AUTH_SUBJECT, next to the gateway's own
    [("X_Auth_Subject", "mallory"), ("x_auth_scopes", "admin")],
    [("X-Auth_Subject", "mallory"), ("X_AUTH-SCOPES", "admin"), ("x_auth-subject", "root")],
]
SPOOF_IDS = ["plain", "case-variants", "named-in-connection", "underscores", "mixed-separators"]


def cgi_values(seen: Any, name: str) -> list[str]:
    """The values a CGI/WSGI backend would find under ``name``: "_" and "-" alike, any case."""
    wanted = name.lower().replace("_", "-")
    return [v for k, v in seen.headers if k.lower().replace("_", "-") == wanted]


@pytest.mark.parametrize("mode", ["required", "optional", "none"])
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "anonymous"])
@pytest.mark.parametrize("spoof", SPOOF_VARIANTS, ids=SPOOF_IDS)
async def test_client_sent_identity_headers_never_reach_the_upstream(
    gateway: tuple[Any, Any, bool], mode: str, with_token: bool, spoof: list[tuple[str, str]]
) -> None:
    client, upstream, enabled = gateway
    headers = list(spoof)
    if with_token:
        headers.append(("Authorization", f"Bearer {_token()}"))
    response = await client.get(f"/{mode}/x", headers=headers)
    if enabled and mode == "required" and not with_token:
        assert response.status == 401
        assert upstream.requests == []
        return
    assert response.status == 200
    (seen,) = upstream.requests
    authenticated = enabled and with_token and mode != "none"
    if authenticated:
        assert cgi_values(seen, "x-auth-subject") == ["alice"]
        assert cgi_values(seen, "x-auth-scopes") == ["read"]
    else:
        assert cgi_values(seen, "x-auth-subject") == [] and cgi_values(seen, "x-auth-scopes") == []


SET_BY_THE_GATEWAY = [
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
]


@pytest.mark.parametrize("name", SET_BY_THE_GATEWAY)
async def test_underscore_spellings_of_headers_the_gateway_sets_never_reach_the_upstream(
    make_gateway: Any, make_upstream: Any, name: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    spellings = [name.replace("-", "_"), name.replace("-", "_").upper(), name.replace("-", "_", 1)]
    response = await client.get("/none/x", headers=[(spelling, "6.6.6.6") for spelling in spellings])
    assert response.status == 200
    (seen,) = upstream.requests
    assert not [k for k, _ in seen.headers if "_" in k]
    assert "6.6.6.6" not in cgi_values(seen, name)  # only what the gateway set itself, if anything


async def test_other_header_names_with_underscores_still_reach_the_upstream(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    sent = [("api_key", "k1"), ("X_Custom_Thing", "v"), ("X-Auth-Subject_Extra", "x")]
    response = await client.get("/none/x", headers=sent)
    assert response.status == 200
    (seen,) = upstream.requests
    for name, value in sent:
        assert seen.values(name) == [value]


@pytest.mark.parametrize("named", OWNED)
async def test_connection_cannot_strip_headers_the_gateway_sets(
    make_gateway: Any, make_upstream: Any, named: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url), {"AUTH_JWT_SECRET": SECRET})
    response = await client.get(
        "/required/x",
        headers={
            "Authorization": f"Bearer {_token()}",
            "Connection": f"keep-alive, {named}",
            named: "client",
        },
    )
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.values(named), f"{named} was stripped"
    if named.startswith(("x-auth", "x-b3", "traceparent")):
        assert seen.values(named) != ["client"]


async def test_connection_named_end_to_end_headers_are_dropped(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    response = await client.get(
        "/none/x",
        headers={"Connection": "x-private, x-other", "X-Private": "1", "X-Other": "2", "X-Kept": "3"},
    )
    assert response.status == 200
    (seen,) = upstream.requests
    assert not seen.names() & {"x-private", "x-other", "connection"}
    assert seen.values("X-Kept") == ["3"]


async def test_http2_upgrade_headers_are_never_forwarded(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    response = await client.get(
        "/none/x",
        headers={
            "Connection": "Upgrade, HTTP2-Settings",
            "Upgrade": "h2c",
            "HTTP2-Settings": "AAMAAABkAAQAAP__",
        },
    )
    assert response.status == 200
    (seen,) = upstream.requests
    assert not seen.names() & {"upgrade", "http2-settings", "connection"}


async def test_a_request_id_with_control_characters_is_replaced(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    response = await client.get("/none/x", headers={"X-Request-ID": "abc\tdef"})
    assert response.status == 200
    (seen,) = upstream.requests
    (rid,) = seen.values("x-request-id")
    assert rid != "abc\tdef" and rid == response.headers["X-Request-ID"]


@pytest.mark.parametrize("path", [b"/none/x", b"/health", b"/openapi.json"])
@pytest.mark.parametrize("expect", [b"foo", b"\x80\xff", b"100-continue, foo"])
async def test_an_unsupported_expectation_gets_a_json_417(
    make_gateway: Any, make_upstream: Any, path: bytes, expect: bytes
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    data = await raw_exchange(
        client.port,
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nExpect: " + expect + b"\r\nConnection: close\r\n\r\n",
    )
    (response,) = parse_responses(data)
    assert response.status == 417
    assert response.headers["Content-Type"] == "application/json" and response.headers.get("X-Request-ID")
    assert expect not in response.body
    assert upstream.requests == []


async def test_expect_100_continue_still_gets_the_interim_answer(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    head = b"POST /none/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
    data = await raw_exchange(client.port, head + b"abc")
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
    assert [q.body for q in upstream.requests] == [b"abc"]


# -- client values quoted in the gateway's own errors -----------------------------------------------

# aiohttp decodes header bytes that are not UTF-8 to lone surrogates; quoting one back once made
# the error body unencodable, and the request a 500.
QUOTED_CONTENT_TYPES = {
    "not UTF-8": (b"application/json\xe9", "'application/json\\xe9'"),
    "obs-text only": (b"\xff\xfe", "'\\xff\\xfe'"),
    "UTF-8": ("application/jsoné".encode(), "'application/jsoné'"),
    "control character": (b"application/json\tx", "'application/json\\x09x'"),
    "8 KB": (b"text/" + b"x" * 8000, "'text/" + "x" * 120 + "...'"),
}


@pytest.mark.parametrize(("sent", "quoted"), QUOTED_CONTENT_TYPES.values(), ids=QUOTED_CONTENT_TYPES)
async def test_a_refused_content_type_is_quoted_back_printable_and_bounded(
    make_gateway: Any, make_upstream: Any, sent: bytes, quoted: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(
        {
            "services": {"intelligence-engine": {"url": upstream.url}},
            "routes": [{"prefix": "/api/v1/chat", "service": "intelligence-engine", "auth": "none"}],
        }
    )
    data = await raw_exchange(
        client.port,
        b"POST /api/v1/chat/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: " + sent
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )  # fmt: skip
    (response,) = parse_responses(data)
    assert response.status == 415
    assert response.headers["Content-Type"] == "application/json" and response.headers["X-Request-ID"]
    detail = response.json()["detail"]
    assert detail == f"Unsupported Media Type: {quoted}; this route accepts application/json"
    assert upstream.requests == []


async def test_a_refused_cors_origin_is_quoted_back_printable_and_bounded(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url), {"CORS_ALLOW_ORIGINS": "https://app.example.com"})
    origin = b"https://\xe9vil.example/" + b"x" * 8000
    data = await raw_exchange(
        client.port,
        b"OPTIONS /none/x HTTP/1.1\r\nHost: x\r\nOrigin: " + origin
        + b"\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    (response,) = parse_responses(data)
    assert response.status == 403
    detail = response.json()["detail"]
    assert detail.startswith("CORS: origin 'https://\\xe9vil.example/xxx") and len(detail) < 200
    assert upstream.requests == []


@pytest.mark.parametrize(
    "host",
    [
        *(b"a b", b"x/y", b"x\\y", b"x?y", b"x#y", b"<x>", b'x"y', b"caf\xc3\xa9.example", b"x\ty"),
        *(b"[::1", b"::1]:80", b"::1", b"2001:db8::1:8080", b"[::1]x", b"[::1]:80]", b"[zz]", b"[1.2.3.4]"),
    ],
    ids=[
        *("space", "slash", "backslash", "question mark", "hash", "angle brackets", "quote", "utf-8", "tab"),
        *("unclosed [", "unopened ]", "bare ipv6", "bare ipv6 and port", "junk after ]", "two ]"),
        *("not hex in []", "ipv4 in []"),
    ],
)
async def test_an_invalid_host_header_is_a_400(make_gateway: Any, make_upstream: Any, host: bytes) -> None:
    """RFC 9112 section 3.2: a Host field with an invalid value is a 400. It used to be passed on
    as X-Forwarded-Host, which backends build links from. Brackets hold an IPv6 address and come
    only around it: ``[::1`` or a bare ``::1`` went on too, and links built on them lead nowhere."""
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    data = await raw_exchange(
        client.port, b"GET /none/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    )
    (response,) = parse_responses(data)
    assert response.status == 400 and response.json()["detail"] == "Invalid Host header"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "host",
    [
        *(b"", b"x", b"x:8080", b"[::1]:8080", b"127.0.0.1", b"xn--caf-dma.example", b"a_b.local"),
        *(b"[::1]", b"[2001:DB8::1]:443", b"[::ffff:10.0.0.5]:80", b"[v1.fe80::a+en1]"),
    ],
)
async def test_a_valid_host_header_is_forwarded_as_x_forwarded_host(
    make_gateway: Any, make_upstream: Any, host: bytes
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    data = await raw_exchange(
        client.port, b"GET /none/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    )
    (response,) = parse_responses(data)
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.values("X-Forwarded-Host") == ([host.decode()] if host else [])


@pytest.mark.parametrize(
    "name", ["X-Original-URL", "X-Rewrite-URL", "x-original-url", "X_Original_URL", "X_REWRITE_URL"]
)
async def test_headers_that_name_another_path_never_reach_the_upstream(
    make_gateway: Any, make_upstream: Any, name: str
) -> None:
    """Yii (and Symfony and Zend Framework before 2018) serve the path X-Original-URL or
    X-Rewrite-URL names instead of the request line's: /none/x with /required/x in one of them
    was /required/x to them, past that route's token."""
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    response = await client.get("/none/x", headers={name: "/required/x"})
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.raw_path == "/none/x"
    assert cgi_values(seen, "x-original-url") == [] and cgi_values(seen, "x-rewrite-url") == []


METHOD_OVERRIDES = [
    ("POST", "/none/x", {"X-HTTP-Method-Override": "PATCH"}),
    ("POST", "/none/x", {"x-http-method-override": "DELETE"}),
    ("POST", "/none/x", {"X-HTTP-Method": "PUT"}),
    ("POST", "/none/x", {"X-Method-Override": "PATCH"}),
    ("GET", "/none/x", {"X-HTTP-Method-Override": "DELETE"}),
    ("POST", "/none/x?_method=PATCH", {}),
    ("POST", "/none/x?a=1&%5Fmethod=PUT", {}),
]


@pytest.mark.parametrize(("method", "target", "headers"), METHOD_OVERRIDES)
async def test_a_method_override_is_refused(
    make_gateway: Any, make_upstream: Any, method: str, target: str, headers: dict[str, str]
) -> None:
    """Symfony and Laravel, Rails, Express's method-override and gorilla take a POST with one of
    these for the method it names; the gateway picks the body schema by the request line's."""
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    response = await client.request(method, target, headers=headers, data=b"{}" if method == "POST" else None)
    assert response.status == 400 and "override" in (await response.json())["detail"]
    assert upstream.requests == []


async def test_a_method_override_cannot_take_a_body_past_its_schema(
    make_gateway: Any, make_upstream: Any
) -> None:
    """POST /api/v1/clusters/{id} has no schema, PATCH does: as a POST overridden to PATCH the
    body reached an Express backend as a PATCH nobody had checked."""
    upstream = await make_upstream()
    config = {
        "services": {"svc": {"url": upstream.url}},
        "routes": [{"prefix": "/api/v1/clusters", "service": "svc", "auth": "none"}],
    }
    client = await make_gateway(config)
    body = b'{"unknown": 1}'
    headers = {"Content-Type": "application/json"}
    assert (await client.patch("/api/v1/clusters/c1", data=body, headers=headers)).status == 422
    overridden = {**headers, "X-HTTP-Method-Override": "PATCH"}
    assert (await client.post("/api/v1/clusters/c1", data=body, headers=overridden)).status == 400
    assert upstream.requests == []


async def test_a_parameter_merely_named_like_the_override_passes(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    for target in ("/none/x?http_method=1", "/none/x?_method=PATCH"):  # the second: a GET, never overridden
        method = "POST" if "http_method" in target else "GET"
        response = await client.request(method, target, data=b"{}" if method == "POST" else None)
        assert response.status == 200
    assert [q.raw_path for q in upstream.requests] == ["/none/x?http_method=1", "/none/x?_method=PATCH"]


async def test_an_underscore_spelling_of_a_method_override_never_reaches_the_upstream(
    make_gateway: Any, make_upstream: Any
) -> None:
    """Symfony reads HTTP_X_HTTP_METHOD_OVERRIDE, which is also what CGI makes of this spelling."""
    upstream = await make_upstream()
    client = await make_gateway(_config(upstream.url))
    response = await client.post("/none/x", data=b"{}", headers={"X_HTTP_Method_Override": "PATCH"})
    assert response.status == 200
    (seen,) = upstream.requests
    assert cgi_values(seen, "x-http-method-override") == []
