"""The route table as seen from outside: which upstream gets which path, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import send_raw_path


@pytest.fixture
async def two_services(make_upstream: Any) -> tuple[Any, Any]:
    return await make_upstream(), await make_upstream()


def table(routes: list[tuple[str, str]], urls: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "services": {name: {"url": url} for name, url in urls.items()},
        "routes": [{"prefix": p, "service": s, "auth": "none", **extra} for p, s in routes],
    }


async def test_longest_prefix_wins(make_gateway: Any, two_services: tuple[Any, Any]) -> None:
    short, long = two_services
    client = await make_gateway(
        table([("/api", "short"), ("/api/v1/clusters", "long")], {"short": short.url, "long": long.url})
    )

    assert (await client.get("/api/v1/clusters/c1")).status == 200
    assert (await client.get("/api/v1/other")).status == 200

    assert [r.raw_path for r in long.requests] == ["/api/v1/clusters/c1"]
    assert [r.raw_path for r in short.requests] == ["/api/v1/other"]


async def test_exact_prefix_path_matches(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/api/v1/clusters", "a")], {"a": upstream.url}))

    assert (await client.get("/api/v1/clusters")).status == 200
    assert (await client.get("/api/v1/clusters/")).status == 200
    assert [r.raw_path for r in upstream.requests] == ["/api/v1/clusters", "/api/v1/clusters/"]


@pytest.mark.parametrize("path", ["/api/v1/clustersX", "/api/v1/clusters-x/1", "/api/v1/cluster"])
async def test_prefix_matches_only_at_a_slash_boundary(
    make_gateway: Any, make_upstream: Any, path: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/api/v1/clusters", "a")], {"a": upstream.url}))

    response = await client.get(path)

    assert response.status == 404
    assert upstream.requests == []


async def test_near_miss_falls_through_to_the_catch_all(
    make_gateway: Any, two_services: tuple[Any, Any]
) -> None:
    clusters, everything = two_services
    client = await make_gateway(
        table([("/api/v1/clusters", "c"), ("/", "all")], {"c": clusters.url, "all": everything.url})
    )

    assert (await client.get("/api/v1/clustersX")).status == 200

    assert clusters.requests == []
    assert [r.raw_path for r in everything.requests] == ["/api/v1/clustersX"]


@pytest.mark.parametrize("path", ["/", "/anything", "/deep/ly/nested?q=1"])
async def test_root_prefix_catches_everything(make_gateway: Any, make_upstream: Any, path: str) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/", "a")], {"a": upstream.url}))

    assert (await client.get(path)).status == 200
    assert [r.raw_path for r in upstream.requests] == [path]


async def test_unrouted_path_gets_the_contract_404(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/api", "a")], {"a": upstream.url}))

    response = await client.get("/nowhere")

    assert response.status == 404
    assert response.content_type == "application/json"
    assert response.headers.get("X-Request-ID")
    body = await response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert set(body) <= {"detail", "errors"}


@pytest.mark.parametrize(
    ("requested", "forwarded"),
    [
        ("/api/v1/clusters/c1", "/c1"),
        ("/api/v1/clusters/c1/nodes?x=1", "/c1/nodes?x=1"),
        ("/api/v1/clusters", "/"),
        ("/api/v1/clusters/", "/"),
        ("/api/v1/clusters?x=1", "/?x=1"),
    ],
)
async def test_strip_prefix_forwards_the_rest_of_the_path(
    make_gateway: Any, make_upstream: Any, requested: str, forwarded: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/api/v1/clusters", "a")], {"a": upstream.url}, strip_prefix=True))

    assert (await send_raw_path(client, requested)).status == 200
    assert [r.raw_path for r in upstream.requests] == [forwarded]


async def test_without_strip_prefix_the_full_path_is_forwarded(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/api/v1/clusters", "a")], {"a": upstream.url}))

    assert (await client.get("/api/v1/clusters/c1")).status == 200
    assert [r.raw_path for r in upstream.requests] == ["/api/v1/clusters/c1"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/../x",
        "/api/./x",
        "/api/..",
        "/api/%2e%2e/x",
        "/api/%2E%2E/x",
        "/api/.%2e/x",
        "/api/%2e/x",
        "/api/v1/../../etc/passwd?x=1",
    ],
)
async def test_dot_segments_are_rejected_with_400(make_gateway: Any, make_upstream: Any, path: str) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/", "a")], {"a": upstream.url}))

    response = await send_raw_path(client, path)

    assert response.status == 400
    assert response.content_type == "application/json"
    assert response.headers.get("X-Request-ID")
    assert "detail" in await response.json()
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/api/..x/y", "/api/.well-known/z", "/api/a.b/..."])
async def test_dots_inside_segments_are_not_dot_segments(
    make_gateway: Any, make_upstream: Any, path: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/", "a")], {"a": upstream.url}))

    assert (await send_raw_path(client, path)).status == 200
    assert [r.raw_path for r in upstream.requests] == [path]


@pytest.mark.parametrize(
    "raw_path",
    [
        "/api/a%2Fb/c",
        "/api/a+b/c%20d",
        "/api/x?q=a+b&q=c%20d&empty=&flag&enc=%2F%3D%26",
        "/api/x?a=1&a=2&a=3",
        "/api/%7Euser/%E2%82%AC?name=%E2%82%AC",
        "/api/x?redirect=http%3A%2F%2Fexample.com%2F%3Fa%3Db",
    ],
)
async def test_path_and_query_reach_the_upstream_byte_for_byte(
    make_gateway: Any, make_upstream: Any, raw_path: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(table([("/api", "a")], {"a": upstream.url}))

    assert (await send_raw_path(client, raw_path)).status == 200
    assert [r.raw_path for r in upstream.requests] == [raw_path]


async def test_an_encoded_slash_that_would_change_the_route_is_refused(
    make_gateway: Any, two_services: tuple[Any, Any]
) -> None:
    """Read raw, the path is the catch-all's; decoded, the clusters route's. Which one the
    upstream sees depends on the upstream, so neither policy can be applied: refused."""
    clusters, everything = two_services
    client = await make_gateway(
        table([("/api/v1/clusters", "c"), ("/", "all")], {"c": clusters.url, "all": everything.url})
    )

    response = await send_raw_path(client, "/api/v1%2Fclusters/x")
    assert response.status == 400 and "ambiguous" in (await response.json())["detail"]
    assert clusters.requests == [] and everything.requests == []
    # Inside one route an encoded slash changes nothing and is forwarded as sent.
    assert (await send_raw_path(client, "/api/v1/clusters/a%2Fb")).status == 200
    assert [r.raw_path for r in clusters.requests] == ["/api/v1/clusters/a%2Fb"]


async def test_the_gateways_own_endpoints_and_the_proxy_split_paths_as_aiohttps_router_does(
    make_gateway: Any, make_upstream: Any
) -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from gateway.routing import _GatewayRouter

    upstream = await make_upstream()
    client = await make_gateway(table([("/", "a")], {"a": upstream.url}))
    app = client.server.app
    router = app.router
    assert isinstance(router, _GatewayRouter)  # the runner gave it the shortcut
    paths = [
        "/health", "/health/ready", "/health/detailed", "/metrics", "/openapi.json", "/metrics?x=1",
        "/health/", "/healthz", "/Health", "/x/metrics", "/metrics/x", "/", "/heal%74h",
        "/health%2Fready", "/%6detrics?a=b", "/api/v1/clusters",
    ]  # fmt: skip
    for path in paths:
        for method in ("GET", "POST", "HEAD"):
            request = make_mocked_request(method, path, app=app)
            walked = await web.UrlDispatcher.resolve(router, request)
            shortcut = await router.resolve(request)
            assert shortcut.handler is walked.handler, (method, path)
            assert shortcut.route is walked.route, (method, path)

    assert (await client.get("/health")).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.post("/metrics")).status == 200
    # Not comparable above: a made-up request reads "//metrics" as a URL with a host.
    assert (await send_raw_path(client, "//metrics")).status == 200
    assert [(r.method, r.raw_path) for r in upstream.requests] == [
        ("GET", "/healthz"),
        ("POST", "/metrics"),
        ("GET", "//metrics"),
    ]
