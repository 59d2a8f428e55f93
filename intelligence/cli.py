"""The command line: ``python -m intelligence [serve]`` and ``python -m intelligence migrate``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.logs import configure_logging
from gateway.server import Listener, ListenError, run, serve

from .app import create_app
from .models import DatabaseUnavailable, MigrationError
from .schema import apply_migrations, load_migrations, one_line, server_of
from .settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m intelligence", description="The chat API.")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate"))
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        return _fail(str(exc))
    configure_logging(settings.log_level, settings.log_format)

    if args.command == "migrate":
        try:
            applied = asyncio.run(
                apply_migrations(settings.postgres.dsn, load_migrations(settings.migrations_dir))
            )
        except MigrationError as exc:
            return _fail(str(exc))
        except Exception as exc:  # psycopg2's errors: name the problem, no traceback
            return _fail(f"migration failed at {server_of(settings.postgres.dsn)}: {one_line(exc)}")
        print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
        return 0

    listener = Listener(
        create_app(settings),
        settings.host,
        settings.port,
        "intelligence",
        "INTELLIGENCE_HOST, INTELLIGENCE_PORT",
    )
    try:
        # asyncio's loop, not uvloop: while PostgreSQL restarts, libpq closes sockets that aiopg
        # still has the loop watching (aiopg issues 856 and 909), and on uvloop the process died
        # of SIGABRT in libuv now and then (3 runs in 70 of test_postgres_restarting_under_load_
        # is_answered_or_503_never_500; none in 90 on asyncio's loop, which logged no error either).
        # The chat API waits on its database, not its loop.
        run(serve([listener], shutdown_timeout=settings.shutdown_timeout), fast_loop=False)
    except (MigrationError, DatabaseUnavailable) as exc:
        return _fail(f"not starting: {exc}")
    except ListenError as exc:
        return _fail(str(exc))
    return 0


def _fail(message: str) -> int:
    print(f"intelligence: {message}", file=sys.stderr, flush=True)
    return 2
