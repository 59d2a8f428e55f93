"""The one place where the gateway's own error responses are built.

    ApiError            raised anywhere below a handler; rendered by error_middleware
    error_response()    the contract's body: {"detail": ..., "errors": [...]} as application/json
    client_text()       a client-sent value (a header) made safe to quote in a ``detail``

Upstream responses never come through here: they pass through untouched.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .metrics import metrics_key, route_label
from .state import CLIENT_CLOSED

__all__ = ["ApiError", "body_too_large", "client_text", "error_middleware", "error_response"]

log = logging.getLogger("gateway")


class ApiError(Exception):
    """An answer the gateway gives itself: status, a short ``detail`` and optional per-field errors."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason  # a bounded word for metrics, e.g. why authentication failed
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers


MAX_QUOTED = 128  # characters of a client's value quoted back; a header may be 8 KB
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def client_text(value: str) -> str:
    """``value`` as it may be quoted in an error message: printable, valid UTF-8, bounded.

    aiohttp decodes header bytes that are not UTF-8 to lone surrogates (surrogateescape), which
    cannot be encoded back to UTF-8; they are shown as ``\\xe9`` escapes, as are control
    characters, and anything past MAX_QUOTED characters is cut with ``...``.
    """
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from a byte
        raw = value.encode("utf-8", "backslashreplace")
    text = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", raw.decode("utf-8", "backslashreplace"))
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 3] + "..."


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body exceeds the limit of {limit} bytes for this route")


def error_response(
    status: int,
    detail: str,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"detail": detail}
    if errors:
        body["errors"] = list(errors)
    return web.Response(
        status=status,
        # A lone surrogate (a JSON key or header the client sent) cannot be encoded as UTF-8;
        # backslashreplace writes it as a \uXXXX escape, which inside a JSON string is still
        # valid JSON, instead of failing the answer with a 500.
        body=json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace"),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn ApiError, aiohttp's own HTTP errors and anything unexpected into the contract's body."""
    try:
        return await handler(request)
    except ApiError as exc:
        # A 5xx of the gateway's own making counts as a rejection only when it names a reason
        # (the JWKS 503); 502/503/504 from the upstream side have their own metrics.
        counted = exc.status < 500 or exc.reason is not None
        if counted and (metrics := request.app.get(metrics_key)) is not None:
            metrics.record_rejection(route_label(request), exc.status, exc.reason)
        return error_response(exc.status, exc.detail, exc.errors, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(exc.status, _phrase(exc.status), headers=headers)
    except Exception as exc:
        transport = request.transport
        if isinstance(exc, ConnectionResetError) and (transport is None or transport.is_closing()):
            # The client hung up while its request was being read (a body read finds the
            # connection gone before aiohttp cancels the handler): nobody to answer, and
            # nothing went wrong here. Logged and counted as nginx does.
            return error_response(CLIENT_CLOSED, "Client Closed Request")
        # The traceback goes to the log; the client only learns that it was our fault.
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return error_response(500, "Internal Server Error")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
