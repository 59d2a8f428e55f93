"""What the process itself is doing: starting, serving or draining."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from .keys import lifecycle_key, sent_status_key
from .wsrelay import Session

__all__ = ["CLIENT_CLOSED", "Lifecycle", "close_while_draining", "status_when_cancelled"]

# A client that went away before its answer: nginx's convention.
CLIENT_CLOSED = 499


@dataclass
class Lifecycle:
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    draining: bool = False
    # Proxied WebSocket sessions: closed with 1001 (going away) on both sides when the gateway drains.
    websockets: set[Session] = field(default_factory=set)

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


def close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
    """Part of ``on_response_prepare``: an answer given while draining says the connection closes.

    aiohttp closes each connection once the request in progress on it is answered, but the answer
    still offered keep-alive: a client that sent its next request on the connection meanwhile had
    it reset, unanswered, with no way to know whether it was processed (a POST cannot simply be
    sent again). Told ``Connection: close``, it sends the next one on a new connection, which
    reaches a replica that is not going away. A 101 is left alone: the connection is the
    WebSocket's now, and draining closes that with 1001.
    """
    if request.app[lifecycle_key].draining and response.status != 101:
        response.force_close()
        # The hook runs after aiohttp wrote its framing headers: say it ourselves.
        response.headers["Connection"] = "close"
