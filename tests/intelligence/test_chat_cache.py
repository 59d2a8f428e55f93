"""The write-through cache: versioned entries, and PostgreSQL answering when Redis is down or slow."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
from chat_helpers import PrivateRedis, cache, headers, pool, redis_sync, service, wait_until

from intelligence.models import ChatMessage, ChatSession, IdConflict
from intelligence.persistence import _dump_message, _dump_session


async def test_save_session_of_a_changed_session_updates_postgresql_and_the_cache(
    client: Any, user: str
) -> None:
    """The seed's save_session(session) stores the session as it is now (an upsert), written
    through to the cache; only the owner can save it."""
    svc, chat_cache = service(client), cache(client)
    first = await svc.save_session(ChatSession(user_id=user, title="v1", metadata={"a": 1}))
    saved = await svc.save_session(replace(first, title="v2", metadata={"b": 2}))
    assert (saved.id, saved.title, saved.metadata, saved.user_id) == (first.id, "v2", {"b": 2}, user)
    assert saved.version > first.version
    async with pool(client).acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT title, metadata FROM chat_sessions WHERE id = %(id)s", {"id": first.id})
        assert await cur.fetchone() == ("v2", {"b": 2})
    _, cached = await chat_cache.get_session(str(first.id))
    assert cached is not None and '"title": "v2"' in cached
    assert await svc.save_session(saved) == saved  # nothing changed: nothing written

    with pytest.raises(IdConflict):
        await svc.save_session(replace(saved, user_id=f"{user}-other", title="mine now"))
    assert (await svc.get_session(first.id)).user_id == user


async def test_a_slow_older_write_cannot_overwrite_a_newer_entry(client: Any, user: str) -> None:
    svc, chat_cache = service(client), cache(client)
    old = await svc.save_session(ChatSession(user_id=user, title="v1"))
    slow_epoch = await chat_cache.epoch()  # a writer that committed v1 and then stalled
    new = await svc.update_session(old.id, user_id=user, title="v2")
    assert new.version > old.version
    # The stalled write-through of the older row finally reaches Redis.
    await chat_cache.put_session(slow_epoch, str(old.id), old.version, _dump_session(old))
    _, cached = await chat_cache.get_session(str(old.id))
    assert cached is not None and '"title": "v2"' in cached
    assert (await svc.get_session(old.id, user_id=user)).title == "v2"

    # Messages: a late fill made from an older snapshot loses to the appends that came after it.
    first = await svc.save_message(ChatMessage(session_id=old.id, role="user", content="one"))
    second = await svc.save_message(ChatMessage(session_id=old.id, role="user", content="two"))
    await chat_cache.put_messages(slow_epoch, str(old.id), 1, [_dump_message(first)], fill=True)
    await chat_cache.append_message(slow_epoch, str(old.id), 1, _dump_message(first))
    _, page = await chat_cache.get_messages(str(old.id), after=0, limit=10)
    assert page is not None and page.last_seq == 2 and len(page.items) == 2
    assert [m.content for m in await svc.get_messages(old.id)] == ["one", "two"]
    assert second.seq == 2


async def test_a_late_write_cannot_resurrect_a_deleted_session(client: Any, user: str) -> None:
    svc, chat_cache = service(client), cache(client)
    session = await svc.save_session(ChatSession(user_id=user, title="doomed"))
    epoch = await chat_cache.epoch()
    assert await svc.delete_session(session.id, user_id=user)
    await chat_cache.put_session(epoch, str(session.id), session.version + 5, _dump_session(session))
    assert await svc.get_session(session.id) is None
    resp = await client.get(f"/api/v1/chat/sessions/{session.id}", headers=headers(user))
    assert resp.status == 404


async def test_out_of_order_appends_are_never_served_with_a_gap(client: Any, user: str) -> None:
    svc, chat_cache = service(client), cache(client)
    session = await svc.save_session(ChatSession(user_id=user))
    epoch = await chat_cache.epoch()
    one = ChatMessage(session_id=session.id, role="user", content="1", seq=1, id=uuid.uuid4())
    three = ChatMessage(session_id=session.id, role="user", content="3", seq=3, id=uuid.uuid4())
    await chat_cache.append_message(epoch, str(session.id), 1, _dump_message(one))
    await chat_cache.append_message(epoch, str(session.id), 3, _dump_message(three))  # 2 is late
    _, page = await chat_cache.get_messages(str(session.id), after=0, limit=10)
    assert page is None  # a miss (PostgreSQL answers), not [1, 3]
    _, page = await chat_cache.get_messages(str(session.id), after=3, limit=10)
    assert page is not None and page.items == ()  # still knows seq 3 is the newest


async def test_a_late_fill_cannot_hide_a_message_appended_while_the_entry_was_absent(
    client: Any, user: str
) -> None:
    """A reader misses (the entry expired, was evicted, or the generation moved on), reads
    PostgreSQL, and fills the cache after a writer's message committed. The writer's append found
    no entry to extend and left none, so the older fill landed as the newest state: the message,
    acknowledged with a 201, was missing from every page until the next append or the TTL."""
    svc, chat_cache = service(client), cache(client)
    session = await svc.save_session(ChatSession(user_id=user))
    first = await svc.save_message(ChatMessage(session_id=session.id, role="user", content="one"))
    epoch = await chat_cache.epoch()
    await chat_cache.discard_messages(epoch, str(session.id))  # expired or evicted
    # The reader's snapshot holds seq 1 only; then the next message commits and is written through.
    second = await svc.save_message(ChatMessage(session_id=session.id, role="user", content="two"))
    await chat_cache.put_messages(epoch, str(session.id), 1, [_dump_message(first)], fill=True)
    assert [m.content for m in await svc.get_messages(session.id, user_id=user)] == ["one", "two"]
    assert await svc.get_messages(session.id, after=1, user_id=user) == [second]


async def test_a_write_through_from_before_a_generation_bump_keeps_an_older_fill_out(
    client: Any, make_client: Any, user: str, cache_prefix: str
) -> None:
    """The generation moves on (a replica starts, or one repairs after an outage) while a message
    is written: its write-through, made under the old generation, was dropped whole, and a reader
    that had missed in the new one and read PostgreSQL before the commit filled the cache without
    it. The message, answered 201, was missing from every page until the next append or the TTL."""
    svc, chat_cache = service(client), cache(client)
    session = await svc.save_session(ChatSession(user_id=user))
    sid = str(session.id)
    first = await svc.save_message(ChatMessage(session_id=session.id, role="user", content="one"))
    before = await svc.get_session(session.id, user_id=user)
    old = await chat_cache.epoch()  # the writer observes the generation, then writes PostgreSQL
    redis_sync().incr(f"{cache_prefix}gen")  # another replica starts
    new = await chat_cache.epoch()
    # A reader misses in the new generation and reads PostgreSQL (one message); then the message
    # commits (written by a replica without a cache, so only the write-through below reaches it).
    writer = service(await make_client(redis_url=None))
    second = await writer.save_message(ChatMessage(session_id=session.id, role="user", content="two"))
    after = await writer.get_session(session.id, user_id=user)
    await chat_cache.put_session(old, sid, after.version, _dump_session(after))
    await chat_cache.append_message(old, sid, 2, _dump_message(second))
    # The reader's fills land last.
    await chat_cache.put_session(new, sid, before.version, _dump_session(before), fill=True)
    await chat_cache.put_messages(new, sid, 1, [_dump_message(first)], fill=True)
    assert [m.content for m in await svc.get_messages(session.id, user_id=user)] == ["one", "two"]
    assert (await svc.get_session(session.id, user_id=user)).message_count == 2
    # And the entries fill again from PostgreSQL.
    _, cached = await chat_cache.get_messages(sid, after=0, limit=10)
    assert cached is not None and len(cached.items) == 2


async def test_a_message_fill_read_before_a_generation_bump_does_not_land_after_it(
    client: Any, make_client: Any, user: str, cache_prefix: str
) -> None:
    """A reader misses, reads the newest messages from PostgreSQL, and the generation moves on
    before it fills the cache. Under the new generation nothing may be held to refuse the fill as
    older (the write-through of a message written meanwhile was lost), so the fill itself must be
    dropped: the message would be missing from every page until the next append or the TTL."""
    svc, chat_cache = service(client), cache(client)
    session = await svc.save_session(ChatSession(user_id=user))
    first = await svc.save_message(ChatMessage(session_id=session.id, role="user", content="one"))
    reader = await chat_cache.epoch()  # the reader misses and reads message one from PostgreSQL
    redis_sync().incr(f"{cache_prefix}gen")  # another replica starts
    writer = service(await make_client(redis_url=None))  # its write-through is lost
    await writer.save_message(ChatMessage(session_id=session.id, role="user", content="two"))
    await chat_cache.put_messages(reader, str(session.id), 1, [_dump_message(first)], fill=True)
    assert [m.content for m in await svc.get_messages(session.id, user_id=user)] == ["one", "two"]


async def test_the_cache_holds_a_sessions_newest_messages_and_no_more(
    make_client: Any, user: str, cache_prefix: str
) -> None:
    """``recent_messages`` bounds what Redis holds per session, whether the messages came by
    append or by a reader's fill; pages reaching further back are read from PostgreSQL."""
    client = await make_client(recent_messages=3)
    svc = service(client)
    session = await svc.save_session(ChatSession(user_id=user))
    for n in range(1, 8):
        await svc.save_message(ChatMessage(session_id=session.id, role="user", content=str(n)))
    redis, key = redis_sync(), f"{cache_prefix}{await cache(client).epoch()}:m:{session.id}"

    def held() -> set[str]:
        return {field.decode() for field in redis.hkeys(key)} - {"v", "n"}

    assert held() == {"5", "6", "7"}

    async def page(**kwargs: Any) -> str:
        return "".join(m.content for m in await svc.get_messages(session.id, user_id=user, **kwargs))

    assert await page() == "1234567"
    assert await page(after=4) == "567"
    assert await page(after=2, limit=3) == "345"
    redis.delete(key)
    assert await page(after=5) == "67"  # a miss: read from PostgreSQL, and the window filled again
    assert held() == {"5", "6", "7"}
    redis.delete(key)
    assert await page(after=4, limit=2) == "56"  # the window read whole, the page no longer than asked
    assert held() == {"5", "6", "7"}


# (key, field, value) written by hand over a good entry: broken JSON, JSON of another shape, a
# version that is not a number.
UNREADABLE = [
    pytest.param("s", "d", "{broken", id="session-not-json"),
    pytest.param("s", "d", "[1, 2]", id="session-wrong-shape"),
    pytest.param("s", "v", "x", id="session-version-not-a-number"),
    pytest.param("m", "1", "{broken", id="message-not-json"),
    pytest.param("m", "2", '{"id": 7}', id="message-wrong-shape"),
    pytest.param("m", "v", "x", id="messages-version-not-a-number"),
]


@pytest.mark.parametrize(("kind", "field", "value"), UNREADABLE)
async def test_an_unreadable_cache_entry_is_a_miss_and_is_replaced(
    client: Any, user: str, cache_prefix: str, kind: str, field: str, value: str
) -> None:
    h = headers(user)
    resp = await client.post("/api/v1/chat/sessions", json={"title": "kept"}, headers=h)
    sid = (await resp.json())["id"]
    url = f"/api/v1/chat/sessions/{sid}"
    for content in ("one", "two"):
        resp = await client.post(url + "/messages", json={"role": "user", "content": content}, headers=h)
        assert resp.status == 201
    gen = await cache(client).epoch()
    key = f"{cache_prefix}{gen}:{kind}:{sid}"
    raw = redis_sync()
    assert raw.hget(key, field) is not None  # the entry being spoiled is really there
    raw.hset(key, field, value)

    async def read() -> tuple[str, list[str]]:
        session = await client.get(url, headers=h)
        messages = await client.get(url + "/messages", headers=h)
        assert (session.status, messages.status) == (200, 200)
        return (await session.json())["title"], [m["content"] for m in (await messages.json())["data"]]

    assert await read() == ("kept", ["one", "two"])
    # Refilled from PostgreSQL: the entry reads again, and is served from the cache.
    assert raw.hget(key, field) != value.encode()
    _, cached_session = await cache(client).get_session(sid)
    _, cached_page = await cache(client).get_messages(sid, after=0, limit=10)
    assert cached_session is not None and '"title": "kept"' in cached_session
    assert cached_page is not None and len(cached_page.items) == 2
    # And writes go through it as before.
    assert (await client.patch(url, json={"title": "new"}, headers=h)).status == 200
    resp = await client.post(url + "/messages", json={"role": "user", "content": "three"}, headers=h)
    assert resp.status == 201
    assert await read() == ("new", ["one", "two", "three"])


@pytest.mark.parametrize("kind", ["s", "m"])
async def test_a_key_of_another_redis_type_is_a_miss_and_redis_is_not_taken_for_down(
    client: Any, user: str, cache_prefix: str, kind: str
) -> None:
    """A string where a hash belongs (written by another program): its reads fail with WRONGTYPE,
    which is this key's problem, not Redis's; the cache must not pause for everyone over it."""
    h = headers(user)
    resp = await client.post("/api/v1/chat/sessions", json={"title": "kept"}, headers=h)
    sid = (await resp.json())["id"]
    url = f"/api/v1/chat/sessions/{sid}"
    resp = await client.post(url + "/messages", json={"role": "user", "content": "one"}, headers=h)
    assert resp.status == 201
    chat_cache = cache(client)
    key = f"{cache_prefix}{await chat_cache.epoch()}:{kind}:{sid}"
    raw = redis_sync()
    raw.delete(key)
    raw.set(key, "written by another program")

    for _ in range(2):
        session = await client.get(url, headers=h)
        messages = await client.get(url + "/messages", headers=h)
        assert (session.status, messages.status) == (200, 200)
        assert (await session.json())["title"] == "kept"
        assert [m["content"] for m in (await messages.json())["data"]] == ["one"]
        assert chat_cache.usable  # no pause, no generation bump
    assert raw.type(key) == b"hash"  # replaced by the refill


@pytest.mark.parametrize("write", ["delete", "patch", "message"])
async def test_a_write_whose_caller_is_cancelled_still_updates_the_cache(
    client: Any, user: str, write: str
) -> None:
    """A client that hangs up while its write waits on a lock: PostgreSQL commits it afterwards,
    and the cache must not keep serving what came before (a deleted chat, an old title)."""
    svc = service(client)
    session = await svc.save_session(ChatSession(user_id=user, title="before"))
    assert (await svc.get_session(session.id, user_id=user)).title == "before"  # cached
    assert await svc.get_messages(session.id, user_id=user) == []  # cached too

    async with pool(client).acquire() as blocker, blocker.cursor() as cur:
        await cur.execute("BEGIN")
        await cur.execute("SELECT 1 FROM chat_sessions WHERE id = %s FOR UPDATE", (session.id,))
        if write == "delete":
            pending = svc.delete_session(session.id, user_id=user)
        elif write == "patch":
            pending = svc.update_session(session.id, user_id=user, title="after")
        else:
            pending = svc.save_message(
                ChatMessage(session_id=session.id, role="user", content="m"), user_id=user
            )
        task = asyncio.ensure_future(pending)

        async def waits_on_the_lock() -> bool:
            async with pool(client).acquire() as conn, conn.cursor() as probe:
                await probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
                return (await probe.fetchone())[0] > 0

        await wait_until(waits_on_the_lock, what="the write to wait on the lock")
        task.cancel()  # the caller is gone
        with pytest.raises(asyncio.CancelledError):
            await task
        await cur.execute("COMMIT")

    async def settled() -> bool:
        found = await svc.get_session(session.id, user_id=user)
        if write == "delete":
            return found is None
        if write == "patch":
            return found is not None and found.title == "after"
        return [m.content for m in await svc.get_messages(session.id, user_id=user)] == ["m"]

    await wait_until(settled, what="the committed write to show")


async def test_a_process_that_starts_does_not_trust_what_an_earlier_one_cached(
    make_client: Any, user: str
) -> None:
    """A write whose cache update was lost (Redis down) by a process that was then stopped before
    Redis came back: nothing remembers that the entry is stale, except that a new process
    retires the cache generation on its first use of Redis."""
    first = await make_client()
    svc = service(first)
    session = await svc.save_session(ChatSession(user_id=user, title="before"))
    assert (await svc.get_session(session.id, user_id=user)).title == "before"  # cached
    async with pool(first).acquire() as conn, conn.cursor() as cur:  # the write the cache missed
        await cur.execute(
            "UPDATE chat_sessions SET title = 'after', version = version + 1 WHERE id = %s", (session.id,)
        )

    restarted = await make_client()
    assert (await service(restarted).get_session(session.id, user_id=user)).title == "after"


async def test_a_process_that_starts_bumps_the_generation_once_however_many_ask(
    make_client: Any, user: str, cache_prefix: str
) -> None:
    first = await make_client()
    session = await service(first).save_session(ChatSession(user_id=user, title="t"))
    raw = redis_sync()
    before = int(raw.get(f"{cache_prefix}gen") or 0)

    restarted = await make_client()
    svc = service(restarted)
    await asyncio.gather(*(svc.get_session(session.id, user_id=user) for _ in range(50)))
    assert int(raw.get(f"{cache_prefix}gen")) == before + 1


async def test_every_call_works_while_redis_is_stopped_and_no_stale_read_after_restart(
    make_client: Any, private_redis: PrivateRedis, user: str
) -> None:
    client = await make_client(redis_url=private_redis.url)
    h = headers(user)
    resp = await client.post("/api/v1/chat/sessions", json={"title": "before"}, headers=h)
    session = await resp.json()
    url = f"/api/v1/chat/sessions/{session['id']}"
    await client.post(url + "/messages", json={"role": "user", "content": "m1"}, headers=h)
    assert (await (await client.get(url + "/messages", headers=h)).json())["data"][0]["content"] == "m1"

    private_redis.stop()
    started = time.monotonic()
    calls = [
        ("PATCH", url, {"title": "during"}, 200),
        ("POST", url + "/messages", {"role": "assistant", "content": "m2"}, 201),
        ("GET", url, None, 200),
        ("GET", url + "/messages", None, 200),
        ("GET", "/api/v1/chat/sessions", None, 200),
        ("POST", "/api/v1/chat/sessions", {"title": "other"}, 201),
    ]
    for method, path, body, status in calls:
        call_started = time.monotonic()
        resp = await client.request(method, path, json=body, headers=h)
        assert resp.status == status, (method, path, await resp.text())
        assert time.monotonic() - call_started < 1.0  # Redis's absence costs at most a short timeout
    assert (await (await client.get(url, headers=h)).json())["title"] == "during"
    messages = (await (await client.get(url + "/messages", headers=h)).json())["data"]
    assert [m["content"] for m in messages] == ["m1", "m2"]
    assert time.monotonic() - started < 5

    private_redis.start()

    async def cache_used_again() -> bool:
        await client.get(url, headers=h)  # any call lets the cache try Redis again
        return cache(client).usable

    await wait_until(cache_used_again, what="the cache to be used again")
    resp = await client.patch(url, json={"title": "after"}, headers=h)
    await client.post(url + "/messages", json={"role": "user", "content": "m3"}, headers=h)
    assert (await (await client.get(url, headers=h)).json())["title"] == "after"
    messages = (await (await client.get(url + "/messages", headers=h)).json())["data"]
    assert [m["content"] for m in messages] == ["m1", "m2", "m3"]
    # ... and those reads were the cache's: Redis holds the entries again.
    keys = private_redis.client().keys("*")
    assert any(b":s:" + session["id"].encode() in k for k in keys)


async def test_entries_left_stale_by_a_slow_redis_are_not_served_when_it_answers_again(
    make_client: Any, private_redis: PrivateRedis, user: str
) -> None:
    client = await make_client(redis_url=private_redis.url)
    h = headers(user)
    session = await (await client.post("/api/v1/chat/sessions", json={"title": "A"}, headers=h)).json()
    url = f"/api/v1/chat/sessions/{session['id']}"
    await client.post(url + "/messages", json={"role": "user", "content": "m1"}, headers=h)
    await client.get(url + "/messages", headers=h)
    assert (await (await client.get(url, headers=h)).json())["title"] == "A"  # cached: title A

    # Redis stops answering (its data survives): the write-throughs below time out.
    admin = private_redis.client()
    admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    paused_at = time.monotonic()
    resp = await client.patch(url, json={"title": "B"}, headers=h)
    assert resp.status == 200
    resp = await client.post(url + "/messages", json={"role": "user", "content": "m2"}, headers=h)
    assert resp.status == 201
    assert time.monotonic() - paused_at < 1.2  # timeouts, not the pause, bounded those calls
    assert not cache(client).usable

    def redis_answers() -> bool:
        try:
            return bool(private_redis.client().ping())
        except Exception:
            return False

    await asyncio.to_thread(lambda: admin.ping())  # returns once the pause is over
    await wait_until(redis_answers, what="redis to answer")
    # The old entries (title A, messages [m1]) are still in Redis, but never served again.
    for _ in range(20):
        assert (await (await client.get(url, headers=h)).json())["title"] == "B"
        messages = (await (await client.get(url + "/messages", headers=h)).json())["data"]
        assert [m["content"] for m in messages] == ["m1", "m2"]
        if cache(client).usable:
            break

    async def repaired() -> bool:
        await client.get(url, headers=h)
        return cache(client).usable

    await wait_until(repaired, what="the cache to be repaired")
    assert (await (await client.get(url, headers=h)).json())["title"] == "B"
    assert int(admin.get(cache(client)._gen_key)) >= 1  # the generation moved on


class _Link:
    """A TCP path to Redis for one replica alone, which the test can cut (a partition between that
    replica and Redis: its connections are reset and new ones refused) and mend."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def sever(self) -> None:
        self.cut = True
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()


async def test_a_replica_that_lost_a_write_retires_the_stale_entry_for_the_others_without_more_requests(
    make_client: Any, private_redis: PrivateRedis, user: str
) -> None:
    """Replica A's write-through of a message is lost (A cannot reach Redis); replica B, which
    saw nothing go wrong, must not go on serving the session's messages without it. A used to
    retire the entry only at its own next use of the cache: a replica that got no more requests
    left B serving the stale list for the TTL (five minutes), and a reader paging after the
    newest seq saw nothing new."""
    link = _Link(private_redis.port)
    writer = await make_client(redis_url=await link.start())
    reader = await make_client(redis_url=private_redis.url)
    h = headers(user)
    try:
        session = await (await writer.post("/api/v1/chat/sessions", json={}, headers=h)).json()
        url = f"/api/v1/chat/sessions/{session['id']}/messages"
        await writer.post(url, json={"role": "user", "content": "m1"}, headers=h)
        assert cache(writer).usable  # written through: m1 is in Redis

        async def contents() -> list[str]:
            return [m["content"] for m in (await (await reader.get(url, headers=h)).json())["data"]]

        assert await contents() == ["m1"]
        assert cache(reader).usable  # served from Redis

        link.sever()
        resp = await writer.post(url, json={"role": "user", "content": "m2"}, headers=h)
        assert resp.status == 201
        assert not cache(writer).usable  # the write-through was lost
        assert await contents() == ["m1"]  # what B holds, as it cannot know yet

        link.cut = False  # A can reach Redis again; no request reaches A any more
        await wait_until(_has(contents, "m2"), timeout=5, what="the reader to see m2")
        assert cache(reader).usable and await contents() == ["m1", "m2"]
    finally:
        await link.close()


def _has(contents: Any, item: str) -> Any:
    async def check() -> bool:
        return item in await contents()

    return check


async def test_a_hung_redis_costs_a_request_at_most_one_timeout_while_the_cache_is_stale(
    make_client: Any, private_redis: PrivateRedis, user: str
) -> None:
    """Redis hangs (SIGSTOP) while the cache is stale: of the requests that find it so, one tries
    the generation bump and the others go to PostgreSQL at once. Each of them used to try again
    after the one before it had timed out, so the last of 30 answered after seconds."""
    client = await make_client(redis_url=private_redis.url)
    h = headers(user)
    session = await (await client.post("/api/v1/chat/sessions", json={"title": "A"}, headers=h)).json()
    url = f"/api/v1/chat/sessions/{session['id']}"
    chat_cache = cache(client)
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        resp = await client.patch(url, json={"title": "B"}, headers=h)  # its write-through times out
        assert resp.status == 200
        assert not chat_cache.usable
        await wait_until(
            lambda: time.monotonic() >= chat_cache._down_until, what="the pause after the failure to end"
        )

        async def timed_read() -> float:
            started = time.monotonic()
            resp = await client.get(url, headers=h)
            assert resp.status == 200 and (await resp.json())["title"] == "B"
            return time.monotonic() - started

        durations = await asyncio.gather(*(timed_read() for _ in range(30)))
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    assert max(durations) < 1.5, sorted(durations)


def restart_from_snapshot(server: PrivateRedis) -> None:
    """Kill Redis (SIGKILL: no save on the way down) and start it again: it loads the dump.rdb
    that the last SAVE wrote, as after a crash with RDB (or AOF fsync'd every second) persistence."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(10)
    server.process = None
    server.start()


async def test_redis_restarted_from_an_older_snapshot_serves_what_postgresql_holds(
    make_client: Any, private_redis: PrivateRedis, user: str
) -> None:
    """Redis saved a snapshot, took more writes, and restarted from the snapshot. The app's Redis
    client reconnected without an error, so nothing told the cache that the writes after the
    snapshot were gone: it served the old title, the message list without the newest message, and
    a deleted session, until the TTL or the next write to each."""
    client = await make_client(redis_url=private_redis.url)
    h = headers(user)
    session = await (await client.post("/api/v1/chat/sessions", json={"title": "A"}, headers=h)).json()
    url = f"/api/v1/chat/sessions/{session['id']}"
    doomed = await (await client.post("/api/v1/chat/sessions", json={"title": "D"}, headers=h)).json()
    doomed_url = f"/api/v1/chat/sessions/{doomed['id']}"
    await client.post(url + "/messages", json={"role": "user", "content": "m1"}, headers=h)
    assert len((await (await client.get(url + "/messages", headers=h)).json())["data"]) == 1  # cached
    assert (await (await client.get(doomed_url, headers=h)).json())["title"] == "D"
    private_redis.client().save()

    assert (await client.patch(url, json={"title": "B"}, headers=h)).status == 200
    resp = await client.post(url + "/messages", json={"role": "user", "content": "m2"}, headers=h)
    assert resp.status == 201
    assert (await client.delete(doomed_url, headers=h)).status == 204
    restart_from_snapshot(private_redis)
    assert private_redis.client().dbsize() > 0  # the snapshot's entries are back

    async def cache_used_again() -> bool:
        # The first call may find the old connection broken: PostgreSQL answers it, and the
        # cache is left alone for retry_after (a read's failure makes nothing stale).
        assert (await client.get(url, headers=h)).status == 200
        return cache(client).usable

    await wait_until(cache_used_again, what="the cache to be used again")
    got = await (await client.get(url, headers=h)).json()
    assert (got["title"], got["message_count"]) == ("B", 2)
    page = await (await client.get(url + "/messages", headers=h)).json()
    assert [m["content"] for m in page["data"]] == ["m1", "m2"]
    assert (await client.get(doomed_url, headers=h)).status == 404
    # The cache is used again, and later writes show.
    assert (await client.patch(url, json={"title": "C"}, headers=h)).status == 200
    assert (await (await client.get(url, headers=h)).json())["title"] == "C"
    keys = private_redis.client().keys("*")
    assert any(b":s:" + session["id"].encode() in k for k in keys)


async def test_a_fill_from_before_a_redis_restart_cannot_land_under_the_generation_it_moved_to(
    make_client: Any, private_redis: PrivateRedis, user: str
) -> None:
    """The snapshot Redis restarts from may be older than the last generation bumps: moving the
    generation on by one after the restart reached a generation that was in use before it, and a
    reader's fill of what it read from PostgreSQL before a write landed under it, over nothing
    (the write-through was lost with the restart): the old title was served until the TTL."""
    client = await make_client(redis_url=private_redis.url)
    svc, chat_cache = service(client), cache(client)
    session = await svc.save_session(ChatSession(user_id=user, title="A"))
    private_redis.client().save()
    private_redis.client().incr(chat_cache._gen_key)  # another replica starts after the snapshot
    reader = await chat_cache.epoch()  # a reader misses, and reads title A from PostgreSQL
    await svc.update_session(session.id, user_id=user, title="B")  # written through under it
    restart_from_snapshot(private_redis)

    async def cache_used_again() -> bool:
        return await chat_cache.epoch() is not None

    await wait_until(cache_used_again, what="the cache to be used again")
    await chat_cache.put_session(reader, str(session.id), session.version, _dump_session(session), fill=True)
    assert (await svc.get_session(session.id, user_id=user)).title == "B"
