"""A Redis user whose ACL refuses the chat cache a command, and what the cache's failure lines say."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from chat_helpers import REDIS_URL, cache, free_port, headers, redis_sync, wait_until
from yarl import URL

import intelligence.cache as cache_module
from intelligence.cache import ChatCache, redis_client
from intelligence.settings import CacheSettings
from tests.helpers import PrivateRedis

# What the common least-privilege ACL leaves out: INFO is one of the @dangerous commands.
LEAST_PRIVILEGE = ("+@all", "-@dangerous")


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    """The local Redis as its default user, which may change users and read the ACL log."""
    client = redis_sync()
    yield client
    client.close()


@pytest.fixture
def acl_user(admin: redis.Redis) -> Iterator[Callable[..., tuple[str, str]]]:
    """``acl_user(*rules)``: a Redis user of this test's own, with a password and those rules on
    every key; its name and a URL that logs in as it. Deleted afterwards (closing its connections):
    a test asks for it before ``make_client``, so that its app is closed first."""
    names: list[str] = []

    def make(*rules: str) -> tuple[str, str]:
        name = f"test-chat-{uuid.uuid4()}"
        password = secrets.token_hex(8)
        names.append(name)
        admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", *rules)
        return name, str(URL(REDIS_URL).with_user(name).with_password(password))

    yield make
    if names:
        admin.execute_command("ACL", "DELUSER", *names)


def refusals(admin: redis.Redis, name: str) -> int:
    """How often Redis refused ``name`` a command (its ACL log counts repeats in one entry)."""
    return sum(e["count"] for e in admin.acl_log(count=128) if e["username"] == name)


def cache_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "intelligence.cache" and r.levelno == level]


async def new_session(client: Any, h: dict[str, str], title: str) -> str:
    """A chat session of the test's user; its URL."""
    resp = await client.post("/api/v1/chat/sessions", json={"title": title}, headers=h)
    assert resp.status == 201
    return f"/api/v1/chat/sessions/{(await resp.json())['id']}"


async def cache_used_again(
    client: Any, url: str, h: dict[str, str], admin: redis.Redis, cache_prefix: str, *, title: str
) -> None:
    """Wait until the cache is in use again, then check that a write goes through Redis."""

    async def usable() -> bool:
        assert (await client.get(url, headers=h)).status == 200
        return cache(client).usable

    await wait_until(usable, what="the cache to be used again")
    assert (await client.patch(url, json={"title": title}, headers=h)).status == 200
    assert (await (await client.get(url, headers=h)).json())["title"] == title
    session_id = url.rsplit("/", 1)[1].encode()
    assert any(session_id in k for k in admin.keys(f"{cache_prefix}*"))  # through Redis


async def test_a_user_refused_info_gets_one_error_saying_what_to_grant_and_chats_come_from_postgresql(
    acl_user: Callable[..., tuple[str, str]],
    admin: redis.Redis,
    make_client: Any,
    user: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under ``+@all -@dangerous`` every new connection's restart check (INFO) was refused: the
    cache was never used, and all the log said, once a second, was "redis unavailable" with
    ``error="server:ResponseError"``."""
    name, redis_url = acl_user(*LEAST_PRIVILEGE)
    client = await make_client(redis_url=redis_url, retry_after=0.05)
    h = headers(user)
    with caplog.at_level(logging.INFO, logger="intelligence.cache"):
        url = await new_session(client, h, "t")
        for content in ("m1", "m2"):
            resp = await client.post(url + "/messages", json={"role": "user", "content": content}, headers=h)
            assert resp.status == 201

        async def retried_several_times() -> bool:
            assert (await client.get(url, headers=h)).status == 200
            return refusals(admin, name) >= 5

        await wait_until(retried_several_times, what="the cache to try Redis again and be refused")
        got = await (await client.get(url, headers=h)).json()
        page = await (await client.get(url + "/messages", headers=h)).json()
    assert (got["title"], got["message_count"]) == ("t", 2)
    assert [m["content"] for m in page["data"]] == ["m1", "m2"]
    assert not cache(client).usable

    (error,) = cache_records(caplog, logging.ERROR)  # once, not on each retry
    message = error.getMessage()
    assert "the Redis user lacks a permission the chat cache needs: INFO" in message
    assert "to notice a Redis restart" in message and "served from PostgreSQL" in message
    assert error.fix == f"ACL SETUSER {name} +info (no restart needed)"
    assert error.error.startswith("NoPermissionError: INFO refused: ")
    # Redis answered: it is not "unavailable", and no line hides the reason behind redis-py's repr.
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert not [r for r in caplog.records if "server:ResponseError" in str(vars(r))]


async def test_info_granted_at_runtime_brings_the_cache_back_and_a_later_refusal_is_reported_again(
    acl_user: Callable[..., tuple[str, str]],
    admin: redis.Redis,
    make_client: Any,
    user: str,
    cache_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name, redis_url = acl_user(*LEAST_PRIVILEGE)
    client = await make_client(redis_url=redis_url, retry_after=0.05)
    h = headers(user)
    with caplog.at_level(logging.INFO, logger="intelligence.cache"):
        url = await new_session(client, h, "A")
        assert len(cache_records(caplog, logging.ERROR)) == 1

        admin.execute_command("ACL", "SETUSER", name, "+info")

        await cache_used_again(client, url, h, admin, cache_prefix, title="B")
        back = [r for r in cache_records(caplog, logging.WARNING) if "may now run" in r.getMessage()]
        assert [r.getMessage() for r in back] == [
            "the Redis user may now run what the chat cache needs; cache in use again"
        ]

        # Taken away again: the connections open keep working, so they are closed; the next ones
        # are refused, and that is said again, since the cache worked in between.
        admin.execute_command("ACL", "SETUSER", name, "-info")
        admin.execute_command("CLIENT", "KILL", "USER", name)

        async def reported_again() -> bool:
            assert (await client.get(url, headers=h)).status == 200
            return len(cache_records(caplog, logging.ERROR)) == 2

        await wait_until(reported_again, what="the second refusal to be reported")
        assert (await (await client.get(url, headers=h)).json())["title"] == "B"


async def test_a_user_refused_a_write_command_gets_one_error_while_its_reads_keep_working(
    acl_user: Callable[..., tuple[str, str]],
    admin: redis.Redis,
    make_client: Any,
    user: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused HSET only: the scripts that read run, those that write are refused. A read that
    runs is no sign that the write's permission came back, so it does not end the refusal."""
    name, redis_url = acl_user(*LEAST_PRIVILEGE, "+info", "-hset")
    client = await make_client(redis_url=redis_url, retry_after=0.05)
    h = headers(user)
    with caplog.at_level(logging.INFO, logger="intelligence.cache"):
        url = await new_session(client, h, "t")

        async def refused_several_times() -> bool:
            resp = await client.post(url + "/messages", json={"role": "user", "content": "m"}, headers=h)
            assert resp.status == 201
            assert (await client.get(url, headers=h)).status == 200
            return refusals(admin, name) >= 5

        await wait_until(refused_several_times, what="the cache's writes to be refused again and again")
        got = await (await client.get(url, headers=h)).json()
    assert got["message_count"] >= 5

    (error,) = cache_records(caplog, logging.ERROR)
    assert error.getMessage() == (
        "the Redis user lacks a permission the chat cache needs; chats are served from PostgreSQL until it is granted"
    )
    assert error.error.startswith("ResponseError: "), error.error  # Redis's words, which vary by version
    assert name in error.fix and "docs/operations.md" in error.fix
    assert not [r for r in caplog.records if "may now run" in r.getMessage()]


@pytest.mark.parametrize(
    ("address", "level", "message", "expected"),
    [
        pytest.param(
            lambda: f"127.0.0.1:{free_port()}",
            logging.WARNING,
            "redis unavailable; serving from PostgreSQL",
            "ConnectionError: Error 111 connecting to",
            id="refused",
        ),
        pytest.param(
            lambda: f"{URL(REDIS_URL).host}:{URL(REDIS_URL).port}",
            logging.ERROR,
            "Redis refuses the chat cache's login; chats are served from PostgreSQL until that is fixed",
            "AuthenticationError: invalid username-password pair",
            id="bad-login",
        ),
    ],
)
async def test_a_redis_failure_is_logged_with_its_reason_and_without_the_password(
    address: Callable[[], str], level: int, message: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The line said ``error="network:ConnectionError"`` (redis-py's repr), not why; the reason
    it says now must not quote the URL with its password. A login Redis refuses is no outage: it
    lasts until someone fixes the URL, so it is an error, not "unavailable"."""
    password = f"pw-{secrets.token_hex(8)}"
    settings = CacheSettings(url=f"redis://nobody-{uuid.uuid4()}:{password}@{address()}/0", prefix="unused:")
    async with redis_client(settings) as redis:
        chat_cache = ChatCache(redis, settings)
        with caplog.at_level(logging.WARNING, logger="intelligence.cache"):
            assert await chat_cache.epoch() is None
        await chat_cache.aclose()
    (record,) = [r for r in caplog.records if r.name == "intelligence.cache"]
    assert (record.levelno, record.getMessage()) == (level, message)
    assert record.error.startswith(expected), record.error
    assert password not in str(vars(record))


async def test_a_wrong_password_is_one_error_until_redis_accepts_it_then_the_cache_is_used_again(
    acl_user: Callable[..., tuple[str, str]],
    admin: redis.Redis,
    make_client: Any,
    user: str,
    cache_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password was logged as "redis unavailable", a warning, again at every retry: as if
    Redis were down, when it answered and will go on refusing until the URL or the user changes."""
    name, right_url = acl_user("+@all")
    wrong_password = f"wrong-{secrets.token_hex(8)}"
    redis_url = str(URL(right_url).with_password(wrong_password))
    client = await make_client(redis_url=redis_url, retry_after=0.05)
    h = headers(user)
    with caplog.at_level(logging.INFO, logger="intelligence.cache"):
        url = await new_session(client, h, "A")

        async def refused_several_times() -> bool:
            assert (await client.get(url, headers=h)).status == 200
            return refusals(admin, name) >= 5

        await wait_until(refused_several_times, what="the cache to try Redis again and be refused")
        assert (await client.patch(url, json={"title": "B"}, headers=h)).status == 200
        assert (await (await client.get(url, headers=h)).json())["title"] == "B"  # from PostgreSQL
        (error,) = cache_records(caplog, logging.ERROR)
        assert error.getMessage() == (
            "Redis refuses the chat cache's login; chats are served from PostgreSQL until that is fixed"
        )
        assert error.fix.startswith("check the user and password in REDIS_URL")
        assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert wrong_password not in str([vars(r) for r in caplog.records])

        admin.execute_command("ACL", "SETUSER", name, f">{wrong_password}")  # now it is a right one

        await cache_used_again(client, url, h, admin, cache_prefix, title="C")
        back = [r.getMessage() for r in cache_records(caplog, logging.WARNING)]
        assert back == ["Redis accepts the chat cache's login again; cache in use again"]


async def test_an_outage_is_one_warning_a_reminder_a_minute_and_one_line_when_redis_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache said "redis unavailable" again at every retry, a line a second from each replica
    for as long as Redis was away, and nothing when it came back."""
    monkeypatch.setattr(cache_module, "OUTAGE_REMINDER", 0.3)  # a minute, in the product
    server = PrivateRedis(tmp_path)
    server.start()
    settings = CacheSettings(url=server.url, prefix="outage:", retry_after=0.02)
    try:
        async with redis_client(settings) as redis:
            chat_cache = ChatCache(redis, settings)
            assert await chat_cache.epoch() is not None
            server.stop()
            retries = 0

            async def said(*lines: str) -> bool:
                nonlocal retries
                if time.monotonic() >= chat_cache._down_until:  # the pause after a failure is over
                    retries += 1
                    assert await chat_cache.epoch() is None
                return [r.getMessage() for r in cache_records(caplog, logging.WARNING)] == list(lines)

            with caplog.at_level(logging.WARNING, logger="intelligence.cache"):
                unavailable = "redis unavailable; serving from PostgreSQL"
                await wait_until(lambda: said(unavailable), what="the outage to be said")
                still = "redis still unavailable; serving from PostgreSQL"
                await wait_until(lambda: said(unavailable, still), what="the reminder")
                assert retries >= 5, retries  # tried again and again, said twice
                reminder = cache_records(caplog, logging.WARNING)[1]
                assert reminder.for_s >= 0 and reminder.error.startswith("ConnectionError: ")

                server.start()

                async def answered() -> bool:
                    return time.monotonic() >= chat_cache._down_until and await chat_cache.epoch() is not None

                await wait_until(answered, what="the cache to reach Redis again")
            messages = [r.getMessage() for r in cache_records(caplog, logging.WARNING)]
            assert messages == [unavailable, still, "redis answers again; cache in use"]
            assert cache_records(caplog, logging.WARNING)[2].down_s > 0
            await chat_cache.aclose()
    finally:
        server.stop()
