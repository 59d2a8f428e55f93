"""Chat sessions and messages as values, and the errors the persistence layer raises.

PersistenceError
├── SessionNotFound       no such session, or it belongs to someone else
├── IdConflict            a client-chosen id is taken by a different body (HTTP 409)
├── DatabaseUnavailable   PostgreSQL cannot be reached or timed out (HTTP 503)
└── MigrationError        the schema is behind the code, or a migration was edited
    └── MigrationsPending
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "ROLES",
    "ChatMessage",
    "ChatSession",
    "DatabaseUnavailable",
    "IdConflict",
    "MigrationError",
    "MigrationsPending",
    "PersistenceError",
    "SessionCursor",
    "SessionNotFound",
]

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatSession:
    user_id: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: datetime | None = None  # set by the database
    updated_at: datetime | None = None
    last_message_at: datetime | None = None
    message_count: int = 0
    version: int = 0  # bumped by every write; orders cache entries

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "user_id": self.user_id,
            "title": self.title,
            "metadata": self.metadata,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_message_at": _iso(self.last_message_at),
            "message_count": self.message_count,
        }


@dataclass(frozen=True)
class ChatMessage:
    session_id: uuid.UUID
    role: str
    content: str | None = None
    tool_calls: list[Any] | None = None
    tool_results: Any = None
    tool_call_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    seq: int | None = None  # set by the database: 1, 2, 3, ... per session, without gaps
    created_at: datetime | None = None

    def same_body(self, other: ChatMessage) -> bool:
        """True when ``other`` is a retry of this write (what the client chose, not what we set)."""
        return (
            self.session_id == other.session_id
            and self.role == other.role
            and self.content == other.content
            and self.tool_calls == other.tool_calls
            and self.tool_results == other.tool_results
            and self.tool_call_id == other.tool_call_id
            and self.metadata == other.metadata
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "session_id": str(self.session_id),
            "seq": self.seq,
            "role": self.role,
            "content": self.content,
            "tool_calls": self.tool_calls,
            "tool_results": self.tool_results,
            "tool_call_id": self.tool_call_id,
            "metadata": self.metadata,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True)
class SessionCursor:
    """Where a page of ``list_sessions`` ended: the last session's (created_at, id)."""

    created_at: datetime
    id: uuid.UUID


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class PersistenceError(Exception):
    """Base of the errors raised by ``intelligence.persistence``."""


class SessionNotFound(PersistenceError):
    """The session does not exist or is not the caller's (the two are indistinguishable on purpose)."""


class IdConflict(PersistenceError):
    """A client-supplied id already names a different session or message."""


class DatabaseUnavailable(PersistenceError):
    """PostgreSQL is down, unreachable or too slow.

    The write was rolled back, except when the connection was lost after the server may have
    committed it (``maybe_applied``): then it may have been stored, and retrying with the same
    id is safe.
    """

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class MigrationError(PersistenceError):
    """The database schema does not match the migrations shipped with the code."""


class MigrationsPending(MigrationError):
    """Migrations exist that the database has not applied; run ``python -m intelligence migrate``."""
