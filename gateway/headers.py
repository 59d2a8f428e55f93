"""Which headers cross the gateway, in which direction, and what the gateway adds.

Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection and never cross: the fixed
set below plus every header the ``Connection`` header names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from aiohttp import http_writer, web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "CLIENT_ADDRESS",
    "GATEWAY_OWNED",
    "GATEWAY_SET",
    "HOP_BY_HOP",
    "PATH_OVERRIDES",
    "TRACE_HEADERS",
    "VIA",
    "VIA_HTTP10",
    "drop_server_banner",
    "keep_header_bytes",
    "response_headers",
    "serialize_head",
    "upstream_headers",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        # Not hop-by-hop by name, but HTTP/2 cleartext upgrade settings belong to one connection.
        "http2-settings",
    }
)

# Set only by the gateway: whatever a client sends under these names is dropped first.
GATEWAY_OWNED = frozenset({"x-auth-subject", "x-auth-scopes"})

# Trace context is re-issued by the gateway for its own span: a client's stale ``b3`` must not
# sit next to the new ``x-b3-*`` set (a backend would prefer the single header).
TRACE_HEADERS = frozenset(
    {"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
     "x-b3-sampled", "x-b3-flags"}
)  # fmt: skip

# Headers that tell a server to serve another path than the request line's: IIS's URL Rewrite
# sets them for the application behind it, and some PHP frameworks take their word for the path
# (Yii; Symfony and Zend Framework before their 2018 fixes). From a client, X-Original-URL: /a/admin on GET /a/x would reach /a/admin's
# handler under /a's route, its auth and its scopes.
PATH_OVERRIDES = frozenset({"x-original-url", "x-rewrite-url"})

# Where a client says its address, host and scheme are, other than X-Forwarded-*: Spring's
# ForwardedHeaderFilter prefers ``Forwarded`` (RFC 7239) to them, nginx's realip and chi's RealIP
# take ``X-Real-IP`` or ``True-Client-IP``. Only a trusted proxy's (TRUSTED_PROXIES) reach the
# upstream: from anyone else they would be the client's word for its own address (an allow-list,
# a rate limit behind the gateway) and for the host the backend builds links with.
CLIENT_ADDRESS = frozenset({"forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip"})

# The gateway answered ``Expect: 100-continue`` itself; Host is the target's.
_REQUEST_DROP = HOP_BY_HOP | GATEWAY_OWNED | TRACE_HEADERS | PATH_OVERRIDES | {"host", "expect"}
_REQUEST_DROP_UNTRUSTED = _REQUEST_DROP | CLIENT_ADDRESS
# aiohttp recomputes the framing of what it sends.
_RESPONSE_DROP = HOP_BY_HOP

VIA = "1.1 gateway"
# Via names the protocol of the message as the gateway received it (RFC 9110 section 7.6.3).
VIA_HTTP10 = "1.0 gateway"
# Headers the gateway writes itself; naming them in ``Connection`` cannot remove them.
_FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"})
_KEEP_NONE: frozenset[str] = frozenset()

# Every header the gateway sets on the way upstream. CGI and WSGI servers (and frameworks on
# them) see a header as HTTP_ + its name upper-cased with "-" and "_" alike turned into "_", so a
# client's ``X_Auth_Subject: mallory`` reaches them under the very name of the gateway's
# ``x-auth-subject: alice``, and ``X_Forwarded_For`` can pass for the gateway's own. A client
# header whose name, "_" read as "-" and case ignored, is one of these is dropped, as
# nginx (underscores_in_headers off) and Envoy (headers_with_underscores_action) drop every name
# with an underscore; other names with underscores pass, as they always did.
GATEWAY_SET = GATEWAY_OWNED | TRACE_HEADERS | _FORWARDING | {"x-request-id"}
# Not spelled with underscores either: the names the gateway sets, the path overrides it drops,
# and the method overrides the routing refuses (Symfony reads HTTP_X_HTTP_METHOD_OVERRIDE).
_NO_UNDERSCORE_SPELLING = (
    GATEWAY_SET
    | PATH_OVERRIDES
    | CLIENT_ADDRESS
    | {"x-http-method-override", "x-http-method", "x-method-override"}
)


# Nearly every request and answer names the same few options (``keep-alive``, ``close``): the set
# to drop for a given Connection header is worked out once. Keys are whole header values, so a
# client sending ever-new ones only churns this bounded cache.
@functools.lru_cache(maxsize=256)
def _drop_with(base: frozenset[str], connection: tuple[str, ...], keep: frozenset[str]) -> frozenset[str]:
    tokens = frozenset(
        token.strip().lower() for value in connection for token in value.split(",") if token.strip()
    )
    return base | (tokens - keep)


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    remote: str | None,
    scheme: str,
    host: str | None,
    via: str = VIA,
    trusted_peer: bool = False,
) -> CIMultiDict[str]:
    """Headers for the upstream request: hop-by-hop, gateway-owned and path overrides removed
    (also when spelled with underscores, see ``GATEWAY_SET``), and the client-address headers
    unless the peer is a trusted proxy (``CLIENT_ADDRESS``); forwarding added (``via``: this
    hop's Via entry).

    The headers a ``Connection`` header names are dropped, unless they are ones the gateway sets
    itself below (a client cannot make the gateway forget ``X-Forwarded-For``).
    """
    drop = _REQUEST_DROP if trusted_peer else _REQUEST_DROP_UNTRUSTED
    connection = incoming.getall("connection", ())
    if connection:
        drop = _drop_with(drop, tuple(connection), _FORWARDING)
    out = _without(incoming, drop)
    # One join and one search, both in C, tell the common request (no "_" in any name) apart.
    if "_" in "".join(incoming.keys()):
        _drop_underscore_spellings(out)
    forwarded_for = out.getall("x-forwarded-for", ())
    if remote:
        chain = ", ".join([*forwarded_for, remote]) if forwarded_for else remote
        out["X-Forwarded-For"] = chain
    out["X-Forwarded-Proto"] = scheme
    if host:
        out["X-Forwarded-Host"] = host
    received = out.getall("via", ())
    out["Via"] = ", ".join([*received, via]) if received else via
    return out


def _drop_underscore_spellings(headers: CIMultiDict[str]) -> None:
    for name in [
        n for n in headers.keys() if "_" in n and n.replace("_", "-").lower() in _NO_UNDERSCORE_SPELLING
    ]:
        headers.popall(name, None)


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones; repeated headers stay repeated."""
    drop = _RESPONSE_DROP
    connection = incoming.getall("connection", ())
    if connection:
        drop = _drop_with(drop, tuple(connection), _KEEP_NONE)
    return _without(incoming, drop)


def drop_server_banner(response: web.StreamResponse) -> None:
    """Part of ``on_response_prepare``: no ``Server`` header unless the upstream sent one.

    aiohttp gives every response without one ``Server: Python/3.x aiohttp/3.y``: on a relayed
    answer that is a header the upstream never sent, and on any answer it tells a scanner which
    versions to look up. Its default is set by identity (``setdefault`` of one string object), so
    an upstream's own header, whatever it says, is a different object and stays.
    """
    if response.headers.get("Server") is SERVER_SOFTWARE:
        del response.headers["Server"]


def _without(incoming: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``incoming`` minus the (lowercase) names in ``drop``, order and repeats kept.

    Copy, then remove: a multidict's key view intersects case-insensitively in C, where a loop
    over every header in Python costs about twice as much on the common request.
    """
    out = CIMultiDict(incoming)
    for name in incoming.keys() & drop:
        out.popall(name, None)
    return out


# -- Serialising a head --------------------------------------------------------------------------

# aiohttp's C serialiser, captured before keep_header_bytes() replaces the module's reference.
_c_serialize = http_writer._serialize_headers
# What the C serialiser refuses too: control characters other than HTAB (CR and LF above all).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def serialize_head(start_line: str, headers: Mapping[str, str]) -> bytes:
    """The start line and header block, exactly as the bytes they were parsed from.

    aiohttp's parsers decode header bytes that are not UTF-8 (``obs-text``, RFC 9110 section 5.5:
    Latin-1 file names, legacy cookies) with ``surrogateescape``, and its C serialiser silently
    drops the escaped characters: ``caf\\xe9`` would reach the other side as ``caf``. A proxy passes
    them on as received, as nginx and Envoy do. Heads that are all ASCII (nearly all of them;
    ``isascii`` is a flag check) keep the C serialiser; the others are encoded back here.
    """
    if start_line.isascii() and "".join(headers.values()).isascii():
        return _c_serialize(start_line, headers)
    lines = [start_line]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    for line in lines:
        if _FORBIDDEN.search(line):
            raise ValueError("Forbidden control character detected in headers")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


def keep_header_bytes() -> None:
    """Make every head aiohttp writes (responses to clients, the WebSocket handshake upstream) go
    through :func:`serialize_head`. aiohttp looks its serialiser up in this module global on every
    write and offers no other hook; the function has the same signature and the same output for
    every head it could already write."""
    http_writer._serialize_headers = serialize_head  # type: ignore[assignment]
