"""Typed keys for state kept on the application and on each request, gathered in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    pass

settings_key = web.AppKey("settings", "Settings")
route_table_key = web.AppKey("route_table", "RouteTable")
upstreams_key = web.AppKey("upstreams", "dict[str, Upstream]")
http_client_key = web.AppKey("http_client", aiohttp.ClientSession)
lifecycle_key = web.AppKey("lifecycle", "Lifecycle")
tracing_key = web.AppKey("tracing", "Tracing")

route_key = web.RequestKey("route", "Route | None")
target_key = web.RequestKey("target", "Target")
request_id_key = web.RequestKey("request_id", str)
# The request body, already read and validated, to forward as it is.
body_key = web.RequestKey("body", bytes)

__all__ = [
    "body_key",
    "http_client_key",
    "lifecycle_key",
    "request_id_key",
    "route_key",
    "route_table_key",
    "settings_key",
    "target_key",
    "tracing_key",
    "upstreams_key",
]
