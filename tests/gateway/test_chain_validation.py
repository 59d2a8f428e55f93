"""Request validation through the whole chain: create_app, a real upstream on loopback.

Size (413) and type (415) are refused before anything is read or verified; a body with a schema is
parsed only after authentication (422 for admitted requests, 401 for the others); what passes
reaches the upstream byte for byte.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.chain import AUTH_ENV, Counting, bearer, counting_handler, read_head, service, token
from tests.helpers import fuzz_examples, parse_responses, raw_exchange

CLUSTER = {
    "name": "prod-eu-1",
    "api_server_url": "https://api.prod-eu-1.example.com:6443",
    "provider": "eks",
    "environment": "production",
}
CLUSTER_ID = "3f2c9a1e-8b7d-4c6e-9f10-2a3b4c5d6e7f"
JSON = {"Content-Type": "application/json"}


def clusters_config(url: str, **route: Any) -> dict[str, Any]:
    """The seed's clusters route (auth required, JSON, 128KB) plus an unschema'd upload route."""
    return service(
        url,
        [
            {"prefix": "/api/v1/clusters", **route},
            {"prefix": "/upload", "max_body": "1KB", "content_types": ["*/*"], "auth": "none"},
        ],
    )


@pytest.fixture
async def upstream(make_upstream: Any) -> Any:
    return await make_upstream()


@pytest.fixture
async def client(make_gateway: Any, upstream: Any) -> Any:
    return await make_gateway(clusters_config(upstream.url), AUTH_ENV)


# -- 422: every problem, only for admitted requests -----------------------------------------------


async def test_empty_cluster_with_a_valid_token_is_422_naming_every_missing_field(client, upstream):
    response = await client.post("/api/v1/clusters", data=b"{}", headers={**JSON, **bearer()})

    assert response.status == 422
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-ID"]
    assert await response.json() == {
        "detail": "Validation Error",
        "errors": [
            {"field": "name", "message": "Field 'name' is required"},
            {"field": "api_server_url", "message": "Field 'api_server_url' is required"},
            {"field": "provider", "message": "Field 'provider' is required"},
            {"field": "environment", "message": "Field 'environment' is required"},
        ],
    }
    assert upstream.requests == []


async def test_nested_paths_and_several_errors_come_in_one_response(client, upstream):
    body = {
        **CLUSTER,
        "name": "Not_A_Label",
        "labels": {"env": "x" * 70},
        "credentials": {"type": "token"},
        "enviroment": "qa",
    }
    response = await client.post("/api/v1/clusters", json=body, headers=bearer())

    assert response.status == 422
    errors = {error["field"]: error for error in (await response.json())["errors"]}
    assert set(errors) == {"name", "labels.env", "credentials.token", "enviroment"}
    assert errors["name"]["message"].startswith("Invalid value for field 'name': ")
    assert errors["name"]["value"] == "Not_A_Label"
    assert errors["labels.env"]["message"].startswith("Invalid value for field 'labels.env': ")
    assert errors["credentials.token"]["message"] == "Field 'credentials.token' is required"
    assert errors["enviroment"] == {
        "field": "enviroment",
        "message": "Unknown field 'enviroment'",
        "value": "qa",
    }
    assert upstream.requests == []


async def test_a_value_json_parsers_disagree_on_and_the_schemas_errors_come_in_one_422(client, upstream):
    body = b'{"name":NaN,"provider":"aws"}'
    response = await client.post("/api/v1/clusters", data=body, headers={**JSON, **bearer()})

    assert response.status == 422
    errors = {error["field"]: error["message"] for error in (await response.json())["errors"]}
    assert list(errors) == ["name", "api_server_url", "provider", "environment"]
    assert errors["name"].startswith("NaN is not valid JSON")
    assert errors["provider"].startswith("Invalid value for field 'provider'")
    assert upstream.requests == []


async def test_unauthenticated_invalid_body_is_401_not_422(client, upstream):
    response = await client.post("/api/v1/clusters", data=b'{"name": ', headers=JSON)

    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert upstream.requests == []


async def test_unauthenticated_body_is_never_read_an_endless_chunked_body_gets_401_promptly(client, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(
            b"POST /api/v1/clusters HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
        )
        await writer.drain()
        started = time.monotonic()
        # The stream never ends: a gateway that read the body first would never answer.
        status, headers, body = await read_head(reader, deadline_s=3.0)
        assert status == 401
        assert time.monotonic() - started < 3.0
        assert json.loads(body) == {"detail": "Authentication required"}
        assert headers["www-authenticate"] == 'Bearer realm="gateway"'
    finally:
        writer.close()
    assert upstream.requests == []


async def test_bad_token_with_an_invalid_body_is_401(client, upstream):
    response = await client.post(
        "/api/v1/clusters", data=b"{}", headers={**JSON, "Authorization": "Bearer not-a-token"}
    )
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


async def test_a_key_with_an_unpaired_surrogate_is_a_422_naming_it(client, upstream):
    # The key is quoted back in "field"; as a lone surrogate it once made the 422 unencodable.
    body = b'{"\\ud800key": 1, "name": "prod-eu-1"}'
    response = await client.post("/api/v1/clusters", data=body, headers={**JSON, **bearer()})

    assert response.status == 422
    errors = (await response.json())["errors"]
    assert {"field": "\ud800key", "message": "Key contains NUL or an unpaired surrogate."} in errors
    assert upstream.requests == []


# -- 415 -----------------------------------------------------------------------------------------


async def test_missing_content_type_is_415(client, upstream):
    body = json.dumps(CLUSTER).encode()
    response = await client.post(
        "/api/v1/clusters", data=body, headers=bearer(), skip_auto_headers=["Content-Type"]
    )
    assert response.status == 415
    assert response.headers["Accept"] == "application/json"
    assert "no Content-Type" in (await response.json())["detail"]
    assert upstream.requests == []


async def test_text_plain_is_415_even_before_authentication(client, upstream):
    body = json.dumps(CLUSTER).encode()
    for headers in (bearer(), {}):
        response = await client.post(
            "/api/v1/clusters", data=body, headers={"Content-Type": "text/plain", **headers}
        )
        assert response.status == 415
        assert "'text/plain'" in (await response.json())["detail"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("method", "path", "content_type", "body"),
    [
        ("POST", "/api/v1/clusters", "application/json; charset=utf-8", CLUSTER),
        ("POST", "/api/v1/clusters", "Application/JSON", CLUSTER),
        ("PATCH", f"/api/v1/clusters/{CLUSTER_ID}", "application/merge-patch+json", {"description": None}),
    ],
)
async def test_json_media_types_are_accepted(client, upstream, method, path, content_type, body):
    raw = json.dumps(body).encode()
    response = await client.request(
        method, path, data=raw, headers={"Content-Type": content_type, **bearer()}
    )

    assert response.status == 200
    assert [(r.method, r.body, r.values("Content-Type")) for r in upstream.requests] == [
        (method, raw, [content_type])
    ]


async def test_any_type_route_takes_any_body_and_none(client, upstream):
    first = await client.post("/upload/a", data=b"\x00\x01 binary", headers={"Content-Type": "image/png"})
    second = await client.post("/upload/b", data=b"plain", skip_auto_headers=["Content-Type"])

    assert (first.status, second.status) == (200, 200)
    assert [(r.raw_path, r.body) for r in upstream.requests] == [
        ("/upload/a", b"\x00\x01 binary"),
        ("/upload/b", b"plain"),
    ]
    assert upstream.requests[1].values("Content-Type") == []


# -- 415 for a compressed body with a schema: it cannot be checked without inflating it ---------

CODED = {
    "gzip": (["gzip"], gzip.compress(json.dumps(CLUSTER).encode()), "gzip"),
    "deflate, not valid": (["deflate"], b"\x00 not deflate", "deflate"),
    "br": (["br"], b"\x8b\x07\x80{}\x03", "br"),
    "identity listed first": (["identity, gzip"], gzip.compress(b"{}"), "gzip"),
    "two field lines": (["gzip", "br"], b"\x1f\x8b", "gzip, br"),
    "not UTF-8": ([b"x-\xe9".decode("utf-8", "surrogateescape")], b"{}", "x-\\xe9"),
}


@pytest.mark.parametrize("authorized", [True, False], ids=["token", "no-token"])
@pytest.mark.parametrize(("codings", "body", "named"), CODED.values(), ids=CODED)
async def test_a_compressed_body_with_a_schema_is_415_naming_the_coding(
    client, upstream, codings, body, named, authorized
):
    head = (
        b"POST /api/v1/clusters HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + b"".join(b"Content-Encoding: " + c.encode("utf-8", "surrogateescape") + b"\r\n" for c in codings)
        + (f"Authorization: Bearer {token()}\r\n".encode() if authorized else b"")
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    (response,) = parse_responses(await raw_exchange(client.port, head + body))

    assert response.status == 415
    assert response.headers["Content-Type"] == "application/json" and response.headers["X-Request-ID"]
    assert response.headers["Accept-Encoding"] == "identity"
    assert response.json() == {
        "detail": f"Content-Encoding {named} is not accepted on this route; send the body uncompressed"
    }
    assert upstream.requests == []


async def test_a_compressed_chat_session_is_415_not_a_500(make_gateway, upstream):
    config = service(upstream.url, [{"prefix": "/api/v1/chat", "auth": "none"}])
    client = await make_gateway(config)
    body = gzip.compress(b'{"title":"hello"}')

    response = await client.post(
        "/api/v1/chat/sessions", data=body, headers={**JSON, "Content-Encoding": "gzip"}
    )

    assert response.status == 415
    assert (await response.json())["detail"].startswith("Content-Encoding gzip is not accepted")
    assert upstream.requests == []


async def test_content_encoding_identity_is_a_plain_body_checked_and_forwarded_as_sent(client, upstream):
    raw = json.dumps(CLUSTER).encode()
    response = await client.post(
        "/api/v1/clusters", data=raw, headers={**JSON, **bearer(), "Content-Encoding": "identity"}
    )

    assert response.status == 200
    [received] = upstream.requests
    assert (received.body, received.values("Content-Encoding")) == (raw, ["identity"])


async def test_a_compressed_body_without_a_schema_is_forwarded_as_sent(client, upstream):
    body = gzip.compress(b"x" * 100_000)  # 100 KB inflated, 1KB route: the bytes sent count
    response = await client.post(
        "/upload/a", data=body, headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"}
    )

    assert response.status == 200
    [received] = upstream.requests
    assert received.body == body
    assert received.values("Content-Encoding") == ["gzip"]
    assert received.values("Content-Length") == [str(len(body))]


# -- 413 -----------------------------------------------------------------------------------------


async def test_declared_length_over_the_limit_is_413_and_the_upstream_gets_nothing(
    make_gateway, make_upstream
):
    counting = Counting()
    upstream = await make_upstream(counting_handler(counting), read_body=False)
    client = await make_gateway(clusters_config(upstream.url), AUTH_ENV)

    for path, size, headers in [
        ("/upload/x", 1025, {"Content-Type": "application/octet-stream"}),
        ("/api/v1/clusters", 128 * 1024 + 1, {**JSON, **bearer()}),
        ("/api/v1/clusters", 128 * 1024 + 1, JSON),  # before authentication too
    ]:
        response = await client.post(path, data=b"x" * size, headers=headers)
        assert response.status == 413, path
        assert "exceeds the limit" in (await response.json())["detail"]
    assert counting.requests == 0


async def test_chunked_body_over_the_limit_is_413_and_the_upstream_gets_at_most_the_limit(
    make_gateway, make_upstream
):
    counting = Counting()
    upstream = await make_upstream(counting_handler(counting), read_body=False)
    client = await make_gateway(clusters_config(upstream.url), AUTH_ENV)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 300  # 2400 bytes against a 1KB limit, length unknown up front

    response = await client.post("/upload/stream", data=chunks(), headers={"Content-Type": "text/plain"})

    assert response.status == 413
    assert counting.requests <= 1
    assert counting.received <= 1024
    assert True not in counting.ended  # the upstream never saw a complete body


async def test_chunked_body_over_the_limit_on_a_schema_route_is_413_and_never_forwarded(
    make_gateway, make_upstream
):
    counting = Counting()
    upstream = await make_upstream(counting_handler(counting), read_body=False)
    client = await make_gateway(clusters_config(upstream.url, max_body="2KB"), AUTH_ENV)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"description": "'
        for _ in range(10):
            yield b"z" * 500

    response = await client.post("/api/v1/clusters", data=chunks(), headers={**JSON, **bearer()})

    assert response.status == 413
    assert counting.requests == 0


# -- what passes is forwarded byte for byte ------------------------------------------------------


async def test_valid_body_reaches_the_upstream_byte_for_byte(client, upstream):
    raw = (
        b'  {\n\t"provider" :"eks",   "environment":"produc\\u0074ion",\r\n'
        b'"api_server_url": "https://api.prod.example.com:6443",\n'
        b'  "description": "caf\\u00e9 \xc3\xa9t\xc3\xa9 \\ud83d\\ude80", "name":"prod-1"}  \n'
    )
    response = await client.post("/api/v1/clusters", data=raw, headers={**JSON, **bearer()})

    assert response.status == 200
    [received] = upstream.requests
    assert received.body == raw
    assert received.values("Content-Length") == [str(len(raw))]
    assert received.values("x-auth-subject") == ["alice"]


async def test_valid_chunked_body_is_forwarded_as_sent(client, upstream):
    raw = json.dumps(CLUSTER, indent=3).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    response = await client.post("/api/v1/clusters", data=chunks(), headers={**JSON, **bearer()})

    assert response.status == 200
    assert [r.body for r in upstream.requests] == [raw]


# -- fuzzing the documented surface --------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def _request(draw: Any, operations: list[tuple[str, str, list[str]]]) -> tuple[str, str, bytes, str]:
    method, path, fields = draw(st.sampled_from(operations))
    param = draw(st.sampled_from([CLUSTER_ID, "not-a-uuid", "%2e%2e", "x" * 40]))
    path = path.replace("{cluster_id}", param).replace("{session_id}", param)
    kind = draw(st.integers(0, 9))
    if kind == 0:
        body = draw(st.binary(max_size=64))
    elif kind == 1:
        body = json.dumps(draw(_json)).encode()
    else:
        keys = st.sampled_from(fields) | st.text(max_size=6) if fields else st.text(max_size=6)
        body = json.dumps(
            draw(st.dictionaries(keys, _json, max_size=6)), ensure_ascii=draw(st.booleans())
        ).encode()
    content_type = draw(st.sampled_from(["application/json", "application/merge-patch+json", "text/plain"]))
    return method, path, body, content_type


@pytest.fixture
async def fuzz_target(make_gateway: Any, make_upstream: Any) -> tuple[Any, list[tuple[str, str, list[str]]]]:
    upstream = await make_upstream()
    routes = [{"prefix": p} for p in ("/api/v1/clusters", "/api/v1/reports", "/api/v1/chat")]
    client = await make_gateway(
        service(upstream.url, routes), {**AUTH_ENV, "RATE_LIMIT_DEFAULT": "100000/minute"}
    )
    document = await (await client.get("/openapi.json")).json()
    components = document["components"]["schemas"]
    operations = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            schema = components[schema["$ref"].rpartition("/")[2]] if "$ref" in schema else schema
            operations.append((method.upper(), path, sorted(schema.get("properties", {}))))
    assert len(operations) >= 7
    return client, operations


@settings(
    max_examples=fuzz_examples(80), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_fuzzed_requests_from_the_openapi_document_never_get_a_5xx(fuzz_target, data):
    client, operations = fuzz_target
    method, path, body, content_type = data.draw(_request(operations))
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    response = await client.request(method, path, data=body, headers=headers)
    text = await response.text()
    assert response.status < 500, (method, path, body, response.status, text)
    assert response.status in (200, 400, 404, 415, 422), (method, path, body, response.status, text)


TOKEN = token("fuzzer", ttl=3600)


# -- 415 for a JSON body with a schema in another charset: it is checked as UTF-8 -----------------


@pytest.mark.parametrize("charset", ["iso-8859-1", '"utf-16"', "latin1", "UTF-32"])
async def test_a_json_body_with_a_schema_in_another_charset_is_415(client, upstream, charset):
    """aiohttp's request.json() decodes by the charset parameter: a display_name of 256 "é" passed
    the schema's 256-character limit as UTF-8 and reached such a backend as 512 characters."""
    body = json.dumps({**CLUSTER, "display_name": "é" * 256}, ensure_ascii=False).encode()
    content_type = f"application/json; charset={charset}"
    response = await client.post(
        "/api/v1/clusters", data=body, headers={"Content-Type": content_type, **bearer()}
    )

    assert response.status == 415
    assert "UTF-8" in (await response.json())["detail"]
    assert upstream.requests == []


async def test_another_charset_still_passes_where_no_schema_applies(client, upstream):
    headers = {"Content-Type": "text/plain; charset=iso-8859-1"}
    assert (await client.post("/upload/x", data=b"caf\xe9", headers=headers)).status == 200
    assert [r.body for r in upstream.requests] == [b"caf\xe9"]
