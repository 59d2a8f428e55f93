"""B3 propagation (openzipkin/b3-propagation) through the gateway: what reaches the upstream.

Each row is one request, its headers written on a raw socket as given, and what the upstream must
receive: the trace id (the caller's, or a new one), the sampling state as B3 multi headers
(``x-b3-sampled``, or ``x-b3-flags: 1`` alone for debug: "Debug implies an accept decision, so
don't also send the X-B3-Sampled header") and the ``traceparent`` flags. Whatever the request
carried, the upstream gets one consistent context in both formats: ``x-b3-spanid`` is the
``traceparent`` parent id, ``x-b3-traceid`` its trace id (a 64-bit B3 id left-padded in
``traceparent``), ``x-b3-parentspanid`` the gateway's own span, and never the client's ``b3``.

When both W3C and B3 arrive and disagree, ``traceparent`` wins (see gateway/tracecontext.py).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import get_request, one_service, parse_responses, raw_exchange

T128 = "80f198ee56343ba864fe8b2a57d3eff7"
T64 = "a3ce929d0e0e4736"
SPAN = "e457b5a2e4d86bd1"
PARENT = "05e3ac9a4f6e3b90"
W3C_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
W3C_PARENT = "00f067aa0ba902b7"
NEW = "new"

# (request headers, trace id the upstream must get (NEW: none the request carried), x-b3-sampled
# that must arrive (None: absent), x-b3-flags (None: absent), traceparent flags)
CASES = [
    # Multiple headers.
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "1")], T128, "1", None, "01",
                 id="multi-accept"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "0")], T128, "0", None, "00",
                 id="multi-deny"),
    pytest.param([("X-B3-TraceId", T64), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "1")], T64, "1", None, "01",
                 id="multi-64-bit"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN), ("X-B3-ParentSpanId", PARENT),
                  ("X-B3-Sampled", "1")], T128, "1", None, "01", id="multi-with-parent"),
    # Defer: the gateway decides, by TRACE_SAMPLE_RATE (1.0 here).
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN)], T128, "1", None, "01", id="multi-defer"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN), ("X-B3-Flags", "1")], T128, None, "1", "01",
                 id="multi-debug"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "0"), ("X-B3-Flags", "1")],
                 T128, None, "1", "01", id="multi-debug-beats-deny"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "true")], T128, "1", None, "01",
                 id="multi-sampled-true"),
    pytest.param([("x-b3-traceid", T128), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0")], T128, "0", None, "00",
                 id="multi-lowercase-names"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-TraceId", W3C_TRACE), ("X-B3-SpanId", SPAN),
                  ("X-B3-Sampled", "0"), ("X-B3-Sampled", "1")], T128, "0", None, "00", id="multi-first-value-wins"),
    pytest.param([("X-B3-Sampled", "0")], NEW, "0", None, "00", id="multi-deny-only"),
    pytest.param([("X-B3-Flags", "1")], NEW, None, "1", "01", id="multi-debug-only"),
    pytest.param([("X-B3-TraceId", T128.upper()), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "0")], NEW, "1", None,
                 "01", id="multi-uppercase-is-invalid"),
    pytest.param([("X-B3-TraceId", "0" * 32), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "0")], NEW, "1", None, "01",
                 id="multi-zero-trace-id-is-invalid"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-Sampled", "0")], NEW, "1", None, "01",
                 id="multi-without-span-id-is-invalid"),
    pytest.param([("X-B3-TraceId", T128), ("X-B3-SpanId", SPAN), ("X-B3-ParentSpanId", T128),
                  ("X-B3-Sampled", "0")], NEW, "1", None, "01", id="multi-128-bit-parent-is-invalid"),
    # Single header: {TraceId}-{SpanId}-{SamplingState}-{ParentSpanId}, the last two optional.
    pytest.param([("b3", f"{T128}-{SPAN}")], T128, "1", None, "01", id="single-defer"),
    pytest.param([("b3", f"{T128}-{SPAN}-1")], T128, "1", None, "01", id="single-accept"),
    pytest.param([("b3", f"{T128}-{SPAN}-0")], T128, "0", None, "00", id="single-deny"),
    pytest.param([("b3", f"{T128}-{SPAN}-d")], T128, None, "1", "01", id="single-debug"),
    pytest.param([("b3", f"{T128}-{SPAN}-1-{PARENT}")], T128, "1", None, "01", id="single-with-parent"),
    pytest.param([("b3", f"{T64}-{SPAN}-0-{PARENT}")], T64, "0", None, "00", id="single-64-bit"),
    pytest.param([("B3", f"{T128}-{SPAN}-0")], T128, "0", None, "00", id="single-name-in-uppercase"),
    pytest.param([("b3", "0")], NEW, "0", None, "00", id="single-deny-only"),
    pytest.param([("b3", "1")], NEW, "1", None, "01", id="single-accept-only"),
    pytest.param([("b3", "d")], NEW, None, "1", "01", id="single-debug-only"),
    pytest.param([("b3", f"{T128}-{SPAN}-x")], NEW, "1", None, "01", id="single-bad-state-is-invalid"),
    pytest.param([("b3", f"{T128}-{SPAN}-1-{PARENT}-1")], NEW, "1", None, "01", id="single-five-fields-is-invalid"),
    pytest.param([("b3", f"{T128}-{SPAN}-0-{T128}")], NEW, "1", None, "01", id="single-128-bit-parent-is-invalid"),
    # Precedence: b3 over x-b3 (the B3 spec), traceparent over both; a format that is present but
    # invalid counts as absent.
    pytest.param([("b3", f"{T128}-{SPAN}-0"), ("X-B3-TraceId", T64), ("X-B3-SpanId", PARENT),
                  ("X-B3-Sampled", "1")], T128, "0", None, "00", id="single-beats-multi"),
    pytest.param([("b3", "0"), ("X-B3-TraceId", T64), ("X-B3-SpanId", PARENT), ("X-B3-Sampled", "1")],
                 NEW, "0", None, "00", id="single-deny-only-beats-multi"),
    pytest.param([("b3", "junk"), ("X-B3-TraceId", T64), ("X-B3-SpanId", PARENT), ("X-B3-Sampled", "0")],
                 T64, "0", None, "00", id="invalid-single-falls-back-to-multi"),
    pytest.param([("traceparent", f"00-{W3C_TRACE}-{W3C_PARENT}-01"), ("b3", f"{T128}-{SPAN}-0"),
                  ("X-B3-TraceId", T64), ("X-B3-SpanId", PARENT), ("X-B3-Sampled", "0")],
                 W3C_TRACE, "1", None, "01", id="traceparent-beats-disagreeing-b3"),
    pytest.param([("traceparent", f"00-{W3C_TRACE}-{W3C_PARENT}-00"), ("b3", f"{T128}-{SPAN}-d")],
                 W3C_TRACE, "0", None, "00", id="traceparent-deny-beats-b3-debug"),
    pytest.param([("traceparent", f"00-{'0' * 32}-{W3C_PARENT}-01"), ("b3", f"{T128}-{SPAN}-0")],
                 T128, "0", None, "00", id="invalid-traceparent-falls-back-to-b3"),
]  # fmt: skip

Send = Callable[[list[tuple[str, str]]], Awaitable[dict[str, list[str]]]]


@pytest.fixture
async def through_gateway(make_gateway: Any, make_upstream: Any) -> Send:
    """Send one request with ``headers`` through the gateway; the trace headers that arrived."""
    upstream = await make_upstream()
    gateway = await make_gateway(one_service(upstream.url))

    async def send(headers: list[tuple[str, str]]) -> dict[str, list[str]]:
        (response,) = parse_responses(await raw_exchange(gateway.port, get_request("/b3", headers)))
        assert response.status == 200, response.body
        arrived: dict[str, list[str]] = {}
        for name, value in upstream.requests[-1].headers:
            if name.lower() in ("traceparent", "tracestate", "b3") or name.lower().startswith("x-b3-"):
                arrived.setdefault(name.lower(), []).append(value)
        return arrived

    return send


@pytest.mark.parametrize(("headers", "trace_id", "sampled", "flags", "traceparent_flags"), CASES)
async def test_b3_through_the_gateway(
    through_gateway: Send,
    headers: list[tuple[str, str]],
    trace_id: str,
    sampled: str | None,
    flags: str | None,
    traceparent_flags: str,
) -> None:
    arrived = await through_gateway(headers)
    one = {name: values[0] for name, values in arrived.items()}
    assert all(len(values) == 1 for values in arrived.values()), arrived
    assert "b3" not in one, "the client's b3 would outrank the gateway's context at the next hop"
    b3_trace = one["x-b3-traceid"]
    if trace_id == NEW:
        sent = {m.lower() for _, v in headers for m in re.findall("[0-9a-fA-F]{16,32}", v)}
        assert re.fullmatch("[0-9a-f]{32}", b3_trace) and b3_trace not in sent
    else:
        assert b3_trace == trace_id
    version, tp_trace, tp_span, tp_flags = one["traceparent"].split("-")
    assert (version, tp_trace, tp_flags) == ("00", b3_trace.rjust(32, "0"), traceparent_flags)
    assert one["x-b3-spanid"] == tp_span and re.fullmatch("[0-9a-f]{16}", tp_span)
    # The gateway's SERVER span is the parent of its call: never an id the client sent.
    parent = one["x-b3-parentspanid"]
    assert re.fullmatch("[0-9a-f]{16}", parent) and parent not in {SPAN, PARENT, W3C_PARENT, tp_span}
    assert (one.get("x-b3-sampled"), one.get("x-b3-flags")) == (sampled, flags)
    assert "tracestate" not in one


@pytest.mark.parametrize("next_hop_reads", ["everything", "b3-only"])
@pytest.mark.parametrize(
    "first",
    [
        pytest.param(
            [("X-B3-TraceId", T64), ("X-B3-SpanId", SPAN), ("X-B3-Flags", "1")], id="x-b3-64-bit-debug"
        ),
        pytest.param([("b3", f"{T64}-{SPAN}-d")], id="b3-64-bit-debug"),
        pytest.param([("X-B3-TraceId", T64), ("X-B3-SpanId", SPAN), ("X-B3-Sampled", "1")], id="x-b3-64-bit"),
    ],
)
async def test_a_64_bit_id_and_debug_survive_the_next_hop(
    through_gateway: Send, first: list[tuple[str, str]], next_hop_reads: str
) -> None:
    """The next hop reads what the gateway wrote (another gateway, the chat API, which prefer
    traceparent; or a B3-only service): it must not lose debug, which W3C cannot carry, nor
    widen a 64-bit trace id to the 32 hex of traceparent."""
    debug = any(v.endswith("d") or k == "X-B3-Flags" for k, v in first)
    hop1 = await through_gateway(first)
    forwarded = [
        (k, v[0]) for k, v in hop1.items() if next_hop_reads == "everything" or k.startswith("x-b3-")
    ]
    hop2 = await through_gateway(forwarded)
    for hop in (hop1, hop2):
        assert hop["x-b3-traceid"] == [T64]
        assert hop["traceparent"][0].split("-")[1] == "0" * 16 + T64
        assert hop.get("x-b3-flags") == (["1"] if debug else None)
        assert hop.get("x-b3-sampled") == (None if debug else ["1"])
    assert hop2["x-b3-parentspanid"] != hop1["x-b3-parentspanid"]
