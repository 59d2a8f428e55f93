"""WebSocket on raw sockets, for tests that must see the exact frames on the wire (an empty Close,
a reason) or answer a handshake as no library would (a subprotocol nobody offered)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

CLOSE, PING, PONG, TEXT = 0x8, 0x9, 0xA, 0x1
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE_HEADERS = (
    f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
)


def accept(key: str) -> str:
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    return base64.b64encode(digest).decode()


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def frame(opcode: int, payload: bytes = b"", *, masked: bool) -> bytes:
    """One final frame; a client's is masked (RFC 6455 section 5.3)."""
    head = bytes([0x80 | opcode])
    length = len(payload)
    bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader, deadline_s: float = 5.0) -> tuple[int, bytes]:
    """The next frame's opcode and (unmasked) payload."""
    async with asyncio.timeout(deadline_s):
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        mask = await reader.readexactly(4) if second & 0x80 else b""
        payload = await reader.readexactly(length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


async def read_until_eof(reader: asyncio.StreamReader, deadline_s: float = 5.0) -> bytes:
    async with asyncio.timeout(deadline_s):
        return await reader.read()


@asynccontextmanager
async def raw_client(
    port: int, path: str = "/ws/room", headers: str = ""
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A WebSocket client on a plain socket, past the 101."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n{UPGRADE_HEADERS}{headers}\r\n".encode())
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        yield reader, writer
    finally:
        writer.close()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


@asynccontextmanager
async def raw_upstream(extra_101_headers: str = "", then: RawHandler | None = None) -> AsyncIterator[str]:
    """A WebSocket server on plain sockets that answers every handshake with a 101 carrying
    ``extra_101_headers`` as they are, then runs ``then`` (or reads until the connection ends)."""

    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            key = next(
                line.split(":", 1)[1].strip()
                for line in head.split("\r\n")
                if line.lower().startswith("sec-websocket-key:")
            )
            writer.write(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept(key)}\r\n{extra_101_headers}\r\n"
                ).encode()
            )
            if then is not None:
                await then(reader, writer)
            else:
                await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:  # Python 3.12+ waits for every connection to end
            writer.close()
        await server.wait_closed()
