"""The chat API's settings: read from the environment once, validated, frozen.

``create_app(settings)`` never reads the environment; ``cli`` calls ``load_settings()`` once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

# The gateway's small parsers, so both apps report a bad value the same way.
from gateway.settings import (
    SettingsError,
    parse_host,
    parse_int,
    parse_logging,
    parse_number,
    parse_sample_rate,
    parse_url,
    postgres_dsn,
    redis_url,
)

__all__ = [
    "CacheSettings",
    "IntelligenceSettings",
    "PostgresSettings",
    "SettingsError",
    "load_settings",
]


@dataclass(frozen=True)
class PostgresSettings:
    dsn: str = field(repr=False)
    pool_max: int = 20
    connect_timeout: float = 3.0  # seconds; also bounds how long a call waits for a dead server
    statement_timeout: float = 10.0  # seconds; server side, so a stuck query frees its locks
    health_timeout: float = 1.0  # /health/db's SELECT 1


@dataclass(frozen=True)
class CacheSettings:
    url: str | None = field(default=None, repr=False)  # None: no cache, PostgreSQL only
    prefix: str = "chat:"
    # Redis must never make a call slow: short socket timeouts, no retries, then a pause.
    socket_timeout: float = 0.15
    retry_after: float = 1.0  # seconds without Redis after a failure before trying again
    session_ttl: int = 300  # seconds
    messages_ttl: int = 300
    recent_messages: int = 100  # how many of a session's newest messages are cached


@dataclass(frozen=True)
class IntelligenceSettings:
    postgres: PostgresSettings
    cache: CacheSettings = CacheSettings()
    host: str = "127.0.0.1"
    port: int = 8081
    log_level: str = "INFO"
    log_format: str = "json"
    shutdown_timeout: float = 30.0
    zipkin_url: str | None = None
    trace_sample_rate: float = 1.0
    migrations_dir: str | None = None  # None: the migrations shipped with the package


def _check_dsn(dsn: str) -> None:
    # libpq parses a connection string only when it connects, and the pool connects lazily. Its
    # parser, run now, finds the same mistakes. (One built from POSTGRES_* is always well formed.)
    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        problem = " ".join(str(exc).split()).removeprefix("invalid dsn: ")
        raise SettingsError(f"POSTGRES_DSN: not a valid connection string: {problem}") from None


def _directory(value: str, key: str) -> str:
    if not os.path.isdir(value):
        problem = "is not a directory" if os.path.exists(value) else "does not exist"
        raise SettingsError(f"{key}: {value} {problem}")
    return value


def load_postgres_settings(env: Mapping[str, str], dsn: str | None = None) -> PostgresSettings:
    """``dsn``, when given, is the database's address and ``POSTGRES_*`` tune the pool only."""
    dsn = dsn or postgres_dsn(env)
    if not dsn:
        raise SettingsError(
            "POSTGRES_DSN (or POSTGRES_HOST, POSTGRES_DB, ...): the chat database is required"
        )
    _check_dsn(dsn)
    return PostgresSettings(
        dsn=dsn,
        pool_max=parse_int(env.get("POSTGRES_POOL_MAX", "20"), "POSTGRES_POOL_MAX", minimum=1, maximum=1000),
        connect_timeout=parse_number(
            env.get("POSTGRES_CONNECT_TIMEOUT", "3"), "POSTGRES_CONNECT_TIMEOUT", minimum=1
        ),
        statement_timeout=parse_number(
            env.get("POSTGRES_STATEMENT_TIMEOUT", "10"), "POSTGRES_STATEMENT_TIMEOUT", minimum=0.1
        ),
    )


def load_settings(
    environ: Mapping[str, str] | None = None, *, dsn: str | None = None
) -> IntelligenceSettings:
    """Read the environment once; raise SettingsError naming the key on any bad value. ``dsn``:
    the database found by other means (``python -m gateway up``'s embedded server)."""
    env = os.environ if environ is None else environ
    log_level, log_format = parse_logging(env)
    ttl = parse_int(env.get("CHAT_CACHE_TTL", "300"), "CHAT_CACHE_TTL", minimum=1, maximum=86400 * 30)
    cache = CacheSettings(
        url=redis_url(env),
        prefix=env.get("CHAT_CACHE_PREFIX", "chat:"),
        session_ttl=ttl,
        messages_ttl=ttl,
    )
    return IntelligenceSettings(
        postgres=load_postgres_settings(env, dsn),
        cache=cache,
        host=parse_host(env.get("INTELLIGENCE_HOST", "127.0.0.1"), "INTELLIGENCE_HOST"),
        port=parse_int(env.get("INTELLIGENCE_PORT", "8081"), "INTELLIGENCE_PORT", minimum=0, maximum=65535),
        log_level=log_level,
        log_format=log_format,
        shutdown_timeout=parse_number(
            env.get("INTELLIGENCE_SHUTDOWN_TIMEOUT", "30"), "INTELLIGENCE_SHUTDOWN_TIMEOUT"
        ),
        zipkin_url=parse_url(env["ZIPKIN_URL"], "ZIPKIN_URL") if env.get("ZIPKIN_URL") else None,
        trace_sample_rate=parse_sample_rate(env.get("TRACE_SAMPLE_RATE", "1.0")),
        migrations_dir=(
            _directory(env["INTELLIGENCE_MIGRATIONS_DIR"], "INTELLIGENCE_MIGRATIONS_DIR")
            if env.get("INTELLIGENCE_MIGRATIONS_DIR")
            else None
        ),
    )
