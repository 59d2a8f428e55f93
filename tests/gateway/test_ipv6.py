"""IPv6 and dual-stack, through real sockets on both loopbacks (127.0.0.1 and ::1): the listening
socket, IPv4 clients of a dual-stack socket, and IPv6 upstream targets."""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import server
from tests.helpers import free_port, one_service, running_gateway, wait_for


@pytest.fixture
def refused_ipv6_url() -> Iterator[str]:
    """An IPv6 loopback port that is bound but not listening: a connect there is refused."""
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        yield f"http://[::1]:{sock.getsockname()[1]}"


async def _status(url: str, **headers: str) -> int:
    # A fresh connection each time: with workers, another one may take it.
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        await response.read()
        return response.status


def _access_lines(log: Path, path: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line["msg"] == "request" and line["path"] == path]


@pytest.mark.parametrize("host", ["::", "[::]"])
async def test_listening_on_every_ipv6_address_takes_ipv4_clients_too(
    make_upstream: Any, tmp_path: Path, host: str
) -> None:
    """``GATEWAY_HOST=::`` on a dual-stack pod: asyncio sets IPV6_V6ONLY, so IPv4 clients (the
    kubelet's probes, half the Service's traffic) were refused. ``[::]`` was refused at start."""
    upstream = await make_upstream()
    async with running_gateway(one_service(upstream.url), tmp_path, host=host) as gateway:
        assert await _status(gateway.url_at("::1") + "/x") == 200
        assert await _status(gateway.url_at("127.0.0.1") + "/x") == 200


async def test_workers_on_every_ipv6_address_take_both_families(make_upstream: Any, tmp_path: Path) -> None:
    upstream = await make_upstream()
    config = one_service(upstream.url)
    async with running_gateway(config, tmp_path, host="::", GATEWAY_WORKERS="2") as gateway:
        for _ in range(4):
            assert await _status(gateway.url_at("127.0.0.1") + "/x") == 200
            assert await _status(gateway.url_at("::1") + "/x") == 200


@pytest.mark.parametrize("trusted", ["127.0.0.0/8", "::ffff:127.0.0.0/104"])
async def test_an_ipv4_client_of_a_dual_stack_socket_is_named_by_its_ipv4_address(
    make_upstream: Any, tmp_path: Path, trusted: str
) -> None:
    """It arrives as ``::ffff:127.0.0.1``: that went upstream in X-Forwarded-For and into the
    access log, where every IPv4 address is written plainly (and what Go's listeners report).
    A TRUSTED_PROXIES entry written IPv4-mapped matches it too; it used to match nothing."""
    upstream = await make_upstream()
    config = one_service(upstream.url)
    async with running_gateway(config, tmp_path, host="::", TRUSTED_PROXIES=trusted) as gateway:
        headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "api.example"}
        assert await _status(gateway.url_at("127.0.0.1") + "/x", **headers) == 200
        await wait_for(lambda: bool(_access_lines(gateway.log, "/x")), what="the access line")
        (line,) = _access_lines(gateway.log, "/x")
    (seen,) = upstream.requests
    assert seen.values("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert seen.values("X-Forwarded-Host") == ["api.example"]  # the peer matched 127.0.0.0/8
    assert line["remote"] == "127.0.0.1"


async def test_ipv6_targets_are_balanced_retried_and_ejected(
    make_gateway: Any, make_upstream: Any, refused_ipv6_url: str
) -> None:
    first, second = await make_upstream(host="::1"), await make_upstream(host="::1")
    client = await make_gateway(one_service([refused_ipv6_url, first.url, second.url]))

    statuses = [(await client.post(f"/r{i}", data=b"x")).status for i in range(4)]

    assert statuses == [200] * 4  # the refused connect retried on the next target
    assert len(first.requests) + len(second.requests) == 4 and first.requests and second.requests
    port = first.url.rpartition(":")[2]
    assert first.requests[0].values("Host") == [f"[::1]:{port}"]
    detailed = await (await client.get("/health/detailed")).json()
    targets = detailed["components"]["svc"]["targets"]
    assert targets[refused_ipv6_url]["ejected"] is True
    assert targets[first.url]["status"] == targets[second.url]["status"] == "healthy"


async def test_a_websocket_is_relayed_to_an_ipv6_target(make_gateway: Any, make_upstream: Any) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"echo {message.data}")
        return ws

    upstream = await make_upstream(echo, read_body=False, host="::1")
    client = await make_gateway(one_service(upstream.url))

    async with client.ws_connect("/ws") as ws:
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=5) == "echo hi"


async def test_ipv6_clients_share_a_rate_limit_per_64_and_mapped_ones_are_ipv4(
    make_gateway: Any, make_upstream: Any
) -> None:
    """The documented bucket (docs/edge.md): a host owns its /64 and picks addresses from it at
    will (RFC 8981), so a per-address limit would be no limit. ``::ffff:a.b.c.d`` is a.b.c.d."""
    upstream = await make_upstream()
    config = one_service(upstream.url, rate_limit="1/minute")
    client = await make_gateway(config, {"TRUSTED_PROXIES": "127.0.0.1"})

    async def status(address: str) -> int:
        return (await client.get("/x", headers={"X-Forwarded-For": address})).status

    assert await status("2001:db8::1") == 200
    assert await status("2001:db8::2") == 429  # same /64
    assert await status("2001:db8:0:1::1") == 200  # the next /64
    assert await status("203.0.113.7") == 200
    assert await status("::ffff:203.0.113.7") == 429


async def test_without_ipv6_in_the_kernel_every_ipv6_address_means_every_ipv4_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The image listens on ``::``; a host booted with ``ipv6.disable=1`` has no AF_INET6 at all
    (EAFNOSUPPORT, simulated here: this machine has IPv6). Go's listeners fall back to IPv4 there,
    and so does the gateway, saying so, rather than refusing to start."""
    real_socket = socket.socket

    def without_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", without_ipv6)
            site = server._site(runner, server.Listener(app, "::", port, "gateway"), reuse_port=False)
        await site.start()
        assert await _status(f"http://127.0.0.1:{port}/") == 200
    finally:
        await runner.cleanup()
    assert "this kernel has no IPv6: listening on 0.0.0.0" in caplog.text
