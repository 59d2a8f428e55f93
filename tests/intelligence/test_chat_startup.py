"""Starting ``python -m intelligence`` where it cannot work (one line naming the problem, exit 2),
and stopping it."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from chat_helpers import Service, wait_until

from intelligence.schema import server_of
from tests.helpers import free_port, program_env, refusal, run_program


def test_serve_on_a_port_in_use_names_the_address_and_the_keys(database: str, busy_port: int) -> None:
    env = program_env(POSTGRES_DSN=database, INTELLIGENCE_PORT=str(busy_port))

    assert refusal(run_program("intelligence", env=env)) == (
        f"intelligence: cannot listen on 127.0.0.1:{busy_port}: address already in use "
        "(INTELLIGENCE_HOST, INTELLIGENCE_PORT)"
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"POSTGRES_DSN": "garbage"},
            'intelligence: POSTGRES_DSN: not a valid connection string: missing "=" after "garbage" '
            "in connection info string",
        ),
        (
            {"POSTGRES_DSN": "dbname=x", "INTELLIGENCE_MIGRATIONS_DIR": "/nope"},
            "intelligence: INTELLIGENCE_MIGRATIONS_DIR: /nope does not exist",
        ),
    ],
)
def test_serve_with_a_setting_libpq_or_the_migrations_reject_is_one_line(
    env: dict[str, str], line: str, run_in_process: Any
) -> None:
    assert refusal(run_in_process("intelligence", **env)) == line


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_unreachable_database_is_named_by_address_database_and_user_never_the_password(
    command: str,
) -> None:
    """aiopg's connection errors leave out the address libpq's own messages name: the line said
    "cannot reach PostgreSQL: Connection refused Is the server running on that host ...", and
    not which host, with two sentences run together."""
    port = free_port()
    password = "pw-" + uuid.uuid4().hex
    dsn = f"postgresql://chat:{password}@127.0.0.1:{port}/chats"
    env = program_env(POSTGRES_DSN=dsn, INTELLIGENCE_PORT=str(free_port()))
    line = refusal(run_program("intelligence", command, env=env))  # serve changes signal handling
    what = "not starting: cannot reach PostgreSQL" if command == "serve" else "migration failed"
    assert line == (
        f"intelligence: {what} at 127.0.0.1:{port} (database chats, user chat): Connection refused. "
        "Is the server running on that host and accepting TCP/IP connections?"
    )
    assert password not in line


@pytest.mark.parametrize(
    ("dsn", "where"),
    [
        ("host=/var/run/postgresql dbname=chats", "/var/run/postgresql (database chats)"),
        ("host=db1,db2 port=5433,5434 user=chat", "db1,db2 (user chat)"),
        ("dbname=chats user=chat password=secret", "the local socket:5432 (database chats, user chat)"),
        ("postgresql://[::1]:6432/chats", "[::1]:6432 (database chats)"),
        ("host=fd00::5 dbname=chats", "[fd00::5]:5432 (database chats)"),
    ],
)
def test_server_of_names_host_port_database_and_user_only(dsn: str, where: str) -> None:
    assert server_of(dsn) == where


async def test_a_hangup_drains_the_chat_api_as_sigterm_does(
    database: str, service_process: Callable[[dict[str, str]], Service]
) -> None:
    """`python -m intelligence` has nothing to reload: SIGHUP (its terminal closed) drains it and
    it exits 0. It was SIGHUP's default action, which cut off what was in flight (exit -1)."""
    svc = service_process({"POSTGRES_DSN": database})
    process = await svc.serving()
    process.send_signal(signal.SIGHUP)
    await wait_until(lambda: process.poll() is not None, what="the chat API to exit")
    assert process.returncode == 0, svc.output()
    assert "draining" in svc.output() and "Traceback" not in svc.output(), svc.output()
