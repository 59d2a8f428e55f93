"""The reverse proxy: one shared ClientSession, bodies streamed both ways, WebSocket relayed.

Small bodies with a declared length (up to ``BUFFER_LIMIT``) are read whole and sent with one
write: that halves the syscalls on the common API call and cannot grow memory with body size.
Everything else is streamed chunk by chunk with flow control on both sockets.

Upstream failures are translated at this one boundary:

    connect refused / DNS       -> eject target, retry once elsewhere if idempotent, else 502
    connect or read timeout     -> eject target, (connect: retry as above), else 504
    closed before the headers   -> retry once if idempotent and nothing was sent, else 502
    closed or reset mid-body    -> the client's response is cut off (connection closed)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from yarl import URL

from .errors import ApiError
from .headers import response_headers, upstream_headers
from .keys import http_client_key, route_key, route_table_key, target_key, upstreams_key
from .routing import strip_route_prefix
from .settings import Route
from .upstream import Upstream

__all__ = ["BUFFER_LIMIT", "CHUNK_SIZE", "http_client_ctx", "proxy_handler", "routing_middleware"]

log = logging.getLogger("gateway.proxy")

BUFFER_LIMIT = 64 * 1024
CHUNK_SIZE = 256 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# aiohttp would otherwise invent these; a proxy sends what the client sent and nothing more.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_WS_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
_WS_MAX_MESSAGE = 16 * 1024 * 1024
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


async def http_client_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one upstream session: bounded keep-alive pool, no cookie jar, no decompression."""
    connector = aiohttp.TCPConnector(
        limit=1024,
        limit_per_host=0,
        keepalive_timeout=30,
        ttl_dns_cache=10,
        enable_cleanup_closed=False,
    )
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        trust_env=False,
    ) as session:
        app[http_client_key] = session
        yield


def routing_middleware(*, proxy: Handler) -> Any:
    """Resolve the route before the rest of the chain, which reads ``request[route_key]``.

    Only requests that reached the catch-all proxy handler are routed; the gateway's own
    endpoints (health, metrics, OpenAPI) get ``None``.
    """

    @web.middleware
    async def routing(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.handler is not proxy:
            request[route_key] = None
            return await handler(request)
        raw_path = request.raw_path
        if not raw_path.startswith("/"):
            raise ApiError(400, "Request target must be a path")
        path = raw_path.partition("?")[0]
        if _has_dot_segment(path):
            raise ApiError(400, "Path must not contain '.' or '..' segments")
        route = request.app[route_table_key].match(path)
        if route is None:
            raise ApiError(404, "No route for this path")
        request[route_key] = route
        return await handler(request)

    return routing


def _has_dot_segment(path: str) -> bool:
    if "." not in path and "%2" not in path and "%2" not in path.lower():
        return False
    for segment in path.split("/"):
        lowered = segment.lower().replace("%2e", ".")
        if lowered in (".", ".."):
            return True
    return False


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    route: Route = request[route_key]
    upstream = request.app[upstreams_key][route.service]
    path = strip_route_prefix(route, request.raw_path)
    headers = upstream_headers(
        request.headers, remote=request.remote, scheme=request.scheme, host=request.host
    )
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _proxy_websocket(request, upstream, path, headers)
    return await _proxy_http(request, upstream, path, headers)


# -- HTTP --------------------------------------------------------------------------------------


class _Body:
    """The request body as the client sends it; remembers whether any of it was consumed."""

    __slots__ = ("_content", "started")

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._content = content
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        content = self._content
        while chunk := await content.readany():
            yield chunk


async def _proxy_http(
    request: web.Request, upstream: Upstream, path: str, headers: CIMultiDict[str]
) -> web.StreamResponse:
    method = request.method
    body: bytes | _Body | None = None
    if request.body_exists:
        length = request.content_length
        if length is not None and length <= BUFFER_LIMIT:
            body = await request.read()
        else:
            body = _Body(request.content)

    session = request.app[http_client_key]
    target = upstream.pick()
    attempts = 2 if method in IDEMPOTENT else 1
    while True:
        if target is None:
            raise ApiError(503, f"No healthy target for service '{upstream.name}'")
        request[target_key] = target
        try:
            upstream_response = await session.request(
                method,
                URL(target.url + path, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=upstream.timeout,
                skip_auto_headers=SKIP_AUTO_HEADERS,
            )
            break
        except _CONNECT_ERRORS as exc:
            upstream.eject(target)
            error = _connect_error(upstream, exc)
        except aiohttp.SocketTimeoutError:
            upstream.eject(target)
            raise ApiError(504, f"Upstream '{upstream.name}' timed out") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # Often a pooled keep-alive connection the upstream had just closed: not ejected.
            error = ApiError(502, f"Upstream '{upstream.name}' closed the connection")
            log.info(
                "upstream disconnected",
                extra={"service": upstream.name, "target": target.url, "error": repr(exc)},
            )
        except aiohttp.ClientError as exc:
            log.warning(
                "upstream error", extra={"service": upstream.name, "target": target.url, "error": repr(exc)}
            )
            raise ApiError(502, f"Upstream '{upstream.name}' sent an invalid response") from None
        attempts -= 1
        if attempts <= 0 or (isinstance(body, _Body) and body.started):
            raise error
        target = upstream.pick(exclude=target)
        if target is None:
            raise error

    upstream.succeeded(target)
    try:
        return await _relay_response(request, upstream_response)
    finally:
        upstream_response.release()


def _connect_error(upstream: Upstream, exc: Exception) -> ApiError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ApiError(504, f"Upstream '{upstream.name}' timed out")
    return ApiError(502, f"Upstream '{upstream.name}' is unreachable")


async def _relay_response(
    request: web.Request, upstream_response: aiohttp.ClientResponse
) -> web.StreamResponse:
    headers = response_headers(upstream_response.headers)
    status = upstream_response.status
    length = upstream_response.content_length
    if (
        length is not None
        and length <= BUFFER_LIMIT
        and request.method != "HEAD"
        and status not in (204, 304)
        and status >= 200
    ):
        try:
            body = await upstream_response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("upstream body failed", extra={"error": repr(exc)})
            raise ApiError(502, "Upstream closed the connection mid-response") from None
        response = web.Response(status=status, reason=upstream_response.reason, body=body)
        # web.Response sets Content-Length itself; setting the copied headers afterwards keeps
        # the upstream's Content-Type (or its absence) untouched.
        del headers["Content-Length"]
        response.headers.extend(headers)
        if "Content-Type" not in headers:
            response.headers.pop("Content-Type", None)
        return response

    response = web.StreamResponse(status=status, reason=upstream_response.reason, headers=headers)
    await response.prepare(request)
    content = upstream_response.content
    try:
        while chunk := await content.read(CHUNK_SIZE):
            await response.write(chunk)
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        if isinstance(exc, aiohttp.ClientConnectionResetError) and request.transport is None:
            return response  # the client left; nothing to cut
        # Headers are gone already: the only honest signal left is to cut the connection, so
        # the client sees a short body (or no final chunk) instead of a clean end.
        log.warning("upstream failed mid-body", extra={"error": repr(exc)})
        transport = request.transport
        if transport is not None:
            transport.close()
        return response
    await response.write_eof()
    return response


# -- WebSocket ---------------------------------------------------------------------------------


async def _proxy_websocket(
    request: web.Request, upstream: Upstream, path: str, headers: CIMultiDict[str]
) -> web.StreamResponse:
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise ApiError(400, "Invalid WebSocket upgrade request")
    protocols = [
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    ]
    for name in list(headers):
        if name.lower() in _WS_HANDSHAKE_HEADERS:
            del headers[name]

    target = upstream.pick()
    if target is None:
        raise ApiError(503, f"No healthy target for service '{upstream.name}'")
    request[target_key] = target
    session = request.app[http_client_key]
    timeout = upstream.service.timeout
    try:
        async with asyncio.timeout(timeout.connect + timeout.read):
            upstream_ws = await session.ws_connect(
                URL(target.url + path, encoded=True),
                headers=headers,
                protocols=protocols,
                autoping=False,
                autoclose=True,
                max_msg_size=_WS_MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
            )
    except aiohttp.WSServerHandshakeError as exc:
        raise ApiError(
            exc.status if exc.status >= 400 else 502, "Upstream refused the WebSocket upgrade"
        ) from None
    except _CONNECT_ERRORS as exc:
        upstream.eject(target)
        raise _connect_error(upstream, exc) from None
    except TimeoutError:
        upstream.eject(target)
        raise ApiError(504, f"Upstream '{upstream.name}' timed out") from None
    except aiohttp.ClientError:
        raise ApiError(502, f"Upstream '{upstream.name}' failed the WebSocket upgrade") from None

    upstream.succeeded(target)
    # Offer the client exactly the subprotocol the upstream chose (from the client's own list).
    client_ws = web.WebSocketResponse(
        protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
        autoping=False,
        autoclose=True,
        max_msg_size=_WS_MAX_MESSAGE,
        compress=False,
    )
    try:
        await client_ws.prepare(request)
        to_upstream = asyncio.create_task(_pump(client_ws, upstream_ws))
        to_client = asyncio.create_task(_pump(upstream_ws, client_ws))
        try:
            await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
            # One side closed and the pump forwarded its close; the other pump ends with it.
            await asyncio.wait((to_upstream, to_client), timeout=10.0)
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
    finally:
        # The client may hang up right after its close frame was answered, which cancels this
        # handler before the pump forwarded that frame: pass the client's close code on here.
        await upstream_ws.close(code=client_ws.close_code or WSCloseCode.OK)
    return client_ws


_WSLike = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: _WSLike, sink: _WSLike) -> None:
    while True:
        msg = await source.receive()
        kind = msg.type
        try:
            if kind is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif kind is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif kind is WSMsgType.PING:
                await sink.ping(msg.data)
            elif kind is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif kind is WSMsgType.CLOSE:
                await sink.close(code=msg.data, message=(msg.extra or "").encode())
                return
            else:  # CLOSING, CLOSED, ERROR: the source is gone without a close code of its own
                await sink.close(code=1011 if kind is WSMsgType.ERROR else 1001)
                return
        except (ConnectionError, aiohttp.ClientConnectionError):
            return
