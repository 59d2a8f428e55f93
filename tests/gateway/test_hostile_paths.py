"""Hostile paths: a request reaches only the service its route names, and the path it carries
cannot be read by that service as lying outside the route's prefix."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.routing import RouteTable, has_dot_segment
from gateway.settings import Route
from tests.helpers import parse_responses, raw_exchange

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
    "target",
    [
        b"http://other-host/b/x",
        b"http://127.0.0.1/a/x",
        b"https://x/a/x",
        b"other-host:80",
        b"//other-host/a/x",
    ],
)
async def test_absolute_and_authority_form_targets_reach_no_upstream(
    two_routes: tuple[Any, Any, Any], target: bytes
) -> None:
    client, a, b = two_routes
    response = await _get(client.port, target)
    assert response.status in (400, 404) and response.json()["detail"]
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
    ``;params`` honoured, then dot segments removed (RFC 3986 section 5.2.4)."""
    while (decoded := unquote(path)) != path:
        path = decoded
    path = re.sub(r";[^/]*", "", path.replace("\\", "/"))
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/" + "/".join(out)


TABLE = RouteTable(Route(prefix=p, service="s", auth="none") for p in ("/a", "/a/b", "/api/v1/chat", "/b"))
TOKENS = ["/", "a", "b", "api", "v1", "chat", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", ";", "x=1",
          "%25", "%252e", "%00", "~", "%41"]  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


@given(st.text(max_size=60))
def test_the_dot_segment_check_never_raises(path: str) -> None:
    assert isinstance(has_dot_segment("/" + path), bool)
