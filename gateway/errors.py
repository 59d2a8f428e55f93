"""The one place where the gateway's own error responses are built.

    ApiError            raised anywhere below a handler; rendered by error_middleware
    error_response()    the contract's body: {"detail": ..., "errors": [...]} as application/json

Upstream responses never come through here: they pass through untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .metrics import metrics_key, route_label

__all__ = ["ApiError", "body_too_large", "error_middleware", "error_response"]

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
        body=json.dumps(body, ensure_ascii=False).encode(),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn ApiError, aiohttp's own HTTP errors and anything unexpected into the contract's body."""
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status < 500 and (metrics := request.app.get(metrics_key)) is not None:
            metrics.record_rejection(route_label(request), exc.status, exc.reason)
        return error_response(exc.status, exc.detail, exc.errors, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(exc.status, _phrase(exc.status), headers=headers)
    except Exception:
        # The traceback goes to the log; the client only learns that it was our fault.
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return error_response(500, "Internal Server Error")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
