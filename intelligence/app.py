"""The chat API application factory (persistence arrives with its own issue)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["create_app"]


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", health)
    return app
