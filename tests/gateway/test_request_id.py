"""``x-request-id`` end to end: kept when the client's is sane, made otherwise, sent upstream once,
returned on the response, on the span; hostile values written byte for byte on a raw socket."""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import pytest
from aiohttp import web

from gateway.middleware.request_id import new_request_id
from tests.helpers import get_request, one_service, parse_responses, raw_exchange

GENERATED = re.compile("[0-9a-f]{32}")
KEPT, MADE = "kept", "made"

CASES = [
    pytest.param([("X-Request-ID", "abc-123")], KEPT, "abc-123", id="simple"),
    pytest.param([("x-request-id", "0f9c2e1a-5b7d-4c1e-9a3f-2b8d6e4c1a7f")], KEPT,
                 "0f9c2e1a-5b7d-4c1e-9a3f-2b8d6e4c1a7f", id="uuid"),
    pytest.param([("X-REQUEST-ID", "Zm9vYmFy+/=._:")], KEPT, "Zm9vYmFy+/=._:", id="base64-and-punctuation"),
    pytest.param([("X-Request-ID", "r" * 128)], KEPT, "r" * 128, id="128-characters"),
    pytest.param([("X-Request-ID", " \tabc \t")], KEPT, "abc", id="ows-around"),
    pytest.param([("X-Request-ID", "first"), ("X-Request-ID", "second")], KEPT, "first", id="two-headers-first-wins"),
    pytest.param([("X-Request-ID", "r" * 129)], MADE, None, id="129-characters"),
    pytest.param([("X-Request-ID", "r" * 6000)], MADE, None, id="6000-characters"),
    pytest.param([("X-Request-ID", "")], MADE, None, id="empty"),
    pytest.param([("X-Request-ID", "a b")], MADE, None, id="inner-space"),
    pytest.param([("X-Request-ID", "abc\tdef")], MADE, None, id="inner-tab"),
    pytest.param([("X-Request-ID", "a,b")], MADE, None, id="a-list"),
    pytest.param([("X-Request-ID", "caf\xe9")], MADE, None, id="latin-1"),
    pytest.param([("X-Request-ID", "\xc3\xa9t\xc3\xa9")], MADE, None, id="utf-8"),
    pytest.param([("X-Request-ID", '"quoted"')], MADE, None, id="quotes"),
    pytest.param([("X-Request-ID", "<script>")], MADE, None, id="markup"),
    pytest.param([("X-Request-ID", "a\\nb")], MADE, None, id="escaped-newline"),
    pytest.param([("X-Request-ID", "a b"), ("X-Request-ID", "good")], MADE, None, id="first-of-two-insane"),
    pytest.param([("X_Request_ID", "underscore")], MADE, None, id="underscore-spelling-is-not-it"),
    pytest.param([], MADE, None, id="absent"),
]  # fmt: skip


@pytest.fixture
async def gateway_and_upstream(make_gateway: Any, make_upstream: Any) -> tuple[Any, Any]:
    upstream = await make_upstream()
    return await make_gateway(one_service(upstream.url)), upstream


@pytest.mark.parametrize(("headers", "outcome", "expected"), CASES)
async def test_request_id_is_kept_when_sane_and_made_otherwise(
    gateway_and_upstream: tuple[Any, Any], headers: list[tuple[str, str]], outcome: str, expected: str | None
) -> None:
    gateway, upstream = gateway_and_upstream
    (response,) = parse_responses(await raw_exchange(gateway.port, get_request("/x", headers)))
    assert response.status == 200
    (sent,) = response.headers.getall("X-Request-ID")
    (arrived,) = upstream.requests[-1].values("x-request-id")  # exactly one, the client's gone
    assert arrived == sent
    if outcome == KEPT:
        assert sent == expected
    else:
        assert GENERATED.fullmatch(sent), sent
    # Nor under another spelling a CGI-style backend would read as the same name.
    names = [k.lower().replace("_", "-") for k, _ in upstream.requests[-1].headers]
    assert names.count("x-request-id") == 1


async def test_made_ids_differ_request_by_request(gateway_and_upstream: tuple[Any, Any]) -> None:
    gateway, _ = gateway_and_upstream
    ids = set()
    for _ in range(5):
        (response,) = parse_responses(await raw_exchange(gateway.port, get_request("/x", [])))
        ids.add(response.headers["X-Request-ID"])
    assert len(ids) == 5


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x7fb", b"a\x00b"])
async def test_a_request_id_the_http_parser_refuses_gets_a_json_400_with_a_made_id(
    gateway_and_upstream: tuple[Any, Any], value: bytes
) -> None:
    gateway, upstream = gateway_and_upstream
    raw = b"GET /x HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: " + value + b"\r\nConnection: close\r\n\r\n"
    (response,) = parse_responses(await raw_exchange(gateway.port, raw))
    assert response.status == 400 and response.headers["Content-Type"] == "application/json"
    assert GENERATED.fullmatch(response.headers["X-Request-ID"])
    assert upstream.requests == []


@pytest.mark.parametrize("client_id", ["abc-123", None], ids=["client-sent-one", "gateway-made-one"])
async def test_an_upstreams_own_request_id_on_its_answer_passes_through_untouched(
    make_gateway: Any, make_upstream: Any, client_id: str | None
) -> None:
    # The contract: "An upstream's own response, error or not, passes through untouched." An
    # upstream that answers with an id of its own keeps it; the gateway's id went to the upstream
    # on the request, and the gateway adds it to an answer only when the upstream set none.
    async def own_id(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Request-ID": "upstream-own-id"})

    upstream = await make_upstream(own_id)
    gateway = await make_gateway(one_service(upstream.url))
    headers = [("X-Request-ID", client_id)] if client_id else []
    (response,) = parse_responses(await raw_exchange(gateway.port, get_request("/x", headers)))
    assert response.status == 200
    assert response.headers.getall("X-Request-ID") == ["upstream-own-id"]
    (arrived,) = upstream.requests[-1].values("x-request-id")
    if client_id:
        assert arrived == client_id
    else:
        assert GENERATED.fullmatch(arrived), arrived


def test_a_forked_worker_makes_ids_of_its_own() -> None:
    """``GATEWAY_WORKERS`` forks its workers: without a new seed each would hand out the ids its
    siblings do, and one id in the access log would name several requests."""
    new_request_id()
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that a fork of a process with threads may deadlock in the child: this
        # child only writes to a pipe and leaves, taking no lock.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: one id, then out without running anything of pytest's
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 256).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = new_request_id()
    assert len(child) == len(parent) == 32
    assert child[:16] != parent[:16]  # the per-process part
