"""Building blocks shared by the schemas: the base classes, ids, Kubernetes names and labels, maps.

Formats, decided once for the whole platform:

    ids        UUIDs in canonical 8-4-4-4-12 hex form (cluster_id, session ids, message ids, ...)
    names      Kubernetes DNS-1123 labels: 1-63 of [a-z0-9-], starting and ending alphanumeric
    labels     Kubernetes label syntax: ``[dns-1123-subdomain/]name`` -> value, both as kubectl checks

Every pattern is matched against the whole string (``fullmatch``): ``$`` alone would let a
trailing newline through.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

__all__ = [
    "MAX_LABELS",
    "MAX_METADATA_KEYS",
    "FullMatch",
    "GatewaySchema",
    "HttpsUrl",
    "LabelMap",
    "Metadata",
    "PatchSchema",
    "dns_label",
    "label_key_problem",
    "label_value_problem",
    "one_of",
    "patch_schema",
    "text",
    "uuid",
]

MAX_LABELS = 64
MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_LENGTH = 128

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL_RE = re.compile(rf"^{_DNS_LABEL}$")
DNS_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class FullMatch(validate.Regexp):
    """``Regexp`` that must match the whole string; the pattern still documents the format."""

    def __call__(self, value: str) -> str:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class GatewaySchema(Schema):
    """Base of every body schema. Unknown fields are rejected (override ``Meta.unknown`` per schema):
    a typo such as ``enviroment`` is answered with a 422 naming it instead of being silently
    dropped by the backend, and no field reaches a backend without having been checked."""

    class Meta:
        unknown = RAISE


class PatchSchema(GatewaySchema):
    """Base of the partial updates: every field optional, but an empty update is a mistake."""

    # Runs only when no field had an error: then an empty result means an empty body.
    @validates_schema
    def _at_least_one(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError(
                "At least one of these fields must be given: " + ", ".join(self.fields) + "."
            )


def patch_schema(full: type[Schema], name: str) -> type[PatchSchema]:
    """The partial-update twin of ``full`` (JSON Merge Patch, RFC 7396): the same fields, all
    optional; ``null`` removes a field that is optional in ``full`` (and a label, for label maps).
    Nested objects are replaced whole, so their own required fields stay required."""
    declared: dict[str, fields.Field] = {}
    for field_name, field in full._declared_fields.items():
        optional = copy.copy(field)  # marshmallow's own deepcopy of a field is shallow too
        optional.allow_none = not field.required
        optional.required = False
        if isinstance(optional, LabelMap) and optional.value_field is not None:
            # A copy: the value field is shared with ``full``, where null stays invalid.
            optional.value_field = copy.copy(optional.value_field)
            optional.value_field.allow_none = True
        declared[field_name] = optional
    return PatchSchema.from_dict(declared, name=name)  # type: ignore[return-value]


# -- scalar fields ----------------------------------------------------------------------------------


def uuid(**kwargs: Any) -> fields.String:
    """A UUID string in canonical form; other spellings (braces, urn:, no dashes) are rejected
    because the body is forwarded as sent and backends need not accept them."""
    return fields.String(
        validate=FullMatch(UUID_RE, error="Must be a UUID in canonical 8-4-4-4-12 hexadecimal form."),
        metadata={"format": "uuid", "example": "3f2c9a1e-8b7d-4c6e-9f10-2a3b4c5d6e7f"},
        **kwargs,
    )


def dns_label(**kwargs: Any) -> fields.String:
    return fields.String(
        validate=[
            validate.Length(min=1, max=63),
            FullMatch(
                DNS_LABEL_RE,
                error="Must be a DNS-1123 label: lowercase letters, digits and '-', "
                "starting and ending with a letter or digit.",
            ),
        ],
        metadata={"example": "prod-eu-1"},
        **kwargs,
    )


def text(max_length: int, *, min_length: int = 0, **kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Length(min=min_length or None, max=max_length), **kwargs)


def one_of(choices: tuple[str, ...], **kwargs: Any) -> fields.String:
    return fields.String(validate=validate.OneOf(choices), **kwargs)


def _https_only(value: str) -> None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValidationError("Not a valid URL.") from exc
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and in the registry's database.
        raise ValidationError("Must not contain credentials (user:password@); use 'credentials'.")
    if parts.fragment or "#" in value:
        raise ValidationError("Must not contain a fragment.")


class HttpsUrl(fields.Url):
    """An ``https://`` URL with a host (IPs and TLD-less in-cluster names are fine), no userinfo."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            schemes={"https"},
            require_tld=False,
            validate=[validate.Length(max=2048), _https_only],
            metadata={"example": "https://api.prod-eu-1.example.com:6443"},
            **kwargs,
        )


# -- maps ---------------------------------------------------------------------------------------


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes label key, or None (``[prefix/]name``, as kubectl checks)."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return "Invalid label key: the prefix before '/' must not be empty."
        if len(prefix) > 253 or not DNS_SUBDOMAIN_RE.fullmatch(prefix):
            return (
                "Invalid label key: the prefix must be a DNS-1123 subdomain of at most 253 "
                "characters (lowercase letters, digits, '-' and '.')."
            )
    if not name:
        return "Invalid label key: the name must not be empty."
    if len(name) > 63:
        return "Invalid label key: the name must be at most 63 characters."
    if not LABEL_NAME_RE.fullmatch(name):
        return (
            "Invalid label key: the name may contain letters, digits, '-', '_' and '.', "
            "and must start and end with a letter or digit."
        )
    return None


def label_value_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "Invalid label value: must be a string."
    if len(value) > 63:
        return "Invalid label value: must be at most 63 characters."
    if not LABEL_VALUE_RE.fullmatch(value):
        return (
            "Invalid label value: may be empty, or contain letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit."
        )
    return None


class _CheckedMap(fields.Dict):
    """A JSON object whose entries are checked one by one; errors are keyed by the entry's key
    (``labels.env``), not by marshmallow's ``{"env": {"key": ..., "value": ...}}``."""

    max_entries: int = 64

    def check_entry(self, key: str, value: Any) -> str | None:
        raise NotImplementedError

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        if len(value) > self.max_entries:
            raise ValidationError(f"Must have at most {self.max_entries} entries.")
        problems = {}
        for key, item in value.items():
            problem = self.check_entry(key, item)
            if problem:
                problems[key] = [problem]
        if problems:
            raise ValidationError(problems)
        return dict(value)


class LabelMap(_CheckedMap):
    """Kubernetes labels: ``{"app.kubernetes.io/name": "api", "env": "prod"}``."""

    max_entries = MAX_LABELS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            keys=fields.String(validate=validate.Length(min=1, max=317)),
            values=fields.String(validate=[validate.Length(max=63), FullMatch(LABEL_VALUE_RE)]),
            metadata={
                "maxProperties": MAX_LABELS,
                "example": {"app.kubernetes.io/part-of": "payments", "env": "prod"},
            },
            **kwargs,
        )

    def check_entry(self, key: str, value: Any) -> str | None:
        # In a merge patch (see patch_schema), ``"env": null`` removes the label.
        if value is None and self.value_field is not None and self.value_field.allow_none:
            return label_key_problem(key)
        return label_key_problem(key) or label_value_problem(value)


class Metadata(_CheckedMap):
    """Free-form client data: any JSON values under at most 64 short keys."""

    max_entries = MAX_METADATA_KEYS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            keys=fields.String(validate=validate.Length(min=1, max=MAX_METADATA_KEY_LENGTH)),
            values=fields.Raw(allow_none=True),
            metadata={"maxProperties": MAX_METADATA_KEYS, "example": {"source": "dashboard"}},
            **kwargs,
        )

    def check_entry(self, key: str, value: Any) -> str | None:
        if not key or len(key) > MAX_METADATA_KEY_LENGTH:
            return f"Keys must be 1 to {MAX_METADATA_KEY_LENGTH} characters long."
        return None
