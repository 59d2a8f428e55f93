"""The reverse proxy: one shared ClientSession, bodies streamed both ways, WebSocket relayed.

Small bodies with a declared length (up to ``BUFFER_LIMIT``) are read whole and sent with one
write: that halves the syscalls on the common API call and cannot grow memory with body size.
Everything else is streamed chunk by chunk with flow control on both sockets.

Upstream failures are translated at this one boundary:

    connect refused / DNS       -> eject target, retry once elsewhere (nothing was sent), else 502
    TLS handshake failed        -> logged with the reason, then as a refused connect
    no socket for it (EMFILE)   -> 503 with Retry-After; the gateway's shortage, target kept
    connect timeout             -> eject target, retry as above, else 504
    read timeout                -> 504, target kept (it is up; one endpoint is slow)
    closed before the headers   -> retry once if idempotent (or nothing was sent), else 502
    closed or reset mid-body    -> the client's response is cut off (connection closed)

A WebSocket upgrade follows the same rules up to its 101 (``_ws_connect``): a failed connect, or
a connection closed before any answer (the upgrade is a GET), is retried once elsewhere; no answer
to the handshake within the read timeout is a 504, target kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, NoReturn
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import RawResponseMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler
from aiozipkin.span import SpanAbc
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from . import wsrelay
from .clientip import ip_address, is_trusted_peer
from .errors import ApiError, body_too_large
from .headers import VIA, VIA_HTTP10, response_headers, serialize_head, upstream_headers
from .httpserver import KNOWN_HOSTS, BodyTimeout, check_host, read_body_chunk, send_continue
from .keys import (
    auth_key,
    body_key,
    http_client_key,
    lifecycle_key,
    query_token_key,
    relayed_key,
    request_id_key,
    route_key,
    route_table_key,
    sent_status_key,
    settings_key,
    span_key,
    target_key,
    tracing_key,
    upstream_key,
)
from .metrics import metrics_key
from .middleware.auth import identity_headers, without_query_token
from .middleware.cors import ALLOWED_METHODS
from .middleware.request_id import REQUEST_ID_HEADER
from .middleware.tracing import ClientSpan, SpanRef, current_trace, downstream_headers, remote_endpoint
from .pool import (
    LOCAL_SHORTAGES,
    WHOLE_LIMIT,
    ConnectFailed,
    ConnectTimeout,
    OutOfSockets,
    TlsFailed,
    UpstreamProtocol,
    exchange,
    tls_reason,
)
from .routing import (
    has_dot_segment,
    has_encoded_control,
    may_read_otherwise,
    shown_target,
    strip_route_prefix,
)
from .settings import Route
from .upstream import Target, Upstream

__all__ = [
    "BUFFER_LIMIT",
    "POOL_SWEEP_SECONDS",
    "BodyTooLarge",
    "close_when_the_connection_cannot_go_on",
    "http_client_ctx",
    "proxy_handler",
    "routing_middleware",
    "upstream_pools_ctx",
]

log = logging.getLogger("gateway.proxy")

# The largest body read whole (and relayed in one write): the size up to which the pool hands an
# answer over whole with its head, so one number decides both.
BUFFER_LIMIT = WHOLE_LIMIT
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# aiohttp would otherwise invent these; a proxy sends what the client sent and nothing more.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_WS_HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
# The upstream's 101 headers that belong to its own handshake with the gateway: the client's are
# the gateway's to make.
_WS_101_OWN_HEADERS = frozenset(
    {"sec-websocket-accept", "sec-websocket-extensions", "sec-websocket-protocol", "content-length"}
)
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "TRACE"})
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


async def http_client_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one upstream session (WebSocket sessions, health checks, Zipkin): no cookie jar, no
    decompression, and no cap on connections held at once.

    A WebSocket holds its upstream connection for its whole life. With aiohttp's cap (it was
    1024, for the whole process) the 1025th session's handshake queued for a free connection
    until it got a 504 that blamed the upstream, and health checks queued behind the sessions
    too. Proxied HTTP requests have no such cap either (``pool.py``): the process's open-files
    limit is the bound, and running out of it is a 503 (``_out_of_sockets``)."""
    connector = aiohttp.TCPConnector(
        limit=0,
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
        trace_configs=[_refusal_trace(), _connect_deadline_trace()],
    ) as session:
        app[http_client_key] = session
        yield


POOL_SWEEP_SECONDS = 5.0


async def upstream_pools_ctx(app: web.Application) -> AsyncIterator[None]:
    """Idle upstream connections are closed after their idle timeout even when traffic stops, and
    every pooled connection is closed on shutdown."""

    async def sweep() -> None:
        while True:
            await asyncio.sleep(POOL_SWEEP_SECONDS)
            for upstream in app[route_table_key].current.upstreams.values():
                for target in upstream.targets:
                    target.pool.sweep()

    sweeper = asyncio.create_task(sweep(), name="upstream-pool-sweeper")
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        for upstream in app[route_table_key].current.upstreams.values():
            upstream.close()


def routing_middleware(*, proxy: Handler) -> Any:
    """Resolve the route before the rest of the chain, which reads ``request[route_key]``.

    Only requests that reached the catch-all proxy handler are routed; the gateway's own
    endpoints (health, metrics, OpenAPI) get ``None``.
    """

    @web.middleware
    def routing(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        version = request.version
        if not HttpVersion10 <= version <= HttpVersion11:
            _refuse_version(request, version)
        if request.match_info.handler is not proxy:
            request[route_key] = None
            return handler(request)
        raw_path = request.raw_path
        if not raw_path.startswith("/"):
            if raw_path == "*" and request.method == "OPTIONS":
                request[route_key] = None
                return _server_options()
            raise ApiError(400, "Request target must be a path or an absolute http(s) URI")
        if "#" in raw_path:
            # Not part of a request target (RFC 9112 section 3.2), and every upstream drops it as
            # a fragment: /a/admin#x would be routed as /a's but read upstream as /a/admin.
            raise ApiError(400, "Request target must not contain a fragment ('#')")
        transfer_encoding = request.headers.get("Transfer-Encoding")
        if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
            # The parser accepts "gzip, chunked" and strips only the chunking; forwarding the
            # rest would hand the upstream a coded body labelled as plain.
            raise ApiError(400, "Unsupported Transfer-Encoding: only 'chunked' is accepted")
        if request.method in _NO_BODY_METHODS and request.body_exists:
            # No defined meaning, and the classic way to hide a request from a server that skips
            # such bodies: refused rather than forwarded.
            raise ApiError(400, f"A {request.method} request must not have a body")
        if _overrides_method(request):
            raise ApiError(
                400,
                "Method overrides (X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override, a "
                "_method parameter) are not accepted: send the request with its own method",
            )
        path = raw_path.partition("?")[0]
        if has_dot_segment(path):
            raise ApiError(400, "Path must not contain '.' or '..' segments, encoded or not")
        if "%" in path and has_encoded_control(path):
            raise ApiError(400, "Path must not contain control characters, encoded or not")
        table = request.app[route_table_key].current
        route = table.match(path)
        if route is None:
            raise ApiError(404, "No route for this path")
        if may_read_otherwise(path) and not table.same_for_every_reading(path, route):
            raise ApiError(
                400,
                "Path is ambiguous: decoded, normalised or read without case, it would match another route",
            )
        request[route_key] = route
        request[upstream_key] = table.upstreams.get(route.service)  # type: ignore[assignment]
        return handler(request)

    return routing


# Headers and a query parameter by which Symfony and Laravel, Rails (Rack::MethodOverride), Express
# (method-override), gorilla/handlers and ASP.NET Core's middleware take a POST for another
# method. The gateway decides by the method on the request line which body schema applies and
# which content types are accepted: POST /api/v1/clusters/x, which has no schema, would reach such a
# backend as a PATCH whose body was never checked.
# istr: asked of every request, a name multidict need not fold first.
_OVERRIDE, _HTTP_METHOD, _METHOD_OVERRIDE = (
    istr(name) for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
)
_METHOD_PARAMETER = "_method"


def _overrides_method(request: web.Request) -> bool:
    headers = request.headers
    if _OVERRIDE in headers or _HTTP_METHOD in headers or _METHOD_OVERRIDE in headers:
        return True
    if request.method != "POST" or "method" not in request.raw_path:  # they honour it on POST only
        return False
    query = request.raw_path.partition("?")[2]
    return any(unquote_plus(part.partition("=")[0]) == _METHOD_PARAMETER for part in query.split("&"))


# The methods the gateway forwards, as the CORS preflight lists them.
_ALLOW = ", ".join(ALLOWED_METHODS)


def _options_answer() -> web.Response:
    return web.Response(status=200, headers={"Allow": _ALLOW})


async def _server_options() -> web.StreamResponse:
    """``OPTIONS *``: a question about the server as a whole (RFC 9110 section 9.3.7), which
    the gateway answers itself; it is no route's, and no upstream's, to answer."""
    return _options_answer()


def _refuse_version(request: web.Request, version: HttpVersion) -> NoReturn:
    """HTTP/0.9, or "HTTP/2.0" on an HTTP/1 connection: a 400 in HTTP/1.1, which is what this
    connection speaks (aiohttp answers in the request's version, which no client of either reads
    in this framing), and the connection closed."""
    request._message = request._message._replace(version=HttpVersion11, should_close=True)
    request._cache["version"] = HttpVersion11  # read, and cached, by the caller
    raise ApiError(400, f"HTTP/{version.major}.{version.minor} is not spoken here, HTTP/1.1 is")


def close_when_the_connection_cannot_go_on(request: web.Request, response: web.StreamResponse) -> None:
    """Part of ``on_response_prepare``: close the connection after a request that asked to upgrade
    it, or that sent its body chunked.

    aiohttp stops parsing a connection after a request with ``Connection: Upgrade`` (``h2c``,
    anything but a WebSocket the upstream accepts): whatever the client sends next would wait,
    unanswered, until the keep-alive timeout. Closing says so at once.

    aiohttp's C parser keeps the last trailer field of a chunked body and hands it to the next
    request on the connection as a header of that request. Behind a proxy that shares one
    connection between its clients, that is one client's header on another's request; closing
    drops whatever was parsed after the chunked request, and the client sends it again on a
    new connection.
    """
    if (response.status != 101 and "Upgrade" in request.headers) or request._message.chunked:
        response.force_close()
        # The hook runs after aiohttp wrote its framing headers: say it ourselves.
        response.headers["Connection"] = "close"


def _as_the_trusted_proxy_received_it(
    headers: CIMultiDictProxy[str], scheme: str, host: str
) -> tuple[str, str]:
    """Scheme and host of the request as a proxy in ``TRUSTED_PROXIES`` (a load balancer that
    terminates TLS) received it, from its ``X-Forwarded-Proto`` / ``X-Forwarded-Host``: the
    backend builds its links and redirects from them, and ``http`` there would be wrong for every
    client that came in over HTTPS. Kong (``trusted_ips``), Traefik (``forwardedHeaders``) and
    Envoy (trusted hops) keep them the same way. One value each, ``http``/``https`` and a valid
    host; anything else is ignored and the gateway's own connection is described instead."""
    protos = headers.getall("X-Forwarded-Proto", ())
    if len(protos) == 1 and protos[0].strip().lower() in ("http", "https"):
        scheme = protos[0].strip().lower()
    hosts = headers.getall("X-Forwarded-Host", ())
    if len(hosts) == 1 and check_host(hosts[0].strip()):
        host = hosts[0].strip()
    return scheme, host


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    route: Route = request[route_key]
    upstream = request[upstream_key]
    path = strip_route_prefix(route, request.raw_path)
    host = request.host
    if host not in KNOWN_HOSTS and not check_host(host):
        # RFC 9112 section 3.2; it would go upstream as X-Forwarded-Host, which backends build
        # links from.
        raise ApiError(400, "Invalid Host header")
    scheme = request.scheme
    trusted = request.app[settings_key].trusted_proxies
    trusted_peer = bool(trusted) and is_trusted_peer(request.remote, trusted)
    if trusted_peer:
        scheme, host = _as_the_trusted_proxy_received_it(request.headers, scheme, host)
    headers = upstream_headers(
        request.headers,
        remote=request.remote,
        scheme=scheme,
        host=host,
        via=VIA if request.version == HttpVersion11 else VIA_HTTP10,
        trusted_peer=trusted_peer,
    )
    headers[REQUEST_ID_HEADER] = request[request_id_key]
    if request.get(auth_key) is not None:
        headers.update(identity_headers(request))
        if request.get(query_token_key):
            path = without_query_token(path)  # the gateway took the credential; it goes no further
    if request.method in _MAX_FORWARDS_METHODS and "Max-Forwards" in headers:
        answer = _count_down_max_forwards(request, headers)
        if answer is not None:
            return answer
    if request.headers.get("Upgrade", "").lower() == "websocket":
        # The session's CLIENT span: the upstream connection, from the handshake to the close.
        with ClientSpan(request.app[tracing_key], f"GET {route.prefix}", upstream.name) as span:
            if span is not None:
                headers.update(downstream_headers(span))
                if span.record is not None:
                    span.record.tag("http.method", "GET")
            return await _proxy_websocket(request, upstream, path, headers, span)
    return await _proxy_http(request, route, upstream, path, headers)


_MAX_FORWARDS_METHODS = frozenset({"TRACE", "OPTIONS"})
# The most the gateway passes on (RFC 9110 section 7.6.2: the recipient's "maximum supported value").
_MAX_FORWARDS_CAP = 255
# Not reflected by a TRACE the gateway answers itself (RFC 9110 section 9.3.8: likely sensitive).
_NOT_REFLECTED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def _count_down_max_forwards(request: web.Request, headers: CIMultiDict[str]) -> web.StreamResponse | None:
    """RFC 9110 section 7.6.2, for TRACE and OPTIONS: an intermediary that receives
    ``Max-Forwards: 0`` answers as the final recipient; a larger value is passed on one lower."""
    value = headers["Max-Forwards"]
    if not (value.isascii() and value.isdigit()):
        raise ApiError(400, "Max-Forwards must be a non-negative integer")
    remaining = int(value) if len(value) < 4 else _MAX_FORWARDS_CAP + 1
    if remaining:
        headers["Max-Forwards"] = str(min(remaining - 1, _MAX_FORWARDS_CAP))
        return None
    if request.method == "OPTIONS":
        return _options_answer()
    # TRACE: the request as the gateway received it, credentials left out, as message/http.
    version = request.version
    lines = [f"TRACE {request.raw_path} HTTP/{version.major}.{version.minor}".encode()]
    lines.extend(
        name + b": " + value for name, value in request.raw_headers if name.lower() not in _NOT_REFLECTED
    )
    return web.Response(status=200, body=b"\r\n".join(lines) + b"\r\n\r\n", content_type="message/http")


# -- HTTP --------------------------------------------------------------------------------------


class _Body:
    """The request body as the client sends it, counted against the route's limit as it streams.

    The chunk that would cross the limit is never forwarded: the upstream sees at most ``limit``
    bytes, then a connection that ends, and the client gets 413.
    """

    __slots__ = ("_content", "_limit", "exceeded", "started", "timed_out")

    def __init__(self, content: aiohttp.StreamReader, limit: int | None) -> None:
        self._content = content
        self._limit = limit
        self.started = False
        self.exceeded = False
        self.timed_out = False

    async def _read(self, content: aiohttp.StreamReader) -> bytes:
        try:
            return await read_body_chunk(content)
        except BodyTimeout:
            self.timed_out = True
            raise

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        content, limit, sent = self._content, self._limit, 0
        while chunk := await self._read(content):
            sent += len(chunk)
            if limit is not None and sent > limit:
                self.exceeded = True
                raise BodyTooLarge(limit)
            yield chunk


async def _read_small(content: aiohttp.StreamReader) -> bytes:
    chunks = []
    while chunk := await read_body_chunk(content):
        chunks.append(chunk)
    return b"".join(chunks)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body exceeds {limit} bytes")
        self.limit = limit


async def _proxy_http(
    request: web.Request, route: Route, upstream: Upstream, path: str, headers: CIMultiDict[str]
) -> web.StreamResponse:
    method = request.method
    body: bytes | _Body | None = request.get(body_key)
    if body is None and request.body_exists:
        length = request.content_length
        limit = route.max_body
        if length is not None and limit is not None and length > limit:
            raise body_too_large(limit)
        await send_continue(request)
        if length is not None and length <= BUFFER_LIMIT:
            body = await _read_small(request.content)
        else:
            body = _Body(request.content, limit)
    if isinstance(body, bytes):
        headers["Content-Length"] = str(len(body))

    with ClientSpan(request.app[tracing_key], f"{method} {route.prefix}", upstream.name) as span:
        if span is not None:
            headers.update(downstream_headers(span))
            if span.record is not None:
                span.record.tag("http.method", method)  # and http.path once a target is chosen
        started = perf_counter()
        try:
            target, protocol, message, payload = await _send(request, upstream, path, headers, body, span)
        except BaseException:
            # No answer (an error, or the client left): the span still names the target tried.
            tried = request.get(target_key)
            if span is not None and span.record is not None and tried is not None:
                _name_target(span.record, upstream, tried, None, path)
            raise
        if message.code == 101:
            # Upgrade is hop-by-hop and never forwarded here (WebSockets take their own path):
            # the client asked for nothing to switch to.
            protocol.close()
            _count_failure(request, "invalid")
            raise ApiError(502, f"Upstream '{upstream.name}' sent an invalid response")
        request.app[metrics_key].record_upstream(upstream.name, perf_counter() - started)
        if span is not None and span.record is not None:
            span.record.tag("http.status_code", str(message.code))
            if message.code >= 500:  # as on the SERVER span, and as Envoy marks an upstream's 5xx
                span.record.tag("error", str(message.code))
            _name_target(span.record, upstream, target, protocol, path)
        if type(payload) is bytes:  # the whole answer came with its head: nothing more to read
            response = _whole_response(
                message.code, message.reason, response_headers(message.headers), payload
            )
            target.pool.release(protocol)
            return response
        try:
            response = await _relay_response(request, message, payload)
        except BaseException:
            protocol.close()
            raise
        if payload.is_eof():
            target.pool.release(protocol)
        else:
            protocol.close()
        return response


def _name_target(
    record: SpanAbc, upstream: Upstream, target: Target, protocol: UpstreamProtocol | None, path: str
) -> None:
    """The CLIENT span's other side: the target's URL as a tag, and as Zipkin's remote endpoint
    the service, the target's address (for a host name, the one the connection reached, when
    there is one) and port, as Brave's HTTP clients record them; and, as Brave tags a call, the
    path as that target receives it (its own base path first; shown as the SERVER span's)."""
    record.tag("peer.target", target.url)
    record.tag("http.path", target.base_path + shown_target(path))
    pool = target.pool
    host: str | None = pool.host
    if ip_address(host) is None:
        transport = protocol.transport if protocol is not None else None
        peer = transport.get_extra_info("peername") if transport is not None else None
        host = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], str) else None
    remote_endpoint(record, upstream.name, host, pool.port)


async def _send(
    request: web.Request,
    upstream: Upstream,
    path: str,
    headers: CIMultiDict[str],
    body: bytes | _Body | None,
    span: SpanRef | None,
) -> tuple[Target, UpstreamProtocol, RawResponseMessage, StreamReader | bytes]:
    """Send the request to a healthy target, retrying once elsewhere when that is safe.

    Each failed attempt is an annotation on the call's span (``connect http://10.0.0.7:9001``):
    the span's tags name only the target that answered, or the last one tried."""
    method = request.method
    # A stream of unknown length goes upstream chunked; a declared length is kept as sent.
    chunked = isinstance(body, _Body) and request.content_length is None
    timeout = upstream.service.timeout
    target = upstream.pick()
    attempts, fresh = 2, False
    while True:
        if target is None:
            raise ApiError(503, f"No healthy target for service '{upstream.name}'")
        request[target_key] = target
        headers["Host"] = target.pool.host_header
        protocol: UpstreamProtocol | None = None
        try:
            protocol = await target.pool.acquire(timeout.connect, fresh=fresh)
            message, payload = await exchange(
                protocol,
                method=method,
                target=target.base_path + path,
                headers=headers,
                body=body,
                chunked=chunked,
                read_timeout=timeout.read,
            )
        except (OSError, TimeoutError, aiohttp.ClientError, HttpProcessingError, BodyTooLarge) as exc:
            if protocol is not None:
                protocol.close()
            if isinstance(body, _Body) and body.exceeded:
                raise body_too_large(request[route_key].max_body or 0) from None
            if isinstance(body, _Body) and body.timed_out:
                raise BodyTimeout from None
            error, kind = _upstream_failure(upstream, target, exc)
            if kind != "local":  # the gateway's own shortage is no failure of the upstream's
                request.app[metrics_key].upstream_errors.labels(upstream.name, kind).inc()
            if span is not None and span.record is not None:
                span.record.annotate(f"{kind} {target.url}")
            attempts -= 1
            # A failed connect sent nothing: any request may go elsewhere. A connection closed
            # before any answer may have carried the request to the upstream: idempotent only.
            sent_nothing = isinstance(exc, ConnectTimeout | ConnectFailed)
            retryable = sent_nothing or (kind == "reset" and method in IDEMPOTENT)
            if not retryable or attempts <= 0 or (isinstance(body, _Body) and body.started):
                raise error from None
            retry = upstream.pick(exclude=target)
            if retry is None and kind == "reset":
                # Most often a pooled connection the upstream closed as it went idle (its idle
                # timeout is shorter than the pool's): the same target, on a new connection.
                retry, fresh = target, True
            if retry is None:
                raise error from None
            target = retry
            continue
        except BaseException:
            # Cancelled (the client went away) while connecting or waiting for the head: the
            # connection is dropped now, not left open for the garbage collector to find.
            if protocol is not None:
                protocol.close()
            raise
        upstream.succeeded(target)
        return target, protocol, message, payload


def _upstream_failure(upstream: Upstream, target: Target, exc: BaseException) -> tuple[ApiError, str]:
    """Translate a failure before the response head: the error, and its kind for metrics
    (connect, timeout, reset, invalid)."""
    name = upstream.name
    if isinstance(exc, OutOfSockets):
        return _out_of_sockets(name, exc), "local"
    if isinstance(exc, ConnectTimeout):
        # Nothing reached the upstream, and the target is likely down.
        upstream.eject(target)
        return ApiError(504, f"Upstream '{name}' timed out"), "timeout"
    if isinstance(exc, TlsFailed):
        upstream.eject(target)
        return _tls_failed(name, target, str(exc)), "connect"
    if isinstance(exc, ConnectFailed):
        upstream.eject(target)
        return ApiError(502, f"Upstream '{name}' is unreachable"), "connect"
    if isinstance(exc, aiohttp.SocketTimeoutError | TimeoutError):
        # Not ejected: the target took the connection and is up; one slow endpoint must not take
        # a service (all of it, when it has one target) out of rotation for everyone.
        return ApiError(504, f"Upstream '{name}' timed out"), "timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | ConnectionError):
        log.info("upstream disconnected", extra={"service": name, "target": target.url, "error": repr(exc)})
        return ApiError(502, f"Upstream '{name}' closed the connection"), "reset"
    log.warning(
        "upstream error", extra={"service": name, "target": target.url, "error": repr(exc)}, exc_info=exc
    )
    return ApiError(502, f"Upstream '{name}' sent an invalid response"), "invalid"


def _tls_failed(name: str, target: Target, reason: str) -> ApiError:
    """A target whose TLS handshake failed: most often the operator's to fix (the CA to trust, a
    renewed certificate), so the log says which target and what OpenSSL objected to, as nginx's
    "SSL_do_handshake() failed ... while SSL handshaking to upstream" does. The client gets a 502
    that names neither: the reason is about the gateway's trust, not the client's request."""
    log.warning(
        "TLS handshake with an upstream failed",
        extra={"service": name, "target": target.url, "error": reason},
    )
    return ApiError(502, f"Upstream '{name}' failed the TLS handshake")


# When the gateway runs out of file descriptors every request that needs a new upstream connection
# fails the same way; one warning per interval says so, with how many it stands for.
OUT_OF_SOCKETS_LOG_INTERVAL = 10.0
_out_of_sockets_log = {"next": 0.0, "suppressed": 0}


def _out_of_sockets(name: str, exc: OSError) -> ApiError:
    """The gateway could not open a socket to an upstream (EMFILE and the like): its own shortage,
    not the upstream's fault. The target is not ejected (it would stay out of the rotation after
    descriptors come back), the failure is not counted against the upstream, and the client gets
    a 503 it may retry, as Envoy answers an overflow, instead of a 502 blaming the upstream."""
    state, now = _out_of_sockets_log, time.monotonic()
    if now >= state["next"]:
        log.warning(
            "cannot open a connection to an upstream: the gateway is out of sockets "
            "(raise its open-files limit, ulimit -n / RLIMIT_NOFILE, or its replicas)",
            extra={"service": name, "error": os.strerror(exc.errno or 0), "suppressed": state["suppressed"]},
        )
        state["next"], state["suppressed"] = now + OUT_OF_SOCKETS_LOG_INTERVAL, 0
    else:
        state["suppressed"] += 1
    return ApiError(
        503,
        f"The gateway cannot open a connection to upstream '{name}' now: too many open connections",
        headers={"Retry-After": "1"},
    )


async def _relay_response(
    request: web.Request, message: RawResponseMessage, payload: StreamReader
) -> web.StreamResponse:
    headers = response_headers(message.headers)
    status = message.code
    length = _content_length(message.headers)
    if (
        length is not None
        and length <= BUFFER_LIMIT
        and request.method != "HEAD"
        and status >= 200
        and status not in (204, 304)
    ):
        try:
            if not length:
                body = b""
            elif payload.is_eof():
                body = payload.read_nowait()  # usually all here with the head: no await needed
            else:
                body = await payload.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("upstream body failed", extra={"error": repr(exc)})
            _count_failure(request, _kind(exc))
            if isinstance(exc, TimeoutError):
                raise ApiError(504, "Upstream timed out mid-response") from None
            raise ApiError(502, "Upstream closed the connection mid-response") from None
        if len(body) != length:
            _count_failure(request, "reset")
            raise ApiError(502, "Upstream closed the connection mid-response")
        return _whole_response(status, message.reason, headers, body)

    if length is None and not _only_chunked(message.headers):
        # A transfer coding the gateway does not decode (gzip, compress, deflate, or chunked twice):
        # Transfer-Encoding is hop-by-hop and dropped, so the client would take the coded bytes
        # for the body. nginx and Go's proxy answer 502 too.
        _count_failure(request, "invalid")
        raise ApiError(502, f"Upstream '{request[upstream_key].name}' sent an unsupported Transfer-Encoding")
    response = _RelayedStream(status=status, reason=message.reason, headers=headers)
    response.untyped = "Content-Type" not in headers
    if length is None and request.version == HttpVersion10:
        # An HTTP/1.0 client knows no chunks: the body ends where the connection does. Kept open,
        # it would wait for more until the keep-alive timeout, and read a next answer as body.
        response.force_close()
    request[sent_status_key] = status
    try:
        # Inside the try: a client that left while the upstream answered fails the head's write.
        await response.prepare(request)
        # Chunk by chunk as the socket delivered them: read(n) would join what is buffered into
        # a new bytes object, one more copy of the body on its way through.
        readchunk = payload.readchunk
        while True:
            chunk, _ = await readchunk()
            if chunk:
                await response.write(chunk)
            elif payload.is_eof():
                break
        await response.write_eof()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # What went out, for the access log: aiohttp counts it only in write_eof, which a cut
        # answer never reaches.
        response._body_length = request.writer.output_size
        transport = request.transport
        if transport is None or transport.is_closing():
            return response  # the client left; nothing to cut
        # Headers are gone already: the only honest signal left is to cut the connection, so
        # the client sees a short body (or no final chunk) instead of a clean end.
        log.warning("upstream failed mid-body", extra={"error": repr(exc)})
        _count_failure(request, _kind(exc))
        # Both spans would otherwise report the 200 that went out as a clean answer.
        detail = (
            "Upstream timed out mid-response"
            if isinstance(exc, TimeoutError)
            else "Upstream closed the connection mid-response"
        )
        for ref in (current_trace(), request.get(span_key)):  # the call's span, the request's
            if ref is not None and ref.record is not None:
                ref.record.tag("error", detail)
        transport.close()
        return response
    return response


def _whole_response(status: int, reason: str | None, headers: CIMultiDict[str], body: bytes) -> _WholeAnswer:
    """An upstream's answer read whole, relayed with its headers (hop-by-hop ones already removed).

    Never for a HEAD request or a 1xx, 204 or 304 answer: those have no body to send."""
    headers["Content-Length"] = str(len(body))
    return _WholeAnswer(status=status, reason=reason, _real_headers=headers, body=body)


class _WholeAnswer(web.StreamResponse):
    """A relayed answer of known, small size, written to the client in one write when aiohttp
    prepares it.

    ``web.Response`` gets there through a dozen coroutine steps (prepare, headers, hook, the
    serialiser, write_eof, the stream writer); on a proxied 1 KiB GET they were 7% of the
    instructions and 7% of the CPU time. This keeps aiohttp's contract with its request handler
    (``prepare`` then ``write_eof``, then ``status``, ``body_length`` and ``keep_alive`` are read)
    and the same bytes on the wire: ``Date`` when the upstream sent none, ``Connection`` as
    aiohttp decides it, the ``on_response_prepare`` hooks (which may close the connection) and
    nothing else; aiohttp's default ``Content-Type`` and ``Server`` are not invented.
    """

    def __init__(
        self, *, status: int, reason: str | None, _real_headers: CIMultiDict[str], body: bytes
    ) -> None:
        super().__init__(status=status, reason=reason, _real_headers=_real_headers)
        self._whole = body

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        if self._eof_sent:
            return
        headers = self._headers
        if "Date" not in headers:
            headers["Date"] = rfc822_formatted_time()
        keep_alive = request.keep_alive
        version = request.version
        if "Connection" not in headers:
            if keep_alive:
                if version == HttpVersion10:
                    headers["Connection"] = "keep-alive"
            elif version == HttpVersion11:
                headers["Connection"] = "close"
        self._keep_alive = keep_alive
        self._req = request
        await request._prepare_hook(self)
        head = serialize_head(f"HTTP/{version.major}.{version.minor} {self._status} {self._reason}", headers)
        body = self._whole
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if len(body) < 2048:  # as aiohttp's writer: a copy is cheaper than a writev this small
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        self._eof_sent = True
        self._req = None
        self._body_length = size = len(head) + len(body)
        request.writer.output_size += size  # type: ignore[attr-defined]  # "response started"


class _RelayedStream(web.StreamResponse):
    """A streamed relayed answer keeps the upstream's headers as they were: aiohttp adds
    ``Content-Type: application/octet-stream`` to any body without one, the upstream did not."""

    untyped = False

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if self.untyped:
            self.headers.popall("Content-Type", None)


def _kind(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else "reset"


def _count_failure(request: web.Request, kind: str) -> None:
    request.app[metrics_key].upstream_errors.labels(request[upstream_key].name, kind).inc()


def _only_chunked(headers: CIMultiDictProxy[str]) -> bool:
    """Whether the response's transfer codings, if any, are ``chunked`` alone."""
    values = headers.getall("Transfer-Encoding", ())
    return not values or [c.strip().lower() for v in values for c in v.split(",")] == ["chunked"]


def _content_length(headers: CIMultiDictProxy[str]) -> int | None:
    value = headers.get("Content-Length")
    if value is None or not value.isdigit():
        return None
    return int(value)


# -- WebSocket ---------------------------------------------------------------------------------


@dataclass
class _Refusal:
    """An upstream's answer to a WebSocket upgrade that was not 101, kept to relay it as sent."""

    status: int = 0
    reason: str | None = None
    headers: CIMultiDictProxy[str] | None = None
    body: bytes | None = None  # None: too large to keep, or not read in full


_refusal: contextvars.ContextVar[_Refusal | None] = contextvars.ContextVar("ws_refusal", default=None)


def _refusal_trace() -> aiohttp.TraceConfig:
    """``ws_connect`` raises on an answer other than 101 and drops it, body and all, and follows
    a redirect itself; these trace hooks read the answer first, for the handshake of the request
    that asked (a contextvar says which), and stop a redirect from being followed: the gateway
    would have opened the session wherever the upstream pointed, identity headers and all.
    nginx and Envoy switch protocols only on a 101 and pass any other answer on as sent."""

    async def keep(response: aiohttp.ClientResponse) -> _Refusal | None:
        refusal = _refusal.get()
        if refusal is None or response.status == 101:
            return None
        refusal.status, refusal.reason, refusal.headers = response.status, response.reason, response.headers
        chunks, size = [], 0
        with contextlib.suppress(aiohttp.ClientError, OSError):
            while chunk := await response.content.readany():
                size += len(chunk)
                if size > BUFFER_LIMIT:  # a refusal is an error page; a large one is not relayed
                    return refusal
                chunks.append(chunk)
            refusal.body = b"".join(chunks)
        return refusal

    async def on_request_end(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        await keep(params.response)

    async def on_request_redirect(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestRedirectParams
    ) -> None:
        response = params.response
        if await keep(response) is not None:
            raise aiohttp.WSServerHandshakeError(
                response.request_info, (), status=response.status, message="redirect not followed"
            )

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    trace.on_request_redirect.append(on_request_redirect)
    trace.freeze()
    return trace


@dataclass
class _Handshake:
    """A WebSocket handshake in progress: its deadline, the read timeout that deadline moves to
    once a connection is made, and whether one was (a timeout after it is a read timeout)."""

    deadline: asyncio.Timeout
    read: float
    connected: bool = False


_ws_handshake: contextvars.ContextVar[_Handshake | None] = contextvars.ContextVar(
    "ws_handshake", default=None
)


def _connect_deadline_trace() -> aiohttp.TraceConfig:
    """``ws_connect`` takes no connect timeout of its own (the session has none, for the
    sessions' sake): the handshake starts under the service's connect timeout, and this hook moves
    the deadline on by its read timeout once a connection (TCP, and TLS for ``https://``) is made.
    Under one deadline of connect + read, a target that accepted TCP and never finished the TLS
    handshake held the upgrade for 32 s by default where a proxied request got its 504 in 2."""

    async def connected(session: aiohttp.ClientSession, context: Any, params: Any) -> None:
        handshake = _ws_handshake.get()
        if handshake is not None:
            handshake.connected = True
            handshake.deadline.reschedule(asyncio.get_running_loop().time() + handshake.read)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(connected)
    trace.on_connection_reuseconn.append(connected)
    trace.freeze()
    return trace


def _relayed_refusal(refusal: _Refusal) -> web.StreamResponse:
    headers = response_headers(refusal.headers)  # type: ignore[arg-type]
    if refusal.status in (204, 304):  # no body, and no Content-Length to say so
        return web.Response(status=refusal.status, reason=refusal.reason, headers=headers)
    return _whole_response(refusal.status, refusal.reason, headers, refusal.body or b"")


def _offered_protocols(request: web.Request) -> list[str]:
    return [
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    ]


def _handshake_problem(upstream_ws: aiohttp.ClientWebSocketResponse, offered: list[str]) -> str | None:
    """What is wrong with the upstream's 101, if anything: a client must fail a connection whose
    server chose a subprotocol or an extension it did not offer (RFC 6455 section 4.1). aiohttp
    ignores either; passed on, the browser would fail it, or the upstream's frames would not
    parse. The gateway offers no extension (its messages cross uncompressed)."""
    headers = upstream_ws._response.headers
    chosen = headers.getall("Sec-WebSocket-Protocol", ())
    if chosen and (len(chosen) > 1 or chosen[0].strip() not in offered):
        return "Upstream chose a WebSocket subprotocol the client did not offer"
    if "Sec-WebSocket-Extensions" in headers:
        return "Upstream accepted a WebSocket extension that was not offered"
    return None


async def _ws_connect(
    request: web.Request,
    upstream: Upstream,
    path: str,
    headers: CIMultiDict[str],
    protocols: list[str],
    span: SpanRef | None,
) -> tuple[Target, aiohttp.ClientWebSocketResponse] | web.StreamResponse:
    """The upgrade sent to a healthy target: its 101, or the upstream's other answer to relay.

    As for a proxied request (``_send``), an upgrade whose connect failed (refused, DNS, TLS
    handshake, connect timeout) sent nothing and is tried once more on another healthy target, as
    nginx (``proxy_next_upstream error timeout``) and Envoy retry an upgrade's connect; each failed
    attempt is an annotation on the session's span. Once connected, nothing is retried."""
    session = request.app[http_client_key]
    timeout = upstream.service.timeout
    target = upstream.pick()
    attempts = 2
    while True:
        if target is None:
            raise ApiError(503, f"No healthy target for service '{upstream.name}'")
        request[target_key] = target
        if span is not None and span.record is not None:
            _name_target(span.record, upstream, target, None, path)
        refusal = _Refusal()
        _refusal.set(refusal)
        handshake: _Handshake | None = None
        try:
            async with asyncio.timeout(timeout.connect) as deadline:
                handshake = _Handshake(deadline, timeout.read)
                _ws_handshake.set(handshake)
                upstream_ws = await session.ws_connect(
                    URL(target.url + path, encoded=True),
                    ssl=target.pool.ssl or True,  # the CAs proxied requests trust (pool.upstream_tls_context)
                    headers=headers,
                    protocols=protocols,
                    autoping=False,
                    autoclose=False,
                    # aiohttp refuses a message of max_msg_size itself
                    max_msg_size=wsrelay.MAX_MESSAGE + 1,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=wsrelay.CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            if span is not None and span.record is not None:
                span.record.tag("http.status_code", str(exc.status))
            if refusal.status == exc.status and refusal.body is not None and exc.status >= 200:
                # The upstream answered without switching (401, 403, 404, a 200 page, a redirect):
                # its answer passes through as sent.
                return _relayed_refusal(refusal)
            raise ApiError(
                exc.status if exc.status >= 400 else 502, "Upstream refused the WebSocket upgrade"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            connected = handshake is not None and handshake.connected
            error, kind, retryable = _ws_upgrade_failure(upstream, target, exc, connected=connected)
            if kind != "local":  # the gateway's own shortage is no failure of the upstream's
                _count_failure(request, kind)
            if span is not None and span.record is not None:
                span.record.annotate(f"{kind} {target.url}")
            attempts -= 1
            retry = upstream.pick(exclude=target) if retryable and attempts > 0 else None
            if retry is None:
                raise error from None
            target = retry
            continue
        finally:
            _ws_handshake.set(None)
        return target, upstream_ws


def _ws_upgrade_failure(
    upstream: Upstream, target: Target, exc: BaseException, *, connected: bool
) -> tuple[ApiError, str, bool]:
    """Translate a failed upgrade as ``_upstream_failure`` does a failed request: the error, its
    kind for metrics, and whether another target may be tried (the connect failed, so nothing was
    sent; or the target closed the connection before any answer, as a GET is retried then). The
    target is ejected only when it could not be connected to."""
    name = upstream.name
    if isinstance(exc, aiohttp.ClientSSLError):  # a ClientConnectorError: before those below
        upstream.eject(target)
        return _tls_failed(name, target, tls_reason(exc)), "connect", True
    if isinstance(exc, _CONNECT_ERRORS):
        shortage = getattr(exc, "os_error", None)
        if shortage is not None and shortage.errno in LOCAL_SHORTAGES:
            return _out_of_sockets(name, shortage), "local", False
        upstream.eject(target)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return ApiError(504, f"Upstream '{name}' timed out"), "timeout", True
        return ApiError(502, f"Upstream '{name}' is unreachable"), "connect", True
    if isinstance(exc, TimeoutError):
        if not connected:  # the connect timeout: nothing reached the upstream
            upstream.eject(target)
            return ApiError(504, f"Upstream '{name}' timed out"), "timeout", True
        # Not ejected: the target took the connection and is up; one slow endpoint must not take
        # the service out of rotation for everyone (a proxied request's read timeout, likewise).
        return ApiError(504, f"Upstream '{name}' timed out"), "timeout", False
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        # Closed or reset before any answer (a backend restarting, a worker killed mid-handshake):
        # the upgrade is a GET, and a GET whose connection ends before its answer's head is tried
        # once elsewhere, as a proxied one is (nginx: proxy_next_upstream error). The target took
        # the connection: it is not ejected. aiohttp itself retries a stale pooled connection.
        return ApiError(502, f"Upstream '{name}' closed the connection"), "reset", True
    return ApiError(502, f"Upstream '{name}' failed the WebSocket upgrade"), "invalid", False


async def _proxy_websocket(
    request: web.Request, upstream: Upstream, path: str, headers: CIMultiDict[str], span: SpanRef | None
) -> web.StreamResponse:
    protocols = _offered_protocols(request)
    # With the client's own subprotocols: a probe that knows none warns, once per session, that
    # they "don't overlap" (the upstream chooses among them below).
    if not web.WebSocketResponse(protocols=protocols).can_prepare(request).ok:
        raise ApiError(400, "Invalid WebSocket upgrade request")
    for name in list(headers):
        if name.lower() in _WS_HANDSHAKE_HEADERS:
            del headers[name]

    started = perf_counter()
    connected = await _ws_connect(request, upstream, path, headers, protocols, span)
    if isinstance(connected, web.StreamResponse):
        return connected  # the upstream's own answer, not a 101
    target, upstream_ws = connected

    problem = _handshake_problem(upstream_ws, protocols)
    if problem is not None:
        upstream_ws._response.close()  # failed, not closed: no Close frame (RFC 6455 section 7.1.7)
        _count_failure(request, "invalid")
        if span is not None and span.record is not None:
            span.record.tag("http.status_code", "502")
        raise ApiError(502, problem)
    upstream.succeeded(target)
    request.app[metrics_key].record_upstream(upstream.name, perf_counter() - started)  # the handshake
    if span is not None and span.record is not None:
        span.record.tag("http.status_code", "101")
    # Offer the client exactly the subprotocol the upstream chose (from the client's own list).
    client_ws = web.WebSocketResponse(
        protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
        autoping=False,
        autoclose=False,
        max_msg_size=wsrelay.MAX_MESSAGE + 1,
        compress=False,
        timeout=wsrelay.CLOSE_TIMEOUT,
    )
    # The rest of the upstream's 101 (a sticky-session cookie, its own headers) passes on, as
    # nginx and Envoy pass it.
    upstream_101 = response_headers(upstream_ws._response.headers)
    for name in upstream_101.keys() & _WS_101_OWN_HEADERS:
        upstream_101.popall(name)
    client_ws.headers.extend(upstream_101)
    sessions = request.app[lifecycle_key].websockets
    relay: wsrelay.Session | None = None
    try:
        await client_ws.prepare(request)
        request[sent_status_key] = 101
        relayed = request[relayed_key] = [0, 0]
        # The read timeout is the longest silence allowed: here, no frame either way.
        relay = wsrelay.Session(
            client_ws, upstream_ws, relayed=relayed, idle_timeout=upstream.service.timeout.read
        )
        sessions.add(relay)
        await relay.run()
        # The handshake, for the access log (which adds the messages): aiohttp counts nothing
        # for a WebSocket.
        client_ws._body_length = request.writer.output_size
    finally:
        if relay is None:  # the client left during its handshake
            upstream_ws._response.close()
        else:
            sessions.discard(relay)
    return client_ws
