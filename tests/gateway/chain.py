"""Helpers for the chain tests: the real app, tokens, and upstreams that count what reaches them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.devauth import mint_token
from gateway.settings import load_settings

SECRET = "chain-tests-secret-" + "k" * 40
AUTH_ENV = {"AUTH_JWT_SECRET": SECRET}
RATELIMIT_FIELDS = (
    "RateLimit-Policy",
    "RateLimit",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)


def token(subject: str = "alice", scopes: tuple[str, ...] = (), ttl: int = 300) -> str:
    """A development token signed with ``SECRET`` (what ``python -m gateway token`` mints)."""
    return mint_token(load_settings(AUTH_ENV), subject=subject, scopes=list(scopes), ttl=ttl)


def bearer(subject: str = "alice", scopes: tuple[str, ...] = ()) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject, scopes)}"}


def service(url: str, routes: list[dict[str, Any]], **service_extra: Any) -> dict[str, Any]:
    """One service ``svc`` behind ``routes`` (each a dict with at least ``prefix``)."""
    return {
        "services": {"svc": {"url": url, **service_extra}},
        "routes": [{"service": "svc", **route} for route in routes],
    }


@dataclass
class Counting:
    """What a streaming upstream received, recorded as it arrives (even if the body is cut)."""

    requests: int = 0
    received: int = 0
    ended: list[bool] = field(default_factory=list)


def counting_handler(counting: Counting) -> Any:
    """An upstream handler that reads the body chunk by chunk, counting bytes as they arrive."""

    async def handle(request: web.Request) -> web.StreamResponse:
        counting.requests += 1
        try:
            while chunk := await request.content.readany():
                counting.received += len(chunk)
        except Exception:
            counting.ended.append(False)
            raise
        counting.ended.append(True)
        return web.json_response({"received": counting.received})

    return handle


async def read_head(reader: asyncio.StreamReader, deadline_s: float) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (status, headers, Content-Length body) within ``deadline_s``."""
    async with asyncio.timeout(deadline_s):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body
