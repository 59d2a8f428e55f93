"""Request correlation id: kept when the client's is sane, generated otherwise, echoed always."""

from __future__ import annotations

import itertools
import os
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from ..keys import request_id_key

__all__ = ["REQUEST_ID_HEADER", "new_request_id", "request_id_middleware", "stamp_request_id"]

REQUEST_ID_HEADER = "X-Request-ID"
# Long or odd ids are log-injection and cardinality hazards; such ids are replaced, not trusted.
_VALID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")


# A random per-process prefix and a counter: unique across processes and restarts, and far cheaper
# per request than reading the OS's random source.
_PREFIX = os.urandom(8).hex()
_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_counter):016x}"


def request_id_middleware() -> web.middleware:  # type: ignore[valid-type]
    """Give every request an id before anything else can fail, so every answer carries it."""
    fullmatch = _VALID.fullmatch

    @web.middleware
    async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
        incoming = request.headers.get(REQUEST_ID_HEADER)
        request[request_id_key] = incoming if incoming and fullmatch(incoming) else new_request_id()
        return await handler(request)

    return request_id


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: reaches streamed and error responses alike."""
    request_id = request.get(request_id_key)
    if request_id is None:  # rejected before the middleware ran (e.g. by the router itself)
        request_id = request[request_id_key] = new_request_id()
    response.headers.setdefault(REQUEST_ID_HEADER, request_id)
