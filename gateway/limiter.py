"""Rate-limit algorithm behind one tiny interface: ``await limiter.hit(key, limit) -> Decision``.

    Limiter            the protocol the middleware sees
    MemoryLimiter      in-process; per process, bounded memory
    RedisLimiter       shared by every gateway process; one EVALSHA per hit
    FailoverLimiter    Redis while it answers, the in-process limiter while it does not
    LimiterUnavailable raised by RedisLimiter when Redis is down, slow or refuses the gateway's user
                       (only FailoverLimiter sees it)

The algorithm is GCRA (generic cell rate algorithm), identical in both stores. For a limit of
``limit`` requests per ``period`` seconds, each request is worth ``interval = period / limit``
seconds of credit. A bucket keeps one number, its theoretical arrival time (TAT): the time at
which it would be empty again. A request at ``now`` is allowed when
``max(TAT, now) + interval - period <= now`` and then moves TAT forward by one interval.

An idle bucket (TAT not after ``now``) is allowed without that comparison: it always has room
for one request, but for a limit of one per period ``(now + interval) - period`` rounds to one
ulp above ``now`` for about a quarter of the clock values within a period below a power of two,
which refused the first request of a fresh bucket there.

Burst semantics: an idle client may send the whole ``limit`` at once (burst = limit); after that
it gets one request every ``interval`` (100/minute: one every 0.6 s). In any span of ``W``
seconds at most ``limit + W / interval`` requests pass: the sustained rate is exactly
``limit / period``, and credit comes back continuously instead of at a fixed-window edge.

    remaining    whole requests that would pass right now
    reset_after  seconds until the bucket is full again (TAT - now)
    retry_after  0 when allowed; otherwise seconds until the next request passes
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from itertools import islice
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .redisrefusal import describe, refusal_fix, user_of
from .settings import RateLimit

__all__ = [
    "Decision",
    "FailoverLimiter",
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RedisLimiter",
    "create_limiter",
]

log = logging.getLogger("gateway.ratelimit")

# Guards against float noise in ``(period - ahead) / interval`` (2.9999999 must count as 3): a
# ten-thousandth of a request is far below anything a client could observe.
_EPSILON = 1e-4


class Decision(NamedTuple):
    """One hit's outcome. A tuple: one is made per request, and a frozen dataclass's
    ``__init__`` costs several times as much."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float


class Limiter(Protocol):
    """``key`` names one bucket under one ``limit``: its TAT means nothing under another limit (a
    day of 1/day debt would be read as a day of 1000/second debt), so callers put the limit's
    numbers in the key, as the rate-limit middleware does."""

    async def hit(self, key: str, limit: RateLimit) -> Decision: ...

    async def close(self) -> None: ...


class LimiterUnavailable(Exception):
    """The shared store did not answer in time, or refused the gateway; the caller decides what to
    do instead. ``fix`` says what the operator has to change when it refused (see
    gateway.redisrefusal), and is ``None`` for an outage, which passes by itself."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


_new_tuple = tuple.__new__
_floor = math.floor


def _decide(limit: RateLimit, allowed: bool, ahead: float, retry_after: float) -> Decision:
    """``ahead`` is TAT - now after this hit (before it, when denied)."""
    # One per request: written out rather than with max/min and the NamedTuple's Python-level
    # __new__, which together took two thirds of a local hit.
    count = limit.limit
    if allowed:
        period = limit.period
        remaining = _floor((period - ahead) / (period / count) + _EPSILON)
        if remaining > count:
            remaining = count
        elif remaining < 0:
            remaining = 0
    else:
        remaining = 0
    return _new_tuple(  # type: ignore[no-any-return]
        Decision,
        (allowed, count, remaining, ahead if ahead > 0.0 else 0.0, retry_after if retry_after > 0.0 else 0.0),
    )


class MemoryLimiter:
    """GCRA in a dict. Idle buckets (TAT in the past) hold nothing and are swept every
    ``sweep_every`` seconds; beyond ``max_keys`` the least recently used buckets are dropped (a
    64th of ``max_keys`` at a time), which forgets those clients' debt: size ``max_keys`` above the
    number of clients active per period.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
        sweep_every: float = 10.0,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        # Dropping one bucket per new client cost O(max_keys) a hit: every deletion leaves a hole at
        # the front of the dict, and next(iter()) walks all of them (44 us a hit at 100,000 keys
        # under a flood of new addresses, against 1.5). A batch pays for that walk once.
        self._evict_batch = max(1, max_keys // 64)
        self._sweep_every = sweep_every
        self._next_sweep = clock() + sweep_every
        self._tat: dict[str, float] = {}  # insertion order = least recently used first

    def __len__(self) -> int:
        return len(self._tat)

    async def hit(self, key: str, limit: RateLimit) -> Decision:
        return self.hit_now(key, limit)

    def hit_now(self, key: str, limit: RateLimit) -> Decision:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        buckets = self._tat
        tat = buckets.pop(key, now)
        interval = limit.period / limit.limit
        if tat > now:
            ahead = tat - now
            allow_at = tat + interval - limit.period
            if now < allow_at:
                buckets[key] = tat
                return _decide(limit, False, ahead, allow_at - now)
        else:  # idle: room for one, whatever the rounding (module docstring)
            tat, ahead = now, 0.0
        buckets[key] = tat + interval
        if len(buckets) > self._max_keys:
            for oldest in list(islice(buckets, self._evict_batch)):
                del buckets[oldest]
        return _decide(limit, True, ahead + interval, 0.0)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        for key in [key for key, tat in self._tat.items() if tat <= now]:
            del self._tat[key]

    async def close(self) -> None:
        self._tat.clear()


# KEYS[1] bucket; ARGV[1] limit, ARGV[2] period in seconds. Redis's own clock is used, so
# gateways with skewed clocks still share one timeline. TAT is stored with full double
# precision ("%.17g") and counted from 2023-11-14 rather than 1970, which keeps sub-microsecond
# resolution in a double; the key expires when the bucket is full again, so idle keys cost nothing.
# Numbers go back as strings: Redis would truncate Lua numbers to integers. An idle bucket is
# allowed without the float comparison, as in MemoryLimiter.hit_now.
_GCRA_LUA = """
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = (tonumber(clock[1]) - 1700000000) + tonumber(clock[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local interval = period / limit
local ahead = 0
if tat > now then
  ahead = tat - now
  local allow_at = tat + interval - period
  if now < allow_at then
    return {0, string.format('%.17g', ahead), string.format('%.17g', allow_at - now)}
  end
else
  tat = now
end
redis.call('SET', KEYS[1], string.format('%.17g', tat + interval), 'PX', math.ceil((ahead + interval) * 1000) + 1)
return {1, string.format('%.17g', ahead + interval), '0'}
"""


# Short enough that a dead Redis costs a request little, long enough that a busy event loop (which
# delays reading Redis's answer too) does not flip every process to local limits under load: at
# 0.1 s the soak on a loaded 2-core machine saw several flips a minute.
REDIS_TIMEOUT = 0.25
# One EVALSHA takes well under a millisecond: a few dozen connections serve thousands of requests a
# second, and the count of sockets to Redis stays bounded whatever the concurrency.
REDIS_MAX_CONNECTIONS = 64
REDIS_POOL_WAIT = 1.0


class RedisLimiter:
    """GCRA in Redis: one atomic script call per hit, shared by every gateway process."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "gateway:rl:", timeout: float = REDIS_TIMEOUT
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._timeout = timeout
        self._script = client.register_script(_GCRA_LUA)
        self._user = user_of(client)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "gateway:rl:", timeout: float = REDIS_TIMEOUT
    ) -> RedisLimiter:
        # Short socket timeouts and no retry of a timeout: a slow Redis must cost a request
        # ~timeout, not redis-py's default ten retries with exponential backoff. One immediate
        # retry of a connection error: after a Redis restart every idle pooled connection is dead,
        # and redis-py (8.x) hands them out unchecked; without it each failed a request once and
        # flipped the gateway to local limits and back. A dead Redis refuses the retry at once. (A
        # reply lost after the script ran would charge twice: one request's worth, rarely.)
        # A bounded pool whose callers wait for a free connection. With the default pool, a burst
        # of more concurrent requests than connections failed at once (MaxConnectionsError) and
        # flipped the gateway to local limits; waiting only as long as a slow Redis is allowed
        # to take flipped it too, since a busy event loop holds connections longer. Waiting for
        # a connection is this process's own congestion, not Redis failing: it gets longer.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=REDIS_POOL_WAIT,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        # from_pool: closing the client closes the pool and its connections too.
        return cls(aioredis.Redis.from_pool(pool), prefix=prefix, timeout=timeout)

    async def hit(self, key: str, limit: RateLimit) -> Decision:
        try:
            # The socket timeouts catch a Redis that is down or stuck; this outer bound only has to
            # leave room for waiting on the pool (our own congestion) and stop anything unforeseen.
            async with asyncio.timeout(REDIS_POOL_WAIT + self._timeout * 2):
                allowed, ahead, retry_after = await self._script(
                    keys=[self._prefix + key], args=[limit.limit, repr(float(limit.period))]
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise LimiterUnavailable(f"redis: {describe(exc)}", refusal_fix(exc, self._user)) from exc
        return _decide(limit, allowed == 1, float(ahead), float(retry_after))

    async def close(self) -> None:
        await self._client.aclose()


class FailoverLimiter:
    """Redis first; while it fails, the in-process limiter with the same limits.

    The switch is logged once each way: a warning when Redis is away, an error naming what to
    change when it refuses the gateway's user (that does not pass by itself), and again if the one
    turns into the other while on the fallback; an outage again every ``reminder_interval`` seconds
    while it lasts, so that the last minute of a log shows it. While on the fallback, one request per
    ``probe_interval`` tries Redis again (the others do not wait for it); the first answer
    switches back. Buckets are not carried across a switch: each store keeps its own.
    """

    def __init__(
        self,
        primary: Limiter,
        fallback: Limiter,
        *,
        probe_interval: float = 1.0,
        reminder_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._probe_interval = probe_interval
        self._reminder_interval = reminder_interval
        self._clock = clock
        self._next_probe = 0.0
        self._since = self._said = 0.0  # when the fallback began, and when that was last logged
        self.fallback_active = False
        self.fallbacks = 0  # switches to the fallback: an outage between two scrapes still shows
        # While on the fallback and Redis refuses the gateway's user: the error and what to change,
        # for /health/detailed (PING may pass where the rate-limit script is refused).
        self.refusal: tuple[str, str] | None = None

    async def hit(self, key: str, limit: RateLimit) -> Decision:
        if self.fallback_active:
            now = self._clock()
            if now < self._next_probe:
                return await self._fallback.hit(key, limit)
            self._next_probe = now + self._probe_interval  # before awaiting: one prober at a time
        try:
            decision = await self._primary.hit(key, limit)
        except LimiterUnavailable as exc:
            self._failed(exc)
            return await self._fallback.hit(key, limit)
        if self.fallback_active:
            self.fallback_active = False
            self.refusal = None
            log.warning(
                "rate limits: Redis is back, shared limits restored",
                extra={"down_s": round(self._clock() - self._since, 1)},
            )
        return decision

    def _failed(self, exc: LimiterUnavailable) -> None:
        now, fix = self._clock(), exc.fix
        if not self.fallback_active:
            self.fallback_active = True
            self.fallbacks += 1
            self._next_probe = now + self._probe_interval
            self._since = now
        elif (fix is None) == (self.refusal is None):  # the same trouble, said already
            # An outage is said again every reminder_interval; a refusal only once.
            if fix is None and now - self._said >= self._reminder_interval:
                self._said = now
                log.warning(
                    "rate limits: Redis still unavailable, using in-process limits",
                    extra={"error": str(exc), "for_s": round(now - self._since)},
                )
            return
        else:
            self._since = now  # the one trouble turned into the other
        self._said = now
        if fix is not None:
            self.refusal = (str(exc), fix)
            log.error(
                "rate limits: Redis refuses the gateway's user; using in-process limits until that is fixed",
                extra={"error": str(exc), "fix": fix},
            )
        else:
            self.refusal = None
            log.warning("rate limits: Redis unavailable, using in-process limits", extra={"error": str(exc)})

    async def close(self) -> None:
        await self._primary.close()
        await self._fallback.close()


def create_limiter(redis_url: str | None, *, prefix: str = "gateway:rl:") -> Limiter:
    """Redis with the in-process fallback when ``redis_url`` is set, otherwise in-process only."""
    if not redis_url:
        return MemoryLimiter()
    return FailoverLimiter(RedisLimiter.from_url(redis_url, prefix=prefix), MemoryLimiter())
