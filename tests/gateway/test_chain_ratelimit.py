"""Rate limits through the whole chain: counts, headers on every limited answer, buckets, Redis."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import REDIS_URL
from tests.gateway.chain import AUTH_ENV, bearer, service
from tests.helpers import PrivateRedis

POLICY_3_PER_MINUTE = '"route";q=3;w=60'


async def streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()  # no Content-Length: relayed chunk by chunk
    await response.prepare(request)
    for part in (b"one,", b"two,", b"three"):
        await response.write(part)
    await response.write_eof()
    return response


@pytest.fixture
async def upstream(make_upstream: Any) -> Any:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/stream"):
            return await streamed(request)
        return web.json_response({"ok": True})

    return await make_upstream(reply)


def limited_routes(prefix: str = "/limited") -> list[dict[str, Any]]:
    return [
        {"prefix": prefix, "rate_limit": "3/minute", "auth": "none"},
        {"prefix": prefix + "-auth", "rate_limit": "3/minute"},
        {"prefix": prefix + "-optional", "rate_limit": "3/minute", "auth": "optional"},
        {"prefix": "/fast", "rate_limit": "2/3seconds", "auth": "none"},
    ]


@pytest.fixture
async def client(make_gateway: Any, upstream: Any) -> Any:
    return await make_gateway(service(upstream.url, limited_routes()), AUTH_ENV)


def assert_limit_headers(response: Any, remaining: int, policy: str = POLICY_3_PER_MINUTE) -> None:
    headers = response.headers
    assert headers["RateLimit-Policy"] == policy
    assert headers["X-RateLimit-Remaining"] == str(remaining)
    assert headers["X-RateLimit-Limit"] == re.search(r"q=(\d+)", policy).group(1)
    for field in ("Limit", "Remaining", "Reset"):
        assert headers[f"RateLimit-{field}"] == headers[f"X-RateLimit-{field}"]
    name, r, t = re.fullmatch(r'"(\w+)";r=(\d+);t=(\d+)', headers["RateLimit"]).groups()
    assert (name, int(r)) == (policy.split(";")[0].strip('"'), remaining)
    if response.status != 429:
        assert t == headers["X-RateLimit-Reset"]


# -- counts and headers ------------------------------------------------------------------------


async def test_exact_counts_at_the_boundary_with_headers_on_every_answer(client, upstream):
    answers = [await client.get("/limited/x") for _ in range(5)]

    assert [a.status for a in answers] == [200, 200, 200, 429, 429]
    for answer, remaining in zip(answers, [2, 1, 0, 0, 0], strict=True):
        assert_limit_headers(answer, remaining)
    # GCRA, 3/minute: one request's worth comes back every 20 s; the bucket is full after 60.
    assert [a.headers["X-RateLimit-Reset"] for a in answers[:3]] == ["20", "40", "60"]
    refused = answers[3]
    assert refused.headers["Retry-After"] == "20"
    assert refused.headers["RateLimit"] == '"route";r=0;t=20'
    assert await refused.json() == {"detail": "Too Many Requests"}
    assert len(upstream.requests) == 3


async def test_401s_are_charged_and_carry_the_headers(client, upstream):
    alice = bearer("alice")  # one token, used twice
    known = await client.get("/limited-auth/x", headers=alice)  # verified, then cached
    assert known.status == 200
    upstream.requests.clear()
    no_token = await client.get("/limited-auth/x")
    bad_token = await client.get("/limited-auth/x", headers={"Authorization": "Bearer nope"})
    basic = await client.get("/limited-auth/x", headers={"Authorization": "Basic YTpi"})
    flood = await client.get("/limited-auth/x", headers={"Authorization": "Bearer nope"})

    assert [r.status for r in (no_token, bad_token, basic, flood)] == [401, 401, 401, 429]
    for response, remaining in zip((no_token, bad_token, basic, flood), [2, 1, 0, 0], strict=True):
        assert_limit_headers(response, remaining)
    assert "Retry-After" in flood.headers
    assert upstream.requests == []
    # An address over its limit from bad tokens is refused before any further token from it is
    # verified (a flood costs a dict lookup each)...
    blocked = await client.get("/limited-auth/x", headers=bearer("bob"))
    assert blocked.status == 429
    assert_limit_headers(blocked, 0)
    # ...except a token already known to be good: a user behind the flooder's NAT keeps working,
    # limited as themself.
    still_fine = await client.get("/limited-auth/x", headers=alice)
    assert still_fine.status == 200


async def test_streamed_responses_carry_the_headers(client):
    for remaining in (2, 1):
        response = await client.get("/limited/stream")
        assert response.status == 200
        assert "Content-Length" not in response.headers
        assert await response.read() == b"one,two,three"
        assert_limit_headers(response, remaining)


async def test_the_gateways_headers_replace_an_upstreams_own(make_gateway, make_upstream):
    # A backend with limits of its own: the client is limited by the gateway first, so the
    # gateway's figures are the ones it must see, on buffered and streamed answers alike.
    own = {"RateLimit-Policy": '"backend";q=1000;w=1', "X-RateLimit-Remaining": "999"}

    async def reply(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/stream"):
            response = web.StreamResponse(headers=own)
            await response.prepare(request)
            await response.write_eof(b"streamed")
            return response
        return web.json_response({"ok": True}, headers=own)

    backend = await make_upstream(reply)
    client = await make_gateway(service(backend.url, limited_routes()), AUTH_ENV)
    for path, remaining in (("/limited/x", 2), ("/limited/stream", 1)):
        response = await client.get(path)
        assert response.status == 200
        assert response.headers.getall("RateLimit-Policy") == [POLICY_3_PER_MINUTE]
        assert response.headers.getall("X-RateLimit-Remaining") == [str(remaining)]


async def test_retry_after_is_never_earlier_than_the_real_reset(client):
    # 2 per 3 s: a request's worth every 1.5 s, so a rounded-down Retry-After (1) would be early.
    assert [(await client.get("/fast")).status for _ in range(2)] == [200, 200]
    refused = await client.get("/fast")
    answered_at = time.monotonic()
    assert refused.status == 429
    retry_after = int(refused.headers["Retry-After"])
    assert refused.headers["RateLimit"] == f'"route";r=0;t={retry_after}'
    assert retry_after == 2

    # Poll until the limiter lets one through. No request sent at or after the moment Retry-After
    # named may have been refused (a rounded-down 1 would be: the reset is 1.5 s after the 2nd).
    last_refused = answered_at
    deadline = answered_at + 5
    while True:
        assert time.monotonic() < deadline, "never allowed again"
        sent_at = time.monotonic()
        if (await client.get("/fast")).status == 200:
            break
        last_refused = sent_at
        await asyncio.sleep(0.02)
    assert last_refused < answered_at + retry_after
    assert last_refused > answered_at + 0.5  # and 429s did continue well into the 1.5 s


# -- buckets -----------------------------------------------------------------------------------


async def test_tokens_are_limited_per_subject_anonymous_clients_per_address(client):
    async def statuses(headers: dict[str, str], n: int = 4) -> list[int]:
        return [(await client.get("/limited-optional/x", headers=headers)).status for _ in range(n)]

    assert await statuses(bearer("alice")) == [200, 200, 200, 429]
    assert await statuses(bearer("bob")) == [200, 200, 200, 429]  # same address, own bucket
    assert await statuses({}) == [200, 200, 200, 429]  # the address's bucket was never touched
    assert await statuses(bearer("alice"), 1) == [429]


async def test_forwarded_for_from_an_untrusted_peer_cannot_change_the_bucket(client):
    spoofed = [f"203.0.113.{n}" for n in range(5)]
    responses = [await client.get("/limited/x", headers={"X-Forwarded-For": ip}) for ip in spoofed]

    assert [r.status for r in responses] == [200, 200, 200, 429, 429]


async def test_forwarded_for_from_a_trusted_proxy_picks_the_client_bucket(make_gateway, upstream):
    client = await make_gateway(
        service(upstream.url, limited_routes()), {**AUTH_ENV, "TRUSTED_PROXIES": "127.0.0.1/32"}
    )

    async def statuses(forwarded_for: str, n: int) -> list[int]:
        return [
            (await client.get("/limited/x", headers={"X-Forwarded-For": forwarded_for})).status
            for _ in range(n)
        ]

    assert await statuses("198.51.100.7", 3) == [200, 200, 200]
    assert await statuses("198.51.100.8", 3) == [200, 200, 200]  # another client behind the proxy
    # Only the rightmost untrusted hop counts: what the client wrote to its left is ignored.
    assert await statuses("6.6.6.6, 198.51.100.7", 1) == [429]
    assert await statuses("7.7.7.7, 198.51.100.8", 1) == [429]


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def shared_prefix(redis_client: Any) -> AsyncIterator[str]:
    """A route prefix no other test uses; its buckets in the shared Redis are removed afterwards."""
    tag = uuid.uuid4().hex
    yield f"/rl-{tag}"
    keys = [key async for key in redis_client.scan_iter(match=f"gateway:rl:*{tag}*")]
    if keys:
        await redis_client.delete(*keys)


async def test_two_gateway_instances_sharing_redis_share_the_limit(
    make_gateway, upstream, shared_prefix, redis_client
):
    config = service(upstream.url, limited_routes(shared_prefix))
    first = await make_gateway(config, {**AUTH_ENV, "REDIS_URL": REDIS_URL})
    second = await make_gateway(config, {**AUTH_ENV, "REDIS_URL": REDIS_URL})

    answers = []
    for client in (first, second, first, second, first):
        response = await client.get(shared_prefix + "/x")
        answers.append((response.status, response.headers["X-RateLimit-Remaining"]))

    assert answers == [(200, "2"), (200, "1"), (200, "0"), (429, "0"), (429, "0")]
    assert await redis_client.exists(f"gateway:rl:ip:127.0.0.1:{shared_prefix}:3/60") == 1


async def test_a_raised_limit_applies_after_a_restart_to_a_client_already_limited(
    make_gateway, upstream, shared_prefix
):
    config = service(upstream.url, [{"prefix": shared_prefix, "auth": "none"}])

    async def restart(default: str) -> Any:
        return await make_gateway(config, {**AUTH_ENV, "REDIS_URL": REDIS_URL, "RATE_LIMIT_DEFAULT": default})

    strict = await restart("1/day")
    assert [(await strict.get(shared_prefix + "/x")).status for _ in range(2)] == [200, 429]

    raised = await (await restart("1000/second")).get(shared_prefix + "/x")
    assert raised.status == 200
    assert_limit_headers(raised, 999, '"default";q=1000;w=1')
    assert raised.headers["X-RateLimit-Reset"] == "1"
    assert "Retry-After" not in raised.headers

    # The same limit again finds the client's bucket in Redis: a restart is no way out of it.
    again = await (await restart("1/day")).get(shared_prefix + "/x")
    assert again.status == 429
    assert int(again.headers["Retry-After"]) > 86_000
    assert_limit_headers(again, 0, '"default";q=1;w=86400')


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_redis_stopped_mid_test_falls_back_then_recovers_shared_limits(
    make_gateway, upstream, private_redis
):
    url = private_redis.url
    routes = [*limited_routes(), {"prefix": "/probe", "rate_limit": "1000/minute", "auth": "none"}]
    client = await make_gateway(service(upstream.url, routes), {**AUTH_ENV, "REDIS_URL": url})
    probe = aioredis.Redis.from_url(url, socket_connect_timeout=1)

    async def redis_component() -> dict[str, Any]:
        return (await (await client.get("/health/detailed")).json())["components"]["redis"]

    try:
        assert (await client.get("/limited/x")).status == 200
        assert await probe.exists("gateway:rl:ip:127.0.0.1:/limited:3/60") == 1
        healthy = await redis_component()
        assert (healthy["status"], healthy["rate_limit_fallback"]) == ("healthy", False)

        private_redis.stop()
        # Still answered, and still limited: the in-process fallback has the same limits.
        statuses = [(await client.get("/limited/x")).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429]

        seen: dict[str, Any] = {}

        async def fallback_reported() -> bool:
            seen.update(await redis_component())
            return seen["status"] == "unhealthy" and seen["rate_limit_fallback"] is True

        await poll(fallback_reported, "health to report the fallback")
        assert "error" in seen
        assert (await (await client.get("/health/detailed")).json())["status"] == "degraded"

        private_redis.start()  # same port, empty
        await probe.aclose()
        probe = aioredis.Redis.from_url(url, socket_connect_timeout=1)

        async def shared_again() -> bool:
            await client.get("/probe/x")  # one request per probe interval tries Redis again
            return await probe.exists("gateway:rl:ip:127.0.0.1:/probe:1000/60") == 1

        await poll(shared_again, "rate limits to go back to Redis")

        async def recovered() -> bool:
            seen.update(await redis_component())
            return seen["status"] == "healthy" and seen["rate_limit_fallback"] is False

        await poll(recovered, "health to report Redis back")
    finally:
        await probe.aclose()


async def poll(predicate: Callable[[], Any], what: str, deadline_s: float = 8.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out after {deadline_s:g}s waiting for {what}"
        await asyncio.sleep(0.05)


# -- Redis refusing the gateway's user -----------------------------------------------------------


@pytest.fixture
async def acl_user(redis_client: Any) -> AsyncIterator[Callable[..., Awaitable[tuple[str, str, str]]]]:
    """``await acl_user(*rules)``: a Redis user of this test's own on every key; its name, password
    and a URL that logs in as it. Deleted afterwards, which closes its connections."""
    names: list[str] = []

    async def make(*rules: str) -> tuple[str, str, str]:
        name, password = f"test-rl-{uuid.uuid4()}", uuid.uuid4().hex
        names.append(name)
        await redis_client.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", *rules)
        return name, password, REDIS_URL.replace("redis://", f"redis://{name}:{password}@", 1)

    yield make
    if names:
        await redis_client.execute_command("ACL", "DELUSER", *names)


def ratelimit_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gateway.ratelimit"]


REFUSED = (
    logging.ERROR,
    "rate limits: Redis refuses the gateway's user; using in-process limits until that is fixed",
)


@pytest.mark.parametrize(
    ("refused", "error"),
    [
        pytest.param(("evalsha", "eval", "script"), "NoPermissionError: ", id="the-script"),
        # Redis checks the commands a script calls against the user too; the refusal comes back
        # as the script's error, in words that vary with the version.
        pytest.param(("time",), "ResponseError: ", id="a-command-inside-it"),
    ],
)
async def test_a_user_refused_the_script_is_one_error_and_unhealthy_though_ping_passes(
    make_gateway, upstream, acl_user, redis_client, caplog, refused, error
):
    """Redis answered PING for a user refused EVALSHA: ``/health/detailed`` said healthy, and the
    log said "Redis unavailable", as for an outage."""
    name, _, url = await acl_user("+@all", *(f"-{command}" for command in refused))
    routes = [{"prefix": "/r", "rate_limit": "2/minute", "auth": "none"}]
    client = await make_gateway(service(upstream.url, routes), {**AUTH_ENV, "REDIS_URL": url})
    with caplog.at_level(logging.INFO, logger="gateway.ratelimit"):
        # Answered and limited all the same: the in-process fallback has the same limits.
        assert [(await client.get("/r/x")).status for _ in range(3)] == [200, 200, 429]
        assert ratelimit_records(caplog) == [REFUSED]
        (record,) = [r for r in caplog.records if r.name == "gateway.ratelimit"]
        assert record.error.startswith("redis: " + error), record.error
        assert record.fix == f"ACL SETUSER {name} with the commands and keys docs/operations.md lists"

        redis = (await (await client.get("/health/detailed")).json())["components"]["redis"]
        assert (redis["status"], redis["rate_limit_fallback"]) == ("unhealthy", True)
        assert redis["error"].startswith("rate limits: redis: " + error)
        assert redis["fix"] == record.fix

        await redis_client.execute_command("ACL", "SETUSER", name, *(f"+{command}" for command in refused))

        async def shared_again() -> bool:
            await client.get("/r/x")  # one request per probe interval tries Redis again
            return any(
                m == "rate limits: Redis is back, shared limits restored"
                for _, m in ratelimit_records(caplog)
            )

        await poll(shared_again, "rate limits to go back to Redis")
        assert ratelimit_records(caplog)[:1] == [REFUSED]  # and no second error meanwhile

        async def healthy() -> bool:
            redis = (await (await client.get("/health/detailed")).json())["components"]["redis"]
            return redis["status"] == "healthy" and "fix" not in redis

        await poll(healthy, "health to report Redis usable")


async def test_a_wrong_password_is_one_error_naming_the_url_and_never_the_password(
    make_gateway, upstream, acl_user, caplog
):
    _, password, right = await acl_user("+@all")
    wrong = right.replace(password, "wrong-" + password)
    routes = [{"prefix": "/r", "rate_limit": "2/minute", "auth": "none"}]
    client = await make_gateway(service(upstream.url, routes), {**AUTH_ENV, "REDIS_URL": wrong})
    with caplog.at_level(logging.INFO, logger="gateway"):
        # Before any request: PING alone is refused, and says what to fix.
        first = (await (await client.get("/health/detailed")).json())["components"]["redis"]
        assert [(await client.get("/r/x")).status for _ in range(3)] == [200, 200, 429]
        redis: dict[str, Any] = {}

        async def fallback_reported() -> bool:  # the report is cached for a second
            redis.update((await (await client.get("/health/detailed")).json())["components"]["redis"])
            return redis["rate_limit_fallback"]

        await poll(fallback_reported, "health to report the fallback")
    assert ratelimit_records(caplog) == [REFUSED]
    (record,) = [r for r in caplog.records if r.name == "gateway.ratelimit"]
    assert record.error.startswith("redis: AuthenticationError: invalid username-password pair"), record.error
    assert record.fix.startswith("check the user and password in REDIS_URL")
    for component in (first, redis):
        assert component["status"] == "unhealthy"
        assert component["error"].startswith("AuthenticationError: invalid username-password pair")
        assert component["fix"] == record.fix
    assert first["rate_limit_fallback"] is False and redis["rate_limit_fallback"] is True
    assert password not in str([vars(r) for r in caplog.records]) + str(first) + str(redis)
