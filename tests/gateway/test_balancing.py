"""Several targets per service: round-robin, passive ejection, retries, and coming back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.settings import ServiceSettings
from gateway.upstream import Upstream
from tests.helpers import one_service, wait_for


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


async def test_a_post_whose_connect_failed_is_retried_on_another_target(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    """A refused connect sent nothing anywhere: retrying is safe for any method (nginx, Envoy)."""
    healthy = await make_upstream()
    client = await make_gateway(one_service([refused_url, healthy.url]))

    statuses = [(await client.post("/p", json={"i": i})).status for i in range(2)]

    assert statuses == [200, 200]
    assert [r.body for r in healthy.requests] == [b'{"i": 0}', b'{"i": 1}']


async def test_a_request_the_upstream_may_have_received_is_retried_only_when_idempotent(
    make_gateway: Any, make_upstream: Any, make_raw_upstream: Any
) -> None:
    """A connection closed after the request went out: the upstream may have acted on it."""
    received: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    healthy = await make_upstream()
    client = await make_gateway(one_service([await make_raw_upstream(hang_up), healthy.url]))

    # Round-robin: the first request meets the target that hangs up, and every other one after.
    assert (await client.post("/p", json={})).status == 502
    assert [(await client.get(f"/g{i}")).status for i in range(4)] == [200] * 4

    assert [head.split(b" ")[0] for head in received][:2] == [b"POST", b"GET"]  # a GET did meet it
    assert [r.method for r in healthy.requests] == ["GET"] * 4  # the POST was not replayed


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_streamed_body_that_began_to_go_out_is_never_retried(
    make_gateway: Any, make_upstream: Any, make_raw_upstream: Any, framing: str
) -> None:
    """A PUT is idempotent, but a body streamed from the client cannot be sent twice: what already
    went to the target that hung up is gone. Retried, the other target would get the rest of it,
    which a chunked body frames as a whole (a truncated upload stored as complete)."""
    received: list[bytes] = []

    async def hang_up_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(16 * 1024)
        writer.close()

    healthy = await make_upstream()
    # A short read timeout: were the rest of a declared-length body retried, the second target
    # would wait for the bytes that went to the first, and the test for its 504.
    client = await make_gateway(
        one_service(
            [await make_raw_upstream(hang_up_mid_body), healthy.url], timeout={"connect": 1, "read": 5}
        )
    )
    body = bytes(range(256)) * 1024  # 256 KiB: more than the gateway buffers, so it is streamed

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 32 * 1024):
            yield body[start : start + 32 * 1024]

    response = await client.put("/upload", data=chunks() if framing == "chunked" else body)

    assert response.status == 502, await response.text()
    assert received and received[0].startswith(b"PUT /upload ")  # it did go out to the first target
    assert healthy.requests == []  # and not, in part, to the second


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


async def test_a_read_timeout_does_not_take_a_single_target_out_of_rotation(
    make_gateway: Any, make_upstream: Any
) -> None:
    """One slow endpoint times out (504); the target is up, and the next request is served."""
    release = asyncio.Event()

    async def reply(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await release.wait()
        return web.json_response({})

    upstream = await make_upstream(reply)
    client = await make_gateway(
        one_service(upstream.url, timeout={"connect": 1, "read": 0.2}, eject_seconds=60)
    )
    try:
        assert (await client.get("/slow")).status == 504
        assert (await client.get("/fast")).status == 200
    finally:
        release.set()


async def test_a_pooled_connection_the_upstream_closed_as_idle_is_retried_on_a_new_one(
    make_gateway: Any, make_raw_upstream: Any
) -> None:
    """The keep-alive race: the upstream's idle timeout is shorter than the pool's. It answers,
    then closes the connection as the gateway sends the next request on it."""
    connections = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Closes once the next request arrives, unanswered: as if it had gone idle just before.
        await reader.readuntil(b"\r\n\r\n")

    client = await make_gateway(one_service(await make_raw_upstream(answer_once)))
    assert [(await client.get(f"/r{i}")).status for i in range(3)] == [200, 200, 200]
    assert connections == 3  # each retry on a new connection, not on another pooled one
    assert (await client.post("/p", data=b"x")).status == 502  # may have been received: not replayed


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


async def test_a_target_that_answers_during_its_cooldown_is_used_again_at_once(
    make_gateway: Any, make_upstream: Any
) -> None:
    """A request already under way on a target answers after another's connect to it was refused
    (a restart, an accept queue full for a moment): the target is up, and it is back in the
    rotation now rather than when the cooldown (60 s here) ends."""
    paths: list[str] = []
    release = asyncio.Event()
    connections: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append((asyncio.current_task(), writer))  # type: ignore[arg-type]
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ")[1].decode()
                paths.append(path)
                if path == "/held":
                    await release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    healthy = await make_upstream()
    client = await make_gateway(one_service([f"http://127.0.0.1:{port}", healthy.url], eject_seconds=60))
    try:
        held = asyncio.ensure_future(client.get("/held"))  # round-robin: the first target
        await wait_for(lambda: paths == ["/held"], what="the held request to reach the first target")
        server.close()  # no longer accepting; the held request's connection stays open
        assert (await client.get("/second")).status == 200  # the other target, in turn
        assert (await client.get("/third")).status == 200  # refused by the first: ejected, retried
        assert [r.raw_path for r in healthy.requests] == ["/second", "/third"]

        server = await asyncio.start_server(answer, "127.0.0.1", port)
        release.set()
        assert (await held).status == 200  # the ejected target answered

        assert [(await client.get(f"/after{i}")).status for i in range(2)] == [200, 200]
        # In the rotation again, long before 60 s: one of the two (which one, the retry's turn
        # in the round-robin decides).
        assert paths[0] == "/held" and paths[1:] in (["/after0"], ["/after1"]), paths
    finally:
        release.set()
        server.close()
        for _, writer in connections:  # ends each handler at its next read
            writer.close()
        await asyncio.gather(*(task for task, _ in connections), return_exceptions=True)


def test_a_retry_never_goes_back_to_the_target_that_failed() -> None:
    """A GET whose connection was reset before its answer is retried elsewhere, and the target
    that reset it is not ejected (it took the connection): only ``exclude`` keeps the retry off it."""
    now = 100.0
    urls = ("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")
    upstream = Upstream(ServiceSettings("svc", urls), clock=lambda: now)
    a, b, c = upstream.targets
    upstream.eject(c)
    for _ in range(6):  # every place in the rotation, the ejected target's included
        first = upstream.pick()
        assert first is not None
        assert upstream.pick(exclude=first) not in (first, c, None)
    upstream.eject(b)
    assert upstream.pick(exclude=a) is None  # the one target left is the one that failed
    upstream.close()
