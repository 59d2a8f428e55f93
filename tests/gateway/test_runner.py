"""The production runner's changes to aiohttp's request path keep ``request.app`` working."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import GatewayTestServer

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
