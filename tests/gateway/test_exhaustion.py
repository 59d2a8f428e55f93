"""Running out: file descriptors, clients that stop reading, many long-lived connections.

Real sockets on loopback; the file-descriptor test runs ``python -m gateway`` with a low
RLIMIT_NOFILE, as ``ulimit -n`` would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import resource
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.helpers import one_service, open_slow_reader, running_gateway, wait_for

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
        # Logs are written by a background thread: wait for the line before the process is killed.
        await wait_for(lambda: "out of sockets" in gateway.log.read_text(), 5.0, "the warning in the log")
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
    reader, writer = await open_slow_reader(client.port)
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
    size = 8 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // 65536):
            await response.write(b"y" * 65536)
        await response.write_eof()
        return response

    upstream = await make_upstream(big)
    client = await make_gateway(one_service(upstream.url), server_kwargs={"send_timeout": 0.25})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the gateway's writes back up
    sock.connect(("127.0.0.1", client.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    loop = asyncio.get_running_loop()
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        started, received = loop.time(), 0
        while received < size:
            chunk = await reader.read(131072)
            assert chunk, f"cut off after {received} bytes"
            received += len(chunk)
            await asyncio.sleep(0.005)  # the gateway waits on this client all along
        assert loop.time() - started > 0.25  # longer than the send timeout
    finally:
        writer.close()


async def test_more_websocket_sessions_than_the_old_connector_cap_all_open(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    """Each WebSocket holds an upstream connection for its life. The session they are opened
    with capped the whole process at 1024 of them: the 1025th handshake queued until it got a 504
    blaming the upstream (after connect + read timeout), and health checks queued behind them."""
    count = 1030
    # Four descriptors a session here: the client's, the gateway's two, the upstream's.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * count + 512
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, f"ulimit -Hn is {hard}, {needed} needed"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    async def accept_and_hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        await reader.read()  # until the gateway closes it

    url = await make_raw_upstream(accept_and_hold)
    client = await make_gateway(one_service(url, rate_limit="100000/second"))
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )

    async def open_session() -> tuple[bytes, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(handshake)
        return (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0], writer

    sessions: list[tuple[bytes, asyncio.StreamWriter]] = []
    try:
        async with asyncio.timeout(10):
            for _ in range(count // 100 + 1):
                sessions += await asyncio.gather(
                    *(open_session() for _ in range(min(100, count - len(sessions))))
                )
        assert {status for status, _ in sessions} == {b"HTTP/1.1 101 Switching Protocols"}
        assert len(sessions) == count
        health = await client.get("/health")
        assert health.status == 200
    finally:
        for _, writer in sessions:
            writer.close()
