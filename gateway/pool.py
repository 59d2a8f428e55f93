"""Keep-alive connection pools to upstream targets, and one HTTP/1.1 exchange over them.

Why not ``ClientSession.request`` for proxied calls: measured on the 1 KiB GET bench, the session's
per-request bookkeeping (request/response objects, cookie and redirect handling, URL
normalisation, per-request timers and traces) cost as much as all the rest of the gateway, and the
session normalises exactly what a proxy must pass through untouched. This module keeps aiohttp's
own client protocol (``ResponseHandler``: the C HTTP parser, flow control, read timeouts; made
cheaper per request by ``UpstreamProtocol``), its header serialiser (through
``headers.serialize_head``, which refuses CR/LF and keeps non-UTF-8 bytes) and, for streamed
bodies, its ``StreamWriter`` (chunked encoding, drain); a request with no body or a small one
goes out in one write. WebSocket upgrades, health checks and the Zipkin reporter still
use the ClientSession.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterable
from contextvars import Context
from urllib.parse import unquote

from aiohttp import hdrs
from aiohttp.client_exceptions import (
    ClientConnectorCertificateError,
    ClientPayloadError,
    ClientSSLError,
    SocketTimeoutError,
)
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import HttpResponseParser, RawResponseMessage, StreamWriter
from aiohttp.streams import EofStream, StreamReader
from multidict import CIMultiDict
from yarl import URL

from .headers import serialize_head
from .writedeadline import WriteDeadline

__all__ = [
    "LOCAL_SHORTAGES",
    "ConnectFailed",
    "ConnectTimeout",
    "OutOfSockets",
    "TargetPool",
    "TlsFailed",
    "UpstreamProtocol",
    "exchange",
    "tls_reason",
    "upstream_tls_context",
]

# 1xx other than 101 are interim: the real answer follows on the same connection.
_INTERIM = range(100, 200)
_NO_BODY = frozenset({204, 304})


class ConnectFailed(OSError):
    """The target refused the connection, reset it during connect, or its name does not resolve."""


class TlsFailed(ConnectFailed):
    """The TLS handshake with an ``https://`` target failed: its certificate did not verify (another
    CA's, expired, for another name), or it does not speak TLS. A connect failure like the others
    (nothing was sent; nginx and Envoy count it so too), with the reason for the log in ``str()``."""


def tls_reason(exc: BaseException) -> str:
    """What OpenSSL said, for a log line or a health entry: ``certificate verify failed:
    certificate has expired``. Also for the ClientSession's wrappers of it (``ClientSSLError``)."""
    if isinstance(exc, ClientConnectorCertificateError):
        exc = exc.certificate_error
    elif isinstance(exc, ClientSSLError):
        exc = exc.os_error
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")  # WRONG_VERSION_NUMBER, as nginx logs it
    return str(exc)


def upstream_tls_context() -> ssl.SSLContext:
    """The one client TLS context for every ``https://`` target, for proxied requests and for the
    ClientSession's WebSocket upgrades and health checks alike: the system's CAs, or those of
    OpenSSL's ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set (a private CA); verification and
    hostname checks on.

    One per process (per value of those variables): each context loads the whole CA bundle,
    which took ~80 ms of the event loop and ~0.9 MB per ``https://`` target when each made its own.
    """
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return ssl.create_default_context()  # reads both variables itself


class OutOfSockets(OSError):
    """The gateway could not make a socket for the connection: its own file descriptors (or the
    kernel's memory for sockets) ran out. Nothing is wrong with the target."""


# What socket() and connect() say when the shortage is the gateway's, not the target's.
LOCAL_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# Status codes whose answers never have a body, as the status line spells them from byte 9 (no
# slice is made: this is asked of every response head).
_BODILESS_STATUS = (b"204", b"304")
# Answers never taken whole (see UpstreamProtocol._take_whole): interim ones, and the bodiless.
_NOT_WHOLE_STATUS = (b"1", *_BODILESS_STATUS)
_CR_LF = (ord("\r"), ord("\n"))

# The largest body an answer may have to be taken whole with its head; also the proxy's
# BUFFER_LIMIT, up to which it reads a body whole anyway (a larger one is streamed to the client).
WHOLE_LIMIT = 64 * 1024
_CONTENT_LENGTH, _TRANSFER_ENCODING, _KEEP_ALIVE = (
    hdrs.CONTENT_LENGTH,
    hdrs.TRANSFER_ENCODING,
    hdrs.KEEP_ALIVE,
)


class ConnectTimeout(TimeoutError):
    """The TCP (or TLS) connect did not finish within the service's connect timeout."""


class UpstreamProtocol(WriteDeadline, ResponseHandler):
    """aiohttp's client protocol with the response parser made once per connection.

    ``ResponseHandler.set_response_params`` builds a new C parser for every request; a keep-alive
    connection to a backend carries thousands, and the parser is ready for the next response
    after each complete one (aiohttp's server reuses its request parser the same way). Only a
    HEAD request needs a parser of its own: its response has no body whatever it declares.
    """

    _reusable: HttpResponseParser | None = None
    # False while the connection sits idle in its pool, or once its answer was taken whole: nothing
    # may arrive then. An upstream that sends bytes there (more body than it declared, a response
    # to nothing) would leave them for the next response on this connection, half-parsed: such a
    # connection is closed instead.
    in_use = True

    # Set when the upstream answered before it had the whole request body: the rest of the body
    # is not sent, and the answer is read to its end on this connection all the same.
    answered_early = False

    # Seconds this connection may sit idle in its pool, when the upstream said how long it keeps
    # it (``Keep-Alive: timeout=N``); None: the pool's own idle timeout.
    idle_limit: float | None = None

    # True from ``begin`` to the first bytes of the answer: the response parser sits between two
    # answers then, so those bytes may be taken without it (``_take_whole``).
    _at_start = False
    # Set when the last answer's head was parsed for ``_take_whole`` in vain (chunked, unframed,
    # its body still to come), and the response parser parsed it again; cleared by an answer the
    # response parser finds whole. While set, answers go to the response parser alone: an
    # upstream that answers chunked does not pay for every head twice.
    _whole_missed = False
    # The parser of heads alone for ``_take_whole``, made once per connection like ``_reusable``.
    _heads: HttpResponseParser | None = None

    def begin(self, *, read_timeout: float, head: bool) -> None:
        """Set up for the next response (instead of ``set_response_params``)."""
        self.in_use = True
        self.answered_early = False
        self.sending = True
        self._at_start = not (head or self._whole_missed)
        self._skip_payload = head
        self._read_timeout = read_timeout
        parser = None if head else self._reusable
        if parser is None:
            parser = HttpResponseParser(
                self,
                self._loop,
                DEFAULT_CHUNK_SIZE,
                payload_exception=ClientPayloadError,
                response_with_body=not head,
                read_until_eof=True,
                auto_decompress=False,
            )
            if not head:
                self._reusable = parser
        self._parser = parser

    # Bytes of a Content-Length body still to come, fed to the payload directly (see below).
    _body_left = 0

    def data_received(self, data: bytes) -> None:
        if not self.in_use and data:
            self._should_close = True
        if self._body_left and data:
            self._feed_body(data)
            return
        if self._at_start:
            self._at_start = False
            if not data.startswith(_NOT_WHOLE_STATUS, 9) and self._take_whole(data):
                return
        if (self._skip_payload or data.startswith(_BODILESS_STATUS, 9)) and data.startswith(b"HTTP/1."):
            data = self._cut_after_head(data)
        super().data_received(data)
        if self._buffer and not self._skip_payload:
            self._bypass_parser(*self._buffer[-1][0])  # the DataQueue holds ((message, payload), size)

    def _take_whole(self, data: bytes) -> bool:
        """Hand the waiting ``exchange`` the answer in ``data`` as (head, body bytes), when it is
        all there is in it: its head, and exactly the body its ``Content-Length`` declares (most
        answers of an API, which arrive in one read). Such an answer needs no payload stream: the
        head alone is parsed, by a parser that never makes one, and the body is what follows it.

        Anything else returns False having changed nothing, and takes the usual way through the
        response parser, which has not seen these bytes: a head or body still to come, bytes
        beyond the body (the connection is then not reused), chunked or unframed bodies, an
        answer that closes the connection, a head that may end before its first CRLFCRLF."""
        head, blank, body = data.partition(b"\r\n\r\n")
        if not blank or not head or len(body) > WHOLE_LIMIT or head[-1] in _CR_LF:
            # The last test: the parser also ends a line at a lone LF, so where the first CRLFCRLF
            # follows an LF (or a CR), the head may have ended at a blank line before it, and the
            # bytes between are body. (Where they are anything but CRs and LFs, the parser below
            # takes them for a second answer, or fails on them: the answer is not taken whole.)
            return False
        parser = self._heads
        if parser is None:
            # No payload is ever made by this parser, so it keeps no reference to the protocol.
            parser = self._heads = HttpResponseParser(
                None,
                self._loop,
                DEFAULT_CHUNK_SIZE,
                payload_exception=ClientPayloadError,
                response_with_body=False,
                read_until_eof=True,
                auto_decompress=False,
            )
        try:
            ((message, _),), upgraded, _ = parser.feed_data(head + blank)
        except Exception:  # not one whole head after all: the response parser will say why
            self._heads = None
            self._whole_missed = True
            return False
        code = message.code
        if message.should_close or upgraded or code < 200:
            self._heads = None  # it refuses bytes after "Connection: close", and after a 101
            self._whole_missed = True
            return False
        headers = message.headers
        length = headers.get(_CONTENT_LENGTH)
        if length is None or not length.isdigit() or _TRANSFER_ENCODING in headers or code in _NO_BODY:
            self._whole_missed = True
            return False
        beyond = len(body) - int(length)
        if beyond:
            if beyond > 0:
                # More than the upstream declared (a second answer, to nothing): the parser takes
                # it for the next answer, and would keep a partial one for the next request.
                self._should_close = True
            self._whole_missed = True
            return False
        keep_alive = headers.get(_KEEP_ALIVE)
        if keep_alive is not None:
            self.idle_limit = keep_alive_limit(keep_alive)
        self._deadline = 0.0  # the answer is complete: no read timeout (see _drop_timeout)
        self._payload = None
        self.in_use = False  # nothing more may come before the next request
        answer = (message, body)
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.feed_data(answer)  # nobody waits yet (or any more): queued as the parser's are
        else:
            self._waiter = None
            waiter.set_result(answer)
        return True

    async def read(self) -> tuple[RawResponseMessage, StreamReader | bytes]:  # type: ignore[override]
        """The next answer: queued by the response parser (with its payload), or handed over
        whole by ``_take_whole`` through the waiter itself (with its body)."""
        if not self._buffer and not self._eof:
            self._waiter = waiter = self._loop.create_future()
            try:
                answer = await waiter
            except (asyncio.CancelledError, TimeoutError):
                self._waiter = None
                raise
            if answer is not None:
                return answer  # type: ignore[no-any-return]
        if self._buffer:
            return self._buffer.popleft()[0]
        if self._exception is not None:
            raise self._exception
        raise EofStream

    def _cut_after_head(self, data: bytes) -> bytes:
        # An answer that has no body whatever it declares (to HEAD; a 204, a 304): bytes after its
        # head belong to no answer (an application answering HEAD as GET sends its body anyway).
        # Fed to the parser they would be a malformed next answer and this one a 502, or not,
        # depending on how the packets fell. The head is relayed; the connection is not reused.
        if data.startswith(b"1", 9):
            return data  # an interim answer; the final one follows
        end = data.find(b"\r\n\r\n") + 4
        if end < 4 or end == len(data):
            return data
        self._should_close = True
        return data[:end]

    def _bypass_parser(self, message: RawResponseMessage, payload: StreamReader) -> None:
        keep_alive = message.headers.get(hdrs.KEEP_ALIVE)
        if keep_alive is not None:
            self.idle_limit = keep_alive_limit(keep_alive)
        # The C parser copies every body chunk it passes on (a slice of the socket's buffer). Once
        # the head is parsed and the body's length is known, what remains of it is counted here
        # and handed to the payload as the socket delivered it: one copy less of a large body.
        if message.chunked:
            # The C parser keeps the last trailer field of a chunked body and hands it to the next
            # response as a header of that response (which may go to another client): the next
            # response on this connection gets a parser of its own.
            self._reusable = None
            return
        if payload.is_eof():
            # The answer ended within this read, in this parser, and whatever the read held after
            # it (a second answer's first bytes, to nothing) is still in the parser: where the
            # answer ended in the read is not known here. Reused, the parser would begin the next
            # answer on this connection, perhaps another client's, with those bytes. The next
            # response gets a parser of its own (this one stays in place until then); the bytes
            # die with this one. Answers taken whole never come here.
            self._reusable = None
            self._whole_missed = False  # whole with its head: the next one may be too
            return
        if message.code < 200 or message.code in _NO_BODY:
            return
        length = message.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return
        left = int(length) - payload.total_bytes
        if left > 0:
            self._body_left = left
            # That parser now waits for a body it will never see: the next response gets a new one.
            # It stays in place until the body is complete, so that a connection lost mid-body
            # still fails the payload through it (connection_lost).
            self._reusable = None

    def _feed_body(self, data: bytes) -> None:
        self._reschedule_timeout()
        left = self._body_left
        if len(data) > left:  # more than the upstream declared: never reuse this connection
            self._should_close = True
            data = data[:left]
        payload = self._payload
        if payload is None:  # closed under us (close() drops it); nothing wants these bytes
            self._body_left = 0
            return
        self._body_left = left = left - len(data)
        payload.feed_data(data)
        if not left:
            payload.feed_eof()
            # The parser still waits for this body: were the connection to close now (an upstream
            # answering "Connection: close"), it would fail a payload that arrived whole.
            self._parser = None

    # The read timeout as a deadline. aiohttp's protocol cancels its timer and makes a new one
    # each time bytes arrive, and cancels it again at each body's end: two timers made and two
    # cancelled per request on a small answer. Here one timer per connection stays armed and
    # data only moves the deadline; when the timer fires early it re-arms for what is left.
    _deadline = 0.0  # loop time by which bytes must arrive; 0.0 while nothing is awaited
    _timer_at = 0.0  # when the armed timer fires

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._deadline = 0.0
            return
        self._deadline = deadline = self._loop.time() + timeout
        handle = self._read_timeout_handle
        if handle is None or deadline < self._timer_at:  # the latter: a shorter timeout than before
            if handle is not None:
                handle.cancel()
            self._arm(deadline)

    def _arm(self, at: float) -> None:
        self._timer_at = at
        # Re-armed from its own callback for as long as the connection lives: made in a request's
        # context, the timer would carry that request's context variables along (see acquire).
        self._read_timeout_handle = self._loop.call_at(at, self._check_deadline, context=Context())

    def _drop_timeout(self) -> None:
        self._deadline = 0.0  # the armed timer finds nothing to do and lapses

    def _check_deadline(self) -> None:
        self._read_timeout_handle = None
        deadline = self._deadline
        if not deadline:
            return
        # uvloop's clock moves in whole milliseconds and rounds delays to them: a remainder under
        # one millisecond would re-arm as call_soon and spin until the clock ticks over.
        if deadline - self._loop.time() < 0.001:
            self._deadline = 0.0
            self._on_read_timeout()
        else:
            self._arm(deadline)

    def _cancel_timer(self) -> None:
        # A lost connection must not stay referenced by the loop's timer until it lapses.
        self._deadline = 0.0
        handle = self._read_timeout_handle
        if handle is not None:
            handle.cancel()
            self._read_timeout_handle = None

    # From the request's first byte to its answer's head; after that what is left unsent is unwanted.
    sending = False

    # The read timeout also bounds a request body the upstream stops taking: armed when the
    # socket's write buffer fills, cancelled when the upstream reads enough of it to go on. Without
    # it an upstream that accepted a streamed upload and then stopped reading (a stalled process,
    # a peer gone silent) held the request, its client and both connections for good: the read
    # timeout only starts once the body is sent (nginx's proxy_send_timeout, between two writes).
    def pause_writing(self) -> None:
        super().pause_writing()
        timeout = self._read_timeout
        if timeout and self.sending:
            self._arm_send_timer(timeout)

    def end_sending(self) -> None:
        self.sending = False
        if self._send_timer is not None:
            self._cancel_send_timer()

    # aiohttp's start_timeout only calls _reschedule_timeout: one call per request instead of two.
    start_timeout = _reschedule_timeout

    @property
    def reusable(self) -> bool:
        """Connected, and fit for another request by aiohttp's own account (``should_close``)."""
        transport = self.transport
        return transport is not None and not transport.is_closing() and not self.should_close

    def _write_timed_out(self) -> None:
        if self._paused and self.transport is not None:
            # The exchange waiting for the answer gets the timeout (a 504), and drops the
            # connection; close() resets it, since the upstream will never take what is queued.
            self.set_exception(SocketTimeoutError("Timeout on writing the request body to the upstream"))

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp calls this at every body's end and at most reads, paused or not; unpaused it
        # re-runs data_received with no data through the parser. Nothing here pauses parsing
        # (bodies are not decompressed), so only a paused transport has anything to resume.
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._reusable = None  # the parser refers back to this protocol
        super().connection_lost(exc)
        self._cancel_timer()
        self._cancel_send_timer()

    def close(self) -> None:
        transport = self.transport
        payload = self._payload
        if payload is not None and not payload.is_eof():
            # aiohttp's close() lets go of the payload before the connection is lost, so nothing
            # would end it: whoever relays it would wait for the rest of the body for good.
            payload.set_exception(ClientPayloadError("Connection to the upstream closed mid-body"))
        if transport is not None and transport.get_write_buffer_size():
            # Bytes of a request body still queued for an upstream that is not reading them (it
            # answered early, or stopped reading): a graceful close waits for them to be sent,
            # which keeps the socket, and its descriptor, for as long as the upstream likes. They
            # are not wanted: reset the connection.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            super().abort()
        else:
            super().close()
        # An answer parsed but never read (its request was cancelled) holds its payload, which
        # refers back to this protocol: a cycle that kept the body's buffered bytes until the
        # garbage collector came by. Nothing reads from a closed connection.
        self._buffer.clear()


# SO_LINGER on, zero seconds: close() sends a reset and drops whatever is queued.
_RESET = struct.pack("ii", 1, 0)


# Taken off an upstream's ``Keep-Alive: timeout=N``: its close, sent as the N seconds run out, may
# cross a request the gateway sends on the connection just then (undici does the same).
KEEP_ALIVE_MARGIN = 1.0


def keep_alive_limit(value: str) -> float | None:
    """How long a connection may stay idle by the upstream's ``Keep-Alive`` header (RFC 2068
    section 19.7.1.1, still sent by Node.js, Apache and others), or None when it does not say."""
    for parameter in value.split(","):
        name, _, seconds = parameter.partition("=")
        if name.strip().lower() == "timeout":
            seconds = seconds.strip()
            return max(int(seconds) - KEEP_ALIVE_MARGIN, 0.0) if seconds.isdigit() else None
    return None


class TargetPool:
    """Idle keep-alive connections to one target, most recently used first.

    At most ``max_idle`` idle connections are kept, each for at most ``idle_timeout`` seconds, or
    a second less than the upstream said it keeps one (``Keep-Alive: timeout=N``), whichever is
    shorter. An upstream that closes idle connections sooner without saying so (uvicorn after
    5 s, gunicorn after 2 s) may close one as the gateway reuses it; the proxy then retries
    idempotent requests on a new connection.
    """

    def __init__(self, url: str, *, max_idle: int = 256, idle_timeout: float = 15.0) -> None:
        parsed = URL(url)
        assert parsed.raw_host is not None  # checked by the settings
        self.host = parsed.raw_host  # ASCII (IDNA) for the resolver and TLS's server name
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = upstream_tls_context() if parsed.scheme == "https" else None
        # As RFC 9110 has it: an IPv6 literal in brackets, the port only when not the default.
        self.host_header = parsed.host_port_subcomponent
        if "%" in self.host and ":" in self.host:
            # A link-local target's zone, http://[fe80::1%25eth0]:8080 (RFC 6874): the resolver
            # takes it as fe80::1%eth0 (it could not resolve "%25eth0"), and it is this host's
            # interface, so it never goes out: "an HTTP client, proxy, or other intermediary MUST
            # remove any ZoneID attached to an outgoing URI" (RFC 6874 section 4).
            address, _, zone = self.host.partition("%")
            self.host = f"{address}%{unquote(zone.removeprefix('25'))}"
            self.host_header = self.host_header.replace(f"%{zone}", "", 1)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: deque[tuple[UpstreamProtocol, float]] = deque()
        self.retired = False

    async def acquire(self, connect_timeout: float, *, fresh: bool = False) -> UpstreamProtocol:
        """An idle pooled connection, or a new one (always a new one when ``fresh``)."""
        idle, now = self._idle, time.monotonic()
        while idle and not fresh:
            protocol, expires = idle.pop()
            if now < expires and protocol.reusable:
                return protocol
            protocol.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                # A transport runs its callbacks in the context it was made in, for as long as it
                # lives. Made in the request's, a pooled connection would keep that request's
                # context variables (its trace span, with its tags) alive after it ended, and show
                # them to whatever ran in those callbacks for later requests: it gets an empty one.
                connecting = asyncio.create_task(self._connect(loop), context=Context())
                try:
                    protocol = await connecting
                except asyncio.CancelledError:
                    # Cancelled (the timeout, or the client left) as the connect finished: the
                    # connection is made but nobody holds it.
                    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                        connecting.result().close()
                    raise
        except TimeoutError:
            raise ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except ssl.SSLError as exc:  # an OSError too, whose errno is OpenSSL's, not the kernel's
            raise TlsFailed(tls_reason(exc)) from exc
        except OSError as exc:  # refused, unreachable, reset, and socket.gaierror for DNS
            if exc.errno in LOCAL_SHORTAGES and not isinstance(exc, socket.gaierror):
                raise OutOfSockets(exc.errno, exc.strerror or str(exc)) from exc
            raise ConnectFailed(exc.errno, exc.strerror or str(exc)) from exc
        return protocol

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamProtocol:
        _, protocol = await loop.create_connection(
            lambda: UpstreamProtocol(loop),
            self.host,
            self.port,
            ssl=self.ssl,
            server_hostname=self.host if self.ssl else None,
        )
        return protocol

    def release(self, protocol: UpstreamProtocol) -> None:
        """Return a connection whose response was read to the end; anything else is closed."""
        if self.retired or not protocol.reusable or len(self._idle) >= self.max_idle:
            protocol.close()
            return
        limit = protocol.idle_limit
        if limit is None or limit > self.idle_timeout:
            limit = self.idle_timeout
        elif not limit:
            protocol.close()  # the upstream keeps it too briefly to reuse safely
            return
        protocol.in_use = False
        idle, now = self._idle, time.monotonic()
        idle.append((protocol, now + limit))
        if now >= idle[0][1]:
            self.sweep()  # expire from the cold end while we are here: idle sockets must not pile up

    def sweep(self) -> None:
        """Close idle connections past their time from the cold end (also when no request comes
        to do it; one with a shorter limit further in is caught when ``acquire`` reaches it)."""
        idle, now = self._idle, time.monotonic()
        while idle and now >= idle[0][1]:
            idle.popleft()[0].close()

    def retire(self) -> None:
        """A reload replaced this target: keep no connection once its current use ends."""
        self.retired = True
        self.close()

    def close(self) -> None:
        while self._idle:
            self._idle.popleft()[0].close()


async def exchange(
    protocol: UpstreamProtocol,
    *,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: bytes | AsyncIterable[bytes] | None,
    chunked: bool,
    read_timeout: float,
) -> tuple[RawResponseMessage, StreamReader | bytes]:
    """Send one request on ``protocol`` and wait for the response head: with its payload to read,
    or, when the whole answer came with its head (``UpstreamProtocol._take_whole``), with its body
    as bytes; the connection is then ready for its next request.

    ``headers`` must already carry the framing: ``Content-Length`` for bytes and for a stream of
    known length, nothing for ``chunked`` streams (``Transfer-Encoding`` is added here). A streamed
    body is written concurrently with waiting for the answer, as an upstream may answer early.
    """
    protocol.begin(read_timeout=read_timeout, head=method == "HEAD")
    sending: asyncio.Task[None] | None = None
    if body is None or isinstance(body, bytes):
        # The whole request in one write; the serializer refuses control characters (CR, LF)
        # in names and values.
        head = serialize_head(f"{method} {target} HTTP/1.1", headers)
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection to the upstream is closed")
        if body:
            transport.writelines((head, body))  # one writev; no copy of a body up to 64 KiB
        else:
            transport.write(head)
        protocol.start_timeout()
    else:
        writer = StreamWriter(protocol, asyncio.get_running_loop())
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
            writer.enable_chunking()
        await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
        sending = asyncio.create_task(_send_body(protocol, writer, body))
        # Its failure surfaces through the response (the connection is dropped); mark it seen.
        sending.add_done_callback(_retrieve)
    try:
        while True:
            message, payload = await protocol.read()
            if message.code not in _INTERIM or message.code == 101:
                break
            # aiohttp ends the read timeout at an interim answer (100 Continue, 103 Early Hints)
            # as at any bodiless one: without a new one, an upstream that then fell silent held
            # the request forever. Bytes of the final answer, when they come, move it on.
            if not protocol._buffer:
                protocol.start_timeout()
    except BaseException:
        if sending is not None and not sending.done():
            sending.cancel()
        raise
    finally:
        protocol.end_sending()
    if sending is not None and not sending.done():
        # The upstream answered before it had the whole body: this connection cannot be reused,
        # and the rest of the body is not wanted. The answer is still read from it (the sender
        # must not drop the connection under it), then the connection is closed.
        protocol.force_close()
        protocol.answered_early = True
        sending.cancel()
    return message, payload


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _send_body(protocol: UpstreamProtocol, writer: StreamWriter, body: AsyncIterable[bytes]) -> None:
    try:
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except BaseException:
        protocol.force_close()
        if not protocol.answered_early:
            # Whatever went wrong (the client's body broke, or crossed its limit), the upstream
            # must not take a truncated body for a whole one: drop the connection.
            with contextlib.suppress(Exception):
                protocol.abort()
        raise
    protocol.start_timeout()
