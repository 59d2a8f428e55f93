"""Starting ``python -m gateway`` where it cannot work: one line naming the problem, exit 2, no traceback.

Problems the settings catch are tested on ``load_settings`` (test_settings.py); these are the ones
found only while starting: the listening address, the worker processes.
"""

from __future__ import annotations

import socket

import pytest

from gateway.server import Listener, ListenError
from tests.helpers import program_env, refusal, run_program


def test_serve_on_a_port_in_use_names_the_address_and_the_keys(busy_port: int) -> None:
    result = run_program("gateway", env=program_env(GATEWAY_PORT=str(busy_port)))

    assert refusal(result) == (
        f"gateway: cannot listen on 127.0.0.1:{busy_port}: address already in use "
        "(GATEWAY_HOST, GATEWAY_PORT)"
    )


@pytest.mark.parametrize(
    ("host", "error", "problem"),
    [
        (
            "nohost.invalid",
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "cannot resolve the host: name or service not known",
        ),
        ("10.99.99.99", OSError(99, "error while attempting to bind"), "cannot assign requested address"),
        ("::1", OSError(13, "error while attempting to bind"), "permission denied"),
    ],
)
def test_a_listen_error_is_one_line_with_the_reason(host: str, error: OSError, problem: str) -> None:
    listener = Listener(None, host, 80, "gateway", "GATEWAY_HOST, GATEWAY_PORT")  # type: ignore[arg-type]

    message = str(ListenError(listener, error))

    shown = f"[{host}]" if ":" in host else host
    assert message == f"cannot listen on {shown}:80: {problem} (GATEWAY_HOST, GATEWAY_PORT)"
