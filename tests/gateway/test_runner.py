"""The production runner's changes to aiohttp's request path keep ``request.app`` working."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.test_utils import TestClient

from gateway.errors import error_middleware
from gateway.keys import request_id_key
from tests.conftest import GatewayTestServer
from tests.helpers import wait_for

marker = web.AppKey("marker", str)


@web.middleware
async def _outer(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    response = await handler(request)
    response.headers["X-Outer-App"] = request.app[marker]
    return response


async def _whoami(request: web.Request) -> web.Response:
    return web.Response(text=request.app[marker] + " " + request.config_dict[marker])


async def test_the_chain_is_the_apps_own_middlewares_and_request_app_is_the_app() -> None:
    app = web.Application(middlewares=[_outer])
    app[marker] = "root"
    app.router.add_get("/", _whoami)
    async with TestClient(GatewayTestServer(app)) as client:
        response = await client.get("/")
        assert response.status == 200
        assert await response.text() == "root root"
        assert response.headers["X-Outer-App"] == "root"
    # aiohttp's current-app layer is gone: the chain is exactly the configured middlewares.
    assert [m for m, _ in app._middlewares_handlers] == [_outer]


async def test_with_a_sub_application_request_app_follows_the_sub_application() -> None:
    app = web.Application(middlewares=[_outer])
    app[marker] = "root"
    sub = web.Application()
    sub[marker] = "sub"
    sub.router.add_get("/", _whoami)
    app.add_subapp("/sub", sub)
    async with TestClient(GatewayTestServer(app)) as client:
        response = await client.get("/sub/")
        assert response.status == 200
        assert await response.text() == "sub sub"
        assert response.headers["X-Outer-App"] == "root"


seen = web.RequestKey("seen", str)


async def _storage(request: web.Request) -> web.Response:
    before = (request.get(seen), request.get(seen, "default"), seen in request)
    request[seen] = "stored"
    after = (request.get(seen), request[seen], seen in request, dict(request))
    return web.Response(text=repr((before, after)))


async def test_the_requests_storage_reads_what_was_stored_and_defaults_otherwise() -> None:
    app = web.Application()
    app.router.add_get("/", _storage)
    async with TestClient(GatewayTestServer(app)) as client:
        for _ in range(2):  # a second request on the same connection starts empty again
            response = await client.get("/")
            assert response.status == 200
            assert await response.text() == repr(
                ((None, "default", False), ("stored", "stored", True, {seen: "stored"}))
            )


async def _fail_after_the_id_is_set(request: web.Request) -> web.Response:
    request[request_id_key] = "req-assigned-1"
    raise RuntimeError("a bug below the error layer")


async def test_the_fallback_500_carries_the_request_id_the_access_log_has() -> None:
    # Only an exception outside error_middleware reaches the runner's own 500; the access log
    # and the span read request[request_id_key], so the answer must carry that id too.
    app = web.Application()
    app.router.add_get("/", _fail_after_the_id_is_set)
    async with TestClient(GatewayTestServer(app)) as client:
        response = await client.get("/")
        assert response.status == 500
        assert await response.json() == {"detail": "Internal Server Error"}
        assert response.headers["X-Request-ID"] == "req-assigned-1"


class _Statuses(AbstractAccessLogger):
    seen: list[int] = []

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.seen.append(response.status)


async def test_a_client_gone_while_its_request_is_read_is_a_499_not_an_unhandled_error(caplog: Any) -> None:
    """A body read that finds the connection lost raises ConnectionResetError before aiohttp has
    cancelled the handler: that is the client leaving, not a bug to log with a traceback."""

    async def reads_after_the_client_left(request: web.Request) -> web.Response:
        request.transport.close()  # as connection_lost leaves it
        raise ConnectionResetError("Connection lost")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/", reads_after_the_client_left)
    _Statuses.seen = []
    server = GatewayTestServer(app, access_log_class=_Statuses, access_log=logging.getLogger("test.access"))
    async with TestClient(server) as client:
        with contextlib.suppress(aiohttp.ClientError):
            await client.post("/", data=b"{}")
        await wait_for(lambda: bool(_Statuses.seen), what="the access line")
    assert _Statuses.seen == [499]
    assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]
