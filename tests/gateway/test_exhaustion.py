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

from aiohttp import web

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


async def test_a_client_that_stops_reading_is_cut_off_and_frees_the_upstream(
    make_gateway: Any, make_upstream: Any
) -> None:
    """A client that stops reading a streamed answer: backpressure stops the upstream, and after
    the send timeout the client's connection is aborted and the upstream's dropped (nginx's
    send_timeout). Without it both were held for as long as the client liked."""
    upstream_done = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            while True:
                await response.write(chunk)
        finally:
            upstream_done.set()

    upstream = await make_upstream(endless)
    client = await make_gateway(one_service(upstream.url), server_kwargs={"send_timeout": 0.3})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", client.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(b"GET /stream HTTP/1.1\r\nHost: gw\r\n\r\n")
        async with asyncio.timeout(5):
            await upstream_done.wait()  # the gateway dropped the upstream connection
        # ... and the client's: what it reads now ends (EOF or reset) instead of waiting.
        async with asyncio.timeout(5):
            while await reader.read(1 << 20):
                pass
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    # Others are served meanwhile and after.
    response = await client.get("/other")
    assert response.status == 200


async def test_a_slow_but_reading_client_gets_the_whole_stream(make_gateway: Any, make_upstream: Any) -> None:
    """The send timeout counts a client that makes no progress, not a slow one: one that keeps
    reading gets everything, however much longer than the timeout it takes."""
    size = 4 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // 65536):
            await response.write(b"y" * 65536)
        await response.write_eof()
        return response

    upstream = await make_upstream(big)
    client = await make_gateway(one_service(upstream.url), server_kwargs={"send_timeout": 0.2})
    response = await client.get("/big")
    received = 0
    started = asyncio.get_running_loop().time()
    while chunk := await response.content.read(256 * 1024):
        received += len(chunk)
        await asyncio.sleep(0.05)  # a reader that keeps the gateway waiting, but never for 0.2 s
    assert received == size
    assert asyncio.get_running_loop().time() - started > 0.5  # well past the send timeout
