"""Distributed tracing: W3C Trace Context and B3 in, both out, spans reported through aiozipkin.

Every request gets a SERVER span, a child of the caller's span when the caller sent a valid
context (``traceparent`` first, then ``b3``, then ``x-b3-*``; see ``gateway.tracecontext``).
The span in progress lives in a contextvar, so ``inject_trace_headers()`` works anywhere in the
request's task without the request object, exactly as the seed's usage shows::

    headers = inject_trace_headers(existing_headers)
    response = await http_client.get(url, headers=headers)

Without ``ZIPKIN_URL`` nothing is recorded, but ids are still made and propagated, so the
backends' traces join up with whatever the caller started.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple

import aiozipkin as az
from aiohttp import web
from aiohttp.typedefs import Handler
from aiozipkin.helpers import TraceContext as ZipkinContext
from aiozipkin.span import SpanAbc
from multidict import CIMultiDictProxy

from ..clientip import IPNetwork, client_ip, ip_address
from ..errors import ApiError
from ..keys import client_ip_key, request_id_key, route_key, span_key
from ..routing import CatchAll, shown_path
from ..state import status_when_cancelled
from ..tracecontext import (
    PROPAGATION_HEADERS,
    SamplingOnly,
    TraceContext,
    extract,
    new_root,
    new_span_id,
    trusted_child_headers,
    trusted_context,
)
from ..zipkin import ZipkinReporter
from .request_id import new_request_id, request_id_for

__all__ = [
    "Tracing",
    "client_span",
    "current_trace",
    "downstream_headers",
    "inject_trace_headers",
    "remote_endpoint",
    "trace_refusal",
    "tracing_ctx",
    "tracing_middleware",
]


class SpanRef(NamedTuple):
    """The span in progress: ``trace`` is the request's trace (as received, or started here),
    ``parent_id`` its parent span's id (None for a root), ``span_id`` its own.

    A tuple: two are made per proxied request, and a tuple is the cheapest immutable record.
    """

    trace: TraceContext
    span_id: str
    record: SpanAbc | None
    request_id: str | None = None
    parent_id: str | None = None

    @property
    def trace_id(self) -> str:
        return self.trace.trace_id


# The tuple's own constructor, called in C: SpanRef(...) goes through a Python-level __new__.
_new_ref = partial(tuple.__new__, SpanRef)

_current: ContextVar[SpanRef | None] = ContextVar("gateway_current_span", default=None)


def current_trace() -> SpanRef | None:
    return _current.get()


def inject_trace_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """``headers`` plus the trace context of the current span, for a call made from it.

    Outside a traced request the headers come back unchanged (as a new dict). Inside one, any
    trace context already in ``headers`` (in any spelling: ``Traceparent``, a ``b3`` the caller
    sent, ``X-B3-Flags``) is replaced, not added to: headers copied from the incoming request
    would otherwise reach the next hop next to the fresh ones, and a stale ``b3`` outranks the
    ``x-b3-*`` set there, as the proxy's header rules already see to for proxied requests.
    """
    ref = _current.get()
    if ref is None:
        return dict(headers) if headers else {}
    replaced = _REPLACED if ref.request_id else PROPAGATION_HEADERS
    out = {k: v for k, v in headers.items() if k.lower() not in replaced} if headers else {}
    out.update(downstream_headers(ref))
    if ref.request_id:
        out["x-request-id"] = ref.request_id
    return out


# What inject_trace_headers() sets for the current span, whatever the caller's headers said.
_REPLACED = PROPAGATION_HEADERS | {"x-request-id"}


def downstream_headers(ref: SpanRef) -> dict[str, str]:
    """The trace context headers for a call made from the span ``ref``."""
    return trusted_child_headers(ref.trace, ref.span_id, parent_id=ref.parent_id)


class Tracing:
    """The tracer and the sampling policy, built once from the settings."""

    def __init__(
        self,
        *,
        service_name: str,
        zipkin_url: str | None,
        sample_rate: float,
        trusted_proxies: Sequence[IPNetwork] = (),
    ) -> None:
        self.sample_rate = sample_rate
        # Whose X-Forwarded-For names the client a SERVER span's remote endpoint is (TRUSTED_PROXIES).
        self.trusted_proxies = tuple(trusted_proxies)
        self.reporter = ZipkinReporter(zipkin_url) if zipkin_url else None
        self.tracer = (
            az.Tracer(self.reporter, az.Sampler(sample_rate=sample_rate), az.create_endpoint(service_name))
            if self.reporter is not None
            else None
        )

    def context_for(self, headers: Mapping[str, str]) -> TraceContext:
        """The caller's context with a sampling decision: theirs when they made one, ours otherwise."""
        # Most requests carry no context: one case-insensitive intersection of the header names,
        # done in C by the multidict, instead of extract()'s pass over every header in Python.
        if isinstance(headers, CIMultiDictProxy) and not headers.keys() & PROPAGATION_HEADERS:
            return new_root(sampled=random.random() < self.sample_rate)
        incoming = extract(headers)
        if isinstance(incoming, TraceContext):
            if incoming.sampled is None:
                c = incoming
                return trusted_context(
                    c.trace_id,
                    c.span_id,
                    random.random() < self.sample_rate,
                    c.debug,
                    c.tracestate,
                    c.origin,
                    c.random_trace_id,
                )
            return incoming
        if isinstance(incoming, SamplingOnly):
            return new_root(sampled=incoming.sampled, debug=incoming.debug)
        return new_root(sampled=random.random() < self.sample_rate)

    def start(
        self, trace: TraceContext, parent_id: str | None, *, kind: str, name: str, request_id: str | None
    ) -> SpanRef:
        """A span in ``trace``, child of ``parent_id``."""
        span_id = new_span_id()
        if self.tracer is None or not trace.sampled:
            return _new_ref((trace, span_id, None, request_id, parent_id))
        record = self.tracer.to_span(
            ZipkinContext(
                trace_id=trace.trace_id,
                parent_id=parent_id,
                span_id=span_id,
                sampled=True,
                debug=trace.debug,
                shared=False,
            )
        )
        record.kind(kind).name(name).start()
        return _new_ref((trace, span_id, record, request_id, parent_id))


async def tracing_ctx(app: web.Application, tracing: Tracing) -> AsyncIterator[None]:
    if tracing.reporter is not None:
        await tracing.reporter.start()
    try:
        yield
    finally:
        if tracing.reporter is not None:
            await tracing.reporter.close()


def tracing_middleware(tracing: Tracing) -> Any:
    """The outermost layer: every answer, including the gateway's own errors, gets a span and
    carries the request id (kept from the client when sane, generated otherwise)."""

    @web.middleware
    async def trace(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request[request_id_key] = request_id_for(request)
        trace = tracing.context_for(request.headers)
        ref = request[span_key] = tracing.start(
            trace, trace.span_id, kind=az.SERVER, name=request.method, request_id=request_id
        )
        token = _current.set(ref)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            # The connection ended under the handler: aiohttp writes no access line for it.
            status = status_when_cancelled(request)
            _log_abandoned(request, status)
            raise
        finally:
            _current.reset(token)
            if ref.record is not None:
                _finish_server_span(ref.record, request, status, tracing.trusted_proxies)

    return trace


class _Abandoned:
    """What an access logger reads of a response, for a request whose client left first."""

    __slots__ = ("body_length", "status")

    def __init__(self, status: int, body_length: int) -> None:
        self.status = status
        self.body_length = body_length


def _log_abandoned(request: web.BaseRequest, status: int) -> None:
    """The access line aiohttp does not write for a request whose client went away while it was
    handled (its handler is cancelled): those are what an operator looks for when clients give up
    on a slow upstream."""
    logger = getattr(request.protocol, "access_logger", None)
    if logger is not None and logger.enabled:
        logger.log(request, _Abandoned(status, request.writer.output_size), 0.0)  # type: ignore[arg-type]


def remote_endpoint(span: SpanAbc, service: str | None, host: str | None, port: int | None) -> None:
    """Name the other side of ``span``'s call: ``service``, the address in ``ipv4`` or ``ipv6``
    as it is one (nothing for a host name: Zipkin's endpoint has no field for one), and ``port``
    (never 0: the v2 API says to leave it out instead)."""
    address = ip_address(host)
    ipv4 = str(address) if address is not None and address.version == 4 else None
    ipv6 = str(address) if address is not None and address.version == 6 else None
    if service or address is not None:
        span.remote_endpoint(service or None, ipv4=ipv4, ipv6=ipv6, port=port or None)


def _client_endpoint(span: SpanAbc, request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> None:
    """The SERVER span's remote endpoint: the client, as Brave's and Envoy's Zipkin tracers record
    it. Its address is the one the gateway trusts (the peer, or with ``TRUSTED_PROXIES`` what
    they forwarded, as the rate limiter reads it; Envoy's trusted hops do the same); the port is
    the peer's, when the address is the peer's too: a forwarded address comes without one."""
    remote = request.remote
    ip = request.get(client_ip_key)
    if ip is None:
        forwarded = request.headers.getall("X-Forwarded-For", ()) if trusted else ()
        ip = client_ip(remote, forwarded, trusted)
    port = None
    peer = ip_address(remote)
    if peer is not None and str(peer) == ip and request.protocol is not None:
        peername = request.protocol.peername
        if isinstance(peername, tuple) and len(peername) >= 2 and isinstance(peername[1], int):
            port = peername[1]
    remote_endpoint(span, None, ip, port)


def _finish_server_span(
    span: SpanAbc, request: web.Request, status: int, trusted: Sequence[IPNetwork]
) -> None:
    _client_endpoint(span, request, trusted)
    route = request.get(route_key)
    if route is not None:
        pattern: str | None = route.prefix
    else:
        # An aiohttp route (the gateway's own endpoints, the chat API's) names its template. A
        # request that reached the route table and matched nothing has no name but its path,
        # whatever a client sends, which would give every such span a name of its own.
        resource = request.match_info.route.resource
        pattern = None if resource is None or isinstance(resource, CatchAll) else resource.canonical
    span.name(f"{request.method} {pattern}" if pattern is not None else request.method)
    span.tag("http.method", request.method)
    span.tag("http.path", shown_path(request))
    if pattern is not None:
        span.tag("http.route", pattern)
    span.tag("http.status_code", str(status))
    span.tag("request_id", request[request_id_key])
    if status >= 500:
        span.tag("error", str(status))
    span.finish()


# The name OpenTelemetry's HTTP conventions give a span whose method is not known.
REFUSED_SPAN_NAME = "HTTP"


def trace_refusal(
    tracing: Tracing, request: web.BaseRequest, answer: Callable[[], web.StreamResponse]
) -> web.StreamResponse:
    """A SERVER span around ``answer()``, the gateway's answer to a request aiohttp's parser
    refused (``gateway.httpserver``): such a request never reaches the middlewares.

    Its head was not parsed, so neither the caller's trace context nor its method and path are
    known: the span starts a trace of its own, sampled at the configured rate, and is named
    ``HTTP``. While ``answer()`` runs it is the current span, so the line it logs carries its ids,
    as does the access line (``request[span_key]``).
    """
    request_id = request.get(request_id_key)
    if request_id is None:
        request_id = request[request_id_key] = new_request_id()
    trace = new_root(sampled=random.random() < tracing.sample_rate)
    ref = request[span_key] = tracing.start(
        trace, None, kind=az.SERVER, name=REFUSED_SPAN_NAME, request_id=request_id
    )
    token = _current.set(ref)
    try:
        response = answer()
    finally:
        _current.reset(token)
    if ref.record is not None:
        _client_endpoint(ref.record, request, ())  # its headers were not parsed: the peer
        ref.record.tag("http.status_code", str(response.status))
        ref.record.tag("request_id", request_id)
        ref.record.finish()
    return response


def client_span(tracing: Tracing, *, name: str, service: str) -> ClientSpan:
    """A CLIENT child of the current span around one downstream call; yields None when untraced.

    While it is open, ``inject_trace_headers()`` names it as the caller.
    """
    return ClientSpan(tracing, name, service)


class ClientSpan:
    """``with client_span(...) as ref``: a class rather than a generator, as every proxied
    request opens one."""

    __slots__ = ("_name", "_ref", "_service", "_token", "_tracing")

    def __init__(self, tracing: Tracing, name: str, service: str) -> None:
        self._tracing = tracing
        self._name = name
        self._service = service
        self._ref: SpanRef | None = None

    def __enter__(self) -> SpanRef | None:
        server = _current.get()
        if server is None:
            return None
        ref = self._ref = self._tracing.start(
            server.trace, server.span_id, kind=az.CLIENT, name=self._name, request_id=server.request_id
        )
        if ref.record is not None:
            remote_endpoint(ref.record, self._service, None, None)
        self._token: Token[SpanRef | None] = _current.set(ref)
        return ref

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        ref = self._ref
        if ref is None:
            return
        _current.reset(self._token)
        if ref.record is not None:
            # A cancel is the client going away (the SERVER span says 499), or how a WebSocket
            # session ends: not the upstream call's error.
            if exc is not None and exc_type is not asyncio.CancelledError:
                ref.record.tag("error", _call_error(exc))
            ref.record.finish()


def _call_error(exc: BaseException) -> str:
    """What a CLIENT span's ``error`` says: the gateway's own error ("Upstream 'x' is unreachable")
    and, when a socket error caused it, the system's or OpenSSL's reason (": Connection refused",
    ": Name or service not known", ": certificate verify failed"), as Brave tags a failed call
    with its exception's message. Anything else is named by its type only (a driver's message may
    quote what it was sent)."""
    if not isinstance(exc, ApiError):
        return type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        # asyncio's refusal reads "Connect call failed ('10.0.0.7', 9001)": the errno says more.
        errno = cause.errno
        reason = os.strerror(errno) if isinstance(errno, int) and errno > 0 else cause.strerror or str(cause)
        if reason:
            return f"{exc.detail}: {reason}"
    return exc.detail
