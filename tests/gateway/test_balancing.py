"""Several targets per service: round-robin, passive ejection, retries, and coming back."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable
from typing import Any

from tests.helpers import one_service


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_round_robin_alternates_between_two_targets(make_gateway: Any, make_upstream: Any) -> None:
    first, second = await make_upstream(), await make_upstream()
    client = await make_gateway(one_service([first.url, second.url]))

    for index in range(6):
        assert (await client.get(f"/r{index}")).status == 200

    assert len(first.requests) == len(second.requests) == 3
    # Strictly alternating: consecutive requests never land on the same target.
    order = sorted([(r.raw_path, "a") for r in first.requests] + [(r.raw_path, "b") for r in second.requests])
    assert all(x[1] != y[1] for x, y in itertools.pairwise(order))


async def test_refused_target_is_skipped_and_idempotent_get_retried(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    healthy = await make_upstream()
    client = await make_gateway(one_service([refused_url, healthy.url]))

    statuses = [(await client.get(f"/r{i}")).status for i in range(4)]

    assert statuses == [200] * 4
    assert [r.raw_path for r in healthy.requests] == ["/r0", "/r1", "/r2", "/r3"]


async def test_retried_request_keeps_its_body(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    healthy = await make_upstream()
    client = await make_gateway(one_service([refused_url, healthy.url]))

    for index in range(2):
        response = await client.put(f"/r{index}", json={"n": index})
        assert response.status == 200

    assert [r.body for r in healthy.requests] == [b'{"n": 0}', b'{"n": 1}']


async def test_post_is_not_retried_on_another_target(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    healthy = await make_upstream()
    client = await make_gateway(one_service([refused_url, healthy.url]))

    # One of the first two POSTs meets the refusing target (round-robin); it must not be
    # replayed on the healthy one. After that the refusing target is ejected.
    statuses = [(await client.post("/p", json={"i": i})).status for i in range(2)]

    assert sorted(statuses) == [200, 502]
    assert len(healthy.requests) == 1


async def test_all_targets_down_gives_503_in_the_contract_format(
    make_gateway: Any, bound_socket: Callable[[], socket.socket]
) -> None:
    urls = [url_of(bound_socket()), url_of(bound_socket())]
    client = await make_gateway(one_service(urls))

    first = await client.get("/x")  # tries both targets, each refuses: both ejected
    second = await client.get("/x")

    assert first.status == 502
    assert second.status == 503
    assert second.content_type == "application/json"
    assert second.headers.get("X-Request-ID")
    assert "svc" in (await second.json())["detail"]


async def test_single_refusing_target_is_ejected(make_gateway: Any, refused_url: str) -> None:
    client = await make_gateway(one_service(refused_url))

    assert (await client.get("/x")).status == 502
    assert (await client.get("/x")).status == 503


async def test_ejected_target_is_not_used_during_its_cooldown(
    make_gateway: Any, make_upstream: Any, bound_socket: Callable[[], socket.socket]
) -> None:
    sock = bound_socket()
    healthy = await make_upstream()
    client = await make_gateway(one_service([url_of(sock), healthy.url], eject_seconds=60))
    assert (await client.get("/eject")).status == 200  # the down target refuses and is ejected

    revived = await make_upstream(sock=sock)
    for index in range(4):
        assert (await client.get(f"/r{index}")).status == 200

    assert revived.requests == []
    assert len(healthy.requests) == 5


async def test_target_that_comes_back_is_used_again_after_the_cooldown(
    make_gateway: Any, make_upstream: Any, bound_socket: Callable[[], socket.socket]
) -> None:
    sock = bound_socket()
    healthy = await make_upstream()
    client = await make_gateway(one_service([url_of(sock), healthy.url], eject_seconds=0.3))
    assert (await client.get("/eject")).status == 200

    revived = await make_upstream(sock=sock)

    deadline = time.monotonic() + 5
    while not revived.requests:
        assert time.monotonic() < deadline, "the revived target got no traffic within 5 s"
        assert (await client.get("/again")).status == 200
        await asyncio.sleep(0.02)  # poll interval

    assert revived.requests[0].raw_path == "/again"
