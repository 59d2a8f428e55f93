"""``python -m gateway up`` as a new user runs it: embedded PostgreSQL, chats survive a restart."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp

from tests.helpers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]


async def _start(
    data_dir: Path, port: int, chat_port: int, log: Path
) -> tuple[asyncio.subprocess.Process, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "GATEWAY_DATA_DIR": str(data_dir),
        "GATEWAY_PORT": str(port),
        "INTELLIGENCE_PORT": str(chat_port),
        "LOG_LEVEL": "WARNING",
    }
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "up", cwd=ROOT, env=env, stdout=out, stderr=out
        )
    await wait_ready(f"http://127.0.0.1:{port}", process, log, deadline_s=90)
    match = None
    for _ in range(100):  # the banner follows readiness by a moment
        match = re.findall(r"export TOKEN=(\S+)", log.read_text())
        if match:
            break
        await asyncio.sleep(0.05)
    assert match, log.read_text()
    return process, match[-1]


async def _stop(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await process.wait() == 0


async def test_up_keeps_chats_with_tool_calls_across_a_restart(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "up.log"
    port, chat_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}/api/v1/chat"
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "top_nodes", "arguments": "{}"}}
        ],
    }
    process, token = await _start(data_dir, port, chat_port, log)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(f"{base}/sessions", json={"title": "survives"}) as response:
                assert response.status == 201, await response.text()
                session_id = (await response.json())["id"]
            async with session.post(f"{base}/sessions/{session_id}/messages", json=message) as response:
                assert response.status == 201, await response.text()
                written = await response.json()
        await _stop(process)

        process, token = await _start(data_dir, port, chat_port, log)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            async with session.get(f"{base}/sessions/{session_id}/messages") as response:
                assert response.status == 200
                assert (await response.json())["data"] == [written]
        await _stop(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
