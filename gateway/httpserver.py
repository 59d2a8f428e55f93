"""The HTTP/1.1 server side: aiohttp's runner with the gateway's connection limits and errors.

aiohttp's C parser (llhttp, strict mode) already refuses the framing tricks behind request
smuggling: ``Content-Length`` with ``Transfer-Encoding``, duplicate or non-numeric lengths,
``Transfer-Encoding`` lists that do not end in ``chunked``, bare CR or LF, obs-fold, whitespace
before the colon, malformed chunk sizes. Its own answer to them is a ``text/plain`` 400 that
quotes the offending bytes and a logged traceback; ``GatewayRunner`` answers them in the
contract's JSON instead, logs one line, and closes the connection. Only malformed requests take
this path, so it costs nothing per good request. They never reach the app's middlewares, so
the answer is also counted here in ``gateway_requests_total`` (route ``malformed``, method
``OTHER``) and given a SERVER span of its own.

Limits (per connection, all enforced by aiohttp's protocol):

    MAX_LINE_SIZE / MAX_FIELD_SIZE  request line / one header field, bytes     -> 431
    MAX_HEADERS                     header fields per request                  -> 431
    KEEPALIVE_TIMEOUT               seconds a connection may take to deliver a complete request
                                    head, counted from the connect or the previous response: an
                                    idle keep-alive connection and a trickled (slowloris) head
                                    are both closed when it runs out. Trickling does not extend it.
    BODY_IDLE_TIMEOUT               seconds the client may leave a request body stalled; then
                                    408, and the connection closes after aiohttp's lingering time
                                    (10 s at most of draining what the client still sends).
    SEND_TIMEOUT                    seconds a response may wait for a client that does not read
                                    it: from when the connection's write buffer fills (64 KiB) to
                                    when the client has taken enough of it to go on. Then the
                                    connection is aborted, and the upstream connection feeding the
                                    response with it (nginx's send_timeout, 60 s).

The head timeout is aiohttp's own keep-alive timer: it costs nothing extra. The send timer is
armed only when the transport tells the protocol to pause writing (the client is behind). The
body timeout arms a timer only when a body read has to wait for the network; a body that arrived
with its head (the common small API call) is read without one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from multidict import CIMultiDict, CIMultiDictProxy
from propcache import under_cached_property
from yarl import URL

from .clientip import peer_host
from .errors import ApiError, error_response
from .headers import drop_server_banner
from .keys import continue_key, request_id_key, span_key, tracing_key
from .metrics import MALFORMED_ROUTE, metrics_key
from .middleware.request_id import REQUEST_ID_HEADER, new_request_id
from .middleware.tracing import trace_refusal
from .routing import resolve_catch_all_directly
from .writedeadline import WriteDeadline

__all__ = [
    "BODY_IDLE_TIMEOUT",
    "KEEPALIVE_TIMEOUT",
    "KNOWN_HOSTS",
    "MAX_FIELD_SIZE",
    "MAX_HEADERS",
    "MAX_LINE_SIZE",
    "SEND_TIMEOUT",
    "STRICT_PARSER",
    "BodyTimeout",
    "GatewayRunner",
    "check_host",
    "expect_continue",
    "origin_form",
    "read_body_chunk",
    "send_continue",
    "valid_host",
]

log = logging.getLogger("gateway.http")

# The classic keep-alive value (nginx, aiohttp's run_app): longer than common load balancer idle
# timeouts (60 s), so the balancer, not the gateway, closes idle connections first.
KEEPALIVE_TIMEOUT = 75.0
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
BODY_IDLE_TIMEOUT = 30.0
# Without it a client that stops reading holds its connection, the handler, and the upstream
# connection behind a streamed answer (or a WebSocket) for as long as it likes: backpressure stops
# the upstream from sending, and nothing else ever times out.
SEND_TIMEOUT = 60.0
# The guarantees above rest on aiohttp's C parser (llhttp). Without its extension (no wheel for
# the platform, or AIOHTTP_NO_EXTENSIONS=1) aiohttp falls back to a pure-Python parser that is
# more lenient: it takes "chunked<TAB>", HTTP/1.2 and Content-Length in trailers.
STRICT_PARSER = HttpRequestParser is not HttpRequestParserPy


class BodyTimeout(ApiError):
    """The client stopped sending its request body for ``BODY_IDLE_TIMEOUT`` seconds."""

    def __init__(self) -> None:
        super().__init__(408, "Request body not received in time")


async def read_body_chunk(content: StreamReader) -> bytes:
    """The next chunk of a request body (``b""`` at its end), or ``BodyTimeout``."""
    # Data already received needs no timer: a timer costs ~12 us on uvloop, so it is armed only
    # when the read has to wait for the network.
    chunk = content.read_nowait()
    if chunk or content.at_eof():
        return chunk
    try:
        async with asyncio.timeout(BODY_IDLE_TIMEOUT):
            return await content.readany()
    except TimeoutError:
        raise BodyTimeout from None


class _OneMessageAtATimeParser(HttpRequestParser):
    """aiohttp's C request parser, made to stop after each request and go on from there.

    Fed several pipelined requests at once, aiohttp's parser returns them all, or, when one of
    them is malformed, none: it raises, and the requests before the bad one were lost. The 400
    then went out as the answer to the first request, which the client took for the answer to a
    request the gateway never read (and ``Connection: close`` followed by more bytes, which llhttp
    counts as malformed, lost its own request the same way). Paused after every message, the
    parser is resumed here until the data is used up: the requests come out in order, the error
    after them.
    """

    def feed_data(self, data: bytes) -> tuple[Any, bool, bytes]:  # type: ignore[override]
        try:
            messages, upgraded, tail = _feed(self, data)
        except BadHttpMethod as exc:
            if _REQUEST_LINE.match(data):
                raise UnknownMethod(error=exc.message) from None
            raise
        if (
            messages
            and data.find(b"\r\n\r\n") == len(data) - 4
            and data[0] not in _CR_LF
            and not messages[-1][0].upgrade
        ):
            # The common case, one request head in one read: its blank line is the only one and
            # ends the data, so it ended where the parser stopped, and nothing is left to parse.
            # (A head that a previous read began may end in this one's first bytes: not here.)
            # Not an upgrade: paused after the message, llhttp has not said "upgraded" yet, and
            # a WebSocket connection the server thinks is still HTTP fails its first flow-control
            # pause (aiohttp pauses the HTTP parser, which asserts it is mid-body).
            return messages, upgraded, tail
        protocol = self.protocol
        later: list[Any] | None = None
        # Not while flow control holds a request body back: resume_reading() goes on from there.
        while not upgraded and not protocol._reading_paused:
            try:
                more, upgraded, tail = _feed(self, b"")
            except HttpProcessingError as exc:
                parsed = [*messages, *(later or ())]
                if not parsed:
                    raise
                parsed.append((_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD))
                return parsed, False, b""
            if not more:
                break
            later = [*(later or ()), *more]
        if later is None:
            return messages, upgraded, tail
        return [*messages, *later], upgraded, tail


_feed = HttpRequestParser.feed_data
# A well-formed request line, whatever its method: when llhttp, which knows a fixed list of methods
# (the WebDAV, RTSP and other registered ones among them), refuses one of these, the method is
# merely unknown to it, not malformed.
_REQUEST_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+ [!-~]+ HTTP/1\.[01]\r?\n")


class UnknownMethod(BadHttpMethod):
    """A request in good form with a method the parser does not know: RFC 9110 section 9.1's
    501, not a 400 (Apache answers so; nginx forwards any method, which aiohttp's parser cannot)."""


_CR_LF = b"\r\n"


class _GatewayRequestHandler(WriteDeadline, RequestHandler):
    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        if STRICT_PARSER:
            self._parser = _OneMessageAtATimeParser(
                self,
                loop,
                kwargs.get("read_bufsize", DEFAULT_CHUNK_SIZE),
                max_line_size=kwargs.get("max_line_size", MAX_LINE_SIZE),
                max_field_size=kwargs.get("max_field_size", MAX_FIELD_SIZE),
                max_headers=kwargs.get("max_headers", MAX_HEADERS),
                payload_exception=RequestPayloadError,
                auto_decompress=kwargs.get("auto_decompress", True),
                max_msg_queue_size=1,  # pause after every message
            )

    @under_cached_property
    def peername(self) -> Any:
        """The socket's remote address, its host as ``clientip.peer_host`` names it (IPv4 for an
        IPv4-mapped IPv6 address); aiohttp's ``request.remote`` is read from it."""
        peer = None if self.transport is None else self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and isinstance(peer[0], str) and (host := peer_host(peer[0])) != peer[0]:
            return (host, peer[1])
        return peer

    def pause_writing(self) -> None:
        super().pause_writing()
        timeout = getattr(self._manager, "send_timeout", SEND_TIMEOUT)
        if timeout:
            self._arm_send_timer(timeout)

    def _write_timed_out(self) -> None:
        transport = self.transport
        if transport is None or not self._paused:
            return
        peer = self.peername
        extra = {"peer": peer[0] if isinstance(peer, tuple) else None}
        # The timer runs outside the request's context: the line is led to its trace by hand.
        request = self._current_request
        if request is not None:
            extra["request_id"] = request.get(request_id_key)
            ref = request.get(span_key)
            if ref is not None:
                extra.update(trace_id=ref.trace_id, span_id=ref.span_id)
        log.info("client stopped reading; connection aborted", extra=extra)
        # close() would wait to flush what the client is not reading.
        transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_send_timer()
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """On drain: the request in progress gets ``timeout`` seconds to finish, and that is all.

        aiohttp waits up to ``timeout`` for it, then cancels it and waits up to ``timeout`` again:
        twice the bound the operator set (60 s for the default 30, past Kubernetes' grace period).
        """
        try:
            async with asyncio.timeout(timeout):
                await super().shutdown(timeout)
        except TimeoutError:
            if self._task_handler is not None:
                self._task_handler.cancel()
            self.force_close()

    def _make_error_handler(
        self, err_info: Any
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        # Only requests the parser refused come this way (aiohttp's _ErrInfo, always a 400 here).
        answer = partial(
            self.handle_error, status=err_info.status, exc=err_info.exc, message=err_info.message
        )
        observe: _Observer | None = getattr(self._manager, "observe_refusal", None)

        async def refuse(request: web.BaseRequest) -> web.StreamResponse:
            if observe is None:
                return answer(request)
            return observe(request, partial(answer, request))

        return refuse

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            self.log_exception("error handling request", exc_info=exc)
            detail = "Internal Server Error"
        else:
            status, detail = _describe(exc, status)
            # A malformed request is the client's problem: one line, no traceback, no log flood.
            log.info("malformed request", extra={"status": status, "error": detail, "peer": request.remote})
        body = json.dumps({"detail": detail}).encode()
        # A request that failed inside the chain already has the id the access log and the span
        # carry; a fresh one would point the client at a request no log line mentions.
        request_id = request.get(request_id_key) or new_request_id()
        request[request_id_key] = request_id  # for the access line, which reads it there
        if request.version != HttpVersion11:
            # aiohttp makes the request it could not parse an HTTP/1.0 one, and its answer's
            # status line said HTTP/1.0 to clients that spoke 1.1; this connection speaks 1.1.
            request._cache["version"] = HttpVersion11
        response = _ErrorAnswer(
            status=status,
            body=body,
            content_type="application/json",
            headers={REQUEST_ID_HEADER: request_id},
        )
        response.force_close()
        return response


_Observer = Callable[[web.BaseRequest, Callable[[], web.StreamResponse]], web.StreamResponse]


def _refusal_observer(app: web.Application) -> _Observer | None:
    """What the app's middlewares would have done for a request the parser refused: a SERVER
    span around the answer, and a count in ``gateway_requests_total``. Operators alert on 4xx
    rates; these are 4xx answers like any other."""
    metrics = app.get(metrics_key)
    tracing = app.get(tracing_key)
    if metrics is None and tracing is None:
        return None

    def observe(request: web.BaseRequest, answer: Callable[[], web.StreamResponse]) -> web.StreamResponse:
        response = answer() if tracing is None else trace_refusal(tracing, request, answer)
        if metrics is not None:
            received = getattr(request, "received", None)
            seconds = perf_counter() - received if received is not None else 0.0
            metrics.record_request(MALFORMED_ROUTE, "OTHER", response.status, seconds)
        return response

    return observe


class _ErrorAnswer(web.Response):
    """The answer to a request the parser refused. The app's response hooks never see it (there is
    no app request yet), so the ``Server`` banner they drop is dropped here."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        drop_server_banner(self)


def _describe(exc: BaseException | None, status: int) -> tuple[int, str]:
    # The parser's own message quotes the client's bytes back; only a fixed phrase is sent.
    if isinstance(exc, UnknownMethod):
        return 501, "Request method not implemented by the gateway"
    if isinstance(exc, LineTooLong):
        return 431, "Request line or header field too large"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
        return 431, "Too many header fields"
    if isinstance(exc, HttpProcessingError):
        return 400, "Malformed HTTP request"
    return status, "Bad Request"


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Expect handler for every route: ``100-continue`` is deferred to ``send_continue``, anything
    else is a JSON 417.

    aiohttp's default handler runs before the middlewares and sends the 100 at once: a client was
    told to upload a body that a 401, 404, 413, 415 or 429 then refused. It also answered an
    unknown expectation in text, echoing the header, and a non-UTF-8 one with a 500.
    """
    if request.headers.get("Expect", "").lower() == "100-continue":
        if request.version >= HttpVersion11 and request.body_exists:
            message = request._message
            request[continue_key] = message
            # Until the 100 is sent the client holds its body back; an answer given before that
            # leaves the connection where the server cannot tell the next request from a late
            # body, so that answer closes it (RFC 9110 section 10.1.1). send_continue undoes this.
            request._message = message._replace(should_close=True)
        return None
    return error_response(417, "Unsupported Expect header: only '100-continue' is supported")


async def send_continue(request: web.Request) -> None:
    """Send the ``100 Continue`` the request's ``Expect`` asked for, if it is still owed: call it
    just before reading a body, once the request is admitted (RFC 9110 section 10.1.1: a server
    that will refuse on the head alone sends the final status instead)."""
    message = request.get(continue_key)
    if message is None:
        return
    request[continue_key] = None
    request._message = message
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not the response


# What a Host header (and the authority of an absolute-form target) may hold: RFC 3986's
# characters for an authority, as Envoy (nghttp2) checks them. No space, "/", "\\", "?", "#" or
# control character: a backend building links from X-Forwarded-Host would take them as given.
_AUTHORITY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:%@\[\]]*")
_ABSOLUTE = ("http://", "https://")


# An IP literal and its port (RFC 3986 section 3.2.2): "[" only first, "]" only before the port.
_IP_LITERAL = re.compile(r"\[([0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\](?::[0-9]*)?")


def valid_host(host: str) -> bool:
    """Whether ``host`` is a Host header value a server may accept (RFC 9112 section 3.2: an
    invalid one is a 400). Empty is valid: a target URI without an authority has an empty Host.

    Brackets hold an IPv6 address (``[::1]:8080``) and nothing else; a host with two colons and
    no brackets (``::1``) cannot be told from its port. Either, passed on as X-Forwarded-Host,
    made a backend's links point nowhere (``http://[::1/x``).
    """
    if _AUTHORITY.fullmatch(host) is None:
        return False
    if "[" in host or "]" in host:
        literal = _IP_LITERAL.fullmatch(host)
        return literal is not None and (literal[1][0] == "v" or _is_ipv6(literal[1]))
    return host.count(":") < 2


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# Host values already found valid. A client sends the same one on every request, and a set
# membership test is the cheapest check there is (no call); bounded in count and length (at most
# about 270 KB), so made-up hosts only cost their own check.
KNOWN_HOSTS: set[str] = set()
_KNOWN_HOSTS_MAX = 1024


def check_host(host: str) -> bool:
    """``valid_host``, remembering the valid ones in ``KNOWN_HOSTS`` (ask that set first)."""
    if not valid_host(host):
        return False
    if len(KNOWN_HOSTS) < _KNOWN_HOSTS_MAX and len(host) <= 261:  # a DNS name and a port
        KNOWN_HOSTS.add(host)
    return True


def origin_form(message: Any) -> Any:
    """An absolute-form request (``GET http://host/path HTTP/1.1``) as the origin-form one it
    stands for: the path (and query) as the target, the URI's authority as the Host header.

    RFC 9112 section 3.2.2: a server must accept the absolute-form, and a Host header sent along
    with it is ignored for the URI's authority. Clients send it to a proxy, which is what they
    take the gateway for when ``http_proxy`` points at it. Only ``http`` and ``https`` URIs with a
    valid authority and no userinfo (RFC 9110 section 4.2.4) are rewritten; anything else stays
    as it was, and the routing refuses it with a 400. ``OPTIONS http://host`` is ``OPTIONS *``
    (RFC 9112 section 3.2.4).
    """
    target = message.path
    if not target[:8].lower().startswith(_ABSOLUTE):
        return message
    rest = target[target.index("://") + 3 :]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority or "@" in authority or not valid_host(authority):
        return message
    if not path:
        path = "*" if message.method == "OPTIONS" else "/"
    elif path.startswith("?"):
        path = "/" + path
    headers = CIMultiDict(message.headers)
    headers["Host"] = authority
    raw_headers = (
        *((name, value) for name, value in message.raw_headers if name.lower() != b"host"),
        (b"Host", authority.encode()),
    )
    return message._replace(
        path=path, url=URL(path, encoded=True), headers=CIMultiDictProxy(headers), raw_headers=raw_headers
    )


class GatewayRequest(web.Request):
    """aiohttp's request with a direct ``get``.

    ``Mapping.get`` goes through ``__getitem__`` and raises and catches a KeyError for every
    absent key; the middlewares and hooks ask about fifteen times per request, and most of the
    keys they ask about (a body, an identity, CORS headers) are usually absent.
    """

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        # Without aiohttp's per-call check for plain-string keys: the gateway's are web.RequestKey.
        self._state[key] = value


class _GatewayServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` with the limits above and JSON answers to unparseable requests.

    Keyword arguments override the limits (tests use a short ``keepalive_timeout``).
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)
        kwargs.setdefault("max_line_size", MAX_LINE_SIZE)
        kwargs.setdefault("max_field_size", MAX_FIELD_SIZE)
        kwargs.setdefault("max_headers", MAX_HEADERS)
        self._send_timeout = kwargs.pop("send_timeout", SEND_TIMEOUT)
        if not STRICT_PARSER:
            log.warning("aiohttp's C HTTP parser is not in use: request framing checks are weaker")
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        _drop_current_app_layer(self._app)
        resolve_catch_all_directly(self._app)
        server.__class__ = _GatewayServer  # same object and state, only the protocol differs
        make = partial(self._app._make_request, _cls=_request_class(self._app))

        def request_factory(message: Any, *args: Any) -> web.BaseRequest:
            if not message.path.startswith("/"):
                message = origin_form(message)
            request = make(message, *args)
            # For the access log's duration: the loop's clock (uvloop) moves in whole milliseconds
            # and only once per loop iteration, too coarse for a hop that adds well under one.
            request.received = perf_counter()  # type: ignore[attr-defined]
            # The storage's own get, called in C: the method above is still a Python frame, and
            # the middlewares and hooks call it about fifteen times per request.
            request.get = request._state.get  # type: ignore[method-assign]
            return request

        server.request_factory = request_factory
        server.observe_refusal = _refusal_observer(self._app)  # type: ignore[attr-defined]
        server.send_timeout = self._send_timeout  # type: ignore[attr-defined]
        return server


def _request_class(app: web.Application) -> type[GatewayRequest]:
    """``GatewayRequest`` with ``request.app`` a plain class attribute, when there is one app.

    aiohttp's ``request.app`` is two properties deep (the match info, its current app); the proxy
    asks for it three times per request. Without sub-applications the answer is always ``app``.
    """
    if app._subapps:
        return GatewayRequest
    return type("GatewayRequest", (GatewayRequest,), {"app": app, "__slots__": ()})


def _drop_current_app_layer(app: web.Application) -> None:
    """Take out the middleware aiohttp appends to every chain to keep ``request.app`` right inside
    sub-applications.

    With no sub-application it sets ``match_info.current_app`` to the app it already is, and it
    is one more coroutine around every request (1.5% of a proxied GET's instructions). aiohttp
    itself leaves it out of an app without middlewares.
    """
    if app._subapps:
        return
    app._middlewares_handlers = tuple(  # type: ignore[assignment]
        (m, new_style)
        for m, new_style in app._middlewares_handlers  # type: ignore[union-attr]
        if not m.__qualname__.startswith("_fix_request_current_app.")
    )
