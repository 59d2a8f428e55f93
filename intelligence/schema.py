"""Migrations: find the versioned ``.sql`` files, apply the pending ones, report what is pending.

Safe when several replicas run ``migrate`` at once: a session-level advisory lock serialises them,
and whoever comes second finds nothing left to do. Each file runs in its own transaction together
with the row recording it in ``schema_migrations``, so a failed migration leaves no trace.

The files live in the top-level ``migrations`` package (package data, so a wheel carries them);
``INTELLIGENCE_MIGRATIONS_DIR`` (``IntelligenceSettings.migrations_dir``) may point elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiopg
import psycopg2

from gateway.settings import decode_utf8

from .models import DatabaseUnavailable, MigrationError, MigrationsPending

__all__ = [
    "Migration",
    "apply_migrations",
    "check_migrations",
    "load_migrations",
    "one_line",
    "pending_migrations",
    "server_of",
]

log = logging.getLogger("intelligence.migrate")

# An arbitrary constant shared by every replica: "the chat schema is being migrated".
ADVISORY_LOCK_ID = 0x63686174_6D696772  # "chatmigr"
_NAME_RE = re.compile(r"^(\d{4,})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def one_line(exc: BaseException) -> str:
    """psycopg2's messages span lines (with hints); one line for a log or a terminal. A line that
    ends without punctuation ends a sentence: "Connection refused. Is the server running ...?"."""
    text = ""
    for line in str(exc).splitlines():
        line = " ".join(line.split())
        if line:
            text += ("" if not text else " " if text[-1] in ".,:;?!" else ". ") + line
    return text or type(exc).__name__


def server_of(dsn: str) -> str:
    """Where a connection string points, for a message: host and port, database and user, never
    the password. aiopg's connection errors leave out the address libpq's own messages name."""
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "the configured server"
    host = parts.get("host") or "the local socket"
    port = parts.get("port") or "5432"
    if host.startswith("/") or "," in host:
        where = host
    else:  # an IPv6 address in brackets, as in a URL: ::1:6432 would read as one address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    names = [
        f"{key} {parts[field]}"
        for key, field in (("database", "dbname"), ("user", "user"))
        if parts.get(field)
    ]
    return where + (f" ({', '.join(names)})" if names else "")


def load_migrations(directory: str | Path | None = None) -> tuple[Migration, ...]:
    """The migrations in ``directory`` (default: the package's) in version order; a malformed file
    name, a duplicate version or a file that cannot be read is a MigrationError."""
    root = Path(directory) if directory else resources.files("migrations")
    found: dict[int, Migration] = {}
    try:
        entries = sorted(root.iterdir(), key=lambda entry: entry.name)
    except OSError as exc:
        raise MigrationError(f"cannot read the migrations in {root}: {exc.strerror or exc}") from exc
    for entry in entries:
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME_RE.match(entry.name)
        if not match:
            raise MigrationError(f"migration file {entry.name!r}: expected NNNN_description.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"two migrations share version {version}: {found[version].name}, {entry.name}"
            )
        try:
            data = entry.read_bytes()
        except OSError as exc:
            raise MigrationError(f"cannot read migration file {entry.name}: {exc.strerror or exc}") from exc
        try:
            sql = decode_utf8(data)
        except ValueError as exc:
            raise MigrationError(f"migration file {entry.name}: {exc}") from None
        found[version] = Migration(version, entry.name, sql)
    return tuple(found[v] for v in sorted(found))


async def _applied(cur: aiopg.Cursor) -> dict[int, str] | None:
    await cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    (exists,) = await cur.fetchone()
    if not exists:
        return None
    await cur.execute("SELECT version, checksum FROM schema_migrations")
    return {version: checksum for version, checksum in await cur.fetchall()}


def _compare(migrations: tuple[Migration, ...], applied: dict[int, str]) -> list[Migration]:
    known = {m.version: m for m in migrations}
    for version, checksum in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {version} applied, which this code does not know: "
                "is an older version of the service running against a newer schema?"
            )
        if migration.checksum != checksum:
            raise MigrationError(f"migration {migration.name} was changed after it was applied")
    return [m for m in migrations if m.version not in applied]


async def pending_migrations(cur: aiopg.Cursor, migrations: tuple[Migration, ...]) -> list[Migration]:
    return _compare(migrations, await _applied(cur) or {})


async def check_migrations(
    pool: aiopg.Pool, migrations: tuple[Migration, ...] | None = None, *, dsn: str | None = None
) -> None:
    """Raise MigrationsPending (or MigrationError) unless the schema is up to date; ``dsn`` names
    the server in the error when PostgreSQL cannot be reached."""
    migrations = load_migrations() if migrations is None else migrations
    try:
        async with pool.acquire() as conn, conn.cursor() as cur:
            pending = await pending_migrations(cur, migrations)
    except (psycopg2.OperationalError, psycopg2.InterfaceError, OSError, TimeoutError) as exc:
        at = f" at {server_of(dsn)}" if dsn else ""
        raise DatabaseUnavailable(f"cannot reach PostgreSQL{at}: {one_line(exc)}") from exc
    if pending:
        names = ", ".join(m.name for m in pending)
        raise MigrationsPending(
            f"{len(pending)} database migration(s) pending ({names}); "
            "run `python -m intelligence migrate` first"
        )


async def apply_migrations(dsn: str, migrations: tuple[Migration, ...] | None = None) -> list[str]:
    """Apply every pending migration, each in its own transaction; return the names applied."""
    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[str] = []
    async with aiopg.connect(dsn, timeout=600) as conn, conn.cursor() as cur:
        # Session-level lock: held across the per-file transactions, released on disconnect
        # even if this process dies half way.
        await cur.execute("SELECT pg_advisory_lock(%(id)s)", {"id": ADVISORY_LOCK_ID})
        try:
            await cur.execute(_CREATE_TABLE)
            for migration in _compare(migrations, await _applied(cur) or {}):
                log.info("applying migration", extra={"migration": migration.name})
                await cur.execute("BEGIN")
                try:
                    await cur.execute(migration.sql)
                    await cur.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES (%(version)s, %(name)s, %(checksum)s)",
                        {
                            "version": migration.version,
                            "name": migration.name,
                            "checksum": migration.checksum,
                        },
                    )
                    await cur.execute("COMMIT")
                except BaseException:
                    if not conn.closed:
                        await cur.execute("ROLLBACK")
                    raise
                applied_now.append(migration.name)
        finally:
            if not conn.closed:
                await cur.execute("SELECT pg_advisory_unlock(%(id)s)", {"id": ADVISORY_LOCK_ID})
    return applied_now
