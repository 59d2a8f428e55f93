"""What the process itself is doing: starting, serving or draining."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from .keys import lifecycle_key, sent_status_key

__all__ = ["CLIENT_CLOSED", "Lifecycle", "status_when_cancelled"]

# A client that went away before its answer: nginx's convention.
CLIENT_CLOSED = 499


@dataclass
class Lifecycle:
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    draining: bool = False
    # Proxied WebSockets, client side: closed with 1001 (going away) when the gateway drains.
    websockets: set[web.WebSocketResponse] = field(default_factory=set)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at


def status_when_cancelled(request: web.Request) -> int:
    """The status to log and count for a request whose handler was cancelled.

    aiohttp cancels a handler when its connection ends, which is also how every WebSocket
    session ends, and on drain when the bound runs out. The answer's own status if its head went
    out (101 for a WebSocket, the upstream's for a streamed relay); 503 if the drain cut it;
    otherwise the client left first: 499.
    """
    sent = request.get(sent_status_key)
    if sent is not None:
        return sent
    lifecycle = request.app.get(lifecycle_key)
    if lifecycle is not None and lifecycle.draining:
        return 503
    return CLIENT_CLOSED
