"""Starting ``python -m gateway`` where it cannot work: one line naming the problem, exit 2, no traceback.

Problems the settings catch are tested on ``load_settings`` (test_settings.py); these are the ones
found only while starting: the listening address, the worker processes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from gateway.server import Listener, ListenError, run
from tests.helpers import one_service, program_env, refusal, run_program, running_gateway, wait_for


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


def test_workers_on_a_port_in_use_stop_with_one_line_instead_of_restarting(busy_port: int) -> None:
    env = program_env(GATEWAY_PORT=str(busy_port), GATEWAY_WORKERS="2")

    # Before, the supervisor restarted the failing workers for ever: the timeout ends that.
    result = run_program("gateway", env=env, timeout=15)

    assert refusal(result) == (
        f"gateway: cannot listen on 127.0.0.1:{busy_port}: address already in use "
        "(GATEWAY_HOST, GATEWAY_PORT)"
    )


def test_a_worker_that_crashes_before_serving_stops_the_supervisor() -> None:
    script = (
        "from gateway.server import WorkerStartError, run_workers\n"
        "def worker(ready):\n"
        "    raise RuntimeError('a bug while building the app')\n"
        "try:\n"
        "    run_workers(2, worker)\n"
        "except WorkerStartError as exc:\n"
        "    print(exc)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script], env=program_env(), capture_output=True, text=True, timeout=15
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "a worker exited with code 1 before it was serving\n"
    # A bug, not a setting: its traceback stays (the other worker may be stopped before it prints).
    assert "RuntimeError: a bug while building the app" in result.stderr


# -- python -m gateway token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "problem"),
    [("", "the subject is empty"), ("   ", "the subject starts or ends with white space")],
)
def test_token_refuses_a_subject_the_gateway_would_refuse(
    tmp_path: Path, subject: str, problem: str, run_in_process: Any
) -> None:
    result = run_in_process("gateway", "token", "--sub", subject, GATEWAY_DATA_DIR=str(tmp_path))

    assert refusal(result) == f"gateway: --sub: {problem}; the gateway would refuse the token"
    assert result.stdout == ""


def test_token_refuses_a_scope_the_gateway_would_ignore(tmp_path: Path, run_in_process: Any) -> None:
    result = run_in_process(
        "gateway", "token", "--sub", "alice", "--scope", 'say"hi', GATEWAY_DATA_DIR=str(tmp_path)
    )

    assert refusal(result).startswith("gateway: --scope: 'say\"hi' is not a scope")


@pytest.mark.parametrize(
    ("data_dir", "problem"), [("/proc/nope", "no such file or directory"), ("file", "not a directory")]
)
def test_token_with_a_data_dir_that_cannot_keep_the_secret_names_it(
    tmp_path: Path, data_dir: str, problem: str, run_in_process: Any
) -> None:
    if data_dir == "file":
        data_dir = str(tmp_path / "file")
        Path(data_dir).write_text("")
    result = run_in_process("gateway", "token", "--sub", "alice", GATEWAY_DATA_DIR=data_dir)

    assert refusal(result) == (
        f"gateway: configuration error: GATEWAY_DATA_DIR: cannot keep the development secret in {data_dir}: {problem}"
    )


def test_token_mints_what_the_gateway_accepts(tmp_path: Path) -> None:
    secret = "a-development-secret-of-at-least-32-bytes"
    result = run_program(
        "gateway", "token", "--sub", "alice", "--scope", "read,write",
        env=program_env(AUTH_JWT_SECRET=secret, GATEWAY_DATA_DIR=str(tmp_path)),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])
    assert (claims["sub"], claims["scope"]) == ("alice", "read write")
    assert claims["exp"] - claims["iat"] == 3600
    assert "iss" not in claims and "aud" not in claims
    assert not any(tmp_path.iterdir())  # with AUTH_JWT_SECRET the data dir is not touched


def test_a_token_carries_its_ttl_and_the_issuer_and_audience_the_gateway_checks(tmp_path: Path) -> None:
    secret = "a-development-secret-of-at-least-32-bytes"
    env = program_env(
        AUTH_JWT_SECRET=secret, AUTH_ISSUER="https://issuer.example", AUTH_AUDIENCE="platform-api"
    )
    result = run_program("gateway", "token", "--sub", "alice", "--ttl", "120", env=env)

    assert result.returncode == 0, result.stderr
    claims = jwt.decode(
        result.stdout.strip(),
        secret,
        algorithms=["HS256"],
        issuer="https://issuer.example",
        audience="platform-api",
    )
    assert claims["exp"] - claims["iat"] == 120


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--sub", "alice", "--ttl", "0"], "--ttl must be a positive number of seconds"),
        (["--sub", "alice", "--ttl", "-5"], "--ttl must be a positive number of seconds"),
        (["--sub", "al\x01ice"], "--sub: "),  # a control character, as the gateway refuses one
    ],
)
def test_the_token_command_refuses_what_the_gateway_would_refuse(
    tmp_path: Path, args: list[str], problem: str
) -> None:
    result = run_program(
        "gateway", "token", *args, env=program_env(AUTH_JWT_SECRET="s" * 32, GATEWAY_DATA_DIR=str(tmp_path))
    )
    assert refusal(result).startswith(f"gateway: {problem}")


def test_a_development_secret_is_made_readable_by_its_owner_only(tmp_path: Path) -> None:
    """Anyone who can read it can mint tokens the gateway accepts."""
    result = run_program(
        "gateway", "token", "--sub", "alice", env=program_env(GATEWAY_DATA_DIR=str(tmp_path))
    )

    assert result.returncode == 0, result.stderr
    (secret_file,) = tmp_path.iterdir()
    assert secret_file.stat().st_mode & 0o777 == 0o600
    jwt.decode(result.stdout.strip(), secret_file.read_text().strip(), algorithms=["HS256"])


async def start_lines(gateway: Any) -> list[dict[str, Any]]:
    """The JSON lines a gateway logged up to "listening": one thread writes them in order, and
    the start-up warnings come before that line."""
    await wait_for(lambda: '"msg": "listening"' in gateway.log.read_text(), what="the listening line")
    return [json.loads(line) for line in gateway.log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("env", "warning"),
    [
        ({"AUTH_ENABLED": "false"}, "AUTH_ENABLED=false: requests are NOT authenticated"),
        ({}, "no AUTH_JWKS_URL or AUTH_JWT_SECRET: every route with auth: required answers 401"),
    ],
    ids=["auth-off", "no-keys"],
)
async def test_a_gateway_that_cannot_authenticate_says_so_at_start(
    make_upstream: Any, tmp_path: Path, env: dict[str, str], warning: str
) -> None:
    upstream = await make_upstream()
    async with running_gateway(one_service(upstream.url), tmp_path, **env) as gateway:
        lines = await start_lines(gateway)
    (found,) = [line for line in lines if line["msg"].startswith(warning)]
    assert found["level"] == "warning"


@pytest.mark.parametrize(
    ("trusted", "warned"), [("10.0.0.0/8,0.0.0.0/0", "0.0.0.0/0"), ("::/0", "::/0"), ("10.0.0.0/8", None)]
)
async def test_trusting_every_address_is_warned_about_at_start(
    make_upstream: Any, tmp_path: Path, trusted: str, warned: str | None
) -> None:
    upstream = await make_upstream()
    async with running_gateway(one_service(upstream.url), tmp_path, TRUSTED_PROXIES=trusted) as gateway:
        lines = await start_lines(gateway)
    warnings = [line for line in lines if "TRUSTED_PROXIES" in line["msg"]]
    if warned is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning["level"] == "warning" and warning["trusted"] == [warned]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # minting the test's token
async def test_a_short_jwt_secret_is_warned_about_and_every_line_stays_json(
    make_upstream: Any, tmp_path: Path
) -> None:
    secret = "only-17-bytes-xyz"
    upstream = await make_upstream()
    config = one_service(upstream.url)
    config["routes"][0]["auth"] = "required"
    async with running_gateway(config, tmp_path, AUTH_JWT_SECRET=secret) as gateway:
        token = jwt.encode({"sub": "alice", "exp": time.time() + 60}, secret, algorithm="HS256")
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{gateway.base}/x", headers={"Authorization": f"Bearer {token}"}
            ) as answer:
                assert answer.status == 200
        await wait_for(lambda: '"path": "/x"' in gateway.log.read_text(), what="the request's line")
        text = gateway.log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # PyJWT's own warning too
    warnings = [line for line in lines if "AUTH_JWT_SECRET" in line["msg"]]
    assert [(w["level"], w["length"]) for w in warnings] == [("warning", 17)]
    assert secret not in text


@pytest.mark.parametrize(("fast_loop", "package"), [(True, "uvloop"), (False, "asyncio")])
def test_the_gateway_runs_on_uvloop_and_the_chat_api_on_asyncios_loop(fast_loop: bool, package: str) -> None:
    """The gateway's hot path wants uvloop; the chat API (and `up`) ask for asyncio's loop, as on
    uvloop a PostgreSQL restart under load could abort the process (README)."""
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run(main(), fast_loop=fast_loop)

    assert seen == [package]
