"""The OpenAPI 3 document served at ``GET /openapi.json``: the gateway's own endpoints, and every
body the gateway validates, per (method, path), with the errors the gateway itself answers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from . import __version__
from .schemas import SCHEMAS, SUMMARIES

__all__ = ["ERROR_RESPONSES", "OPENAPI_VERSION", "ErrorSchema", "FieldErrorSchema", "build_openapi"]

OPENAPI_VERSION = "3.0.3"


class FieldErrorSchema(Schema):
    field = fields.String(required=True, metadata={"description": "Dotted path: labels.env, tool_calls.2.id"})
    message = fields.String(required=True)
    value = fields.Raw(
        metadata={"description": "The offending value; only short scalars, never for secret-looking fields."}
    )


class ErrorSchema(Schema):
    """The body of every error the gateway returns itself (upstream errors pass through untouched)."""

    detail = fields.String(required=True, metadata={"example": "Validation Error"})
    errors = fields.List(
        fields.Nested(FieldErrorSchema), metadata={"description": "Absent when not per field."}
    )


def _error(
    description: str, headers: Mapping[str, str] | None = None, *, example: str | None = None
) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": "Error"}
    if example is not None:
        media["example"] = {"detail": example}
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": media},
        "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
    }
    for name, text in (headers or {}).items():
        response["headers"][name] = {"description": text, "schema": {"type": "string"}}
    return response


# A backend may answer 502/503/504 itself; that answer is relayed as it was sent, not this one.
_BACKEND_OWN = " A backend's own answer with this status passes through untouched."


# Name -> (status, response). Referenced by every proxied operation that has a body schema: the
# answers the gateway gives itself, in the contract's error format.
ERROR_RESPONSES: Mapping[str, tuple[str, dict[str, Any]]] = {
    "Unauthorized": (
        "401",
        _error(
            "Missing or invalid bearer token.",
            {"WWW-Authenticate": 'Bearer realm="gateway" without a token, else Bearer error=...'},
        ),
    ),
    "Forbidden": ("403", _error("The token lacks a scope the route requires.")),
    "PayloadTooLarge": (
        "413",
        _error("Body over the route's max_body (chat 64KB, reports 16KB, clusters 128KB, else 1MB)."),
    ),
    "UnsupportedMediaType": (
        "415",
        _error(
            "Content-Type not accepted by the route (default: JSON), or a Content-Encoding other than"
            " identity on a body with a schema (send it uncompressed).",
            {"Accept-Encoding": "identity (with a Content-Encoding refused)"},
        ),
    ),
    "ValidationError": (
        "422",
        _error("The body is not JSON, not an object, or fails the schema; every problem listed."),
    ),
    "TooManyRequests": (
        "429",
        _error(
            "Rate limited.",
            {
                "Retry-After": "Seconds until a request may succeed.",
                "RateLimit-Policy": 'The limit (draft-ietf-httpapi-ratelimit-headers): "route";q=100;w=60.',
                "RateLimit": 'Requests left and seconds until a request may succeed: "route";r=0;t=20.',
                "RateLimit-Limit": "Requests allowed per window (the draft's earlier spelling).",
                "RateLimit-Remaining": "Requests left (0 here).",
                "RateLimit-Reset": "Seconds until the whole quota is back.",
                "X-RateLimit-Limit": "Requests allowed per window.",
                "X-RateLimit-Remaining": "Requests left (0 here).",
                "X-RateLimit-Reset": "Seconds until the whole quota is back.",
            },
        ),
    ),
    "BadGateway": (
        "502",
        _error(
            "The backend is unreachable (connection refused, name not resolved), closed the connection"
            " before answering, or sent an answer that is not HTTP." + _BACKEND_OWN,
            example="Upstream 'cluster-registry' is unreachable",
        ),
    ),
    "ServiceUnavailable": (
        "503",
        _error(
            "No healthy target for the route's service (every one was ejected after failing to"
            " connect), the gateway has no file descriptor left to open a connection to it, or the"
            " bearer token cannot be verified now: the issuer's signing keys (AUTH_JWKS_URL) could"
            " not be loaded since the gateway started. The token may be good; retry after"
            " Retry-After." + _BACKEND_OWN,
            {
                "Retry-After": "Seconds until the issuer's keys may be fetched again, or 1 when the"
                " gateway is out of file descriptors."
            },
            example="The token cannot be verified now: the issuer's signing keys are unavailable",
        ),
    ),
    "GatewayTimeout": (
        "504",
        _error(
            "The backend did not accept the connection or send its response head within the"
            " service's timeouts (connect, read)." + _BACKEND_OWN,
            example="Upstream 'cluster-registry' timed out",
        ),
    ),
}


def _status(
    status: str, description: str, schema: Any = None, media: str = "application/json"
) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {media: {"schema": schema}}
    return {status: response}


_HEALTH = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
_COMPONENT = {
    "type": "object",
    "required": ["status", "latency_ms"],
    "properties": {
        # "disabled": Redis without REDIS_URL (in-process rate limits; not a failure).
        "status": {"type": "string", "enum": ["healthy", "unhealthy", "disabled"]},
        "latency_ms": {"type": "number"},
        "error": {"type": "string"},
        # Redis refusing the user in REDIS_URL: what the operator has to change.
        "fix": {"type": "string"},
    },
}
_DETAILED = {
    "type": "object",
    "required": ["status", "components", "uptime_seconds"],
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "degraded"]},
        "components": {"type": "object", "additionalProperties": _COMPONENT},
        "uptime_seconds": {"type": "number"},
    },
}

_PARAM_RE = re.compile(r"\{([^}]+)\}")


def build_openapi() -> dict[str, Any]:
    """The whole document, as a JSON-ready dict; cheap enough to build once at start."""
    spec = APISpec(
        title="Platform API gateway",
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin()],
        info={
            "description": "The gateway's own endpoints, and the request bodies it validates before "
            "proxying. A validated body is forwarded byte for byte; backends' responses pass through."
        },
    )
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.header("RequestId", {"description": "Correlation id.", "schema": {"type": "string"}})
    spec.components.response("Error", _error("An error the gateway returned itself."))
    for name, (_, response) in ERROR_RESPONSES.items():
        spec.components.response(name, response)
    _gateway_paths(spec)
    _validated_paths(spec)
    return spec.to_dict()


def _gateway_paths(spec: APISpec) -> None:
    def get(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
        # Probes and scrapers call these without a token.
        return {"get": {"summary": summary, "tags": ["gateway"], "security": [], "responses": responses}}

    spec.path("/health", operations=get("Liveness", _status("200", "Alive.", _HEALTH)))
    spec.path(
        "/health/ready",
        operations=get(
            "Readiness",
            {**_status("200", "Ready.", _HEALTH), **_status("503", "Starting or draining.", _HEALTH)},
        ),
    )
    spec.path(
        "/health/detailed",
        operations=get(
            "Every backend, Redis and PostgreSQL, with latencies", _status("200", "Status.", _DETAILED)
        ),
    )
    spec.path(
        "/metrics",
        operations=get(
            "Prometheus metrics", _status("200", "Prometheus text format.", {"type": "string"}, "text/plain")
        ),
    )
    spec.path(
        "/openapi.json",
        operations=get("This document", _status("200", "OpenAPI 3 document.", {"type": "object"})),
    )


def _validated_paths(spec: APISpec) -> None:
    by_path: dict[str, dict[str, Any]] = {}
    for (method, path), schema in SCHEMAS.items():
        responses: dict[str, Any] = {
            "default": {"description": "The backend's response, passed through untouched."},
        }
        for name, (status, _) in ERROR_RESPONSES.items():
            responses[status] = name
        by_path.setdefault(path, {})[method.lower()] = {
            "summary": SUMMARIES.get((method, path), ""),
            "tags": [path.split("/")[3]],
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": type(schema)}},
            },
            "responses": responses,
        }
    for path, operations in by_path.items():
        parameters = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            }
            for name in _PARAM_RE.findall(path)
        ]
        spec.path(path, operations=operations, parameters=parameters or None)
