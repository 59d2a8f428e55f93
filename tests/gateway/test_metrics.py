"""GET /metrics after known traffic, parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
import uuid
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path
from typing import Any

import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import limiter_key, tracing_key
from gateway.metrics import Metrics
from gateway.reload import reload_routes
from tests.helpers import one_service, parse_responses, raw_exchange, wait_for

SECRET = "metrics-test-secret-" + "x" * 32
KEY = ec.generate_private_key(ec.SECP256R1())


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> Samples:
    """``{sample name: {sorted label pairs: value}}`` from an exposition."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def scrape(client: Any) -> Samples:
    """``parse`` of one scrape."""
    response = await client.get("/metrics")
    assert response.status == 200
    # The text exposition format's own type (Prometheus falls back to it for a bare text/plain).
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(await response.text())


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def test_requests_by_route_method_and_status_class(make_gateway: Any, make_upstream: Any) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.json_response({}, status=500 if request.method == "POST" else 200)

    upstream = await make_upstream(reply)
    client = await make_gateway(one_service(upstream.url, prefix="/api"))
    for user in ("12345", "67890", "abc"):
        assert (await client.get(f"/api/users/{user}")).status == 200
    assert (await client.post("/api/users", json={})).status == 500
    assert (await client.get("/elsewhere")).status == 404
    assert (await client.get("/health")).status == 200

    samples = await scrape(client)
    assert value(samples, "gateway_requests_total", route="/api", method="GET", status="2xx") == 3
    assert value(samples, "gateway_requests_total", route="/api", method="POST", status="5xx") == 1
    assert value(samples, "gateway_requests_total", route="unmatched", method="GET", status="4xx") == 1
    assert value(samples, "gateway_requests_total", route="/health", method="GET", status="2xx") == 1
    # Labels are bounded: no raw path, no user id, anywhere.
    routes = {dict(labels).get("route") for labels in samples["gateway_requests_total"]}
    assert routes == {"/api", "unmatched", "/health"}
    assert value(samples, "gateway_request_duration_seconds_count", route="/api", method="GET") == 3
    assert (
        value(samples, "gateway_request_duration_seconds_bucket", route="/api", method="GET", le="+Inf") == 3
    )
    assert 0 < value(samples, "gateway_request_duration_seconds_sum", route="/api", method="GET") < 5
    assert value(samples, "gateway_upstream_duration_seconds_count", service="svc") == 4
    assert value(samples, "gateway_requests_in_flight") == 1  # the scrape itself
    assert value(samples, "gateway_process_info", pid=str(os.getpid())) == 1


def test_a_duration_on_a_bucket_bound_counts_in_that_bucket_and_labels_stay_bounded() -> None:
    """Prometheus buckets are upper bounds, inclusive (``le``). A method outside the usual ones and
    a reason the gateway does not know are not made into labels of their own."""
    metrics = Metrics()
    metrics.record_request("/r", "GET", 200, 0.005)
    metrics.record_request("/r", "PROPFIND", 207, 0.5)
    metrics.record_rejection("/r", 401, "made-up")
    samples = parse(metrics.render().decode())
    bucket = "gateway_request_duration_seconds_bucket"
    assert value(samples, bucket, route="/r", method="GET", le="0.0025") == 0
    assert value(samples, bucket, route="/r", method="GET", le="0.005") == 1
    assert value(samples, "gateway_requests_total", route="/r", method="OTHER", status="2xx") == 1
    assert {dict(labels)["method"] for labels in samples["gateway_requests_total"]} == {"GET", "OTHER"}
    assert "gateway_auth_failures_total" not in samples


async def test_random_paths_methods_hosts_and_request_ids_add_no_series(
    make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url, prefix="/api"))

    async def hostile(n: int) -> None:
        for method, path in ((f"X-{uuid.uuid4().hex[:8]}", "/api/a"), ("GET", f"/x/{uuid.uuid4()}"),
                             ("PROPFIND", f"/api/{uuid.uuid4()}"), ("POST", f"/metrics/{n}")):  # fmt: skip
            headers = {"Host": f"{uuid.uuid4()}.example", "X-Request-ID": str(uuid.uuid4())}
            async with client.request(method, path, headers=headers) as response:
                await response.read()

    async def series() -> set[str]:
        text = await (await client.get("/metrics")).text()
        return {line.rpartition(" ")[0] for line in text.splitlines() if line.startswith("gateway_")}

    await hostile(0)
    await series()  # the scrape's own series, seen from the next one on
    before = await series()
    for n in range(1, 26):
        await hostile(n)
    assert await series() == before
    assert not [line for line in before if "uuid" in line or ".example" in line or "X-" in line]


async def test_in_flight_counts_a_slow_request(make_gateway: Any, make_upstream: Any) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({})

    upstream = await make_upstream(slow)
    client = await make_gateway(one_service(upstream.url))
    pending = asyncio.ensure_future(client.get("/slow"))
    await asyncio.wait_for(arrived.wait(), 5)
    assert value(await scrape(client), "gateway_requests_in_flight") == 2
    release.set()
    assert (await pending).status == 200
    assert value(await scrape(client), "gateway_requests_in_flight") == 1


async def test_a_client_that_leaves_before_its_answer_is_counted_as_4xx_not_5xx(
    make_gateway: Any, make_upstream: Any
) -> None:
    """nginx's 499: the gateway did nothing wrong, and an alert on the 5xx rate must not fire
    because clients give up on a slow backend."""
    arrived = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    upstream = await make_upstream(never)
    client = await make_gateway(one_service(upstream.url))
    leaving = asyncio.ensure_future(client.get("/slow"))
    await asyncio.wait_for(arrived.wait(), 5)
    leaving.cancel()  # the client closes its connection
    with contextlib.suppress(asyncio.CancelledError):
        await leaving

    deadline = time.monotonic() + 5
    while value(await scrape(client), "gateway_requests_total", route="/", method="GET", status="4xx") != 1:
        assert time.monotonic() < deadline, "the abandoned request was never counted"
        await asyncio.sleep(0.01)
    assert value(await scrape(client), "gateway_requests_total", route="/", method="GET", status="5xx") == 0


async def test_upstream_errors_by_kind(
    make_gateway: Any, make_upstream: Any, make_raw_upstream: Any, refused_url: str
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    cases = [
        ("connect", refused_url, 502),
        ("invalid", await make_raw_upstream(garbage), 502),
        ("reset", await make_raw_upstream(hang_up), 502),
        ("timeout", (await make_upstream(hang)).url, 504),
    ]
    for kind, url, status in cases:
        client = await make_gateway(one_service(url, timeout={"connect": 1, "read": 0.3}))
        # POST: not retried, so one failure is one count.
        assert (await client.post("/x", data=b"{}")).status == status, kind
        samples = await scrape(client)
        errors = samples.get("gateway_upstream_errors_total", {})
        assert errors == {(("kind", kind), ("service", "svc")): 1.0}, kind
    never.set()


async def test_rejections_by_rate_limit_auth_and_validation(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    cfg = {
        "services": {"svc": {"url": upstream.url}},
        "routes": [
            {"prefix": "/limited", "service": "svc", "auth": "none", "rate_limit": "1/minute"},
            {"prefix": "/secure", "service": "svc", "scopes": ["clusters:write"]},
            {"prefix": "/api/v1/chat", "service": "svc", "auth": "none", "max_body": 32},
        ],
    }
    client = await make_gateway(cfg, {"AUTH_JWT_SECRET": SECRET})
    assert (await client.get("/limited")).status == 200
    assert (await client.get("/limited")).status == 429

    assert (await client.get("/secure")).status == 401
    bad = {"Authorization": "Bearer not-a-token"}
    assert (await client.get("/secure", headers=bad)).status == 401
    assert (await client.get("/secure", headers=bad)).status == 401
    token = jwt.encode({"sub": "u1", "scope": "clusters:read", "exp": 2**31}, SECRET, algorithm="HS256")
    assert (await client.get("/secure", headers={"Authorization": f"Bearer {token}"})).status == 403

    chat = "/api/v1/chat/sessions"
    assert (
        await client.post(chat, data=b"x" * 64, headers={"Content-Type": "application/json"})
    ).status == 413
    assert (await client.post(chat, data=b"{}", headers={"Content-Type": "text/plain"})).status == 415
    assert (await client.post(chat, json={"title": 5})).status == 422
    assert (await client.get("/nowhere")).status == 404  # refused too, but not for its body

    samples = await scrape(client)
    assert samples["gateway_ratelimit_rejections_total"] == {(("route", "/limited"),): 1.0}
    assert samples["gateway_auth_failures_total"] == {
        (("reason", "missing"), ("route", "/secure")): 1.0,
        (("reason", "invalid"), ("route", "/secure")): 2.0,
        (("reason", "insufficient_scope"), ("route", "/secure")): 1.0,
    }
    assert samples["gateway_validation_rejections_total"] == {
        (("route", "/api/v1/chat"), ("status", "413")): 1.0,
        (("route", "/api/v1/chat"), ("status", "415")): 1.0,
        (("route", "/api/v1/chat"), ("status", "422")): 1.0,
    }
    # An upstream's own 401 is the upstream's business, not an auth failure of the gateway.
    assert "gateway_upstream_errors_total" not in samples


async def test_metrics_need_no_token_and_are_not_rate_limited(make_gateway: Any, make_upstream: Any) -> None:
    upstream = await make_upstream()
    cfg = one_service(upstream.url, auth="required")
    client = await make_gateway(cfg, {"AUTH_JWT_SECRET": SECRET, "RATE_LIMIT_DEFAULT": "1/minute"})
    for _ in range(3):
        assert (await client.get("/metrics")).status == 200


async def test_spans_dropped_come_from_the_reporter(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url), {"ZIPKIN_URL": refused_url + "/api/v2/spans"})
    for _ in range(3):
        assert (await client.get("/x")).status == 200
    reporter = client.app[tracing_key].reporter
    await reporter.flush()  # the collector refuses: the batch is dropped
    assert reporter.dropped >= 6  # a server and a client span per request
    assert value(await scrape(client), "gateway_spans_dropped_total") == reporter.dropped


async def test_redis_fallback_gauge(make_gateway: Any, make_upstream: Any, refused_url: str) -> None:
    upstream = await make_upstream()
    redis_url = refused_url.replace("http://", "redis://") + "/0"
    client = await make_gateway(one_service(upstream.url), {"REDIS_URL": redis_url})
    assert value(await scrape(client), "gateway_ratelimit_fallback_active") == 0
    assert value(await scrape(client), "gateway_ratelimit_fallbacks_total") == 0
    assert (await client.get("/x")).status == 200  # limited in process while Redis is away
    await wait_for(lambda: client.app[limiter_key].fallback_active, what="the fallback")
    assert value(await scrape(client), "gateway_ratelimit_fallback_active") == 1
    assert value(await scrape(client), "gateway_ratelimit_fallbacks_total") == 1


async def test_component_health_is_the_last_known(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    good = await make_upstream()
    cfg = {
        "services": {"good": {"url": good.url}, "down": {"url": refused_url}},
        "routes": [{"prefix": "/", "service": "good", "auth": "none"}],
    }
    client = await make_gateway(cfg)
    assert "gateway_component_up" not in await scrape(client)  # nothing probed yet
    assert (await client.get("/health/detailed")).status == 200
    samples = await scrape(client)
    assert value(samples, "gateway_component_up", component="good") == 1
    assert value(samples, "gateway_component_up", component="down") == 0
    assert value(samples, "gateway_component_up", component="postgresql") == 0
    assert value(samples, "gateway_component_up", component="redis") == 1  # disabled is not down
    assert len(good.requests) == 1  # scraping does not probe


async def test_component_health_survives_a_reload(
    make_gateway: Any, make_upstream: Any, refused_url: str, tmp_path: Path
) -> None:
    # A reload forgets the cached /health/detailed report; the gauge must not vanish with it (an
    # alert on a backend still down would resolve), except for services the reload removed.
    good = await make_upstream()
    cfg = {
        "services": {"good": {"url": good.url}, "down": {"url": refused_url}},
        "routes": [{"prefix": "/", "service": "good", "auth": "none"}],
    }
    client = await make_gateway(cfg)
    assert (await client.get("/health/detailed")).status == 200
    reloaded = tmp_path / "reloaded.yaml"  # "good" removed
    route = {"prefix": "/", "service": "down", "auth": "none"}
    reloaded.write_text(yaml.safe_dump({"services": {"down": {"url": refused_url}}, "routes": [route]}))
    assert await reload_routes(client.app, {"GATEWAY_CONFIG": str(reloaded)})
    samples = await scrape(client)
    assert {dict(labels)["component"]: n for labels, n in samples["gateway_component_up"].items()} == {
        "down": 0,
        "postgresql": 0,
        "redis": 1,
    }


async def test_requests_the_parser_refuses_are_counted_as_malformed(
    make_gateway: Any, make_upstream: Any
) -> None:
    # They never reach the middlewares; a 4xx-rate alert must still see them.
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url))
    refused = [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    ]
    statuses = []
    for data in refused:
        (response,) = parse_responses(await raw_exchange(client.port, data))
        statuses.append(response.status)
    assert statuses == [400, 400, 431]

    samples = await scrape(client)
    assert value(samples, "gateway_requests_total", route="malformed", method="OTHER", status="4xx") == 3
    assert value(samples, "gateway_request_duration_seconds_count", route="malformed", method="OTHER") == 3
    assert upstream.requests == []


# promtool's own lint (`promtool check metrics`) where it is installed (Debian: `prometheus`);
# the rules it applies that this exposition could break are checked here in any case.
PROMTOOL = shutil.which("promtool")
_NON_BASE_UNITS = re.compile(
    r"_(milliseconds|microseconds|nanoseconds|minutes|hours|days|ms|us|ns|kilobytes|megabytes|percent)(_|$)"
)


async def test_the_exposition_after_varied_traffic_passes_the_prometheus_lint(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(msg.data)
            return ws
        return web.json_response({}, status=int(request.query.get("status", "200")))

    upstream = await make_upstream(reply)
    cfg = {
        "services": {"svc": {"url": upstream.url}, "dead": {"url": refused_url}},
        "routes": [
            {"prefix": "/open", "service": "svc", "auth": "none", "rate_limit": "3/minute"},
            {"prefix": "/secure", "service": "svc", "scopes": ["clusters:write"]},
            {"prefix": "/dead", "service": "dead", "auth": "none"},
            {"prefix": "/api/v1/chat", "service": "svc", "auth": "none", "max_body": 32},
        ],
    }
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_JWKS_URL": refused_url + "/jwks"}
    client = await make_gateway(cfg, env)
    assert [(await client.get(p)).status for p in ("/open", "/open?status=500", "/nowhere")] == [
        200,
        500,
        404,
    ]
    async with client.ws_connect("/open/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "hi"
    assert (await client.get("/open")).status == 429
    es256 = jwt.encode({"sub": "u", "exp": 2**31}, KEY, algorithm="ES256", headers={"kid": "k1"})
    for headers, status in [({}, 401), ({"Authorization": f"Bearer {es256}"}, 503)]:
        assert (await client.get("/secure", headers=headers)).status == status
    assert (await client.post("/dead", json={})).status == 502
    assert (await client.post("/api/v1/chat/sessions", json={"title": 5})).status == 422
    (refused,) = parse_responses(await raw_exchange(client.port, b"GARBAGE\r\n\r\n"))
    assert refused.status == 400

    response = await client.get("/metrics")
    text = await response.text()
    families = list(text_string_to_metric_families(text))  # raises on anything malformed
    assert {"1xx", "2xx", "4xx", "5xx"} <= {
        s.labels["status"] for f in families if f.name == "gateway_requests" for s in f.samples
    }
    for family in families:
        assert family.documentation, family.name
        assert re.fullmatch(r"(gateway|process)_[a-z_]+", family.name), (
            family.name
        )  # ours, and the standard process_*
        assert not _NON_BASE_UNITS.search(family.name), family.name
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {family.name + "_total", family.name + "_created"}
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
    if PROMTOOL is not None:
        lint = await asyncio.create_subprocess_exec(
            PROMTOOL, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
        )
        output, _ = await lint.communicate(text.encode())
        assert (lint.returncode, output) == (0, b"")


async def test_the_standard_process_families_are_exposed(make_gateway: Any, make_upstream: Any) -> None:
    # Running out of descriptors at accept is handled inside the event loop and logged nowhere:
    # process_open_fds against process_max_fds is what an alert can watch.
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url))
    samples = await scrape(client)
    open_fds, max_fds = value(samples, "process_open_fds"), value(samples, "process_max_fds")
    assert 0 < open_fds < max_fds
    assert value(samples, "process_resident_memory_bytes") > 0
