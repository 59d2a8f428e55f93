"""What the process itself is doing: starting, serving or draining."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["Lifecycle"]


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
