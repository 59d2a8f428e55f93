"""The chat HTTP API (CONTRACT.md, "Intelligence engine HTTP surface").

Handlers validate input, call ChatPersistenceService and render its values; domain errors become
the contract's error body in ``domain_errors_middleware``. The owner of everything is the
``x-auth-subject`` header the gateway sets after authentication.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.claims import subject_problem
from gateway.errors import ApiError

from .keys import service_key
from .models import (
    ROLES,
    ChatMessage,
    ChatSession,
    DatabaseUnavailable,
    IdConflict,
    SessionCursor,
    SessionNotFound,
)
from .persistence import UNSET

__all__ = ["domain_errors_middleware", "setup_api_routes"]

PREFIX = "/api/v1/chat"
SUBJECT_HEADER = "x-auth-subject"
SESSIONS_LIMIT = (50, 200)  # default, maximum
MESSAGES_LIMIT = (100, 1000)
MAX_TITLE = 1000

SESSION_FIELDS = frozenset({"id", "title", "metadata"})
SESSION_PATCH_FIELDS = frozenset({"title", "metadata"})
MESSAGE_FIELDS = frozenset(
    {"id", "role", "content", "tool_calls", "tool_results", "tool_call_id", "metadata"}
)


@web.middleware
async def domain_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Persistence errors to HTTP: missing or foreign session 404, id conflict 409, database 503."""
    try:
        return await handler(request)
    except SessionNotFound as exc:
        raise ApiError(404, "Session not found") from exc
    except IdConflict as exc:
        raise ApiError(409, "Conflict", [{"field": "id", "message": str(exc)}]) from exc
    except DatabaseUnavailable as exc:
        request.app.logger.warning("database unavailable: %s", exc)
        if request.method in ("GET", "HEAD"):
            detail = "The chat database is unavailable. Try again shortly."
        elif exc.maybe_applied:
            # The connection broke after the server may have committed: saying nothing was stored
            # would have a client send a message twice, or give up on one that was kept.
            detail = (
                "The chat database is unavailable, and the connection broke while this change was"
                " being stored: it may have been applied. Read it back before sending it again."
            )
        else:
            detail = "The chat database is unavailable; nothing was stored. Try again shortly."
        raise ApiError(503, detail, headers={"Retry-After": "1"}) from exc


# -- input ------------------------------------------------------------------------------------


def _subject(request: web.Request) -> str:
    subject = request.headers.get(SUBJECT_HEADER, "").strip()
    if not subject:
        raise ApiError(
            401, "Not authenticated: no x-auth-subject", headers={"WWW-Authenticate": 'Bearer realm="chat"'}
        )
    # The gateway's own rule for a token's subject: bytes that are not UTF-8 (aiohttp hands them
    # over as lone surrogates) or control characters could be neither stored nor logged.
    if subject_problem(subject) is not None:
        raise ApiError(401, "Not authenticated: malformed x-auth-subject")
    return subject


def _session_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["session_id"])
    except ValueError:
        raise ApiError(404, "Session not found") from None  # not a session id, so no such session


def _limit(request: web.Request, bounds: tuple[int, int]) -> int:
    default, maximum = bounds
    raw = request.query.get("limit")
    if raw is None:
        return default
    # ASCII digits only: int() would also take " 5", "+5", "1_0" and other scripts' digits (U+0665).
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 10 else 0
    if not 1 <= value <= maximum:
        raise ApiError(
            422, "Validation Error",
            [{"field": "limit", "message": f"expected a whole number from 1 to {maximum}", "value": raw}],
        )  # fmt: skip
    return value


def _bad_value(*_: Any) -> None:
    raise ValueError("NaN and Infinity are not JSON")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = json.loads(raw, parse_constant=_bad_value, parse_float=_finite)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            422, "Validation Error", [{"field": "body", "message": f"invalid JSON: {exc}"}]
        ) from None
    except RecursionError:
        raise _body_error("nested too deeply") from None
    if not isinstance(data, dict):
        raise _body_error("expected a JSON object")
    problem = _unstorable(data)
    if problem is not None:
        raise _body_error(problem)
    return data


def _finite(text: str) -> float:
    # 1e400 reads as infinity, which no JSON column takes back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _body_error(message: str) -> ApiError:
    return ApiError(422, "Validation Error", [{"field": "body", "message": message}])


# Deeper than any chat body needs; a stored body is read back by recursive parsers.
MAX_DEPTH = 64
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _unstorable(data: Any) -> str | None:
    """What in a parsed body PostgreSQL or UTF-8 cannot hold: NUL, a lone surrogate (a JSON escape
    like \\ud800), nesting deeper than ``MAX_DEPTH``. Walked without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            texts: Any = (value,)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:  # containers count, as in the gateway's rule; a leaf does not
                return f"nested deeper than {MAX_DEPTH} levels"
            texts = value.keys() if isinstance(value, dict) else ()
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        else:
            continue
        for text in texts:
            if "\x00" in text:
                return "text must not contain NUL (\\u0000)"
            if _SURROGATE.search(text):
                return "text must not contain a lone surrogate (\\ud800-\\udfff)"
    return None


class _Errors:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, field: str, message: str) -> None:
        self.items.append({"field": field, "message": message})

    def raise_any(self) -> None:
        if self.items:
            raise ApiError(422, "Validation Error", self.items)


def _check_unknown(data: Mapping[str, Any], allowed: frozenset[str], errors: _Errors) -> None:
    for name in sorted(set(data) - allowed):
        errors.add(name, f"unknown field (expected: {', '.join(sorted(allowed))})")


def _optional_id(data: Mapping[str, Any], errors: _Errors) -> uuid.UUID:
    raw = data.get("id")
    if raw is None:
        return uuid.uuid4()
    try:
        if isinstance(raw, str):
            return uuid.UUID(raw)
    except ValueError:
        pass
    errors.add("id", "expected a UUID")
    return uuid.uuid4()


def _title(data: Mapping[str, Any], errors: _Errors) -> str | None:
    title = data.get("title")
    if title is not None and not isinstance(title, str):
        errors.add("title", "expected a string or null")
        return None
    if title is not None and len(title) > MAX_TITLE:
        errors.add("title", f"at most {MAX_TITLE} characters")
    return title


def _metadata(data: Mapping[str, Any], errors: _Errors) -> dict[str, Any]:
    metadata = data.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        errors.add("metadata", "expected an object")
        return {}
    return metadata


# -- output -----------------------------------------------------------------------------------


def _encode_cursor(value: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(request: web.Request) -> dict[str, Any] | None:
    raw = request.query.get("after")
    if raw is None or raw == "":
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if isinstance(data, dict):
            return data
    except (ValueError, binascii.Error):
        pass
    raise ApiError(
        422, "Validation Error", [{"field": "after", "message": "not a cursor from a previous page"}]
    )


def _page(items: list[dict[str, Any]], has_more: bool, cursor: str | None) -> web.Response:
    return web.json_response(
        {"data": items, "has_more": has_more, "next": cursor if has_more else None},
        dumps=_dumps,
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


# -- handlers ---------------------------------------------------------------------------------


async def create_session(request: web.Request) -> web.Response:
    user_id = _subject(request)
    data = await _body(request)
    errors = _Errors()
    _check_unknown(data, SESSION_FIELDS, errors)
    session = ChatSession(
        id=_optional_id(data, errors), user_id=user_id, title=_title(data, errors),
        metadata=_metadata(data, errors),
    )  # fmt: skip
    errors.raise_any()
    stored, created = await request.app[service_key].create_session(session)
    return _json(stored.to_json(), 201 if created else 200)


async def list_sessions(request: web.Request) -> web.Response:
    user_id = _subject(request)
    limit = _limit(request, SESSIONS_LIMIT)
    raw = _decode_cursor(request)
    after = None
    if raw is not None:
        try:
            created = datetime.fromisoformat(raw["t"])
            if created.tzinfo is None:
                raise ValueError("a cursor's time has an offset")
            # In UTC: Python takes offsets up to 24 h, PostgreSQL refuses those from 16 h.
            after = SessionCursor(created.astimezone(UTC), uuid.UUID(raw["id"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ApiError(
                422, "Validation Error", [{"field": "after", "message": "not a cursor from a previous page"}]
            ) from None
    sessions = await request.app[service_key].list_sessions(user_id, limit + 1, after=after)
    page, has_more = sessions[:limit], len(sessions) > limit
    cursor = None
    if has_more:
        last = page[-1]
        assert last.created_at is not None
        cursor = _encode_cursor({"t": last.created_at.isoformat(), "id": str(last.id)})
    return _page([s.to_json() for s in page], has_more, cursor)


async def get_session(request: web.Request) -> web.Response:
    user_id = _subject(request)
    session = await request.app[service_key].get_session(_session_id(request), user_id=user_id)
    if session is None:
        raise SessionNotFound
    return _json(session.to_json())


async def update_session(request: web.Request) -> web.Response:
    user_id = _subject(request)
    session_id = _session_id(request)
    data = await _body(request)
    errors = _Errors()
    _check_unknown(data, SESSION_PATCH_FIELDS, errors)
    title = _title(data, errors) if "title" in data else UNSET
    metadata = _metadata(data, errors) if "metadata" in data else UNSET
    if "metadata" in data and data["metadata"] is None:
        errors.add("metadata", "expected an object")
    errors.raise_any()
    session = await request.app[service_key].update_session(
        session_id, user_id=user_id, title=title, metadata=metadata
    )
    return _json(session.to_json())


async def delete_session(request: web.Request) -> web.Response:
    user_id = _subject(request)
    if not await request.app[service_key].delete_session(_session_id(request), user_id=user_id):
        raise SessionNotFound
    return web.Response(status=204)


async def create_message(request: web.Request) -> web.Response:
    user_id = _subject(request)
    session_id = _session_id(request)
    data = await _body(request)
    errors = _Errors()
    _check_unknown(data, MESSAGE_FIELDS, errors)
    role = data.get("role")
    if role not in ROLES:
        errors.add("role", f"expected one of: {', '.join(ROLES)}")
    content = data.get("content")
    if content is not None and not isinstance(content, str):
        errors.add("content", "expected a string or null")
    tool_calls = data.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
            errors.add("tool_calls", "expected a list of objects")
        elif role != "assistant":
            errors.add("tool_calls", "only an assistant message makes tool calls")
    tool_results = data.get("tool_results")
    tool_call_id = data.get("tool_call_id")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        errors.add("tool_call_id", "expected a string or null")
    if (tool_results is not None or tool_call_id is not None) and role != "tool":
        field = "tool_results" if tool_results is not None else "tool_call_id"
        errors.add(field, "only a tool message carries tool results")
    if content is None and tool_calls is None and tool_results is None:
        errors.add("content", "Field 'content' is required (or tool_calls / tool_results)")
    message = ChatMessage(
        id=_optional_id(data, errors), session_id=session_id, role=str(role), content=content,
        tool_calls=tool_calls, tool_results=tool_results, tool_call_id=tool_call_id,
        metadata=_metadata(data, errors),
    )  # fmt: skip
    errors.raise_any()
    stored, created = await request.app[service_key].add_message(message, user_id=user_id)
    return _json(stored.to_json(), 201 if created else 200)


async def list_messages(request: web.Request) -> web.Response:
    user_id = _subject(request)
    session_id = _session_id(request)
    limit = _limit(request, MESSAGES_LIMIT)
    raw = _decode_cursor(request)
    after = 0
    if raw is not None:
        seq = raw.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not math.isfinite(seq):
            raise ApiError(
                422, "Validation Error", [{"field": "after", "message": "not a cursor from a previous page"}]
            )
        after = seq
    messages = await request.app[service_key].get_messages(
        session_id, limit + 1, after=after, user_id=user_id
    )
    page, has_more = messages[:limit], len(messages) > limit
    cursor = _encode_cursor({"seq": page[-1].seq}) if has_more else None
    return _page([m.to_json() for m in page], has_more, cursor)


def setup_api_routes(app: web.Application) -> None:
    app.router.add_post(f"{PREFIX}/sessions", create_session)
    app.router.add_get(f"{PREFIX}/sessions", list_sessions)
    app.router.add_get(f"{PREFIX}/sessions/{{session_id}}", get_session)
    app.router.add_patch(f"{PREFIX}/sessions/{{session_id}}", update_session)
    app.router.add_delete(f"{PREFIX}/sessions/{{session_id}}", delete_session)
    app.router.add_post(f"{PREFIX}/sessions/{{session_id}}/messages", create_message)
    app.router.add_get(f"{PREFIX}/sessions/{{session_id}}/messages", list_messages)
