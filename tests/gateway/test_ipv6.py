"""IPv6 and dual-stack, through real sockets on both loopbacks (127.0.0.1 and ::1): the listening
socket and IPv4 clients of a dual-stack socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import one_service, running_gateway, wait_for


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
