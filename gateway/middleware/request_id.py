"""Request correlation id: kept when the client's is sane, generated otherwise, echoed always.

The tracing middleware, outermost, assigns it; ``set_request_id_header``, called from each app's
``on_response_prepare`` hook, puts it on every response (streamed and error ones alike).
"""

from __future__ import annotations

import itertools
import os
import re

from aiohttp import web

from ..keys import request_id_key

__all__ = [
    "REQUEST_ID_HEADER",
    "new_request_id",
    "request_id_for",
    "set_request_id_header",
]

REQUEST_ID_HEADER = "X-Request-ID"
# Long or odd ids are log-injection and cardinality hazards; such ids are replaced, not trusted.
_VALID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")


# A random per-process prefix and a counter: unique across processes and restarts, and far cheaper
# per request than reading the OS's random source.
_prefix = os.urandom(8).hex()
_counter = itertools.count(1)


def _reseed() -> None:
    # Forked workers must not hand out the same ids as their parent and siblings.
    global _prefix, _counter
    _prefix, _counter = os.urandom(8).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    return f"{_prefix}{next(_counter):016x}"


def request_id_for(request: web.Request) -> str:
    """The client's ``x-request-id`` when it is sane, a new one otherwise."""
    incoming = request.headers.get(REQUEST_ID_HEADER)
    return incoming if incoming and _VALID.fullmatch(incoming) else new_request_id()


def set_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(request_id_key)
    if request_id is None:  # rejected before the middleware ran (e.g. by the router itself)
        request_id = request[request_id_key] = new_request_id()
    response.headers.setdefault(REQUEST_ID_HEADER, request_id)
