"""The body schemas the gateway checks, one module per backend, attached to (method, route pattern).

A pattern's ``{name}`` segment matches exactly one non-empty path segment. A request whose method
and path match no pattern is not validated here (only its size and content type are checked).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from marshmallow import Schema

from .chat import MessageCreateSchema, SessionCreateSchema, SessionUpdateSchema
from .clusters import ClusterCreateSchema, ClusterUpdateSchema
from .reports import ReportCreateSchema

__all__ = ["SCHEMAS", "SUMMARIES"]

SCHEMAS: Mapping[tuple[str, str], Schema] = MappingProxyType(
    {
        ("POST", "/api/v1/clusters"): ClusterCreateSchema(),
        ("PUT", "/api/v1/clusters/{cluster_id}"): ClusterCreateSchema(),
        ("PATCH", "/api/v1/clusters/{cluster_id}"): ClusterUpdateSchema(),
        ("POST", "/api/v1/reports"): ReportCreateSchema(),
        ("POST", "/api/v1/chat/sessions"): SessionCreateSchema(),
        ("PATCH", "/api/v1/chat/sessions/{session_id}"): SessionUpdateSchema(),
        ("POST", "/api/v1/chat/sessions/{session_id}/messages"): MessageCreateSchema(),
    }
)

# One line per operation, for the OpenAPI document.
SUMMARIES: Mapping[tuple[str, str], str] = MappingProxyType(
    {
        ("POST", "/api/v1/clusters"): "Register a cluster",
        ("PUT", "/api/v1/clusters/{cluster_id}"): "Replace a cluster's registration",
        ("PATCH", "/api/v1/clusters/{cluster_id}"): "Update a cluster (JSON Merge Patch)",
        ("POST", "/api/v1/reports"): "Generate a report",
        ("POST", "/api/v1/chat/sessions"): "Start a chat session",
        ("PATCH", "/api/v1/chat/sessions/{session_id}"): "Rename or re-tag a chat session",
        ("POST", "/api/v1/chat/sessions/{session_id}/messages"): "Add a message to a chat session",
    }
)
