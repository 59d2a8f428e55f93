"""Starting ``python -m intelligence`` where it cannot work: one line naming the problem, exit 2."""

from __future__ import annotations

from tests.helpers import program_env, refusal, run_program


def test_serve_on_a_port_in_use_names_the_address_and_the_keys(database: str, busy_port: int) -> None:
    env = program_env(POSTGRES_DSN=database, INTELLIGENCE_PORT=str(busy_port))

    assert refusal(run_program("intelligence", env=env)) == (
        f"intelligence: cannot listen on 127.0.0.1:{busy_port}: address already in use "
        "(INTELLIGENCE_HOST, INTELLIGENCE_PORT)"
    )
