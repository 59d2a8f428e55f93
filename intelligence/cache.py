"""Redis as a write-through cache of sessions and of each session's newest messages.

This module knows keys, versions and TTLs, nothing else: values are opaque strings.

Correctness rules, all enforced inside Lua scripts so they hold across replicas:

* Versioned writes: an entry carries the version of the row it was made from (a session's
  ``version`` column, a message list's last ``seq``) and a write only lands if it is newer, so a
  slow, older write can never overwrite a newer entry. A deleted session leaves a tombstone with
  an infinite version for the TTL, so a late write-through cannot resurrect it. A message whose
  append finds no list to extend leaves its seq as the list's version (holding no messages), so
  a reader's fill from an older snapshot cannot land over it.
* Generations: every key lives under ``<prefix><gen>:``, where ``gen`` is a counter in Redis. A
  process that failed (or skipped) a write while Redis was down or slow knows the cache may be
  stale; before it uses Redis again it increments ``gen``, which retires every older entry at
  once for all replicas (the old keys just expire). Writers and filling readers observe ``gen``
  before they read PostgreSQL. A fill is dropped if it changed in between, so nothing read
  before the repair can land after it; a write-through leaves only a mark of its version in the
  new generation (its row may be older than the lost write, but a fill from before its commit
  must not land either). A tombstone is always written.
* A Redis server the cache has not seen before (restarted, perhaps from a snapshot older than the
  last writes; a replica promoted without them) retires the generation: each new connection
  compares the server's ``run_id`` (``INFO server``, new on every start) with the one recorded
  in ``<prefix>server``, and on a change records it and moves ``gen`` on by ``RESTART_STEP``.
  Nothing else would tell: the client reconnects without an error, and the snapshot holds
  entries older than PostgreSQL's rows (a missing message, an old title, a deleted session) and
  the generation they were written under. The step, not 1, because the snapshot's ``gen`` may be
  older than the last bumps: a fill that read PostgreSQL under one of them before the restart
  must not land under the generation the restart moved to (sound while fewer than
  ``RESTART_STEP`` bumps happen between a snapshot and the restart). A marker key, or a counter
  of writes, would be rolled back with the snapshot; checking PostgreSQL per hit would cost what
  the cache saves. The check costs one script per new connection, none per call.
* An entry that cannot be read (not JSON, another shape, a version that is not a number, a key
  of another Redis type) is a miss: the reader drops it and refills it from PostgreSQL. The
  scripts read such a version as absent and delete a key of the wrong type (``pcall``), so no
  write is refused because of it and Redis is not taken for down.
* Redis must never make a call fail or slow: short socket timeouts, no retries, and after a
  failure the cache is left alone for ``retry_after`` seconds; PostgreSQL answers meanwhile.
* A Redis user refused a command the cache needs (INFO, under the common ``-@dangerous``) is not
  Redis being down: it is logged once at ERROR, saying what to grant, and again only after the
  refused call has run in between. The cache keeps trying each ``retry_after``, so granting the
  permission brings it back without a restart. docs/operations.md lists what the user needs.

Known window: a replica that did *not* see the outage may serve an entry that a failed write on
another replica left stale until that replica repairs: it bumps the generation as soon as Redis
answers it again (``retry_after`` after the failure, then again each ``retry_after``), whether
or not it gets more requests; only a replica that dies first leaves the entry to its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.redisrefusal import describe, is_login_refusal, refusal_fix, user_of

from .settings import CacheSettings

__all__ = ["ChatCache", "Epoch", "RecentMessages", "redis_client"]

log = logging.getLogger("intelligence.cache")

# Larger than any real version: marks a deleted session. A float in Lua, still exact.
TOMBSTONE = 2**52

# How far the generation moves on a Redis server not seen before: past every generation used
# since the snapshot it may have started from.
RESTART_STEP = 2**20

Epoch = str  # the generation observed before reading PostgreSQL; None when Redis is unusable

# The calls that are not scripts, as a permission refusal records them.
_BUMP, _EPOCH = "INCR gen", "GET gen"

# How the claim script says that the user may not run INFO. Redis 7.0's refusal inside a script
# does not name the command ("The user executing the script can't run this command").
_INFO_REFUSED = "INFO refused"

# What a logged refusal of the login stopped: every call, and any call that runs ends it.
_LOGIN = "login"

# While Redis stays away, how often that is said again: the last minute of a replica's log shows
# the outage, without a line a second from each replica for as long as it lasts.
OUTAGE_REMINDER = 60.0

# KEYS: gen, server; ARGV: step -> {generation, recorded run_id|false} when the server is new,
# else false. INFO is read here, not by the client: the check and the bump are one atomic step.
_CLAIM_SERVER = """
local info = redis.pcall('INFO', 'server')
if type(info) == 'table' then
  return redis.error_reply('NOPERM {refused}: ' .. string.gsub(info.err, '^ERR ', ''))
end
local id = string.match(info, 'run_id:(%x+)')
if not id then return redis.error_reply('ERR no run_id in INFO server') end
local seen = redis.call('GET', KEYS[2])
if seen == id then return false end
redis.call('SET', KEYS[2], id)
return {redis.call('INCRBY', KEYS[1], ARGV[1]), seen}
""".replace("{refused}", _INFO_REFUSED)

# KEYS: gen; ARGV: prefix, suffix -> {gen, version|false, data|false}
_GET = """
local g = redis.call('GET', KEYS[1]) or '0'
local key = ARGV[1] .. g .. ARGV[2]
local h = redis.pcall('HMGET', key, 'v', 'd')
if h.err then
  redis.call('DEL', key)
  return {g, false, false}
end
return {g, h[1], h[2]}
"""

# A write-through whose generation moved on while it wrote PostgreSQL is the row as committed,
# but maybe older than a write whose loss the new generation repairs: it leaves only a mark of its
# version, holding no data (a miss for readers), so that a reader's fill from a snapshot taken
# before its commit cannot land; a fill of that version or newer replaces the mark. A fill under
# an older generation is dropped. (Dropping the write-through too let such a fill land.)

# KEYS: gen; ARGV: epoch, prefix, suffix, version, data, ttl, fill -> 1 set, 0 older, -1 epoch gone
_PUT = """
local g = redis.call('GET', KEYS[1]) or '0'
local key = ARGV[2] .. g .. ARGV[3]
local v = tonumber(ARGV[4])
local h = redis.pcall('HMGET', key, 'v', 'd')
local cv, held = -1, false
if h.err then
  redis.call('DEL', key)
else
  cv, held = tonumber(h[1]) or -1, h[2] and h[2] ~= ''
end
if g ~= ARGV[1] then
  if ARGV[7] == '1' or cv >= v then return -1 end
  redis.call('DEL', key)
  redis.call('HSET', key, 'v', v, 'd', '')
  redis.call('EXPIRE', key, tonumber(ARGV[6]))
  return -1
end
if cv > v or (cv == v and held) then return 0 end
redis.call('HSET', key, 'v', ARGV[4], 'd', ARGV[5])
redis.call('EXPIRE', key, tonumber(ARGV[6]))
return 1
"""

# Recent messages: one hash per session, fields v (last seq), n (how many of the newest are
# held: seqs v-n+1 .. v) and one field per held seq.
# KEYS: gen; ARGV: prefix, suffix, after, limit -> {gen} on a miss, else {gen, v, items...}
_READ_MESSAGES = """
local g = redis.call('GET', KEYS[1]) or '0'
local key = ARGV[1] .. g .. ARGV[2]
local h = redis.pcall('HMGET', key, 'v', 'n')
if h.err then
  redis.call('DEL', key)
  return {g}
end
local v, n = tonumber(h[1]), tonumber(h[2])
if not v or not n or v >= TOMB then return {g} end
local lo, hi = tonumber(ARGV[3]) + 1, math.min(tonumber(ARGV[3]) + tonumber(ARGV[4]), v)
if lo > v then return {g, h[1]} end
if lo < v - n + 1 then return {g} end
local fields = {}
for s = lo, hi do fields[#fields + 1] = tostring(s) end
local items = redis.call('HMGET', key, unpack(fields))
local out = {g, h[1]}
for i = 1, #items do
  if not items[i] then return {g} end
  out[#out + 1] = items[i]
end
return out
""".replace("TOMB", str(TOMBSTONE))

# KEYS: gen; ARGV: epoch, prefix, suffix, version, ttl, first_seq, fill, items... -> 1 / 0 / -1
_FILL_MESSAGES = """
local g = redis.call('GET', KEYS[1]) or '0'
local key = ARGV[2] .. g .. ARGV[3]
local v = tonumber(ARGV[4])
local n = #ARGV - 7
local h = redis.pcall('HMGET', key, 'v', 'n')
if h.err then h = {} end
local cv, cn = tonumber(h[1]) or -1, tonumber(h[2]) or 0
if g ~= ARGV[1] then
  if ARGV[7] == '1' or cv >= v then return -1 end
  redis.call('DEL', key)
  redis.call('HSET', key, 'v', v, 'n', 0)
  redis.call('EXPIRE', key, tonumber(ARGV[5]))
  return -1
end
if cv > v or (cv == v and cn >= n) then return 0 end
redis.call('DEL', key)
redis.call('HSET', key, 'v', v, 'n', n)
local first = tonumber(ARGV[6])
for i = 8, #ARGV do redis.call('HSET', key, tostring(first + i - 8), ARGV[i]) end
redis.call('EXPIRE', key, tonumber(ARGV[5]))
return 1
"""

# KEYS: gen; ARGV: epoch, prefix, suffix, seq, item, ttl, keep -> 1 appended, 0 not, -1 epoch gone
# No entry, out of order (a concurrent writer's append is late or lost), or a generation that
# moved on: leave a high-water mark holding no messages, so a reader refills from PostgreSQL and
# no older fill can land (a reader that missed and read PostgreSQL before this message committed
# fills after it).
_APPEND_MESSAGE = """
local g = redis.call('GET', KEYS[1]) or '0'
local key = ARGV[2] .. g .. ARGV[3]
local seq = tonumber(ARGV[4])
local h = redis.pcall('HMGET', key, 'v', 'n')
local v, n
if not h.err then v, n = tonumber(h[1]), tonumber(h[2]) end
local moved = g ~= ARGV[1]
if v and n and v >= seq then return moved and -1 or 0 end
if moved or not (v and n) or v ~= seq - 1 then
  redis.call('DEL', key)
  redis.call('HSET', key, 'v', seq, 'n', 0)
  redis.call('EXPIRE', key, tonumber(ARGV[6]))
  return moved and -1 or 0
end
local keep = tonumber(ARGV[7])
redis.call('HSET', key, tostring(seq), ARGV[5], 'v', seq)
if n + 1 > keep then
  redis.call('HDEL', key, tostring(seq - keep))
else
  n = n + 1
end
redis.call('HSET', key, 'n', n)
redis.call('EXPIRE', key, tonumber(ARGV[6]))
return 1
"""

# KEYS: gen; ARGV: epoch, prefix, session suffix, messages suffix, ttl
# Under whatever generation is current: the row is gone, so a tombstone is never stale.
_TOMBSTONE = """
local g = redis.call('GET', KEYS[1]) or '0'
local s, m = ARGV[2] .. g .. ARGV[3], ARGV[2] .. g .. ARGV[4]
redis.call('DEL', s, m)
redis.call('HSET', s, 'v', TOMB, 'd', '')
redis.call('HSET', m, 'v', TOMB, 'n', 0)
redis.call('EXPIRE', s, tonumber(ARGV[5]))
redis.call('EXPIRE', m, tonumber(ARGV[5]))
return 1
""".replace("TOMB", str(TOMBSTONE))


# ARGV: prefix, epoch, suffix. Under an older generation the key is retired anyway.
_DISCARD = """
return redis.call('DEL', ARGV[1] .. ARGV[2] .. ARGV[3])
"""


@dataclass(frozen=True)
class RecentMessages:
    """A page served from the cache: the session's last seq when cached, and the items asked for."""

    last_seq: int
    items: tuple[str, ...]


class ChatCache:
    """The cache as the persistence layer sees it; every method swallows Redis failures.

    A method that reads returns ``(epoch, value)``; a write passes the epoch it observed before
    it touched PostgreSQL back in. An epoch of None means the write could not reach Redis, which
    marks the cache as possibly stale until the generation is bumped.
    """

    def __init__(self, redis: Redis | None, settings: CacheSettings) -> None:
        self._redis = redis
        self._cfg = settings
        self._gen_key = f"{settings.prefix}gen"
        self._down_until = 0.0
        # A process that starts cannot know what writes an earlier one lost (it may have been
        # stopped while Redis was down, before it could retire the entries they left stale):
        # its first use of Redis bumps the generation, as after an outage.
        self._stale = redis is not None
        self._bumping = asyncio.Lock()
        self._failures = 0
        self._repair: asyncio.Task[None] | None = None
        self._closing = False
        # The call a logged permission refusal stopped (a script, or _BUMP, _EPOCH; _LOGIN for the
        # login itself), until it runs.
        self._refused: object = None
        # Since when Redis has been away, and when that was last logged; None while it answers.
        self._outage: tuple[float, float] | None = None
        self._user = user_of(redis)  # for the ACL SETUSER in that line
        self._op_timeout = settings.socket_timeout * 3
        script = redis.register_script if redis is not None else (lambda _: None)
        self._get: Any = script(_GET)
        self._put: Any = script(_PUT)
        self._read_messages: Any = script(_READ_MESSAGES)
        self._fill_messages: Any = script(_FILL_MESSAGES)
        self._append_message: Any = script(_APPEND_MESSAGE)
        self._tombstone: Any = script(_TOMBSTONE)
        self._discard: Any = script(_DISCARD)

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    @property
    def window(self) -> int:
        """How many of a session's newest messages are held; 0 without a cache."""
        return self._cfg.recent_messages if self._redis is not None else 0

    @property
    def usable(self) -> bool:
        """Redis is configured, not in a pause after a failure, and not known to be stale."""
        return self._redis is not None and not self._stale and time.monotonic() >= self._down_until

    # -- failure handling ---------------------------------------------------------------------

    def _failed(self, exc: BaseException | None, *, wrote: bool, call: object = None) -> None:
        if self._redis is None:
            return  # no cache configured: nothing can go stale, nothing to report
        if wrote:
            # The entry this write should have replaced may now be older than PostgreSQL.
            if not self._stale:
                log.warning("cache write lost; cache marked stale until Redis answers again")
            self._stale = True
            self._failures += 1
            self._repair_soon()
        if exc is not None:
            fix = refusal_fix(exc, self._user)
            now = time.monotonic()
            if fix is not None:
                self._outage = None  # Redis answered: the refusal's own line says what is wrong now
                self._report_refusal(exc, call, fix)
            elif self._outage is None:
                self._outage = (now, now)
                log.warning("redis unavailable; serving from PostgreSQL", extra={"error": describe(exc)})
            elif now - self._outage[1] >= OUTAGE_REMINDER:
                since = self._outage[0]
                self._outage = (since, now)
                log.warning(
                    "redis still unavailable; serving from PostgreSQL",
                    extra={"error": describe(exc), "for_s": round(now - since)},
                )
            self._down_until = now + self._cfg.retry_after

    def _report_refusal(self, exc: BaseException, call: object, fix: str) -> None:
        """Once, not on every retry: the refusal lasts until someone changes the user's password
        or ACL, and ``_answered`` logs when that has happened, so a repeat would say nothing new."""
        if self._refused is not None:
            return
        if is_login_refusal(exc):
            self._refused = _LOGIN
            log.error(
                "Redis refuses the chat cache's login; chats are served from PostgreSQL until that is fixed",
                extra={"error": describe(exc), "fix": fix},
            )
            return
        self._refused = call
        if str(exc).startswith(_INFO_REFUSED):
            log.error(
                "the Redis user lacks a permission the chat cache needs: INFO, which it reads to notice"
                " a Redis restart; chats are served from PostgreSQL until it is granted",
                extra={"error": describe(exc), "fix": f"ACL SETUSER {self._user} +info (no restart needed)"},
            )
        else:
            log.error(
                "the Redis user lacks a permission the chat cache needs; chats are served from"
                " PostgreSQL until it is granted",
                extra={"error": describe(exc), "fix": fix},
            )

    def _answered(self, call: object) -> None:
        """Redis ran ``call``: an outage is over, and a refusal of that call (or of the login)
        too. Only that call: a user refused HSET still runs the scripts that read, and each would
        end the refusal, to be reported again at the next write."""
        if self._outage is not None:
            since, self._outage = self._outage[0], None
            log.warning(
                "redis answers again; cache in use", extra={"down_s": round(time.monotonic() - since, 1)}
            )
        refused = self._refused
        if refused is None:
            return
        if call != refused and refused != _LOGIN:
            return
        self._refused = None
        if refused == _LOGIN:
            log.warning("Redis accepts the chat cache's login again; cache in use again")
        else:
            log.warning("the Redis user may now run what the chat cache needs; cache in use again")

    def _repair_soon(self) -> None:
        """Bump the generation as soon as Redis answers, whether or not this process uses the
        cache again. The other replicas cannot know that a write of this one was lost: until the
        bump they serve the entry it left stale (a session's messages without the newest ones),
        and a replica that gets no more requests would never make it, leaving them the TTL."""
        if self._repair is None or self._repair.done():
            self._repair = asyncio.get_running_loop().create_task(self._repair_when_redis_answers())

    async def _repair_when_redis_answers(self) -> None:
        while self._stale and not self._closing:
            # _ready waits out the pause after a failure, then bumps (once, however many wait). A
            # millisecond more: uvloop's timers may fire up to one early, and _ready would still
            # find the pause on, then spin on zero-length sleeps until the clock caught up.
            await asyncio.sleep(max(0.0, self._down_until - time.monotonic()) + 0.001)
            await self._ready()

    async def aclose(self) -> None:
        """Stop a repair still waiting for Redis (the next process bumps the generation)."""
        # The flag too, not just the cancel: on Python 3.11 redis-py's asyncio.wait_for (around
        # each write) swallows a cancel that comes as the write completes, and the loop would go
        # on retrying a Redis that keeps failing, and this wait with it, for ever.
        self._closing = True
        if self._repair is not None:
            self._repair.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repair

    def distrust(self, reason: str) -> None:
        """PostgreSQL may no longer hold what the entries were made from: retire them all before
        the cache is used again. An entry ahead of the database (one restored from a backup, a
        standby promoted without the last commits) would refuse every later write-through as
        older, and keep serving what the database lost until its TTL."""
        if self._redis is None:
            return
        log.warning("cache retired before its next use", extra={"reason": reason})
        self._stale = True
        self._failures += 1

    async def _ready(self) -> bool:
        if self._redis is None or time.monotonic() < self._down_until:
            return False
        if self._stale:
            async with self._bumping:  # one bump, however many requests find the cache stale
                if time.monotonic() < self._down_until:
                    # The bump this one waited for failed: against a hung Redis every waiter's
                    # own try would cost a timeout, one after the other (seconds for the last).
                    return False
                if self._stale:
                    return await self._bump()
        return True

    async def _bump(self) -> bool:
        assert self._redis is not None
        failures = self._failures
        try:
            async with asyncio.timeout(self._op_timeout):
                gen = await self._redis.incr(self._gen_key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc, wrote=False, call=_BUMP)
            return False
        if self._refused is not None or self._outage is not None:
            self._answered(_BUMP)
        if self._failures == failures:  # no write was lost while the bump was on its way
            self._stale = False
        log.info("cache generation bumped", extra={"generation": gen})
        return True

    async def _call(self, script: Any, args: Sequence[Any], *, wrote: bool) -> Any:
        if not await self._ready():
            if wrote:
                self._failed(None, wrote=True)
            return None
        try:
            async with asyncio.timeout(self._op_timeout):
                result = await script(keys=[self._gen_key], args=list(args))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc, wrote=wrote, call=script)
            return None
        if self._refused is not None or self._outage is not None:
            self._answered(script)
        return result

    # -- keys ---------------------------------------------------------------------------------

    @staticmethod
    def _session_suffix(session_id: str) -> str:
        return f":s:{session_id}"

    @staticmethod
    def _messages_suffix(session_id: str) -> str:
        return f":m:{session_id}"

    # -- operations ---------------------------------------------------------------------------

    async def epoch(self) -> Epoch | None:
        """The generation now, observed before a write touches PostgreSQL."""
        if not await self._ready():
            return None
        assert self._redis is not None
        try:
            async with asyncio.timeout(self._op_timeout):
                value = await self._redis.get(self._gen_key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc, wrote=False, call=_EPOCH)
            return None
        if self._refused is not None or self._outage is not None:
            self._answered(_EPOCH)
        return _text(value) if value is not None else "0"

    async def get_session(self, session_id: str) -> tuple[Epoch | None, str | None]:
        found = await self._call(self._get, [self._cfg.prefix, self._session_suffix(session_id)], wrote=False)
        if not found:
            return None, None
        gen, version, data = found
        if version is None or data is None or not data:
            return _text(gen), None
        try:
            if int(version) >= TOMBSTONE:
                return _text(gen), None
        except ValueError:
            await self.discard_session(_text(gen), session_id)
            return _text(gen), None
        return _text(gen), _text(data)

    async def put_session(
        self, epoch: Epoch | None, session_id: str, version: int, data: str, *, fill: bool = False
    ) -> None:
        """Store a session at ``version``. ``fill``: a reader's copy, whose loss makes nothing stale."""
        if epoch is None:
            if not fill:
                self._failed(None, wrote=True)
            return
        await self._call(
            self._put,
            [
                epoch,
                self._cfg.prefix,
                self._session_suffix(session_id),
                version,
                data,
                self._cfg.session_ttl,
                int(fill),
            ],
            wrote=not fill,
        )

    async def get_messages(
        self, session_id: str, *, after: int, limit: int
    ) -> tuple[Epoch | None, RecentMessages | None]:
        found = await self._call(
            self._read_messages,
            [self._cfg.prefix, self._messages_suffix(session_id), after, limit],
            wrote=False,
        )
        if not found:
            return None, None
        if len(found) == 1:
            return _text(found[0]), None
        return _text(found[0]), RecentMessages(int(found[1]), tuple(_text(i) for i in found[2:]))

    async def put_messages(
        self, epoch: Epoch | None, session_id: str, last_seq: int, items: Sequence[str], *, fill: bool = False
    ) -> None:
        """Replace the held messages with ``items``, the newest ones up to ``last_seq``."""
        if epoch is None:
            if not fill:
                self._failed(None, wrote=True)
            return
        items = list(items)[-self._cfg.recent_messages :] if self._cfg.recent_messages else []
        first = last_seq - len(items) + 1
        await self._call(
            self._fill_messages,
            [epoch, self._cfg.prefix, self._messages_suffix(session_id), last_seq,
             self._cfg.messages_ttl, first, int(fill), *items],
            wrote=not fill,
        )  # fmt: skip

    async def append_message(self, epoch: Epoch | None, session_id: str, seq: int, item: str) -> None:
        if epoch is None:
            self._failed(None, wrote=True)
            return
        await self._call(
            self._append_message,
            [epoch, self._cfg.prefix, self._messages_suffix(session_id), seq, item,
             self._cfg.messages_ttl, self._cfg.recent_messages],
            wrote=True,
        )  # fmt: skip

    async def forget_session(self, epoch: Epoch | None, session_id: str) -> None:
        if epoch is None:
            self._failed(None, wrote=True)
            return
        await self._call(
            self._tombstone,
            [epoch, self._cfg.prefix, self._session_suffix(session_id),
             self._messages_suffix(session_id), max(self._cfg.session_ttl, self._cfg.messages_ttl)],
            wrote=True,
        )  # fmt: skip

    async def discard_session(self, epoch: Epoch, session_id: str) -> None:
        """Drop an entry that cannot be read (edited by hand, or written by another program), so
        that the reader's fill from PostgreSQL lands; the versioned write would refuse it."""
        await self._call(
            self._discard, [self._cfg.prefix, epoch, self._session_suffix(session_id)], wrote=False
        )

    async def discard_messages(self, epoch: Epoch, session_id: str) -> None:
        """As ``discard_session``, for the session's held messages."""
        await self._call(
            self._discard, [self._cfg.prefix, epoch, self._messages_suffix(session_id)], wrote=False
        )

    async def ping(self) -> None:
        """Raise unless Redis answers now (for health checks; does not touch the failure state)."""
        if self._redis is None:
            raise RuntimeError("no cache configured")
        async with asyncio.timeout(self._op_timeout):
            await self._redis.ping()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _claim_server(prefix: str) -> Any:
    """The connect hook: before a new connection carries a command, retire the generation if its
    server is not the one the entries were written to (see the module docstring)."""
    keys = (f"{prefix}gen", f"{prefix}server")

    async def on_connect(conn: AbstractConnection) -> None:
        await conn.on_connect()  # what the client does without a hook: AUTH, SELECT, ...
        await conn.send_command("EVAL", _CLAIM_SERVER, len(keys), *keys, RESTART_STEP)
        claimed = await conn.read_response()  # an error reply raises: the connection fails
        if not claimed:
            return
        gen, seen = claimed
        if seen:
            log.warning(
                "redis restarted or failed over; cache entries written before retired",
                extra={"generation": int(gen)},
            )
        else:
            log.info("redis server recorded for the cache", extra={"generation": int(gen)})

    return on_connect


@asynccontextmanager
async def redis_client(settings: CacheSettings) -> AsyncIterator[Redis | None]:
    """A client with short timeouts and no retries: the cache gives up fast and PostgreSQL answers.
    Each new connection checks that its server is the one the cache's entries were written to."""
    if not settings.url:
        yield None
        return
    client = Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        redis_connect_func=_claim_server(settings.prefix),
    )
    try:
        yield client
    finally:
        await client.aclose()
