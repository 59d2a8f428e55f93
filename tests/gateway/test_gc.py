"""The request path makes no reference cycles: what ``gateway.server.tune_gc`` relies on.

The gateway raises the collector's threshold (``GC_THRESHOLD``) because a server with requests in
flight crosses the default one all the time. That is free only while requests leave nothing for
the collector to find: objects that refcounting cannot free would pile up between collections.
"""

from __future__ import annotations

import gc
from typing import Any

from aiohttp import web

from gateway.server import GC_THRESHOLD, tune_gc
from tests.helpers import one_service

REQUESTS = 300


async def _exchanges(client: Any, count: int) -> None:
    for index in range(count):
        method, path = ("GET", "/small") if index % 2 else ("POST", "/big")
        async with client.request(
            method, path, data=b"b" * 100_000 if method == "POST" else None
        ) as response:
            assert response.status == 200
            await response.read()


async def test_proxied_requests_leave_no_reference_cycles(make_gateway: Any, make_upstream: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.path == "/big":  # streamed both ways: a body over the proxy's buffer limit
            return web.Response(body=b"r" * 100_000)
        return web.Response(body=b"r" * 1024, content_type="application/octet-stream")

    client = await make_gateway(one_service((await make_upstream(reply)).url))
    await _exchanges(client, 20)  # pools, caches and lazily made objects exist after these
    gc.collect()
    gc.disable()
    try:
        await _exchanges(client, REQUESTS)
        found = gc.collect()
    finally:
        gc.enable()

    # The test's own client, upstream and event loop live in this process too; a cycle per
    # request anywhere would show as REQUESTS or more.
    assert found < REQUESTS // 10, f"{found} objects in reference cycles after {REQUESTS} requests"


def test_tune_gc_raises_the_threshold_and_freezes_start_up_objects() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()  # the suite's own (conftest.py)
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        if frozen:
            gc.freeze()
        gc.set_threshold(*before)
