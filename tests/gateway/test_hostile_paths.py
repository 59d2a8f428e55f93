"""Hostile paths: a request reaches only the service its route names, and the path it carries
cannot be read by that service as lying outside the route's prefix."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.keys import route_table_key
from gateway.routing import RouteTable, has_dot_segment
from gateway.settings import Route
from tests.helpers import fuzz_examples, parse_responses, raw_exchange

HOST = b"Host: x\r\n"


@pytest.fixture
async def two_routes(make_gateway: Any, make_upstream: Any) -> tuple[Any, Any, Any]:
    """/a -> A, /b -> B, nothing else routed."""
    a, b = await make_upstream(), await make_upstream()
    config = {
        "services": {"svc-a": {"url": a.url}, "svc-b": {"url": b.url}},
        "routes": [
            {"prefix": "/a", "service": "svc-a", "auth": "none"},
            {"prefix": "/b", "service": "svc-b", "auth": "none", "strip_prefix": True},
        ],
    }
    return await make_gateway(config), a, b


async def _get(port: int, target: bytes) -> Any:
    data = await raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
    (response,) = parse_responses(data)
    return response


ESCAPES = [
    b"/a/../b/x",
    b"/a/%2e%2e/b/x",
    b"/a/..%2Fb/x",
    b"/a/..%2fb/x",
    b"/a/%2e%2e%2fb/x",
    b"/a/..%5Cb/x",
    b"/a/..%5cb/x",
    b"/a\\..\\b/x",
    b"/a/..\\b/x",
    b"/a/..;/b/x",
    b"/a/..;jsessionid=1/b/x",
    b"/a/%252e%252e/b/x",
    b"/a/%252e%252e%252fb/x",
    b"/a/./../b/x",
    b"/b/..%2f..%2fa/x",
    b"/a/..%20/b/x",
]


@pytest.mark.parametrize("target", ESCAPES, ids=[t.decode() for t in ESCAPES])
async def test_paths_that_climb_out_of_their_route_are_refused(
    two_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    client, a, b = two_routes
    response = await _get(client.port, target)
    assert response.status == 400 and response.json()["detail"]
    assert response.headers["Content-Type"].startswith("application/json")
    assert a.requests == [] and b.requests == []


@pytest.mark.parametrize(
    "target",
    [b"/c/x", b"//a/x", b"/a%2Fx", b"/A/x", b"/ab", b"/%61/x", b"*"],
    ids=[
        "other prefix",
        "double slash",
        "encoded slash",
        "case",
        "no boundary",
        "encoded letter",
        "asterisk",
    ],
)
async def test_paths_outside_every_route_reach_no_upstream(
    two_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    client, a, b = two_routes
    response = await _get(client.port, target)
    assert response.status in (400, 404) and response.json()["detail"]
    assert a.requests == [] and b.requests == []


@pytest.mark.parametrize(
    ("target", "service", "forwarded", "authority"),
    [
        (b"http://other-host/b/x", "b", "/x", "other-host"),
        (b"http://127.0.0.1:8/a/x?q=1", "a", "/a/x?q=1", "127.0.0.1:8"),
        (b"HTTPS://x/a/x", "a", "/a/x", "x"),
        (b"http://[::1]:8080/a/%7Ex", "a", "/a/%7Ex", "[::1]:8080"),
    ],
)
async def test_an_absolute_form_target_is_routed_by_its_path_with_its_authority_as_host(
    two_routes: tuple[Any, Any, Any], target: bytes, service: str, forwarded: str, authority: str
) -> None:
    """RFC 9112 section 3.2.2: a server must accept the absolute-form, and takes the URI's
    authority over a Host header sent with it. The path goes through every check a path does."""
    client, a, b = two_routes
    data = await raw_exchange(
        client.port, b"GET " + target + b" HTTP/1.1\r\nHost: not-this\r\nConnection: close\r\n\r\n"
    )
    (response,) = parse_responses(data)
    assert response.status == 200
    hit, missed = (a, b) if service == "a" else (b, a)
    (seen,) = hit.requests
    assert seen.raw_path == forwarded and missed.requests == []
    assert seen.values("X-Forwarded-Host") == [authority]
    assert seen.values("X-Forwarded-Proto") == ["http"]  # the connection's, whatever the URI says
    assert seen.values("Host") == [
        client.app[route_table_key].current.upstreams["svc-" + service].targets[0].pool.host_header
    ]


@pytest.mark.parametrize(
    "target",
    [
        b"ftp://x/a/x",
        b"http://user@x/a/x",
        b"http://user:pw@x/a/x",
        b"http:///a/x",
        b"http://x\\y/a/x",
        b"http://x/a/../b/x",
        b"http://x/a/x#f",
        b"other-host:80",
        b"//other-host/a/x",
    ],
)
async def test_targets_that_are_neither_paths_nor_http_uris_reach_no_upstream(
    two_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    client, a, b = two_routes
    response = await _get(client.port, target)
    assert response.status in (400, 404) and response.json()["detail"]
    assert a.requests == [] and b.requests == []


async def test_an_absolute_form_target_is_held_to_its_routes_policy(
    nested_routes: tuple[Any, Any, Any],
) -> None:
    client, admin, open_ = nested_routes
    assert (await _get(client.port, b"http://x/a/admin/x")).status == 401
    assert (await _get(client.port, b"http://x/a/%61dmin/x")).status == 400
    assert admin.requests == [] and open_.requests == []


@pytest.mark.parametrize("target", [b"*", b"http://x", b"http://x:80"])
async def test_options_asterisk_is_answered_by_the_gateway(
    two_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    """``OPTIONS *`` asks about the server as a whole (RFC 9110 section 9.3.7); ``OPTIONS
    http://x`` is the same question (RFC 9112 section 3.2.4). It used to be a 400."""
    client, a, b = two_routes
    data = await raw_exchange(
        client.port, b"OPTIONS " + target + b" HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    )
    (response,) = parse_responses(data)
    assert response.status == 200 and response.body == b""
    assert response.headers["Content-Length"] == "0"
    assert "OPTIONS" in response.headers["Allow"] and "GET" in response.headers["Allow"]
    assert response.headers.get("X-Request-ID")
    assert a.requests == [] and b.requests == []


@pytest.mark.parametrize(
    ("target", "service", "forwarded"),
    [
        (b"/a/x%2Fy", "a", "/a/x%2Fy"),
        (b"/a//x", "a", "/a//x"),
        (b"/a/.well-known/x", "a", "/a/.well-known/x"),
        (b"/a/x?p=../../b", "a", "/a/x?p=../../b"),
        (b"/b/x/..y", "b", "/x/..y"),
    ],
)
async def test_odd_but_contained_paths_reach_their_own_service_unchanged(
    two_routes: tuple[Any, Any, Any], target: bytes, service: str, forwarded: str
) -> None:
    client, a, b = two_routes
    assert (await _get(client.port, target)).status == 200
    hit, missed = (a, b) if service == "a" else (b, a)
    assert [q.raw_path for q in hit.requests] == [forwarded] and missed.requests == []


@pytest.fixture
async def nested_routes(make_gateway: Any, make_upstream: Any) -> tuple[Any, Any, Any]:
    """/a/admin -> ADMIN (a token needed), /a -> OPEN (none): the audit's shape of a bypass."""
    admin, open_ = await make_upstream(), await make_upstream()
    config = {
        "services": {"admin": {"url": admin.url}, "open": {"url": open_.url}},
        "routes": [
            {"prefix": "/a/admin", "service": "admin", "auth": "required"},
            {"prefix": "/a", "service": "open", "auth": "none"},
        ],
    }
    return await make_gateway(config, {"AUTH_JWT_SECRET": "s" * 32}), admin, open_


# Each is /a/admin/x to a server that decodes, merges or drops what the raw path keeps, or that
# ignores case (Express, ASP.NET Core: also the dotless i), or trims segments (Windows, IIS).
OTHER_READINGS = [b"/a/%61dmin/x", b"/a/%61%64%6D%69%6E/x", b"/a//admin/x", b"/a/admin;v=1/x",
                  b"/a%2Fadmin/x", b"/a/%2561dmin/x", b"/a\\admin/x", b"/a/x/../admin", b"/a/ADMIN/x",
                  b"/a/Admin", b"/a/%41dmin/x", b"/a/adm%C4%B1n/x", "/a/adm\u0131n/x".encode(),
                  b"/a/admin./x", b"/a/admin%20/x", b"/a/%20admin", b"/a/%u0061dmin/x"]  # fmt: skip


@pytest.mark.parametrize("target", OTHER_READINGS, ids=[t.decode() for t in OTHER_READINGS])
async def test_a_path_another_route_would_read_as_its_own_is_refused(
    nested_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    client, admin, open_ = nested_routes
    response = await _get(client.port, target)
    assert response.status in (400, 404) and response.json()["detail"]
    assert admin.requests == [] and open_.requests == []
    # The plain spelling is held to its route's policy.
    assert (await _get(client.port, b"/a/admin/x")).status == 401


@pytest.mark.parametrize(
    "target",
    [
        b"/a/admin%0a",
        b"/a/admin%0A?q=1",
        b"/a/x%00",
        b"/a/x%00.json",
        b"/a/x%0d%0ay",
        b"/a/x%250a",
        b"/a/%7f",
    ],
)
async def test_a_path_with_an_encoded_control_character_is_refused(
    nested_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    """Starlette (FastAPI) matches its routes with a "$" that also matches before a final newline:
    /a/admin%0a, routed as /a's, was its /a/admin. NUL ends a path in C."""
    client, admin, open_ = nested_routes
    response = await _get(client.port, target)
    assert response.status == 400 and "control" in response.json()["detail"]
    assert admin.requests == [] and open_.requests == []


@pytest.mark.parametrize("target", [b"/a/admin#x", b"/a/admin#/y", b"/a/admin#", b"/a/x#y", b"/a/x?q=1#y"])
async def test_a_target_with_a_fragment_is_refused(
    nested_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    """A fragment is no part of a request target, and upstreams drop it: /a/admin#x, routed as
    /a's (no prefix ends in '#'), would reach /a/admin without the token that route requires."""
    client, admin, open_ = nested_routes
    response = await _get(client.port, target)
    assert response.status == 400 and "fragment" in response.json()["detail"]
    assert admin.requests == [] and open_.requests == []


@pytest.mark.parametrize(
    "target",
    [
        b"/a/%7Euser/x",
        b"/a/x%2Fadmin",
        b"/a/x//y",
        b"/a/x;v=1",
        b"/a/%61bc",
        b"/a/Xyz/ABC",
        b"/a/v1./x",
        b"/a/x%20y",
    ],
)
async def test_odd_paths_every_reading_routes_alike_are_forwarded_as_sent(
    nested_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    client, admin, open_ = nested_routes
    assert (await _get(client.port, target)).status == 200
    assert [q.raw_path for q in open_.requests] == [target.decode()] and admin.requests == []


async def test_an_overlong_path_is_refused_with_431(two_routes: tuple[Any, Any, Any]) -> None:
    client, a, b = two_routes
    response = await _get(client.port, b"/a/" + b"x" * 9000)
    assert response.status == 431 and response.json()["detail"]
    assert a.requests == [] and b.requests == []


async def test_a_long_path_under_the_limit_is_forwarded_whole(two_routes: tuple[Any, Any, Any]) -> None:
    client, a, _ = two_routes
    path = "/a/" + "x" * 8000
    assert (await _get(client.port, path.encode())).status == 200
    assert [q.raw_path for q in a.requests] == [path]


# -- the routing decision, against the most liberal reading an upstream could make ---------------


def liberal_resolve(path: str) -> str:
    """The path as the most liberal upstream might resolve it: decoded repeatedly, backslashes and
    ``;params`` honoured, case ignored, segments trimmed, then dot segments removed (RFC 3986
    section 5.2.4)."""
    while (decoded := unquote(path)) != path:
        path = decoded
    path = re.sub(r";[^/]*", "", path.replace("\\", "/")).upper().lower()
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment.strip(". "):  # Windows trims spaces and dots, but ".." stays ".."
            segment = segment.strip(" ").rstrip(". ")
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/" + "/".join(out)


TABLE = RouteTable(Route(prefix=p, service="s", auth="none") for p in ("/a", "/a/b", "/api/v1/chat", "/b"))
TOKENS = ["/", "a", "b", "api", "v1", "chat", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", ";", "x=1",
          "%25", "%252e", "%00", "~", "%41", "%61", "%62", "%2562", "//", "A", "B", "%42", "%20", "%0a"]  # fmt: skip


@settings(max_examples=fuzz_examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["", "/a", "/a/b", "/b", "/api/v1/chat"]),
    st.lists(st.sampled_from(TOKENS), max_size=10).map("".join),
)
def test_an_accepted_path_resolves_inside_its_route_prefix(prefix: str, rest: str) -> None:
    path = prefix + "/" + rest
    route = TABLE.match(path)
    if route is None or has_dot_segment(path):
        return  # 404 or 400: nothing is forwarded
    resolved = liberal_resolve(path)
    assert resolved == route.prefix or resolved.startswith(route.prefix + "/"), (path, resolved)


@settings(max_examples=fuzz_examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["", "/a", "/a/b", "/b", "/api/v1/chat"]),
    st.lists(st.sampled_from(TOKENS), max_size=10).map("".join),
)
def test_an_accepted_path_is_routed_alike_however_it_is_read(prefix: str, rest: str) -> None:
    path = prefix + "/" + rest
    route = TABLE.match(path)
    if route is None or has_dot_segment(path) or not TABLE.same_for_every_reading(path, route):
        return  # 404 or 400: nothing is forwarded
    assert TABLE.match(liberal_resolve(path)) is route, (path, liberal_resolve(path))


@given(st.text(max_size=60))
def test_the_dot_segment_check_never_raises(path: str) -> None:
    assert isinstance(has_dot_segment("/" + path), bool)
