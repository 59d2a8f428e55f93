"""Typed keys for state kept on the application and on each request, gathered in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

settings_key = web.AppKey("settings", "Settings")
# The route table and upstreams in force; a reload (SIGHUP) swaps them together.
route_table_key = web.AppKey("route_table", "LiveTable")
http_client_key = web.AppKey("http_client", aiohttp.ClientSession)
lifecycle_key = web.AppKey("lifecycle", "Lifecycle")
tracing_key = web.AppKey("tracing", "Tracing")
limiter_key = web.AppKey("limiter", "Limiter")

route_key = web.RequestKey("route", "Route | None")
# The route's upstream, from the same table as the route (set by the routing middleware).
upstream_key = web.RequestKey("upstream", "Upstream")
target_key = web.RequestKey("target", "Target")
request_id_key = web.RequestKey("request_id", str)
# The request's SERVER span (ids only when untraced), for the access log line after it ends.
span_key = web.RequestKey("span", "SpanRef")
# The request body, already read and validated, to forward as it is.
body_key = web.RequestKey("body", bytes)
# Set by gateway.middleware.auth after a token is verified; absent for anonymous requests.
auth_key = web.RequestKey("auth", "Identity")
# Set with auth_key when the token came in the access_token query parameter: the proxy takes the
# parameter out of the query it forwards.
query_token_key = web.RequestKey("query_token", bool)
client_ip_key = web.RequestKey("client_ip", str)
# The rate-limit headers for this request's response, written by on_response_prepare.
ratelimit_headers_key = web.RequestKey("ratelimit_headers", "dict[str, str]")
# A request whose "Expect: 100-continue" is not answered yet: its message as parsed, to restore
# when the 100 is sent (gateway.httpserver.send_continue).
continue_key = web.RequestKey("continue", "RawRequestMessage | None")
# The status of an answer whose head went out before it was complete (a streamed relay, a
# WebSocket's 101): what the access log and the span say if the handler is then cancelled.
sent_status_key = web.RequestKey("sent_status", int)
# A WebSocket session's message bytes, client to upstream and upstream to client: the access log
# adds them to the handshake's, as nginx and Envoy count what crossed an upgraded connection.
relayed_key = web.RequestKey("relayed", "list[int]")

__all__ = [
    "auth_key",
    "body_key",
    "client_ip_key",
    "continue_key",
    "http_client_key",
    "lifecycle_key",
    "limiter_key",
    "query_token_key",
    "ratelimit_headers_key",
    "relayed_key",
    "request_id_key",
    "route_key",
    "route_table_key",
    "sent_status_key",
    "settings_key",
    "span_key",
    "target_key",
    "tracing_key",
    "upstream_key",
]
