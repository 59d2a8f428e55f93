"""Request validation at the door: cheap checks early, schema checks only for admitted requests.

Two layers, because a request that will be refused for its token must not get its body parsed:

- ``body_checks_middleware`` (before rate limits and authentication): a declared
  ``Content-Length`` over the route's limit is a 413 before any of the body is read, and a
  POST/PUT/PATCH body must declare a type the route accepts (415); a body with a schema must
  also be JSON, UTF-8 and not compressed (415). Bodies without a schema keep streaming, compressed or
  not, as sent; the proxy counts them against the same limit as they pass.
- ``schema_validation_middleware`` (after authentication): a body with a schema
  (``gateway.schemas``) is read up to the route's limit, checked, and on success forwarded as the
  exact bytes the client sent; on failure every problem is reported at once (422).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..errors import ApiError, body_too_large, client_text
from ..httpserver import read_body_chunk, send_continue
from ..keys import body_key, route_key
from ..validation import (
    content_codings,
    find_schema,
    foreign_charset,
    is_json_media_type,
    media_type_allowed,
    validate_body,
)

__all__ = ["SCHEMA_BODY_CAP", "body_checks_middleware", "schema_validation_middleware"]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A schema'd body is held in memory to be checked: on a route without a limit, this one applies.
SCHEMA_BODY_CAP = 1024 * 1024


def _has_body(request: web.Request) -> bool:
    length = request.content_length
    return length > 0 if length is not None else request.body_exists


def body_checks_middleware() -> Any:
    """413 on a declared length over the route's limit; 415 on a body type the route refuses, and
    on a body with a schema that is not JSON or is compressed."""

    @web.middleware
    def body_checks(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        route = request.get(route_key)
        if route is None or not _has_body(request):
            return handler(request)
        length = request.content_length
        if route.max_body is not None and length is not None and length > route.max_body:
            raise body_too_large(route.max_body)
        if request.method in BODY_METHODS:
            content_type = request.headers.get("Content-Type")
            if not media_type_allowed(content_type, route.content_types):
                raise _unsupported(content_type, route.content_types)
            json_body = is_json_media_type(content_type)
            coded = "Content-Encoding" in request.headers
            charset = foreign_charset(content_type)
            if (not json_body or coded or charset) and find_schema(request.method, request.raw_path):
                # A body with a schema must be JSON even where the route takes */*: many backends
                # parse JSON whatever the header says, so another type would be a way around the
                # check. It is checked as UTF-8, so it must be read as UTF-8 upstream too.
                if not json_body:
                    raise _unsupported(content_type, ("application/json",))
                if charset:
                    raise ApiError(
                        415,
                        f"JSON must be UTF-8: charset '{client_text(charset)}' is not accepted on this route",
                        headers={"Accept": "application/json"},
                    )
                if codings := content_codings(request.headers.getall("Content-Encoding")):
                    raise _encoded(codings)
        return handler(request)

    return body_checks


def _unsupported(content_type: str | None, accepted: tuple[str, ...]) -> ApiError:
    sent = f"'{client_text(content_type)}'" if content_type else "no Content-Type"
    return ApiError(
        415,
        f"Unsupported Media Type: {sent}; this route accepts {', '.join(accepted)}",
        headers={"Accept": ", ".join(accepted)},
    )


def _encoded(codings: list[str]) -> ApiError:
    # Checking a compressed body means inflating it here and trusting that the backend's
    # decoder reads the same bytes (concatenated gzip members, trailing data and zlib headers are
    # where decoders differ), plus a bound on how far it inflates. Refusing is what RFC 9110
    # section 15.5.16 describes, and the client can always send the body plain.
    return ApiError(
        415,
        f"Content-Encoding {client_text(', '.join(codings))} is not accepted on this route; "
        "send the body uncompressed",
        headers={"Accept-Encoding": "identity"},
    )


def schema_validation_middleware() -> Any:
    """Check bodies that have a schema; keep the exact bytes for the proxy to forward."""

    @web.middleware
    def schema_validation(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        route = request.get(route_key)
        if route is None or request.method not in BODY_METHODS:
            return handler(request)
        found = find_schema(request.method, request.raw_path)
        if found is None:
            return handler(request)
        limit = route.max_body if route.max_body is not None else SCHEMA_BODY_CAP
        return _validated(request, handler, limit, found[1])

    return schema_validation


async def _validated(request: web.Request, handler: Handler, limit: int, schema: Any) -> web.StreamResponse:
    await send_continue(request)
    raw = await _read_limited(request, limit)
    errors = validate_body(raw, schema)
    if errors:
        raise ApiError(422, "Validation Error", errors)
    request[body_key] = raw
    return await handler(request)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    content = request.content
    while chunk := await read_body_chunk(content):
        total += len(chunk)
        if total > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
