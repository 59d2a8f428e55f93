"""Which headers cross the gateway, in which direction, and what the gateway adds.

Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection and never cross: the fixed
set below plus every header the ``Connection`` header names.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "GATEWAY_OWNED",
    "HOP_BY_HOP",
    "TRACE_HEADERS",
    "VIA",
    "response_headers",
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

# The gateway answered ``Expect: 100-continue`` itself; Host is the target's.
_REQUEST_DROP = HOP_BY_HOP | GATEWAY_OWNED | TRACE_HEADERS | {"host", "expect"}
# aiohttp recomputes the framing of what it sends.
_RESPONSE_DROP = HOP_BY_HOP

VIA = "1.1 gateway"
# Headers the gateway writes itself; naming them in ``Connection`` cannot remove them.
_FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"})


def _connection_tokens(values: Iterable[str]) -> frozenset[str]:
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    remote: str | None,
    scheme: str,
    host: str | None,
) -> CIMultiDict[str]:
    """Headers for the upstream request: hop-by-hop and gateway-owned removed, forwarding added.

    The headers a ``Connection`` header names are dropped, unless they are ones the gateway sets
    itself below (a client cannot make the gateway forget ``X-Forwarded-For``).
    """
    drop = _REQUEST_DROP
    connection = incoming.getall("connection", ())
    if connection:
        drop = drop | (_connection_tokens(connection) - _FORWARDING)
    out = _without(incoming, drop)
    forwarded_for = out.getall("x-forwarded-for", ())
    if remote:
        chain = ", ".join([*forwarded_for, remote]) if forwarded_for else remote
        out["X-Forwarded-For"] = chain
    out["X-Forwarded-Proto"] = scheme
    if host:
        out["X-Forwarded-Host"] = host
    via = out.getall("via", ())
    out["Via"] = ", ".join([*via, VIA]) if via else VIA
    return out


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones; repeated headers stay repeated."""
    drop = _RESPONSE_DROP
    connection = incoming.getall("connection", ())
    if connection:
        drop = drop | _connection_tokens(connection)
    return _without(incoming, drop)


def _without(incoming: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``incoming`` minus the (lowercase) names in ``drop``, order and repeats kept.

    Copy, then remove: a multidict's key view intersects case-insensitively in C, where a loop
    over every header in Python costs about twice as much on the common request.
    """
    out = CIMultiDict(incoming)
    for name in incoming.keys() & drop:
        out.popall(name, None)
    return out
