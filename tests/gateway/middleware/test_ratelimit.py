from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import signal
import time
import uuid
from collections.abc import Callable

import jwt
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.keys import route_table_key
from gateway.limiter import FailoverLimiter, MemoryLimiter, RedisLimiter
from gateway.middleware.auth import TokenVerifier
from gateway.routing import RouteTable
from gateway.settings import AuthSettings, RateLimit, Route
from tests.conftest import REDIS_URL
from tests.helpers import PrivateRedis, free_port

from .app import ROUTES, make_app

SECRET = "rate-limit-tests-" + "s" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_limiter(redis_client):
    """RedisLimiters on a per-test key prefix; the prefix's keys are deleted afterwards."""
    prefix = f"test:rl:{uuid.uuid4().hex}:"
    made = []

    def build() -> RedisLimiter:
        limiter = RedisLimiter.from_url(REDIS_URL, prefix=prefix, timeout=0.5)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.close()
    keys = [key async for key in redis_client.scan_iter(match=prefix + "*")]
    if keys:
        await redis_client.delete(*keys)


# -- the algorithm, in-process with an injected clock ------------------------------------------


async def test_exact_counts_at_the_boundary_and_retry_after():
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limit = RateLimit(5, 10.0)
    decisions = [await limiter.hit("k", limit) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert decisions[-1].retry_after == pytest.approx(2.0)
    clock.now += 1.999
    assert not (await limiter.hit("k", limit)).allowed
    clock.now += 0.001
    allowed = await limiter.hit("k", limit)
    assert allowed.allowed
    assert allowed.remaining == 0


async def test_full_reset_after_the_period():
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limit = RateLimit(3, 6.0)
    for _ in range(3):
        await limiter.hit("k", limit)
    first = await limiter.hit("k", limit)
    assert not first.allowed
    assert first.reset_after == pytest.approx(6.0)
    clock.now += 6.0
    again = [await limiter.hit("k", limit) for _ in range(4)]
    assert [d.allowed for d in again] == [True, True, True, False]


async def test_keys_are_independent():
    limiter = MemoryLimiter(clock=Clock())
    limit = RateLimit(1, 60.0)
    assert (await limiter.hit("a", limit)).allowed
    assert (await limiter.hit("b", limit)).allowed
    assert not (await limiter.hit("a", limit)).allowed


@pytest.mark.parametrize("period", [1.0, 60.0, 3600.0])
def test_one_per_period_allows_the_first_request_at_any_clock_value(period):
    """``(now + 60) - 60`` rounds one ulp above ``now`` for about a quarter of the clock values
    within a minute below a power of two: the first request of a fresh one-per-minute bucket was
    refused there (seen as a flaky end-to-end test when the machine's uptime neared 2048 s), and
    its reset could read 61 s."""
    limit = RateLimit(1, period)
    clock = Clock()
    refused = []
    for power in (11, 12, 13, 20, 27):  # monotonic clocks count seconds since boot
        for step in range(200):
            clock.now = 2.0**power - period * (step + 0.5) / 200
            limiter = MemoryLimiter(clock=clock)
            first, second = limiter.hit_now("k", limit), limiter.hit_now("k", limit)
            if not first.allowed or second.allowed or first.reset_after != period:
                refused.append((clock.now, first, second))
    assert refused == []


async def test_idle_keys_are_swept_and_memory_is_bounded():
    clock = Clock()
    limiter = MemoryLimiter(clock=clock, max_keys=100, sweep_every=1.0)
    limit = RateLimit(10, 1.0)
    for i in range(500):
        await limiter.hit(f"k{i}", limit)
    assert len(limiter) == 100  # least recently used dropped beyond max_keys
    clock.now += 2.0  # all buckets full again: nothing left worth remembering
    await limiter.hit("fresh", limit)
    assert len(limiter) == 1


def test_past_max_keys_the_least_recently_used_buckets_go_in_a_batch():
    # Dropping the oldest bucket one by one walked the holes that earlier deletions left at the
    # front of the dict: each new client cost O(max_keys) under a flood of new addresses. A batch
    # (a 64th of max_keys) pays for that walk once; counted here, not timed.
    limiter = MemoryLimiter(clock=Clock(), max_keys=6_400)
    limit = RateLimit(10, 60.0)
    keys = [f"ip:10.0.{i >> 8}.{i & 255}:/x:10/60" for i in range(6_401)]
    for key in keys[:6_400]:
        limiter.hit_now(key, limit)
    limiter.hit_now(keys[0], limit)  # used again: now the most recently used
    assert len(limiter) == 6_400

    limiter.hit_now(keys[6_400], limit)

    assert len(limiter) == 6_401 - 100
    assert set(limiter._tat) == {keys[0], *keys[101:]}

    for key in keys[1:100]:  # the next 99 new clients fit without dropping anyone
        limiter.hit_now(key, limit)
    assert len(limiter) == 6_400


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(1, 20),
    period=st.sampled_from([1.0, 3.0, 7.0, 60.0]),
    gaps=st.lists(st.floats(0, 2.0, allow_nan=False), min_size=1, max_size=80),
)
def test_gcra_bound_holds_and_retry_after_is_exact(limit, period, gaps):
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    rate = RateLimit(limit, period)
    allowed_at: list[float] = []
    for gap in gaps:
        clock.now += gap
        decision = limiter.hit_now("k", rate)
        if decision.allowed:
            allowed_at.append(clock.now)
            continue
        # Denied: the rounded-up header value is never earlier than the real moment...
        assert math.ceil(decision.retry_after) >= decision.retry_after
        probe = MemoryLimiter(clock=clock)
        probe._tat = dict(limiter._tat)
        saved = clock.now
        clock.now = saved + decision.retry_after - 1e-6
        assert not probe.hit_now("k", rate).allowed
        clock.now = saved + decision.retry_after
        assert probe.hit_now("k", rate).allowed  # ...and the real moment is exact.
        clock.now = saved
    # GCRA's bound: in any span of W seconds at most limit + W / interval requests pass (a burst
    # of ``limit``, then the steady rate).
    interval = period / limit
    for i, start in enumerate(allowed_at):
        for j in range(i, len(allowed_at)):
            span = allowed_at[j] - start
            assert j - i + 1 <= limit + span / interval + 1e-6


# -- Redis -------------------------------------------------------------------------------------


async def test_redis_exact_counts_at_the_boundary(redis_limiter):
    limiter = redis_limiter()
    limit = RateLimit(5, 60.0)
    decisions = [await limiter.hit("k", limit) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False, False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert 11.5 < decisions[5].retry_after <= 12.0


async def test_redis_one_per_period_allows_the_first_request_then_refuses(redis_limiter):
    limiter = redis_limiter()
    limit = RateLimit(1, 60.0)
    first, second = await limiter.hit("k", limit), await limiter.hit("k", limit)
    assert (first.allowed, first.remaining, first.reset_after) == (True, 0, 60.0)
    assert not second.allowed
    assert 59.0 < second.retry_after <= 60.0


async def test_redis_bucket_refills_after_the_period(redis_limiter):
    limiter = redis_limiter()
    limit = RateLimit(2, 1.0)
    assert [(await limiter.hit("k", limit)).allowed for _ in range(3)] == [True, True, False]
    deadline = time.monotonic() + 3
    while not (decision := await limiter.hit("k", limit)).allowed:
        assert time.monotonic() < deadline, "the Redis bucket never refilled"
        await asyncio.sleep(0.05)
    assert decision.remaining in (0, 1)


async def test_redis_keys_expire_when_idle(redis_limiter, redis_client):
    limiter = redis_limiter()
    await limiter.hit("k", RateLimit(10, 60.0))
    ttl = await redis_client.pttl(limiter._prefix + "k")
    assert 0 < ttl <= 6001  # one interval of debt, not the whole period


async def test_limits_are_shared_by_two_gateway_instances(redis_limiter, aiohttp_client):
    first = await aiohttp_client(make_app(limiter=redis_limiter()))
    second = await aiohttp_client(make_app(limiter=redis_limiter()))
    statuses = []
    for i in range(5):
        client = first if i % 2 else second
        response = await client.get("/api/limited/x")
        statuses.append((response.status, response.headers["X-RateLimit-Remaining"]))
    assert statuses == [(200, "2"), (200, "1"), (200, "0"), (429, "0"), (429, "0")]


async def test_redis_outage_falls_back_with_the_same_limits_and_recovers(tmp_path, caplog):
    server = PrivateRedis(tmp_path)
    server.start()
    port = server.port
    limiter = FailoverLimiter(
        RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", prefix="t:", timeout=0.1),
        MemoryLimiter(),
        probe_interval=0.1,
    )
    limit = RateLimit(3, 60.0)
    try:
        assert (await limiter.hit("on-redis", limit)).allowed
        assert not limiter.fallback_active

        server.stop()
        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            decisions = [await limiter.hit("k", limit) for _ in range(5)]
        assert limiter.fallback_active
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
        outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_logs) == 1  # once, not per request

        server.start()  # same port, empty
        deadline = time.monotonic() + 5
        while limiter.fallback_active:
            assert time.monotonic() < deadline, "did not go back to Redis"
            await limiter.hit("probe", limit)
            await asyncio.sleep(0.02)
        # Back on Redis: its own (fresh) bucket, kept in Redis.
        assert (await limiter.hit("back", limit)).remaining == 2
        probe = RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", prefix="t:")
        try:
            assert await probe._client.exists("t:back") == 1
        finally:
            await probe.close()
    finally:
        await limiter.close()
        server.stop()


async def test_the_outage_is_logged_with_what_failed(caplog):
    port = free_port()  # nothing listens there
    limiter = FailoverLimiter(
        RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", prefix="t:"), MemoryLimiter()
    )
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            await limiter.hit("k", RateLimit(3, 60.0))
    finally:
        await limiter.close()
    (record,) = caplog.records
    # Not redis-py's repr ("redis: network:ConnectionError"): an operator needs the reason.
    assert record.error.startswith("redis: ConnectionError: ")
    assert f"connecting to 127.0.0.1:{port}" in record.error


async def test_a_redis_back_without_the_gateways_user_is_an_error_after_the_outage_warning(tmp_path, caplog):
    """A Redis restarted without its ACL file answers again, and refuses the login: that is no
    longer the outage already logged, and does not pass by itself."""
    server = PrivateRedis(tmp_path)
    server.start()

    password = uuid.uuid4().hex

    async def add_user() -> None:
        admin = aioredis.Redis(port=server.port)
        await admin.execute_command("ACL", "SETUSER", "gw", "on", f">{password}", "~*", "+@all")
        await admin.aclose()

    await add_user()
    # The limiter's clock moves one probe interval per hit: every hit while on the fallback probes.
    now = 0.0

    def clock() -> float:
        return now

    limiter = FailoverLimiter(
        RedisLimiter.from_url(f"redis://gw:{password}@127.0.0.1:{server.port}/0", prefix="t:", timeout=0.1),
        MemoryLimiter(),
        probe_interval=1.0,
        reminder_interval=1e9,  # the outage's reminders are another test's
        clock=clock,
    )
    limit = RateLimit(1000, 60.0)

    def said() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gateway.ratelimit"]

    async def probe() -> None:
        nonlocal now
        now += 1.0
        await limiter.hit("k", limit)

    async def hit_until(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await probe()
            await asyncio.sleep(0.02)

    outage = (logging.WARNING, "rate limits: Redis unavailable, using in-process limits")
    refused = (
        logging.ERROR,
        "rate limits: Redis refuses the gateway's user; using in-process limits until that is fixed",
    )
    back = (logging.WARNING, "rate limits: Redis is back, shared limits restored")
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            await limiter.hit("k", limit)
            server.stop()
            await hit_until("the outage", lambda: said() == [outage])
            server.start()  # same port, no user gw
            await hit_until("the refusal", lambda: said() == [outage, refused])
            for _ in range(5):  # refused again at each probe: said once
                await probe()
            assert said() == [outage, refused]
            assert limiter.refusal is not None and limiter.refusal[1].startswith(
                "check the user and password"
            )
            await add_user()
            await hit_until("Redis to be used again", lambda: not limiter.fallback_active)
        assert said() == [outage, refused, back]
        assert limiter.refusal is None
        (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert error.error.startswith("redis: AuthenticationError: ")
        assert password not in str([vars(r) for r in caplog.records])
    finally:
        await limiter.close()
        server.stop()


async def test_a_long_outage_is_said_again_once_a_minute_and_its_end_with_its_length(caplog):
    clock = Clock()
    port = free_port()  # nothing listens there
    limiter = FailoverLimiter(
        RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", prefix="t:"), MemoryLimiter(), clock=clock
    )
    limit = RateLimit(1000, 60.0)
    said: list[str] = []
    lengths: list[int] = []
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            for step in (0, 30, 29, 2, 30, 30):  # seconds; a request each, after the first a probe
                clock.now += step
                await limiter.hit("k", limit)
                said.append("; ".join(r.getMessage() for r in caplog.records))
                lengths += [r.for_s for r in caplog.records if hasattr(r, "for_s")]
                caplog.clear()
    finally:
        await limiter.close()
    unavailable = "rate limits: Redis unavailable, using in-process limits"
    still = "rate limits: Redis still unavailable, using in-process limits"
    assert said == [unavailable, "", "", still, "", still]
    assert lengths == [61, 121]
    assert limiter.fallback_active


async def test_a_redis_restarted_between_requests_is_no_outage(tmp_path, caplog):
    # The pool's idle connections died with the old server; redis-py (8.x, its maintenance
    # notifications on "auto") hands them out unchecked, and each failed once with "Connection
    # closed by server": the gateway flipped to local limits and back, logging both, per connection.
    server = PrivateRedis(tmp_path)
    server.start()
    limiter = FailoverLimiter(
        RedisLimiter.from_url(server.url, prefix="t:", timeout=0.5), MemoryLimiter(), probe_interval=60
    )
    limit = RateLimit(100, 60.0)
    try:
        await asyncio.gather(*(limiter.hit(f"before-{i}", limit) for i in range(8)))  # 8 pooled
        server.stop()
        server.start()  # same port, empty, before any request noticed

        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            await asyncio.gather(*(limiter.hit(f"after-{i}", limit) for i in range(8)))

        assert not limiter.fallback_active
        assert [r.getMessage() for r in caplog.records] == []
        with server.client() as probe:
            assert probe.exists(*(f"t:after-{i}" for i in range(8))) == 8
    finally:
        await limiter.close()
        server.stop()


async def test_hung_redis_costs_one_short_timeout_then_the_fallback(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    port = server.port
    limiter = FailoverLimiter(
        RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", prefix="t:", timeout=0.05),
        MemoryLimiter(),
        probe_interval=60,
    )
    try:
        await limiter.hit("k", RateLimit(3, 60.0))
        server.process.send_signal(signal.SIGSTOP)  # connected, but never answers
        started = time.monotonic()
        await limiter.hit("k", RateLimit(3, 60.0))
        assert time.monotonic() - started < 0.5
        assert limiter.fallback_active
        started = time.monotonic()
        for _ in range(20):  # no probing before probe_interval: no waiting at all
            await limiter.hit("k", RateLimit(3, 60.0))
        assert time.monotonic() - started < 0.05
    finally:
        server.process.send_signal(signal.SIGCONT)
        await limiter.close()
        server.stop()


# -- the middleware, end to end ----------------------------------------------------------------

POLICY = re.compile(r'^"(default|route)";q=(\d+);w=(\d+)$')
RATELIMIT = re.compile(r'^"(default|route)";r=(\d+);t=(\d+)$')


async def test_headers_on_allowed_and_limited_responses(aiohttp_client):
    clock = Clock()
    client = await aiohttp_client(make_app(limiter=MemoryLimiter(clock=clock)))
    first = await client.get("/api/limited/x")
    assert first.status == 200
    assert first.headers["RateLimit-Policy"] == '"route";q=3;w=10'
    assert first.headers["RateLimit"] == '"route";r=2;t=4'  # 3.33 s of debt, rounded up
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == ("3", "2")
    assert first.headers["X-RateLimit-Reset"] == "4"
    # The draft's earlier spelling, as Kong sends it, says the same.
    assert [first.headers[f"RateLimit-{f}"] for f in ("Limit", "Remaining", "Reset")] == ["3", "2", "4"]
    assert "Retry-After" not in first.headers
    await client.get("/api/limited/x")
    await client.get("/api/limited/x")
    limited = await client.get("/api/limited/x")
    assert limited.status == 429
    assert (await limited.json()) == {"detail": "Too Many Requests"}
    assert limited.headers["Retry-After"] == "4"  # 3.33 s rounded up, never down
    assert limited.headers["RateLimit"] == '"route";r=0;t=4'
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert limited.headers["X-RateLimit-Reset"] == "10"
    assert [limited.headers[f"RateLimit-{f}"] for f in ("Limit", "Remaining", "Reset")] == ["3", "0", "10"]
    assert POLICY.match(limited.headers["RateLimit-Policy"])


async def test_retry_after_is_never_earlier_than_the_reset(aiohttp_client):
    clock = Clock()
    client = await aiohttp_client(make_app(limiter=MemoryLimiter(clock=clock)))
    for _ in range(3):
        await client.get("/api/limited/x")
    limited = await client.get("/api/limited/x")
    retry_after = int(limited.headers["Retry-After"])
    clock.now += 10 / 3 - 0.01  # just before the real moment: still limited
    assert (await client.get("/api/limited/x")).status == 429
    clock.now += retry_after - (10 / 3 - 0.01)  # at Retry-After: allowed
    assert (await client.get("/api/limited/x")).status == 200


async def test_default_limit_applies_where_the_route_sets_none(aiohttp_client):
    client = await aiohttp_client(make_app(limiter=MemoryLimiter(clock=Clock()), default=RateLimit(2, 60.0)))
    statuses = [(await client.get("/api/open/x")).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    response = await client.get("/api/open/x")
    assert response.headers["RateLimit-Policy"] == '"default";q=2;w=60'


async def test_limits_are_per_route_prefix(aiohttp_client):
    client = await aiohttp_client(make_app(limiter=MemoryLimiter(clock=Clock()), default=RateLimit(1, 60.0)))
    assert (await client.get("/api/open/a")).status == 200
    assert (await client.get("/api/open/b")).status == 429
    assert (await client.get("/api/limited/a")).status == 200


async def test_streamed_responses_get_the_headers_through_on_response_prepare(aiohttp_client):
    client = await aiohttp_client(make_app(limiter=MemoryLimiter(clock=Clock())))
    response = await client.get("/api/limited/stream")
    assert response.status == 200
    assert await response.read() == b"chunk"
    assert response.headers["X-RateLimit-Remaining"] == "2"
    assert RATELIMIT.match(response.headers["RateLimit"])


async def test_spoofed_forwarded_for_cannot_escape_the_bucket(aiohttp_client):
    client = await aiohttp_client(make_app(limiter=MemoryLimiter(clock=Clock())))
    statuses = [
        (await client.get("/api/limited/x", headers={"X-Forwarded-For": f"198.51.100.{i}"})).status
        for i in range(5)
    ]
    assert statuses == [200, 200, 200, 429, 429]


async def test_trusted_proxy_clients_get_their_own_buckets(aiohttp_client):
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    client = await aiohttp_client(make_app(limiter=MemoryLimiter(clock=Clock()), trusted=trusted))
    for _ in range(3):
        assert (await client.get("/api/limited/x", headers={"X-Forwarded-For": "198.51.100.1"})).status == 200
    limited = await client.get("/api/limited/x", headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.1"})
    assert limited.status == 429  # prepending a hop does not change who the client is
    other = await client.get("/api/limited/x", headers={"X-Forwarded-For": "198.51.100.2"})
    assert other.status == 200
    assert (await other.json())["client_ip"] == "198.51.100.2"


# -- the two stages around authentication ------------------------------------------------------


class CountingVerifier(TokenVerifier):
    calls = 0

    async def verify(self, token):
        self.calls += 1
        return await super().verify(token)


def _auth_app(default: RateLimit, verifier: TokenVerifier | None = None):
    auth = AuthSettings(jwks_url=None, algorithms=("HS256",), jwt_secret=SECRET)
    return make_app(
        auth=auth,
        verifier=verifier or TokenVerifier(auth),
        limiter=MemoryLimiter(clock=Clock()),
        default=default,
    )


def _token(sub: str) -> dict[str, str]:
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


async def test_bad_tokens_are_charged_to_the_address(aiohttp_client):
    verifier = CountingVerifier(AuthSettings(jwks_url=None, algorithms=("HS256",), jwt_secret=SECRET))
    client = await aiohttp_client(_auth_app(RateLimit(3, 60.0), verifier))
    bad = {"Authorization": "Bearer not-a-token"}
    responses = [await client.get("/api/required/x", headers=bad) for _ in range(6)]
    assert [r.status for r in responses] == [401, 401, 401, 429, 429, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses[:3]] == ["2", "1", "0"]
    assert int(responses[5].headers["Retry-After"]) >= 1
    # Once the address is out of budget, further tokens are refused without being verified.
    assert verifier.calls == 4
    # The failures used the address's bucket, the same one anonymous requests use.
    assert (await client.get("/api/required/x")).status == 429


async def test_a_remembered_refusal_counts_its_reset_down_with_its_retry_after(aiohttp_client):
    clock = Clock()
    auth = AuthSettings(jwks_url=None, algorithms=("HS256",), jwt_secret=SECRET)
    app = make_app(
        auth=auth,
        verifier=TokenVerifier(auth),
        limiter=MemoryLimiter(clock=clock),
        default=RateLimit(3, 60.0),
        clock=clock,
    )
    client = await aiohttp_client(app)
    bad = {"Authorization": "Bearer not-a-token"}
    assert [(await client.get("/api/required/x", headers=bad)).status for _ in range(4)] == [401] * 3 + [429]

    clock.now += 10  # still refused, from the address's remembered refusal
    again = await client.get("/api/required/x", headers=bad)

    assert again.status == 429
    assert (again.headers["Retry-After"], again.headers["RateLimit"]) == ("10", '"default";r=0;t=10')
    # The bucket is full 60 s after the three charges, so 50 s from now: not the 60 said before.
    assert again.headers["RateLimit-Reset"] == again.headers["X-RateLimit-Reset"] == "50"

    clock.now += 9.6  # 0.4 s left: rounded up, never a Retry-After of 0 that asks for a retry now
    last = await client.get("/api/required/x", headers=bad)

    assert last.status == 429
    assert (last.headers["Retry-After"], last.headers["RateLimit"]) == ("1", '"default";r=0;t=1')


async def test_authenticated_clients_are_limited_by_subject_not_address(aiohttp_client):
    client = await aiohttp_client(_auth_app(RateLimit(3, 60.0)))
    alice, bob = _token("alice"), _token("bob")
    assert [(await client.get("/api/required/x", headers=alice)).status for _ in range(4)] == [
        200,
        200,
        200,
        429,
    ]
    # Same address, another subject: its own bucket.
    response = await client.get("/api/required/x", headers=bob)
    assert response.status == 200
    assert response.headers["X-RateLimit-Remaining"] == "2"
    # And the address's anonymous bucket was never touched by either of them.
    assert [(await client.get("/api/optional/x")).status for _ in range(3)] == [200, 200, 200]


async def test_a_changed_route_limit_gives_a_limited_subject_a_fresh_bucket(aiohttp_client):
    client = await aiohttp_client(_auth_app(RateLimit(3, 60.0)))
    alice = _token("alice")
    assert [(await client.get("/api/required/x", headers=alice)).status for _ in range(4)] == [
        200,
        200,
        200,
        429,
    ]
    live = client.app[route_table_key]
    raised = Route(prefix="/api/required", service="s", rate_limit=RateLimit(1000, 1.0))
    live.current = RouteTable((raised, *(r for r in ROUTES if r.prefix != raised.prefix)))

    response = await client.get("/api/required/x", headers=alice)
    assert response.status == 200
    assert response.headers["RateLimit-Policy"] == '"route";q=1000;w=1'
    assert response.headers["X-RateLimit-Remaining"] == "999"
