"""The OpenAPI document: valid OpenAPI 3, complete, and in agreement with what the gateway does."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jwt
import pytest
import requests
import schemathesis
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from schemathesis.core.transport import Response as StResponse

from gateway.keys import lifecycle_key
from gateway.openapi import ERROR_RESPONSES, build_openapi
from gateway.schemas import SCHEMAS
from gateway.validation import validate_body
from tests.helpers import one_service

from .test_validation import CLUSTER, CLUSTER_ID, INVALID, REPORT, TOOL_CALL, VALID


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_openapi()


def validator(document: dict[str, Any], ref: str) -> OAS30Validator:
    # The component schemas refer to each other with "#/components/...": keep them in the root.
    return OAS30Validator({"$ref": ref, "components": document["components"]})


def body_ref(document: dict[str, Any], method: str, path: str) -> str:
    operation = document["paths"][path][method.lower()]
    return operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def test_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.")
    validate_spec(document)  # raises on any violation of the OpenAPI 3.0 schema and its rules


def test_document_loads_in_schemathesis_with_every_operation(document: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # schemathesis' own check against the OpenAPI meta-schema
    assert list(schema.iter_schema_warnings()) == []
    loaded = {(result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()}
    described = {
        (m.upper(), path) for path, item in document["paths"].items() for m in item if m != "parameters"
    }
    assert loaded == described


def test_document_is_plain_json(document: dict[str, Any]) -> None:
    assert json.loads(json.dumps(document)) == document


GATEWAY_ENDPOINTS = ["/health", "/health/ready", "/health/detailed", "/metrics", "/openapi.json"]


@pytest.mark.parametrize("path", GATEWAY_ENDPOINTS)
def test_gateway_endpoints_are_described_without_auth(document: dict[str, Any], path: str) -> None:
    operation = document["paths"][path]["get"]
    assert operation["security"] == []
    assert "200" in operation["responses"]


@pytest.mark.parametrize(("method", "path"), sorted(SCHEMAS))
def test_every_validated_body_is_described_with_the_gateway_errors(
    document: dict[str, Any], method: str, path: str
) -> None:
    operation = document["paths"][path][method.lower()]
    assert operation["security"] == [{"bearer": []}]  # the routes' default: a token is required
    assert operation["requestBody"]["required"] is True
    assert body_ref(document, method, path).startswith("#/components/schemas/")
    for status in ("401", "403", "413", "415", "422", "429", "502", "503", "504"):
        ref = operation["responses"][status]["$ref"]
        response = document["components"]["responses"][ref.rsplit("/", 1)[1]]
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
    names = {p["name"] for p in document["paths"][path].get("parameters", [])}
    assert names == {segment[1:-1] for segment in path.split("/") if segment.startswith("{")}


async def test_rate_limit_and_auth_responses_document_the_headers_they_send(
    document: dict[str, Any], make_gateway: Any, make_upstream: Any
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url, rate_limit="1/minute"))
    assert (await client.get("/x")).status == 200
    refused = await client.get("/x")
    assert refused.status == 429
    sent = {
        n.lower() for n in refused.headers if "ratelimit" in n.lower() or n in ("Retry-After", "X-Request-ID")
    }
    assert {n.lower() for n in document["components"]["responses"]["TooManyRequests"]["headers"]} == sent
    assert "WWW-Authenticate" in document["components"]["responses"]["Unauthorized"]["headers"]
    assert {status for status, _ in ERROR_RESPONSES.values()} == {
        "401", "403", "413", "415", "422", "429", "502", "503", "504"
    }  # fmt: skip


async def test_the_gateways_own_endpoints_answer_with_a_status_and_type_the_document_names(
    document: dict[str, Any], make_gateway: Any, make_upstream: Any
) -> None:
    """A client generated from the document reads each answer by its status and media type: an
    undocumented 503 from /health/ready (starting, draining) or a /metrics page in a type the
    document does not name is an answer it cannot read."""
    upstream = await make_upstream()
    client = await make_gateway(one_service(upstream.url, auth="none"))
    lifecycle = client.app[lifecycle_key]

    async def answer(path: str) -> tuple[str, str]:
        response = await client.get(path)
        await response.read()
        return str(response.status), response.content_type

    answers = {path: [await answer(path)] for path in GATEWAY_ENDPOINTS}
    lifecycle.ready = False
    answers["/health/ready"].append(await answer("/health/ready"))
    lifecycle.ready, lifecycle.draining = True, True
    answers["/health/ready"].append(await answer("/health/ready"))

    assert [status for status, _ in answers["/health/ready"]] == ["200", "503", "503"]
    for path, seen in answers.items():
        responses = document["paths"][path]["get"]["responses"]
        for status, media in seen:
            assert status in responses, (path, status)
            assert media in responses[status]["content"], (path, status, media)


def _as_schemathesis(response: Any, body: bytes) -> StResponse:
    request = requests.Request(response.method, str(response.url)).prepare()
    headers = {name.lower(): response.headers.getall(name) for name in response.headers}
    return StResponse(
        status_code=response.status, headers=headers, content=body, request=request, elapsed=0, verify=True
    )


async def test_the_gateways_own_5xx_answers_are_as_documented(
    document: dict[str, Any], make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    slow = (await make_upstream(hang)).url
    operation = schemathesis.openapi.from_dict(document).find_operation_by_path("POST", "/api/v1/clusters")

    async def gateway(url: str, auth: str, env: dict[str, str] | None = None) -> Any:
        service = {"url": url, "timeout": {"connect": 1, "read": 0.3}}
        route = {"prefix": "/api/v1/clusters", "service": "svc", "auth": auth}
        return await make_gateway({"services": {"svc": service}, "routes": [route]}, env)

    async def answer(client: Any, status: int, headers: dict[str, str] | None = None) -> Any:
        response = await client.post("/api/v1/clusters", json=CLUSTER, headers=headers)
        body = await response.read()
        assert response.status == status, body
        operation.validate_response(_as_schemathesis(response, body))  # raises on any mismatch
        name = operation.definition.raw["responses"][str(status)]["$ref"].rsplit("/", 1)[1]
        documented = {n.lower() for n in document["components"]["responses"][name]["headers"]}
        assert {"retry-after", "x-request-id"} & {n.lower() for n in response.headers} <= documented
        return response

    unreachable = await gateway(refused_url, "none")
    await answer(unreachable, 502)  # the connect fails and the only target is ejected...
    await answer(unreachable, 503)  # ...so the next request finds no healthy target
    await answer(await gateway(slow, "none"), 504)
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"sub": "u1", "exp": 2**31}, key, algorithm="ES256", headers={"kid": "k1"})
    issuer_down = await gateway(slow, "required", {"AUTH_JWKS_URL": refused_url + "/jwks"})
    response = await answer(issuer_down, 503, {"Authorization": f"Bearer {token}"})
    assert int(response.headers["Retry-After"]) >= 1
    never.set()


def test_error_schema_matches_the_contract_envelope(document: dict[str, Any]) -> None:
    check = validator(document, "#/components/schemas/Error")
    errors = validate_body(
        json.dumps({**CLUSTER, "name": "BAD", "x": 1}).encode(), SCHEMAS[("POST", "/api/v1/clusters")]
    )
    assert errors
    check.validate({"detail": "Validation Error", "errors": errors})
    check.validate({"detail": "Payload Too Large"})  # errors may be absent
    assert not check.is_valid({"errors": errors})  # detail is required
    assert not check.is_valid({"detail": "x", "errors": [{"field": "name"}]})  # message is required


@pytest.mark.parametrize(("key", "body"), [(k, b) for k, b in VALID if not isinstance(b, bytes)])
def test_bodies_the_gateway_accepts_are_valid_by_the_document(
    document: dict[str, Any], key: tuple[str, str], body: Any
) -> None:
    validator(document, body_ref(document, *key)).validate(body)


DOCUMENTED_REJECTIONS = [
    (("POST", "/api/v1/clusters"), {**CLUSTER, "enviroment": "qa"}),
    (("POST", "/api/v1/clusters"), {k: v for k, v in CLUSTER.items() if k != "name"}),
    (("POST", "/api/v1/clusters"), {**CLUSTER, "provider": "EKS"}),
    (("POST", "/api/v1/clusters"), {**CLUSTER, "name": "x" * 64}),
    (("POST", "/api/v1/clusters"), {**CLUSTER, "labels": {"env": "bad value!"}}),
    (("POST", "/api/v1/reports"), {**REPORT, "cluster_ids": ["nope"]}),
    (("POST", "/api/v1/reports"), {**REPORT, "time_range": {"start": "2025-01-01T00:00:00Z"}}),
    (("POST", "/api/v1/chat/sessions/{session_id}/messages"), {"role": "robot", "content": "x"}),
    (
        ("POST", "/api/v1/chat/sessions/{session_id}/messages"),
        {"role": "assistant", "tool_calls": [{**TOOL_CALL, "type": "retrieval"}], "id": CLUSTER_ID},
    ),
]


@pytest.mark.parametrize(("key", "body"), DOCUMENTED_REJECTIONS)
def test_the_document_also_rejects_what_the_gateway_rejects(
    document: dict[str, Any], key: tuple[str, str], body: Any
) -> None:
    # Not every rule can be said in OpenAPI 3.0 (start < end, role-dependent fields), but these can.
    assert validate_body(json.dumps(body).encode(), SCHEMAS[key])
    assert not validator(document, body_ref(document, *key)).is_valid(body)


def test_partial_updates_require_nothing_and_accept_null_for_optional_fields(
    document: dict[str, Any],
) -> None:
    update = document["components"]["schemas"]["ClusterUpdate"]
    assert "required" not in update
    assert update["properties"]["description"]["nullable"] is True
    assert not update["properties"]["name"].get("nullable", False)
    assert update["additionalProperties"] is False
    assert update["properties"]["labels"]["additionalProperties"]["nullable"] is True
    create = document["components"]["schemas"]["ClusterCreate"]
    assert "nullable" not in create["properties"]["description"]
    assert "nullable" not in create["properties"]["labels"]["additionalProperties"]


def test_the_test_tables_cover_every_schema() -> None:
    # Keeps the validation tests honest as schemas are added.
    assert {key for key, _, _ in INVALID} == set(SCHEMAS)
    assert {key for key, _ in VALID} == set(SCHEMAS)


async def test_the_detailed_health_answer_is_valid_by_the_document(
    document: dict[str, Any], make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    """Without REDIS_URL, Redis shows as "disabled"; a backend that refuses, as unhealthy."""
    upstream = await make_upstream()
    client = await make_gateway(
        {
            "services": {"up": {"url": upstream.url}, "down": {"url": refused_url}},
            "routes": [{"prefix": "/", "service": "up", "auth": "none"}],
        }
    )
    response = await client.get("/health/detailed")
    body = await response.json()
    assert body["components"]["redis"]["status"] == "disabled"
    schema = document["paths"]["/health/detailed"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]
    OAS30Validator({**schema, "components": document["components"]}).validate(body)
