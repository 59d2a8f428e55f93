"""Running out: file descriptors, clients that stop reading, many long-lived connections.

Real sockets on loopback; the file-descriptor test runs ``python -m gateway`` with a low
RLIMIT_NOFILE, as ``ulimit -n`` would.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

from tests.helpers import one_service, running_gateway, wait_for

OPEN_FILES = 64


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, dict[str, str], bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, body


async def test_out_of_file_descriptors_an_upstream_connection_gets_503_and_the_target_stays_in(
    make_upstream: Any, tmp_path: Path
) -> None:
    """With every descriptor taken by client connections, a request that needs a new upstream
    connection cannot have one (EMFILE). That is the gateway's shortage: a 503 in the contract's
    format with Retry-After, one warning in the log, and the target is not ejected, so the first
    request after descriptors come back is served (it was a 502 blaming the upstream, then 503
    "no healthy target" for the ejection's 5 s)."""
    upstream = await make_upstream()
    config = one_service(upstream.url, prefix="/svc")
    async with running_gateway(config, tmp_path, open_files=OPEN_FILES, AUTH_ENABLED="false") as gateway:
        pid = gateway.process.pid
        # Connections the gateway has accepted (they were answered), proxying nothing yet: its
        # upstream pool is empty.
        held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(2)]
        for reader, writer in held:
            assert (await _get(reader, writer, "/health"))[0] == 200
        fillers: list[socket.socket] = []
        try:
            for _ in range(OPEN_FILES + 16):
                fillers.append(socket.create_connection(("127.0.0.1", gateway.port)))
            await wait_for(lambda: _open_fds(pid) >= OPEN_FILES, 5.0, "the gateway to run out of fds")
            status, headers, body = await _get(*held[0], "/svc/x")
            assert status == 503, body
            assert headers["content-type"] == "application/json"
            assert headers["retry-after"] == "1"
            assert headers["x-request-id"]
            assert "too many open connections" in json.loads(body)["detail"]
        finally:
            for sock in fillers:
                sock.close()
        await wait_for(lambda: _open_fds(pid) < OPEN_FILES - 8, 5.0, "the fillers' fds to be closed")
        status, _, body = await _get(*held[1], "/svc/x")
        assert status == 200, body
        assert len(upstream.requests) == 1
        for _, writer in held:
            writer.close()
    records = [json.loads(line) for line in gateway.log.read_text().splitlines() if line.startswith("{")]
    warnings = [r for r in records if "out of sockets" in r["msg"]]
    assert len(warnings) == 1, records
    assert warnings[0]["level"] == "warning" and warnings[0]["service"] == "svc"
    assert "Traceback" not in gateway.log.read_text()
