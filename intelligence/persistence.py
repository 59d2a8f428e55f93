"""Chat sessions and messages in PostgreSQL, written through to the cache after each commit.

Plain SQL with named parameters, one transaction per logical write. Ordering guarantees come from
the database, not from this process, so they hold across replicas:

* a message's ``seq`` is taken from ``chat_sessions.message_count`` under the session's row lock
  in the same transaction as the insert, so seqs are strictly increasing and gapless and commit
  in seq order (a reader paging by seq never skips a message that commits later);
* a client-chosen message id makes a retried write idempotent: the same body returns the stored
  message, another body raises IdConflict; a duplicate insert rolls back its seq.

PostgreSQL failures become DatabaseUnavailable; a transaction that fails is rolled back, and a
connection that broke is thrown away. Reads and the id-idempotent writes are retried once on a
fresh connection when theirs broke (a pooled connection may have died with a database restart);
an explicit transaction only if it broke before COMMIT was sent. A new connection that reaches a
server started at another time than the last one (restarted, restored from a backup, a standby
promoted) retires the cache, whose entries may be ahead of what that server holds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final, ParamSpec, TypeVar

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2.extras import Json

from gateway.middleware.tracing import Tracing, client_span

from .cache import ChatCache, Epoch
from .models import (
    ChatMessage,
    ChatSession,
    DatabaseUnavailable,
    IdConflict,
    SessionCursor,
    SessionNotFound,
)
from .settings import PostgresSettings

__all__ = ["UNSET", "ChatPersistenceService", "create_pool"]

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger("intelligence.persistence")


def _to_the_end(write: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A write, once begun, runs to its end even if its caller is cancelled (a client that hangs
    up, a drain that runs out): cancelled between PostgreSQL's commit and the cache's update, it
    left the cache serving what the database no longer holds (a deleted chat, an old title)."""

    @functools.wraps(write)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(write(*args, **kwargs))
        writes: set[asyncio.Future[Any]] = args[0]._writes  # type: ignore[attr-defined]
        writes.add(task)
        task.add_done_callback(writes.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.add_done_callback(_unawaited_failure)
            raise

    return run


def _unawaited_failure(task: asyncio.Future[Any]) -> None:
    # Nobody waits for it any more: its own failure is reported here, not lost.
    if not task.cancelled() and task.exception() is not None:
        log.warning("a write its caller stopped waiting for failed", extra={"error": repr(task.exception())})


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()

_CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError, OSError, TimeoutError)

SESSION_COLUMNS = (
    "id, user_id, title, metadata, created_at, updated_at, last_message_at, message_count, version"
)
MESSAGE_COLUMNS = (
    "id, session_id, seq, role, content, tool_calls, tool_results, tool_call_id, metadata, created_at"
)

INSERT_SESSION = f"""
INSERT INTO chat_sessions (id, user_id, title, metadata)
VALUES (%(id)s, %(user_id)s, %(title)s, %(metadata)s)
ON CONFLICT (id) DO NOTHING
RETURNING {SESSION_COLUMNS}
"""
SELECT_SESSION = f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = %(id)s"
LIST_SESSIONS = f"""
SELECT {SESSION_COLUMNS} FROM chat_sessions
WHERE user_id = %(user_id)s
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""
LIST_SESSIONS_AFTER = f"""
SELECT {SESSION_COLUMNS} FROM chat_sessions
WHERE user_id = %(user_id)s AND (created_at, id) < (%(created_at)s, %(id)s)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""
UPDATE_SESSION = f"""
UPDATE chat_sessions SET
    title = CASE WHEN %(set_title)s THEN %(title)s ELSE title END,
    metadata = CASE WHEN %(set_metadata)s THEN %(metadata)s::jsonb ELSE metadata END,
    updated_at = now(),
    version = version + 1
WHERE id = %(id)s AND user_id = %(user_id)s
RETURNING {SESSION_COLUMNS}
"""
DELETE_SESSION = "DELETE FROM chat_sessions WHERE id = %(id)s AND user_id = %(user_id)s RETURNING id"
DELETE_SESSION_ANY_OWNER = "DELETE FROM chat_sessions WHERE id = %(id)s RETURNING id"
# One statement, so one transaction: take the next seq under the session's row lock (writers to
# a session queue here, and commit in seq order) and insert the message with it. A duplicate id
# aborts the whole statement, so the seq it took is never used: the sequence stays gapless.
APPEND_MESSAGE = f"""
WITH s AS (
    UPDATE chat_sessions SET
        message_count = message_count + 1,
        version = version + 1,
        -- the clock after the lock was granted, so created_at follows seq order
        last_message_at = clock_timestamp(),
        updated_at = clock_timestamp()
    WHERE id = %(session_id)s AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s)
    RETURNING {SESSION_COLUMNS}
), m AS (
    INSERT INTO chat_messages
        (id, session_id, seq, role, content, tool_calls, tool_results, tool_call_id, metadata, created_at)
    SELECT %(id)s, s.id, s.message_count, %(role)s, %(content)s, %(tool_calls)s::json,
           %(tool_results)s::json, %(tool_call_id)s, %(metadata)s::jsonb, s.last_message_at
    FROM s
    RETURNING {MESSAGE_COLUMNS}
)
SELECT s.*, m.* FROM s JOIN m ON true
"""
SELECT_MESSAGE = f"""
SELECT {", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))}, s.user_id
FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id
WHERE m.id = %(id)s
"""
SESSION_MESSAGE_COUNT = (
    "SELECT message_count FROM chat_sessions WHERE id = %(session_id)s"
    " AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s)"
)
SELECT_MESSAGES = f"""
SELECT {MESSAGE_COLUMNS} FROM chat_messages
WHERE session_id = %(session_id)s AND seq > %(after)s
ORDER BY seq
LIMIT %(limit)s
"""
PING = "SELECT 1"
SERVER_STARTED = "SELECT pg_postmaster_start_time()"


async def create_pool(settings: PostgresSettings) -> aiopg.Pool:
    """A pool that connects lazily, so the service starts (and recovers) whenever PostgreSQL is up."""
    return await aiopg.create_pool(
        settings.dsn,
        minsize=0,
        maxsize=settings.pool_max,
        timeout=settings.statement_timeout + settings.connect_timeout,
        connect_timeout=max(1, int(settings.connect_timeout)),
        options=f"-c statement_timeout={int(settings.statement_timeout * 1000)} -c timezone=UTC",
        application_name="intelligence",
    )


class ChatPersistenceService:
    """Sessions and messages: PostgreSQL is the truth, the cache is written through after commit.

    ``user_id`` arguments restrict an operation to the owner's sessions; without it (internal
    callers) any session is reachable. Another user's session behaves exactly like a missing one.
    """

    def __init__(self, pool: aiopg.Pool, cache: ChatCache, *, tracing: Tracing | None = None) -> None:
        self._pool = pool
        self._cache = cache
        self._tracing = tracing
        self._writes: set[asyncio.Future[Any]] = set()  # running, whether or not anyone waits
        self._connection_lost = False  # since the last call that PostgreSQL answered
        self._server_started: datetime | None = None  # of the server the last new connection reached
        self._connections: weakref.WeakSet[aiopg.Connection] = weakref.WeakSet()  # those checked

    async def abandon_writes(self) -> None:
        """Cancel the writes still running (on shutdown, after the drain)."""
        pending = list(self._writes)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- sessions -----------------------------------------------------------------------------

    async def save_session(self, session: ChatSession) -> ChatSession:
        """Store ``session`` as it is now: insert it, or give the stored session with its id its
        title and metadata (the owner never changes: another user's id is an IdConflict).

        Unlike ``create_session`` (POST, where a taken id with another body is a 409), saving a
        changed session is what "save" is for; the cache is written through either way.
        """
        try:
            return (await self.create_session(session))[0]
        except IdConflict:
            pass
        try:
            return await self.update_session(
                session.id, user_id=session.user_id, title=session.title, metadata=session.metadata
            )
        except SessionNotFound:
            # Another user's session, or deleted since the insert found it: not this owner's to save.
            raise IdConflict(f"session {session.id} belongs to another user") from None

    @_to_the_end
    async def create_session(self, session: ChatSession) -> tuple[ChatSession, bool]:
        """Insert; returns (stored, created). Re-sending the same id and body is not an error."""
        epoch = await self._cache.epoch()
        params = {
            "id": session.id,
            "user_id": session.user_id,
            "title": session.title,
            "metadata": Json(session.metadata),
        }

        async def insert(cur: aiopg.Cursor) -> tuple[ChatSession, bool]:
            await cur.execute(INSERT_SESSION, params)
            row = await cur.fetchone()
            if row is not None:
                return _session(row), True
            await cur.execute(SELECT_SESSION, {"id": session.id})
            existing = _session(await cur.fetchone())
            if (existing.user_id, existing.title, existing.metadata) != (
                session.user_id, session.title, session.metadata,
            ):  # fmt: skip
                raise IdConflict(f"session {session.id} already exists with different content")
            return existing, False

        stored, created = await self._run(insert, begin="BEGIN")
        if created:
            await self._cache.put_session(epoch, str(stored.id), stored.version, _dump_session(stored))
            await self._cache.put_messages(epoch, str(stored.id), 0, [])
        return stored, created

    async def get_session(self, session_id: uuid.UUID, *, user_id: str | None = None) -> ChatSession | None:
        epoch, cached = await self._cache.get_session(str(session_id))
        session = _decoded(_load_session, cached) if cached is not None else None
        if cached is not None and session is None:
            assert epoch is not None
            await self._cache.discard_session(epoch, str(session_id))
        if session is None:

            async def select(cur: aiopg.Cursor) -> ChatSession | None:
                await cur.execute(SELECT_SESSION, {"id": session_id})
                row = await cur.fetchone()
                return _session(row) if row is not None else None

            found = await self._run(select)
            if found is None:
                return None
            session = found
            await self._cache.put_session(
                epoch, str(session.id), session.version, _dump_session(session), fill=True
            )
        if user_id is not None and session.user_id != user_id:
            return None
        return session

    async def list_sessions(
        self, user_id: str, limit: int = 50, *, after: SessionCursor | None = None
    ) -> list[ChatSession]:
        """The user's sessions, newest first; ``after`` continues from a previous page's last one."""
        if after is None:
            sql, params = LIST_SESSIONS, {"user_id": user_id, "limit": limit}
        else:
            sql = LIST_SESSIONS_AFTER
            params = {"user_id": user_id, "limit": limit, "created_at": after.created_at, "id": after.id}

        async def select(cur: aiopg.Cursor) -> list[ChatSession]:
            await cur.execute(sql, params)
            return [_session(row) for row in await cur.fetchall()]

        return await self._run(select)

    @_to_the_end
    async def update_session(
        self,
        session_id: uuid.UUID,
        *,
        user_id: str,
        title: str | _Unset | None = UNSET,
        metadata: dict[str, Any] | _Unset = UNSET,
    ) -> ChatSession:
        """Change title and/or replace metadata; raises SessionNotFound."""
        if isinstance(title, _Unset) and isinstance(metadata, _Unset):
            session = await self.get_session(session_id, user_id=user_id)
            if session is None:
                raise SessionNotFound(str(session_id))
            return session
        epoch = await self._cache.epoch()
        params = {
            "id": session_id,
            "user_id": user_id,
            "set_title": not isinstance(title, _Unset),
            "title": None if isinstance(title, _Unset) else title,
            "set_metadata": not isinstance(metadata, _Unset),
            "metadata": None if isinstance(metadata, _Unset) else Json(metadata),
        }

        async def update(cur: aiopg.Cursor) -> ChatSession:
            await cur.execute(UPDATE_SESSION, params)
            row = await cur.fetchone()
            if row is None:
                raise SessionNotFound(str(session_id))
            return _session(row)

        # One statement: its own transaction.
        session = await self._run(update, changes=(epoch, str(session_id)))
        await self._cache.put_session(epoch, str(session.id), session.version, _dump_session(session))
        return session

    @_to_the_end
    async def delete_session(self, session_id: uuid.UUID, *, user_id: str | None = None) -> bool:
        """Delete the session and (by cascade) its messages; False when there was none."""
        epoch = await self._cache.epoch()
        sql = DELETE_SESSION if user_id is not None else DELETE_SESSION_ANY_OWNER

        async def delete(cur: aiopg.Cursor) -> bool:
            await cur.execute(sql, {"id": session_id, "user_id": user_id})
            return await cur.fetchone() is not None

        # No retry: if the connection broke after the delete committed, a second attempt would
        # find nothing and report a missing session.
        deleted = await self._run(delete, retry=False, changes=(epoch, str(session_id)))
        if deleted:
            await self._cache.forget_session(epoch, str(session_id))
        return deleted

    # -- messages -----------------------------------------------------------------------------

    async def save_message(self, message: ChatMessage, *, user_id: str | None = None) -> ChatMessage:
        return (await self.add_message(message, user_id=user_id))[0]

    @_to_the_end
    async def add_message(
        self, message: ChatMessage, *, user_id: str | None = None
    ) -> tuple[ChatMessage, bool]:
        """Append to the session; returns (stored, created). Raises SessionNotFound, IdConflict."""
        epoch = await self._cache.epoch()
        params = {
            "id": message.id,
            "session_id": message.session_id,
            "user_id": user_id,
            "role": message.role,
            "content": message.content,
            "tool_calls": None if message.tool_calls is None else Json(message.tool_calls),
            "tool_results": None if message.tool_results is None else Json(message.tool_results),
            "tool_call_id": message.tool_call_id,
            "metadata": Json(message.metadata),
        }

        tries = 0

        async def append(cur: aiopg.Cursor) -> tuple[ChatSession, ChatMessage]:
            nonlocal tries
            tries += 1
            await cur.execute(APPEND_MESSAGE, params)
            row = await cur.fetchone()
            if row is None:
                raise SessionNotFound(str(message.session_id))
            return _session(row[:9]), _message(row[9:])

        try:
            session, stored = await self._run(append, changes=(epoch, str(message.session_id)))
        except psycopg2.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "chat_messages_pkey":
                raise
            # A retry of a message already stored: the client's own (perhaps by a concurrent twin of
            # this request), or ours, when the first attempt's connection broke after its commit;
            # then this request created it (201), and the cache is retired (see _run).
            existing = await self._existing_message(message, user_id)
            if existing is None:  # pragma: no cover - the id was deleted with its session meanwhile
                raise IdConflict(f"message {message.id} was written and deleted concurrently") from None
            return existing, tries > 1
        assert stored.seq is not None
        await self._cache.put_session(epoch, str(session.id), session.version, _dump_session(session))
        await self._cache.append_message(epoch, str(session.id), stored.seq, _dump_message(stored))
        return stored, True

    async def _existing_message(self, message: ChatMessage, user_id: str | None) -> ChatMessage | None:
        async def select(cur: aiopg.Cursor) -> tuple[ChatMessage, str] | None:
            await cur.execute(SELECT_MESSAGE, {"id": message.id})
            row = await cur.fetchone()
            return (_message(row[:-1]), row[-1]) if row is not None else None

        found = await self._run(select)
        if found is None:
            return None
        stored, owner = found
        if user_id is not None and owner != user_id:
            if stored.session_id == message.session_id:
                raise SessionNotFound(str(message.session_id))
            raise IdConflict(f"message id {message.id} is already taken")
        if not stored.same_body(message):
            raise IdConflict(f"message {message.id} already exists with different content")
        return stored

    async def get_messages(
        self,
        session_id: uuid.UUID,
        limit: int = 100,
        *,
        after: int = 0,
        user_id: str | None = None,
    ) -> list[ChatMessage]:
        """Messages with ``seq > after``, oldest first; raises SessionNotFound."""
        if user_id is not None and await self.get_session(session_id, user_id=user_id) is None:
            raise SessionNotFound(str(session_id))
        epoch, cached = await self._cache.get_messages(str(session_id), after=after, limit=limit)
        if cached is not None:
            page = [_decoded(_load_message, item) for item in cached.items]
            if None not in page:
                return page  # type: ignore[return-value]
            assert epoch is not None
            await self._cache.discard_messages(epoch, str(session_id))
        keep = self._cache.window

        async def select(cur: aiopg.Cursor) -> tuple[int, list[ChatMessage], list[ChatMessage] | None]:
            await cur.execute(SESSION_MESSAGE_COUNT, {"session_id": session_id, "user_id": user_id})
            row = await cur.fetchone()
            if row is None:
                raise SessionNotFound(str(session_id))
            (count,) = row
            if keep and after >= count - keep:
                # The page lies in the newest messages: read them all and refill the cache.
                await cur.execute(
                    SELECT_MESSAGES, {"session_id": session_id, "after": max(count - keep, 0), "limit": keep}
                )
                tail = [_message(r) for r in await cur.fetchall()]
                return count, [m for m in tail if m.seq is not None and m.seq > after][:limit], tail
            await cur.execute(SELECT_MESSAGES, {"session_id": session_id, "after": after, "limit": limit})
            return count, [_message(r) for r in await cur.fetchall()], None

        # One snapshot: the count and the messages agree even while writers append.
        count, page, tail = await self._run(select, begin="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if tail is not None:
            await self._cache.put_messages(
                epoch, str(session_id), count, [_dump_message(m) for m in tail], fill=True
            )
        return page

    # -- health -------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless ``SELECT 1`` answers."""

        async def select(cur: aiopg.Cursor) -> None:
            await cur.execute(PING)
            await cur.fetchone()

        await self._run(select, retry=False)

    # -- the one place that talks to the pool -------------------------------------------------

    async def _run(
        self,
        work: Callable[[aiopg.Cursor], Awaitable[T]],
        *,
        begin: str | None = None,
        retry: bool = True,
        changes: tuple[Epoch | None, str] | None = None,
    ) -> T:
        """Run ``work`` on a pooled connection. ``changes``: the cache's epoch and the session a
        write changes, whose entries are dropped at once if the write may have been applied unseen."""
        if self._tracing is None:
            return await self._run_untraced(work, begin=begin, retry=retry, changes=changes)
        # A CLIENT span per logical database call, named for the service method that made it.
        operation = work.__qualname__.split(".<locals>")[0].rpartition(".")[2]
        with client_span(self._tracing, name=f"db {operation}", service="postgresql") as span:
            if span is not None and span.record is not None:
                span.record.tag("db.system", "postgresql")
            return await self._run_untraced(work, begin=begin, retry=retry, changes=changes)

    async def _run_untraced(
        self,
        work: Callable[[aiopg.Cursor], Awaitable[T]],
        *,
        begin: str | None,
        retry: bool,
        changes: tuple[Epoch | None, str] | None,
    ) -> T:
        attempt = 0
        maybe_applied = False  # by an attempt whose connection broke: its outcome is not known
        while True:
            attempt += 1
            conn: aiopg.Connection | None = None
            committing = False
            try:
                conn = await self._acquire()
                try:
                    async with conn.cursor() as cur:
                        try:
                            if conn not in self._connections:
                                await self._check_server(cur)
                                self._connections.add(conn)
                            if begin is not None:
                                await cur.execute(begin)
                            result = await work(cur)
                            if begin is not None:
                                committing = True
                                await cur.execute("COMMIT")
                            if self._connection_lost:
                                self._connection_lost = False
                                self._cache.distrust("a PostgreSQL connection broke while in use")
                            return result
                        except BaseException:
                            await _abandon(conn, cur, in_transaction=begin is not None and not committing)
                            raise
                finally:
                    await self._pool.release(conn)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # a real cancel: the caller is gone
                # aiopg reports a statement PostgreSQL cancelled (statement_timeout) as a
                # CancelledError nobody asked for: the database is too slow, a 503.
                raise DatabaseUnavailable("PostgreSQL unavailable: the statement timed out") from None
            except _CONNECTION_ERRORS as exc:
                if conn is not None:
                    # A write on it may have committed unseen (then no write-through followed):
                    # the cache is retired once PostgreSQL answers again (not now: while it is
                    # away, the cache still serves reads).
                    self._connection_lost = True
                broken = conn is not None and conn.closed
                if broken:
                    await self._pool.clear()  # its siblings most likely died with it
                # A transaction cut before its COMMIT was sent is rolled back by the server; a
                # COMMIT, or a statement outside a transaction, may have been carried out.
                maybe_applied = maybe_applied or committing or (begin is None and conn is not None)
                if broken and retry and attempt == 1 and not committing:
                    continue
                if maybe_applied and changes is not None:
                    await self._forget_unseen_write(*changes)
                raise DatabaseUnavailable(_describe(exc), maybe_applied=maybe_applied) from exc

    async def _forget_unseen_write(self, epoch: Epoch | None, session_id: str) -> None:
        # The 503 tells the client the change may have been applied and to read it back: that read
        # must come from PostgreSQL, not from entries made before the change (a deleted chat still
        # served, an old title, a message missing). The rest of the cache is retired too, but only
        # once PostgreSQL answers again (see above): until then it serves every other session.
        if epoch is not None:
            await self._cache.discard_session(epoch, session_id)
            await self._cache.discard_messages(epoch, session_id)

    async def _acquire(self) -> aiopg.Connection:
        refused: list[RuntimeError] = []
        for _ in range(self._pool.maxsize + 1):
            try:
                return await self._pool.acquire()
            except AssertionError:
                # aiopg's pool, once it has waited for a new connection, hands out the oldest free
                # one without looking at it again (an assert): one that died meanwhile (its server
                # process killed, a restart under load) is dropped by then. Ask again.
                continue
            except RuntimeError as exc:
                # uvloop: "unable to perform operation on <UVPoll closed=True>". While PostgreSQL
                # restarts, aiopg leaves the loop watching sockets that libpq has closed (on TCP),
                # and a new connection's socket that gets one of those numbers cannot be watched
                # (aiopg issues 856, 909). Holding the error holds that socket open, so the next
                # try gets another number.
                refused.append(exc)
        raise DatabaseUnavailable("PostgreSQL unavailable: no connection could be opened")

    async def _check_server(self, cur: aiopg.Cursor) -> None:
        # A new connection may reach another server than the cache was filled from: the same one
        # restored from a backup, or a standby promoted without the last commits. Its entries can
        # then be ahead of the database, and would refuse every later write-through as older.
        await cur.execute(SERVER_STARTED)
        (started,) = await cur.fetchone()
        if self._server_started is not None and started != self._server_started:
            self._cache.distrust("PostgreSQL restarted or failed over")
        self._server_started = started


async def _abandon(conn: aiopg.Connection, cur: aiopg.Cursor, *, in_transaction: bool) -> None:
    """Leave the connection idle (rolled back) or closed, never mid-transaction in the pool."""
    if conn.closed:
        return
    status = conn.raw.get_transaction_status()
    if status == psycopg2.extensions.TRANSACTION_STATUS_IDLE and not in_transaction:
        return
    try:
        await cur.execute("ROLLBACK")
    except Exception:
        await conn.close()
        return
    if conn.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        await conn.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"PostgreSQL unavailable: {text}"


# -- rows, dataclasses and their cached form ----------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def _session(row: tuple[Any, ...]) -> ChatSession:
    id_, user_id, title, metadata, created, updated, last_message, count, version = row
    return ChatSession(
        id=id_, user_id=user_id, title=title, metadata=metadata, created_at=_utc(created),
        updated_at=_utc(updated), last_message_at=_utc(last_message), message_count=count,
        version=version,
    )  # fmt: skip


def _message(row: tuple[Any, ...]) -> ChatMessage:
    id_, session_id, seq, role, content, tool_calls, tool_results, tool_call_id, metadata, created = row
    return ChatMessage(
        id=id_, session_id=session_id, seq=seq, role=role, content=content, tool_calls=tool_calls,
        tool_results=tool_results, tool_call_id=tool_call_id, metadata=metadata,
        created_at=_utc(created),
    )  # fmt: skip


def _decoded(load: Callable[[str], T], text: str) -> T | None:
    """A cached entry, or None when it cannot be read: then it is a miss, and PostgreSQL answers."""
    try:
        return load(text)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("unreadable cache entry dropped", extra={"error": repr(exc)[:200]})
        return None


def _dump_session(session: ChatSession) -> str:
    return json.dumps({**session.to_json(), "version": session.version}, ensure_ascii=False)


def _load_session(text: str) -> ChatSession:
    data = json.loads(text)
    return ChatSession(
        id=uuid.UUID(data["id"]), user_id=data["user_id"], title=data["title"],
        metadata=data["metadata"], created_at=_parse_time(data["created_at"]),
        updated_at=_parse_time(data["updated_at"]), last_message_at=_parse_time(data["last_message_at"]),
        message_count=data["message_count"], version=data["version"],
    )  # fmt: skip


def _dump_message(message: ChatMessage) -> str:
    return json.dumps(message.to_json(), ensure_ascii=False)


def _load_message(text: str) -> ChatMessage:
    data = json.loads(text)
    return ChatMessage(
        id=uuid.UUID(data["id"]), session_id=uuid.UUID(data["session_id"]), seq=data["seq"],
        role=data["role"], content=data["content"], tool_calls=data["tool_calls"],
        tool_results=data["tool_results"], tool_call_id=data["tool_call_id"],
        metadata=data["metadata"], created_at=_parse_time(data["created_at"]),
    )  # fmt: skip


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None
