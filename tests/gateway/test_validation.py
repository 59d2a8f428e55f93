"""The validation core: schema lookup, strict JSON parsing, field errors, media types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import EXCLUDE, Schema, fields, validates_schema

from gateway.schemas import SCHEMAS
from gateway.schemas._common import GatewaySchema
from gateway.validation import (
    MAX_DEPTH,
    MAX_ERRORS,
    BodyError,
    SchemaTable,
    content_codings,
    find_schema,
    is_json_media_type,
    media_type_allowed,
    parse_json_object,
    validate_body,
)
from tests.helpers import fuzz_examples

CLUSTER_ID = "3f2c9a1e-8b7d-4c6e-9f10-2a3b4c5d6e7f"
OTHER_ID = "0b6f1a4e-2c3d-4e5f-8a9b-0c1d2e3f4a5b"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"

CLUSTERS = ("POST", "/api/v1/clusters")
CLUSTER_PUT = ("PUT", "/api/v1/clusters/{cluster_id}")
CLUSTER_PATCH = ("PATCH", "/api/v1/clusters/{cluster_id}")
REPORTS = ("POST", "/api/v1/reports")
SESSIONS = ("POST", "/api/v1/chat/sessions")
SESSION_PATCH = ("PATCH", "/api/v1/chat/sessions/{session_id}")
MESSAGES = ("POST", "/api/v1/chat/sessions/{session_id}/messages")

CLUSTER: dict[str, Any] = {
    "name": "prod-eu-1",
    "api_server_url": "https://api.prod-eu-1.example.com:6443",
    "provider": "eks",
    "environment": "production",
}
REPORT: dict[str, Any] = {
    "report_type": "cost",
    "cluster_ids": [CLUSTER_ID],
    "time_range": {"start": "2025-01-01T00:00:00Z", "end": "2025-02-01T00:00:00+01:00"},
}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_pods", "arguments": "{}"}}


def check(key: tuple[str, str], body: Any) -> list[dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return validate_body(raw, SCHEMAS[key])


def by_field(errors: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {error["field"]: error for error in errors}


# -- the seed's example --------------------------------------------------------------------------


def test_empty_object_to_cluster_create_names_every_missing_required_field() -> None:
    errors = check(CLUSTERS, {})
    assert errors == [
        {"field": "name", "message": "Field 'name' is required"},
        {"field": "api_server_url", "message": "Field 'api_server_url' is required"},
        {"field": "provider", "message": "Field 'provider' is required"},
        {"field": "environment", "message": "Field 'environment' is required"},
    ]


# -- valid bodies, per schema --------------------------------------------------------------------

VALID = [
    (CLUSTERS, CLUSTER),
    (
        CLUSTERS,
        {
            **CLUSTER,
            "cluster_id": CLUSTER_ID.upper(),
            "display_name": "Production (EU) — 生产",
            "description": "",
            "region": "eu-west-1",
            "kubernetes_version": "v1.30.2-eks-1234",
            "labels": {"app.kubernetes.io/part-of": "payments", "env": "prod", "empty": "", "a": "b_c.d-e"},
            "credentials": {"type": "token", "token": "eyJhbGciOi"},
        },
    ),
    (CLUSTERS, {**CLUSTER, "api_server_url": "https://10.0.0.1:6443"}),
    (CLUSTERS, {**CLUSTER, "api_server_url": "https://kubernetes.default.svc/"}),
    (
        CLUSTERS,
        {
            **CLUSTER,
            "credentials": {
                "type": "client_certificate",
                "client_certificate": PEM_CERT,
                "client_key": PEM_KEY,
                "ca_certificate": PEM_CERT,
            },
        },
    ),
    (CLUSTERS, {**CLUSTER, "name": "a" * 63, "labels": {f"{'d' * 253}/{'n' * 63}": "v" * 63}}),
    (CLUSTER_PUT, CLUSTER),
    (CLUSTER_PATCH, {"environment": "staging"}),
    (CLUSTER_PATCH, {"description": None, "labels": {"env": None, "tier": "gold"}}),
    (REPORTS, REPORT),
    (REPORTS, {**REPORT, "cluster_ids": [CLUSTER_ID, OTHER_ID], "format": "pdf", "title": "Q1 costs"}),
    (SESSIONS, {}),
    (SESSIONS, {"title": "Why is payments-api crashlooping? 🔥", "metadata": {"nested": {"a": [1, None]}}}),
    (SESSION_PATCH, {"title": "renamed"}),
    (SESSION_PATCH, {"title": None}),
    (MESSAGES, {"role": "user", "content": "Pourquoi le pod redémarre-t-il ? 为什么"}),
    (MESSAGES, {"role": "system", "content": "You are helpful.", "id": CLUSTER_ID}),
    (MESSAGES, {"role": "assistant", "tool_calls": [TOOL_CALL]}),
    (
        MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL, {**TOOL_CALL, "id": "call_2"}]},
    ),
    (MESSAGES, {"role": "tool", "tool_call_id": "call_1", "content": ""}),
    # As the intelligence engine accepts them: structured results, with or without the call id.
    (MESSAGES, {"role": "tool", "tool_call_id": "call_1", "tool_results": {"pods": [{"name": "a"}]}}),
    (MESSAGES, {"role": "tool", "content": "3 pods", "tool_results": [1, 2, 3]}),
    (MESSAGES, {"role": "user", "content": "x" * 32768, "metadata": {"client": "cli"}}),
    # A surrogate pair written as escapes is one valid character.
    (MESSAGES, b'{"role": "user", "content": "\\ud83d\\ude80 launch"}'),
    # Numbers at the edges of what is accepted (metadata is free-form).
    (SESSIONS, b'{"metadata": {"big": 9223372036854775807, "small": -9223372036854775808, "f": 1e308}}'),
    (SESSIONS, b" \r\n\t{}\n "),
]


@pytest.mark.parametrize(("key", "body"), VALID)
def test_valid_body_has_no_errors(key: tuple[str, str], body: Any) -> None:
    assert check(key, body) == []


# -- invalid bodies, per schema: (route, body, {field: fragment of its message}) -------------------

INVALID = [
    (CLUSTERS, {**CLUSTER, "name": "Prod_EU"}, {"name": "DNS-1123 label"}),
    (CLUSTERS, {**CLUSTER, "name": "-prod"}, {"name": "DNS-1123 label"}),
    (CLUSTERS, {**CLUSTER, "name": "a" * 64}, {"name": "Length must be between 1 and 63"}),
    (CLUSTERS, {**CLUSTER, "name": "prod\n"}, {"name": "DNS-1123 label"}),
    (CLUSTERS, {**CLUSTER, "name": 42}, {"name": "Not a valid string"}),
    (CLUSTERS, {**CLUSTER, "name": None}, {"name": "may not be null"}),
    (CLUSTERS, {**CLUSTER, "cluster_id": "not-a-uuid"}, {"cluster_id": "UUID"}),
    (CLUSTERS, {**CLUSTER, "cluster_id": "{" + CLUSTER_ID + "}"}, {"cluster_id": "canonical"}),
    (CLUSTERS, {**CLUSTER, "cluster_id": CLUSTER_ID.replace("-", "")}, {"cluster_id": "canonical"}),
    (
        CLUSTERS,
        {**CLUSTER, "api_server_url": "http://api.example.com"},
        {"api_server_url": "Not a valid URL"},
    ),
    (CLUSTERS, {**CLUSTER, "api_server_url": "api.example.com"}, {"api_server_url": "Not a valid URL"}),
    (
        CLUSTERS,
        {**CLUSTER, "api_server_url": "https://u:p@api.example.com"},
        {"api_server_url": "credentials"},
    ),
    (CLUSTERS, {**CLUSTER, "api_server_url": "https://api.example.com/#x"}, {"api_server_url": "fragment"}),
    (CLUSTERS, {**CLUSTER, "provider": "EKS"}, {"provider": "Must be one of: eks, gke, aks"}),
    (CLUSTERS, {**CLUSTER, "environment": "prod"}, {"environment": "Must be one of: production"}),
    (CLUSTERS, {**CLUSTER, "region": "EU West"}, {"region": "lowercase"}),
    (CLUSTERS, {**CLUSTER, "kubernetes_version": "latest"}, {"kubernetes_version": "v1.30.2"}),
    (CLUSTERS, {**CLUSTER, "labels": ["env=prod"]}, {"labels": "Not a valid mapping"}),
    (CLUSTERS, {**CLUSTER, "labels": {"env": "bad value!"}}, {"labels.env": "Invalid label value"}),
    (CLUSTERS, {**CLUSTER, "labels": {"env": "v" * 64}}, {"labels.env": "at most 63"}),
    (CLUSTERS, {**CLUSTER, "labels": {"env": 3}}, {"labels.env": "must be a string"}),
    (CLUSTERS, {**CLUSTER, "labels": {"env": None}}, {"labels.env": "must be a string"}),
    (CLUSTER_PUT, {**CLUSTER, "description": None}, {"description": "may not be null"}),
    (CLUSTERS, {**CLUSTER, "labels": {"env": "prod-"}}, {"labels.env": "starting and ending"}),
    (CLUSTERS, {**CLUSTER, "labels": {"Bad Key": "x"}}, {"labels.Bad Key": "Invalid label key"}),
    (CLUSTERS, {**CLUSTER, "labels": {"n" * 70: "x"}}, {"labels." + "n" * 61 + "...": "at most 63"}),
    (CLUSTERS, {**CLUSTER, "labels": {"/env": "x"}}, {"labels./env": "prefix before '/'"}),
    (
        CLUSTERS,
        {**CLUSTER, "labels": {"Example.COM/env": "x"}},
        {"labels.Example.COM/env": "DNS-1123 subdomain"},
    ),
    (
        CLUSTERS,
        {**CLUSTER, "labels": {"example.com/": "x"}},
        {"labels.example.com/": "name must not be empty"},
    ),
    (CLUSTERS, {**CLUSTER, "labels": {"ünï": "x"}}, {"labels.ünï": "Invalid label key"}),
    (CLUSTERS, {**CLUSTER, "labels": {f"k{i}": "v" for i in range(65)}}, {"labels": "at most 64 entries"}),
    (CLUSTERS, {**CLUSTER, "credentials": {"type": "token"}}, {"credentials.token": "is required"}),
    (
        CLUSTERS,
        {**CLUSTER, "credentials": {"type": "client_certificate", "token": "t"}},
        {
            "credentials.client_certificate": "is required",
            "credentials.client_key": "is required",
            "credentials.token": "Not allowed when type is 'client_certificate'",
        },
    ),
    (CLUSTERS, {**CLUSTER, "credentials": {"type": "x509"}}, {"credentials.type": "Must be one of"}),
    (
        CLUSTERS,
        {**CLUSTER, "credentials": {"type": "token", "token": "t", "ca_certificate": "abc"}},
        {"credentials.ca_certificate": "PEM"},
    ),
    (CLUSTERS, {**CLUSTER, "enviroment": "staging"}, {"enviroment": "Unknown field 'enviroment'"}),
    (
        CLUSTER_PUT,
        {"name": "prod"},
        {"api_server_url": "is required", "provider": "is required", "environment": "is required"},
    ),
    (CLUSTER_PATCH, {}, {"body": "At least one of these fields must be given: name, cluster_id"}),
    (CLUSTER_PATCH, {"name": None}, {"name": "may not be null"}),
    (CLUSTER_PATCH, {"labels": {"env": "bad value!"}}, {"labels.env": "Invalid label value"}),
    (CLUSTER_PATCH, {"credentials": {"token": "t"}}, {"credentials.type": "is required"}),
    (CLUSTER_PATCH, {"colour": "blue"}, {"colour": "Unknown field"}),
    (REPORTS, {**REPORT, "report_type": "weekly"}, {"report_type": "Must be one of: cluster_health"}),
    (REPORTS, {**REPORT, "cluster_ids": []}, {"cluster_ids": "Length must be between 1 and 100"}),
    (REPORTS, {**REPORT, "cluster_ids": [CLUSTER_ID] * 2}, {"cluster_ids": "more than once"}),
    (REPORTS, {**REPORT, "cluster_ids": [CLUSTER_ID, "prod"]}, {"cluster_ids.1": "UUID"}),
    (REPORTS, {**REPORT, "cluster_ids": CLUSTER_ID}, {"cluster_ids": "Not a valid list"}),
    (
        REPORTS,
        {
            **REPORT,
            "cluster_ids": [OTHER_ID] * 0 + [f"{i:08x}-0000-4000-8000-000000000000" for i in range(101)],
        },
        {"cluster_ids": "between 1 and 100"},
    ),
    (
        REPORTS,
        {**REPORT, "time_range": {"start": "2025-02-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}},
        {"time_range.end": "later than 'start'"},
    ),
    (
        REPORTS,
        {**REPORT, "time_range": {"start": "2025-01-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}},
        {"time_range.end": "later than 'start'"},
    ),
    (
        REPORTS,
        {**REPORT, "time_range": {"start": "2024-01-01T00:00:00Z", "end": "2025-06-01T00:00:00Z"}},
        {"time_range.end": "366 days"},
    ),
    (
        REPORTS,
        {**REPORT, "time_range": {"start": "2025-01-01T00:00:00", "end": "2025-01-02T00:00:00Z"}},
        {"time_range.start": "aware datetime"},
    ),
    (
        REPORTS,
        {**REPORT, "time_range": {"start": "yesterday", "end": "2025-01-02T00:00:00Z"}},
        {"time_range.start": "Not a valid"},
    ),
    (
        REPORTS,
        {**REPORT, "time_range": {"end": "2025-01-02T00:00:00Z"}},
        {"time_range.start": "Field 'time_range.start' is required"},
    ),
    (REPORTS, {**REPORT, "time_range": "last week"}, {"time_range": "Invalid input type"}),
    (REPORTS, {**REPORT, "format": "xlsx"}, {"format": "Must be one of: json, csv"}),
    (SESSIONS, {"title": "t" * 201}, {"title": "Longer than maximum length 200"}),
    (SESSIONS, {"metadata": "x"}, {"metadata": "Not a valid mapping"}),
    (SESSIONS, {"metadata": {f"k{i}": i for i in range(65)}}, {"metadata": "at most 64 entries"}),
    (SESSIONS, {"metadata": {"": 1}}, {"metadata.": "1 to 128 characters"}),
    (SESSIONS, {"user_id": "someone-else"}, {"user_id": "Unknown field"}),
    (SESSION_PATCH, {}, {"body": "At least one of these fields must be given: title, metadata."}),
    (MESSAGES, {"role": "robot", "content": "hi"}, {"role": "Must be one of: system, user, assistant, tool"}),
    (MESSAGES, {"content": "hi"}, {"role": "is required"}),
    (MESSAGES, {"role": "user"}, {"content": "Field 'content' is required"}),
    (MESSAGES, {"role": "user", "content": None}, {"content": "Field 'content' is required"}),
    (MESSAGES, {"role": "user", "content": "   "}, {"content": "Must not be blank"}),
    (MESSAGES, {"role": "user", "content": "x" * 32769}, {"content": "Longer than maximum length 32768"}),
    (MESSAGES, {"role": "user", "content": ["parts"]}, {"content": "Not a valid string"}),
    (MESSAGES, {"role": "user", "content": "hi", "id": "42"}, {"id": "UUID"}),
    (MESSAGES, {"role": "tool", "tool_call_id": "call_1"}, {"content": "Field 'content' is required"}),
    (
        MESSAGES,
        {"role": "user", "content": "hi", "tool_results": {"pods": 3}},
        {"tool_results": "Only tool messages"},
    ),
    (
        MESSAGES,
        {"role": "user", "content": "hi", "tool_call_id": "call_1"},
        {"tool_call_id": "Only tool messages"},
    ),
    (
        MESSAGES,
        {"role": "user", "content": "hi", "tool_calls": [TOOL_CALL]},
        {"tool_calls": "Only assistant messages"},
    ),
    (MESSAGES, {"role": "assistant", "tool_calls": []}, {"content": "is required"}),
    (
        MESSAGES,
        {"role": "assistant", "tool_calls": {"id": "x"}},
        {"tool_calls": "Not a valid list", "content": "is required"},
    ),
    (
        MESSAGES,
        {"role": "assistant", "tool_calls": [TOOL_CALL, TOOL_CALL]},
        {"tool_calls.1.id": "Another tool call has the same id"},
    ),
    (
        MESSAGES,
        {"role": "assistant", "tool_calls": [{**TOOL_CALL, "type": "retrieval"}]},
        {"tool_calls.0.type": "Must be one of: function."},
    ),
    (
        MESSAGES,
        {
            "role": "assistant",
            "tool_calls": [{**TOOL_CALL, "function": {"name": "get_pods", "arguments": {"ns": "x"}}}],
        },
        {"tool_calls.0.function.arguments": "Not a valid string"},
    ),
    (
        MESSAGES,
        {"role": "assistant", "tool_calls": [{**TOOL_CALL, "id": "has space"}]},
        {"tool_calls.0.id": "letters, digits"},
    ),
    (
        MESSAGES,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": ""}}
                for i in range(33)
            ],
        },
        {"tool_calls": "Longer than maximum length 32"},
    ),
]


@pytest.mark.parametrize(("key", "body", "expected"), INVALID)
def test_invalid_body_reports_the_field_and_reason(
    key: tuple[str, str], body: Any, expected: dict[str, str]
) -> None:
    errors = by_field(check(key, body))
    assert set(errors) == set(expected), errors
    for field, fragment in expected.items():
        assert fragment in errors[field]["message"], errors[field]


@pytest.mark.parametrize("field", ["name", "cluster_id", "provider"])
def test_invalid_value_message_starts_like_the_seed(field: str) -> None:
    (error,) = check(CLUSTERS, {**CLUSTER, field: "Not Valid!"})
    assert error["message"].startswith(f"Invalid value for field '{field}': ")
    assert error["value"] == "Not Valid!"


def test_every_error_is_reported_at_once_with_nested_paths() -> None:
    body = {
        "role": "assistant",
        "content": 7,
        "id": "nope",
        "tool_calls": [
            TOOL_CALL,
            {"id": "call_2", "type": "function", "function": {"name": "ok", "arguments": "{}"}},
            {"id": "call_3", "type": "function", "function": {"name": "bad name!", "arguments": "{}"}},
        ],
        "metadata": [],
        "extra": True,
    }
    errors = by_field(check(MESSAGES, body))
    assert set(errors) == {"content", "id", "tool_calls.2.function.name", "metadata", "extra"}
    assert errors["tool_calls.2.function.name"]["message"].startswith(
        "Invalid value for field 'tool_calls.2.function.name': "
    )
    assert errors["tool_calls.2.function.name"]["value"] == "bad name!"
    assert errors["extra"] == {"field": "extra", "message": "Unknown field 'extra'", "value": True}


def test_several_reasons_for_one_field_become_one_entry() -> None:
    errors = check(CLUSTERS, {**CLUSTER, "name": "X" * 64})
    assert [e["field"] for e in errors] == ["name"]
    assert "Length must be between 1 and 63" in errors[0]["message"]
    assert "; " in errors[0]["message"]


def test_errors_are_capped_with_a_note_of_how_many_were_left_out() -> None:
    errors = check(REPORTS, {**REPORT, "cluster_ids": list(range(250))})
    assert len(errors) == MAX_ERRORS + 1
    assert errors[0]["field"] == "cluster_ids.0"
    assert errors[-1] == {"field": "body", "message": "150 more errors not shown."}


# -- the unknown-field policy ----------------------------------------------------------------------


def test_unknown_fields_are_rejected_at_every_level() -> None:
    body = {**REPORT, "time_range": {**REPORT["time_range"], "tz": "UTC"}, "owner": "me"}
    errors = by_field(check(REPORTS, body))
    assert set(errors) == {"time_range.tz", "owner"}


def test_a_schema_can_choose_to_let_unknown_fields_through() -> None:
    class Lenient(GatewaySchema):
        class Meta:
            unknown = EXCLUDE

        name = fields.String(required=True)

    assert validate_body(b'{"name": "a", "future_field": 1}', Lenient()) == []
    assert validate_body(b'{"future_field": 1}', Lenient()) == [
        {"field": "name", "message": "Field 'name' is required"}
    ]


def test_a_schema_that_raises_refuses_the_body_and_never_lets_it_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug in a schema must neither take the gateway down nor open the door: an empty list would
    # forward the body unchecked. The client gets one error on the body; the log says which schema.
    class Broken(GatewaySchema):
        name = fields.String(required=True)

        @validates_schema
        def crash(self, data: dict[str, Any], **kwargs: Any) -> None:
            raise RuntimeError("bug")

    assert validate_body(b'{"name": "a"}', Broken()) == [
        {"field": "body", "message": "The body could not be validated."}
    ]
    (logged,) = [r for r in caplog.records if r.getMessage() == "schema raised while validating"]
    assert logged.schema == "Broken"  # type: ignore[attr-defined]


# -- value echo and redaction ----------------------------------------------------------------------

REDACTED = [
    (CLUSTERS, {**CLUSTER, "password": "hunter2"}, "password"),
    (CLUSTERS, {**CLUSTER, "api_token": "abc"}, "api_token"),
    (CLUSTERS, {**CLUSTER, "Authorization": "Bearer x"}, "Authorization"),
    (CLUSTERS, {**CLUSTER, "client_secret": "s"}, "client_secret"),
    (CLUSTERS, {**CLUSTER, "apiKey": "k"}, "apiKey"),
    (
        CLUSTERS,
        {**CLUSTER, "credentials": {"type": "token", "token": ["not", "a", "string"]}},
        "credentials.token",
    ),
    (
        CLUSTERS,
        {**CLUSTER, "credentials": {"type": "token", "token": "t", "ca_certificate": "abc"}},
        "credentials.ca_certificate",
    ),
    (CLUSTERS, {**CLUSTER, "labels": {"api-key": "not valid!"}}, "labels.api-key"),
    (CLUSTERS, {**CLUSTER, "api_server_url": "https://admin:pw@x.example"}, "api_server_url"),
]


@pytest.mark.parametrize(("key", "body", "field"), REDACTED)
def test_values_of_secret_looking_fields_are_never_echoed(
    key: tuple[str, str], body: Any, field: str
) -> None:
    errors = by_field(check(key, body))
    assert field in errors
    assert "value" not in errors[field]


@pytest.mark.parametrize(
    ("value", "echoed"),
    [
        ("Bad_Name", True),
        ("B" * 62, True),  # 64 characters of JSON with the quotes
        ("B" * 63, False),
        ("É" * 62, True),  # counted in characters, not bytes
        (12, True),
        (None, True),
        (True, True),
        (["a"], False),
        ({"a": 1}, False),
    ],
)
def test_only_short_scalar_values_are_echoed(value: Any, echoed: bool) -> None:
    (error,) = check(REPORTS, {**REPORT, "format": value})
    assert ("value" in error) is echoed
    if echoed:
        assert error["value"] == value


def test_missing_fields_carry_no_value() -> None:
    assert all("value" not in e for e in check(CLUSTERS, {}))


# -- parsing: what is not a JSON object ------------------------------------------------------------

PARSE_ERRORS = [
    (b"", "Invalid JSON at line 1, column 1: the body is empty"),
    (b"  \n ", "Invalid JSON at line 1, column 1: the body is empty"),
    (b'{"name": }', "Invalid JSON at line 1, column 10: Expecting value"),
    (b'{\n  "name": "a",\n  "x": tru\n}', "Invalid JSON at line 3, column 8: Expecting value"),
    (b'{"name": "a"', "Invalid JSON at line 1, column 13"),
    (b'{"name": "a"} {}', "Invalid JSON at line 1, column 15: Extra data"),
    (b"{'name': 'a'}", "Invalid JSON at line 1, column 2: Expecting property name enclosed in double quotes"),
    (b'{"a": "line\nbreak"}', "Invalid JSON at line 1, column 12: Invalid control character."),
    (b"[]", "Expected a JSON object at line 1, column 1, got an array."),
    (b'\n  [{"name": "a"}]', "Expected a JSON object at line 2, column 3, got an array."),
    (b'"name"', "Expected a JSON object at line 1, column 1, got a string."),
    (b"42", "got a number."),
    (b"null", "got null."),
    (b"true", "got a boolean."),
    (b"\xef\xbb\xbf{}", "Invalid JSON at line 1, column 1: the body starts with a UTF-8 byte order mark"),
    (b'{"name": "caf\xe9"}', "Invalid UTF-8 at line 1, column 14 (byte 13)"),
    (b'{\n"n": "\xc3\xa9\xc3"}', "Invalid UTF-8 at line 2, column 8 (byte 10)"),
    (b'{"a": "\xed\xa0\x80"}', "Invalid UTF-8"),  # an encoded surrogate is not UTF-8
    (b"\xff\xfe{\x00}\x00", "Invalid UTF-8 at line 1, column 1 (byte 0)"),  # UTF-16
    (
        b"[" * 100_000,
        f"Invalid JSON at line 1, column {MAX_DEPTH + 1}: nested deeper than {MAX_DEPTH} levels.",
    ),
]


@pytest.mark.parametrize(("raw", "message"), PARSE_ERRORS)
def test_a_body_that_is_not_a_json_object_is_one_error_on_body(raw: bytes, message: str) -> None:
    with pytest.raises(BodyError) as caught:
        parse_json_object(raw)
    (error,) = caught.value.errors
    assert error["field"] == "body"
    assert message in error["message"], error
    assert validate_body(raw, SCHEMAS[CLUSTERS]) == caught.value.errors


def test_a_body_nested_thousands_deep_is_one_error_about_its_depth() -> None:
    """Where Python's JSON parser gives up on nesting depends on the version (3.11 and 3.12 at
    about a thousand levels, as a RecursionError; 3.13 parses 5000): either way the answer is
    one error about the depth, on the body or at the 32nd level."""
    raw = b'{"a":' * 5000 + b"1" + b"}" * 5000
    with pytest.raises(BodyError) as caught:
        parse_json_object(raw)
    (error,) = caught.value.errors
    assert error["field"] in ("body", ".".join(["a"] * MAX_DEPTH)), error["field"][:80]
    assert f"ested deeper than {MAX_DEPTH} levels." in error["message"], error
    # Parsed (3.13), the body's fields are checked against the schema too: its errors join.
    assert error in validate_body(raw, SCHEMAS[CLUSTERS])


VALUE_ERRORS = [
    (b'{"name": "a", "name": "b"}', {"name": "Duplicate key 'name' in a JSON object."}),
    (
        b'{"labels": {"env": "a", "tier": "b", "env": "c", "env": "d"}}',
        {"labels.env": "Duplicate key 'env' in a JSON object."},
    ),
    (b'{"a": [{"x": 1, "x": 1}]}', {"a.0.x": "Duplicate key"}),
    (b'{"a": NaN}', {"a": "NaN is not valid JSON"}),
    (
        b'{"a": [Infinity, -Infinity]}',
        {"a.0": "Infinity is not valid JSON", "a.1": "-Infinity is not valid JSON"},
    ),
    (b'{"a": 1e400}', {"a": "Number out of range"}),
    (b'{"a": -1e400}', {"a": "Number out of range"}),
    (b'{"a": 9223372036854775808}', {"a": "Integer out of range"}),
    (b'{"a": -9223372036854775809}', {"a": "Integer out of range"}),
    (b'{"a": ' + b"9" * 5000 + b"}", {"a": "Integer out of range"}),
    (b'{"a": "nul\\u0000"}', {"a": "NUL"}),
    (b'{"a\\u0000": 1}', {"a\x00": "Key contains NUL"}),
    (b'{"a": "\\ud800"}', {"a": "unpaired surrogate"}),
    (b'{"a": "\\udc00\\ud800"}', {"a": "unpaired surrogate"}),
    (
        b'{"a":' * MAX_DEPTH + b"{}" + b"}" * MAX_DEPTH,
        {".".join(["a"] * MAX_DEPTH): f"Nested deeper than {MAX_DEPTH} levels."},
    ),
]


@pytest.mark.parametrize(("raw", "expected"), VALUE_ERRORS)
def test_values_parsers_disagree_on_are_rejected_with_their_path(
    raw: bytes, expected: dict[str, str]
) -> None:
    with pytest.raises(BodyError) as caught:
        parse_json_object(raw)
    errors = by_field(caught.value.errors)
    assert set(errors) == set(expected)
    for field, fragment in expected.items():
        assert fragment in errors[field]["message"]
        assert "value" not in errors[field]


def test_nesting_up_to_the_limit_is_accepted() -> None:
    raw = b'{"a":' * (MAX_DEPTH - 1) + b"[]" + b"}" * (MAX_DEPTH - 1)
    assert isinstance(parse_json_object(raw), dict)


REQUIRED_REST = {
    "api_server_url": "Field 'api_server_url' is required",
    "environment": "Field 'environment' is required",
}
# A value the parser refuses is reported on its path, and the schema still checks the rest: one
# 422 lists every field. The schema's own finding on a refused path (required, not a string...)
# would only repeat it, so there is one error per field.
REFUSED_AND_REST = [
    (b'{"name": NaN, "provider": "aws"}', {"name": "NaN is not valid JSON"}),
    (b'{"name": "BAD", "name": "ok", "provider": "aws"}', {"name": "Duplicate key 'name'"}),
    (b'{"name": "prod\\u0000", "provider": "aws"}', {"name": "NUL"}),
    (b'{"name": "\\udc00", "provider": "aws"}', {"name": "unpaired surrogate"}),
    (b'{"name": 1e400, "provider": "aws"}', {"name": "Number out of range"}),
    (b'{"name": 9223372036854775808, "provider": "aws"}', {"name": "Integer out of range"}),
    (
        b'{"name": "a", "provider": "aws", "labels": {"env": Infinity}}',
        {"labels.env": "Infinity is not valid"},
    ),
    (b'{"name": "a", "provider": "aws", "x\\u0000": {"y": NaN}}', {"x\x00": "Key contains NUL"}),
]


@pytest.mark.parametrize(("raw", "refused"), REFUSED_AND_REST)
def test_refused_values_and_the_schemas_errors_come_in_one_list(raw: bytes, refused: dict[str, str]) -> None:
    errors = by_field(check(CLUSTERS, raw))

    assert set(errors) == {*refused, "provider", *REQUIRED_REST}
    for field, fragment in refused.items():
        assert fragment in errors[field]["message"], errors[field]
        assert "value" not in errors[field]
    assert errors["provider"]["message"].startswith("Invalid value for field 'provider': Must be one of")
    assert errors["provider"]["value"] == "aws"
    for field, message in REQUIRED_REST.items():
        assert errors[field] == {"field": field, "message": message}


def test_refused_items_keep_the_indexes_of_the_items_after_them() -> None:
    raw = b'{"report_type": "cost", "cluster_ids": [NaN, "%s", 5], "time_range": {"start": NaN}}' % (
        CLUSTER_ID.encode()
    )
    errors = by_field(check(REPORTS, raw))

    assert set(errors) == {"cluster_ids.0", "cluster_ids.2", "time_range.start", "time_range.end"}
    assert errors["cluster_ids.2"]["value"] == 5
    assert errors["time_range.end"]["message"] == "Field 'time_range.end' is required"


def test_a_body_that_is_only_refused_values_is_reported_once_per_field() -> None:
    assert check(MESSAGES, b'{"role": "user", "content": "nul\\u0000"}') == [
        {"field": "content", "message": "Contains NUL (\\u0000) or an unpaired surrogate."}
    ]


# -- which schema ----------------------------------------------------------------------------------

FIND = [
    ("POST", "/api/v1/clusters", "/api/v1/clusters"),
    ("post", "/api/v1/clusters", "/api/v1/clusters"),
    ("POST", "/api/v1/clusters/", "/api/v1/clusters"),
    ("POST", "//api/v1//clusters", "/api/v1/clusters"),
    ("POST", "/api/v1/clusters?dry_run=1", "/api/v1/clusters"),
    ("POST", "/api/v1/%63lusters", "/api/v1/clusters"),
    ("PUT", "/api/v1/clusters/" + CLUSTER_ID, "/api/v1/clusters/{cluster_id}"),
    ("PATCH", "/api/v1/clusters/prod-eu-1", "/api/v1/clusters/{cluster_id}"),
    ("PATCH", "/api/v1/clusters/a%2Fb", "/api/v1/clusters/{cluster_id}"),
    ("POST", "/api/v1/chat/sessions", "/api/v1/chat/sessions"),
    ("PATCH", "/api/v1/chat/sessions/s1", "/api/v1/chat/sessions/{session_id}"),
    ("POST", "/api/v1/chat/sessions/s1/messages", "/api/v1/chat/sessions/{session_id}/messages"),
    # Spellings a lenient backend (Tomcat, IIS, a double decoder) still routes to the handler.
    ("POST", "/api/v1/chat/sessions/s1/messages;x", "/api/v1/chat/sessions/{session_id}/messages"),
    ("POST", "/api/v1/chat/sessions/s1;v=2/messages", "/api/v1/chat/sessions/{session_id}/messages"),
    ("POST", "/api/v1/chat/sessions%2Fs1%2Fmessages", "/api/v1/chat/sessions/{session_id}/messages"),
    ("POST", "/api/v1/chat/sessions/s1\\messages", "/api/v1/chat/sessions/{session_id}/messages"),
    ("POST", "/api/v1/%2563lusters", "/api/v1/clusters"),
    # ... and one that ignores case (Express, ASP.NET Core), or trims segments (Windows, IIS).
    ("POST", "/api/v1/Clusters", "/api/v1/clusters"),
    ("POST", "/api/v1/%43lusters", "/api/v1/clusters"),
    ("POST", "/api/v1/chat/sessions/s1/MESSAGES", "/api/v1/chat/sessions/{session_id}/messages"),
    ("PATCH", "/api/v1/CLUSTERS/Prod-EU-1", "/api/v1/clusters/{cluster_id}"),
    ("POST", "/api/v1/clusters.", "/api/v1/clusters"),
    ("POST", "/api/v1/clusters%20", "/api/v1/clusters"),
    ("POST", "/api/v1/reports", "/api/v1/reports"),
    ("GET", "/api/v1/clusters", None),
    ("DELETE", "/api/v1/clusters/x", None),
    ("POST", "/api/v1/clusters/x", None),
    ("PATCH", "/api/v1/clusters", None),
    ("POST", "/api/v1/clusters/x/nodes", None),
    ("POST", "/api/v1/clusters-x", None),
    ("POST", "/api/v1/chat/sessions/s1/messages/m1", None),
    ("POST", "/", None),
    ("POST", "", None),
]


@pytest.mark.parametrize(("method", "path", "pattern"), FIND)
def test_find_schema_matches_method_and_pattern(method: str, path: str, pattern: str | None) -> None:
    found = find_schema(method, path)
    if pattern is None:
        assert found is None
    else:
        assert found is not None
        assert found[0] == pattern
        assert found[1] is SCHEMAS[(method.upper(), pattern)]


def test_the_most_specific_pattern_wins() -> None:
    generic, special, deeper = Schema(), Schema(), Schema()
    table = SchemaTable(
        {("POST", "/a/{x}/c"): generic, ("POST", "/a/b/{y}"): special, ("POST", "/a/{x}/{y}"): deeper}
    )
    assert table.find("POST", "/a/b/c") == ("/a/b/{y}", special)
    assert table.find("POST", "/a/z/c") == ("/a/{x}/c", generic)
    assert table.find("POST", "/a/z/q") == ("/a/{x}/{y}", deeper)


# -- media types -------------------------------------------------------------------------------------

JSON_TYPES = [
    ("application/json", True),
    ("application/json; charset=utf-8", True),
    ("Application/JSON;charset=UTF-8", True),
    ("  application/json  ", True),
    ("application/merge-patch+json", True),
    ("application/vnd.api+json; ext=bulk", True),
    ("application/problem+JSON", True),
    ("text/json", False),
    ("application/jsonx", False),
    ("application/json-seq", False),
    ("application/x-www-form-urlencoded", False),
    ("text/plain", False),
    ("application/json, text/plain", False),
    ("application/", False),
    ("json", False),
    ("", False),
    (None, False),
]


@pytest.mark.parametrize(("content_type", "expected"), JSON_TYPES)
def test_is_json_media_type(content_type: str | None, expected: bool) -> None:
    assert is_json_media_type(content_type) is expected


ALLOWED = [
    ("application/json", ("application/json",), True),
    ("application/json; charset=utf-8", ("application/json",), True),
    ("APPLICATION/JSON", ("application/json",), True),
    ("application/merge-patch+json", ("application/json",), True),
    ("text/plain", ("application/json",), False),
    ("multipart/form-data; boundary=x", ("application/json",), False),
    (None, ("application/json",), False),
    ("", ("application/json",), False),
    ("text/plain", ("*/*",), True),
    (None, ("*/*",), True),
    ("image/png", ("image/*",), True),
    ("image/png", ("text/*",), False),
    ("text/csv", ("application/json", "text/csv"), True),
    ("text/csv; header=present", ("text/csv; charset=utf-8",), True),
    ("application/octet-stream", ("application/json", "text/*"), False),
    ("application/vnd.api+json", ("application/vnd.api+json",), True),
    ("application/json", ("application/vnd.api+json",), False),
]


@pytest.mark.parametrize(("content_type", "allowed", "expected"), ALLOWED)
def test_media_type_allowed(content_type: str | None, allowed: tuple[str, ...], expected: bool) -> None:
    assert media_type_allowed(content_type, allowed) is expected


CODINGS = [
    ([], []),
    ([""], []),
    (["identity"], []),
    (["Identity, ,identity"], []),
    (["gzip"], ["gzip"]),
    (["GZip"], ["GZip"]),
    (["identity, gzip"], ["gzip"]),
    (["gzip", "br"], ["gzip", "br"]),
    ([" deflate ,gzip "], ["deflate", "gzip"]),
]


@pytest.mark.parametrize(("values", "expected"), CODINGS)
def test_content_codings_leave_out_identity(values: list[str], expected: list[str]) -> None:
    assert content_codings(values) == expected


# -- never raises ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def _field_values(schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
    # The schema's own field names with arbitrary values reach far deeper than random keys do.
    return st.dictionaries(st.sampled_from(sorted(schema.fields)), json_values, max_size=len(schema.fields))


def _assert_well_formed(errors: Any) -> None:
    assert isinstance(errors, list)
    for error in errors:
        assert isinstance(error["field"], str)
        assert isinstance(error["message"], str)
        assert error["message"] != "The body could not be validated."
        json.dumps(error)


FUZZ = settings(max_examples=fuzz_examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(key=st.sampled_from(sorted(SCHEMAS)), raw=st.binary(max_size=300))
def test_validate_body_never_raises_for_arbitrary_bytes(key: tuple[str, str], raw: bytes) -> None:
    _assert_well_formed(validate_body(raw, SCHEMAS[key]))


@FUZZ
@given(key=st.sampled_from(sorted(SCHEMAS)), value=json_values)
def test_validate_body_never_raises_for_arbitrary_json(key: tuple[str, str], value: Any) -> None:
    errors = validate_body(json.dumps(value).encode(), SCHEMAS[key])
    _assert_well_formed(errors)
    if not isinstance(value, dict):
        assert [e["field"] for e in errors] == ["body"]


@FUZZ
@given(data=st.data(), key=st.sampled_from(sorted(SCHEMAS)))
def test_validate_body_never_raises_for_arbitrary_values_of_known_fields(
    data: st.DataObject, key: tuple[str, str]
) -> None:
    body = data.draw(_field_values(SCHEMAS[key]))
    _assert_well_formed(validate_body(json.dumps(body).encode(), SCHEMAS[key]))


@FUZZ
@given(
    nested=st.dictionaries(
        st.sampled_from(
            ["type", "token", "client_key", "start", "end", "id", "function", "name", "arguments"]
        ),
        json_values,
        max_size=5,
    )
)
def test_validate_body_never_raises_inside_nested_objects(nested: dict[str, Any]) -> None:
    bodies = [
        (CLUSTERS, {**CLUSTER, "credentials": nested}),
        (REPORTS, {**REPORT, "time_range": nested}),
        (MESSAGES, {"role": "assistant", "tool_calls": [nested, {**TOOL_CALL, "function": nested}]}),
    ]
    for key, body in bodies:
        _assert_well_formed(validate_body(json.dumps(body).encode(), SCHEMAS[key]))
