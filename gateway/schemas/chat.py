"""Bodies for the intelligence engine's chat API: sessions and the messages in them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from ._common import FullMatch, GatewaySchema, Metadata, one_of, patch_schema, text, uuid

__all__ = [
    "MAX_CONTENT",
    "ROLES",
    "FunctionCallSchema",
    "MessageCreateSchema",
    "SessionCreateSchema",
    "SessionUpdateSchema",
    "ToolCallSchema",
]

ROLES = ("system", "user", "assistant", "tool")
MAX_CONTENT = 32 * 1024  # characters; the route's 64KB body limit is the other bound
MAX_TOOL_CALLS = 32
_TOOL_CALL_ID = FullMatch(
    r"^[A-Za-z0-9_.:-]{1,128}$", error="Must be 1-128 of letters, digits, '_', '.', ':', '-'."
)
_FUNCTION_NAME = FullMatch(r"^[A-Za-z0-9_.-]{1,64}$", error="Must be 1-64 of letters, digits, '_', '.', '-'.")


class _SessionFields(GatewaySchema):
    title = text(200)
    metadata = Metadata()


class SessionCreateSchema(_SessionFields):
    """A new chat session; every field is optional, ``{}`` is a valid body. ``id`` is the client's
    idempotency key, as the intelligence engine accepts it."""

    id = uuid()


SessionUpdateSchema = patch_schema(_SessionFields, "SessionUpdateSchema")


class FunctionCallSchema(GatewaySchema):
    name = fields.String(required=True, validate=_FUNCTION_NAME)
    # A JSON text as the model produced it; not parsed here, since models do emit broken JSON and
    # a client replaying its history must be able to store what it got.
    arguments = text(MAX_CONTENT, required=True)


class ToolCallSchema(GatewaySchema):
    id = fields.String(required=True, validate=_TOOL_CALL_ID)
    type = one_of(("function",), required=True)
    function = fields.Nested(FunctionCallSchema, required=True)


class MessageCreateSchema(GatewaySchema):
    """A message to append. ``id`` is the client's idempotency key: retrying with the same id does
    not add a second message."""

    id = uuid()
    role = one_of(ROLES, required=True)
    content = text(
        MAX_CONTENT,
        allow_none=True,
        metadata={"description": "Required, except for an assistant message that has tool_calls."},
    )
    tool_calls = fields.List(fields.Nested(ToolCallSchema), validate=validate.Length(max=MAX_TOOL_CALLS))
    tool_call_id = fields.String(
        validate=_TOOL_CALL_ID,
        allow_none=True,
        metadata={"description": "The tool call a tool message answers; only on tool messages."},
    )
    # Any JSON: what the tool returned, stored and given back as sent.
    tool_results = fields.Raw(
        allow_none=True,
        metadata={"description": "A tool message's structured result; only on tool messages."},
    )
    metadata = Metadata()

    # Also runs when a field has an error: the client learns everything at once.
    @validates_schema(skip_on_field_errors=False, pass_original=True)
    def _role_rules(self, data: Mapping[str, Any], original: Any, **kwargs: Any) -> None:
        role = data.get("role")
        if role not in ROLES or not isinstance(original, Mapping):
            return
        errors: dict[str, Any] = {}
        tool_calls = original.get("tool_calls")
        if "tool_calls" in original and role != "assistant":
            errors["tool_calls"] = ["Only assistant messages may have tool_calls."]
        # As the intelligence engine has it: a tool message answers with content or tool_results,
        # and may name the call it answers; those two fields belong to tool messages only.
        if role != "tool":
            for name in ("tool_call_id", "tool_results"):
                if original.get(name) is not None:
                    errors[name] = [f"Only tool messages may have {name}."]
        content_optional = (role == "assistant" and isinstance(tool_calls, list) and tool_calls) or (
            role == "tool" and original.get("tool_results") is not None
        )
        if original.get("content") is None and not content_optional:
            errors["content"] = ["Missing data for required field."]
        elif (
            role in ("system", "user")
            and isinstance(data.get("content"), str)
            and not data["content"].strip()
        ):
            errors["content"] = ["Must not be blank."]
        duplicates = _duplicate_tool_call_ids(data.get("tool_calls") or [])
        if duplicates and "tool_calls" not in errors:
            errors["tool_calls"] = {i: {"id": ["Another tool call has the same id."]} for i in duplicates}
        if errors:
            raise ValidationError(errors)


def _duplicate_tool_call_ids(tool_calls: list[Mapping[str, Any]]) -> list[int]:
    seen: set[str] = set()
    duplicates = []
    for index, call in enumerate(tool_calls):
        call_id = call.get("id")
        if call_id in seen:
            duplicates.append(index)
        elif call_id is not None:
            seen.add(call_id)
    return duplicates
