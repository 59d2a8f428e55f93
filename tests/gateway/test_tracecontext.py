"""Table-driven tests for gateway.tracecontext: W3C Trace Context Level 1 and B3 propagation."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict

from gateway import tracecontext
from gateway.tracecontext import (
    PROPAGATION_HEADERS,
    Origin,
    SamplingOnly,
    TraceContext,
    child_headers,
    extract,
    new_root,
    new_span_id,
    new_trace_id,
)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
TID64 = "a3ce929d0e0e4736"
B3_TID = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SID = "e457b5a2e4d86bd1"
B3_PID = "05e3ac9a4f6e3b90"
CHILD = "b9c7c989f97918e1"


def tp(version: str = "00", trace: str = TID, span: str = SID, flags: str = "01") -> str:
    return f"{version}-{trace}-{span}-{flags}"


def ctx_of(headers: Mapping[str, str]) -> TraceContext:
    result = extract(headers)
    assert isinstance(result, TraceContext), result
    return result


# -- traceparent ---------------------------------------------------------------------------------

TRACEPARENT_VALID = [
    pytest.param(tp(flags="01"), TID, SID, True, id="sampled"),
    pytest.param(tp(flags="00"), TID, SID, False, id="not-sampled"),
    pytest.param(tp(flags="09"), TID, SID, True, id="sampled-with-unknown-bit"),
    pytest.param(tp(flags="08"), TID, SID, False, id="unknown-bit-only"),
    pytest.param(tp(flags="ff"), TID, SID, True, id="all-flags"),
    pytest.param(tp(flags="fe"), TID, SID, False, id="all-flags-but-sampled"),
    pytest.param(" " + tp(), TID, SID, True, id="leading-space"),
    pytest.param("\t" + tp(), TID, SID, True, id="leading-tab"),
    pytest.param(tp() + " \t", TID, SID, True, id="trailing-ows"),
    pytest.param(tp(version="01"), TID, SID, True, id="version-01-exact"),
    pytest.param(tp(version="01") + "-what-the-future-will-be-like", TID, SID, True, id="v01-extra-fields"),
    pytest.param(tp(version="cc", flags="00") + "-x", TID, SID, False, id="vcc-extra-field"),
    pytest.param(tp(version="fe") + "-", TID, SID, True, id="vfe-trailing-dash"),
    pytest.param(tp(trace="0" * 31 + "1", span="0" * 15 + "1"), "0" * 31 + "1", "0" * 15 + "1", True,
                 id="ids-almost-zero"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "trace_id", "span_id", "sampled"), TRACEPARENT_VALID)
def test_valid_traceparent_is_read(value: str, trace_id: str, span_id: str, sampled: bool) -> None:
    ctx = ctx_of({"traceparent": value})
    assert (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.debug) == (trace_id, span_id, sampled, False)
    assert ctx.origin is Origin.TRACEPARENT
    assert ctx.tracestate == ()


@pytest.mark.parametrize(
    ("flags", "sampled", "random_id", "written"),
    [
        pytest.param("00", False, False, "00", id="none"),
        pytest.param("01", True, False, "01", id="sampled"),
        pytest.param("02", False, True, "02", id="random"),
        pytest.param("03", True, True, "03", id="sampled-random"),
        pytest.param("0b", True, True, "03", id="with-a-reserved-bit"),
        pytest.param("ff", True, True, "03", id="all"),
        pytest.param("fc", False, False, "00", id="reserved-only"),
    ],
)
def test_level_2_random_flag_is_kept_and_reserved_bits_cleared(
    flags: str, sampled: bool, random_id: bool, written: str
) -> None:
    """Trace Context Level 2: a participant continuing a trace sends the random-trace-id flag
    (02) as it received it; bits no level defines go out as zero (Level 1)."""
    for value in (tp(flags=flags), tp(version="cc", flags=flags) + "-future"):
        ctx = ctx_of({"traceparent": value})
        assert (ctx.sampled, ctx.random_trace_id) == (sampled, random_id)
        assert child_headers(ctx, CHILD)["traceparent"] == f"00-{TID}-{CHILD}-{written}"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"b3": f"{B3_TID}-{B3_SID}-1"}, id="b3"),
        pytest.param({"X-B3-TraceId": B3_TID, "X-B3-SpanId": B3_SID, "X-B3-Sampled": "1"}, id="x-b3"),
        pytest.param({"traceparent": tp(flags="03")[:-1]}, id="invalid-traceparent"),
    ],
)
def test_random_flag_is_not_claimed_for_ids_of_unknown_origin(headers: dict[str, str]) -> None:
    result = extract(headers)
    ctx = result if isinstance(result, TraceContext) else new_root(sampled=True)
    assert not ctx.random_trace_id
    assert child_headers(ctx, CHILD)["traceparent"].endswith("-01")


TRACEPARENT_INVALID = [
    pytest.param("", id="empty"),
    pytest.param("garbage", id="garbage"),
    pytest.param(tp(trace=TID.upper()), id="uppercase-trace-id"),
    pytest.param(tp(span=SID.upper()), id="uppercase-parent-id"),
    pytest.param(tp(flags="0A"), id="uppercase-flags"),
    pytest.param(tp(version="0A"), id="uppercase-version"),
    pytest.param(tp().upper(), id="all-uppercase"),
    pytest.param(tp(trace=TID[:-1]), id="trace-id-31"),
    pytest.param(tp(trace=TID + "3"), id="trace-id-33"),
    pytest.param(tp(span=SID[:-1]), id="parent-id-15"),
    pytest.param(tp(span=SID + "7"), id="parent-id-17"),
    pytest.param(tp(flags="1"), id="flags-1-char"),
    pytest.param(tp(flags="001"), id="flags-3-chars"),
    pytest.param(tp(flags=".0"), id="flags-illegal-char"),
    pytest.param(tp(trace="." + TID[1:]), id="trace-id-illegal-char"),
    pytest.param(tp(span=SID[:-1] + "."), id="parent-id-illegal-char"),
    pytest.param(tp(trace="g" * 32), id="trace-id-not-hex"),
    pytest.param(tp(trace="0" * 32), id="trace-id-all-zero"),
    pytest.param(tp(span="0" * 16), id="parent-id-all-zero"),
    pytest.param(tp(version="ff"), id="version-ff"),
    pytest.param(tp(version="ff") + "-extra", id="version-ff-extra-fields"),
    pytest.param(tp(version="0"), id="version-1-char"),
    pytest.param(tp(version="000"), id="version-3-chars"),
    pytest.param(tp(version=".0"), id="version-illegal-char"),
    pytest.param(tp() + "-what-the-future-will-be-like", id="v00-extra-fields"),
    pytest.param(tp() + "-", id="v00-trailing-dash"),
    pytest.param(tp() + ".", id="v00-trailing-dot"),
    pytest.param(tp(version="cc") + ".what-the-future", id="future-flags-not-followed-by-dash"),
    pytest.param(tp(version="cc")[:-1], id="future-shorter-than-55"),
    pytest.param(tp(version="cc", trace=TID[:-1]) + "-1", id="future-short-trace-id-padded"),
    pytest.param(tp(version="cc", trace="0" * 32), id="future-trace-id-all-zero"),
    pytest.param(tp(version="cc", span="0" * 16), id="future-parent-id-all-zero"),
    pytest.param(tp().replace("-", "_"), id="wrong-delimiter"),
    pytest.param(f"00-{TID}- {SID}-01", id="inner-space"),
    pytest.param(tp() + "\n", id="trailing-newline"),
    pytest.param(tp(version="00", flags="01\x00"), id="trailing-nul"),
]


@pytest.mark.parametrize("value", TRACEPARENT_INVALID)
def test_invalid_traceparent_gives_nothing(value: str) -> None:
    assert extract({"traceparent": value, "tracestate": "foo=1"}) is None


def test_traceparent_sent_twice_is_invalid() -> None:
    headers = CIMultiDict([("traceparent", tp()), ("traceparent", tp(trace="1" * 32))])
    assert extract(headers) is None


def test_traceparent_sent_twice_identically_is_still_invalid() -> None:
    assert extract(CIMultiDict([("traceparent", tp()), ("traceparent", tp())])) is None


HEADER_CONTAINERS = [
    pytest.param(lambda pairs: dict(pairs), id="dict"),
    pytest.param(lambda pairs: CIMultiDict(pairs), id="cimultidict"),
    pytest.param(lambda pairs: CIMultiDictProxy(CIMultiDict(pairs)), id="cimultidictproxy"),
    pytest.param(lambda pairs: MultiDict(pairs), id="case-sensitive-multidict"),
]


@pytest.mark.parametrize("make", HEADER_CONTAINERS)
@pytest.mark.parametrize(
    ("parent", "state"),
    [("traceparent", "tracestate"), ("TraceParent", "TraceState"), ("TRACEPARENT", "TRACESTATE"),
     ("tRaCePaReNt", "TrAcEsTaTe")],
)  # fmt: skip
def test_header_names_match_in_any_case(make, parent: str, state: str) -> None:
    ctx = ctx_of(make([(parent, tp()), (state, "a=1")]))
    assert ctx.trace_id == TID
    assert ctx.tracestate == ("a=1",)


@pytest.mark.parametrize("name", ["trace-parent", "trace.parent", "traceparent2"])
def test_misspelt_traceparent_is_not_read(name: str) -> None:
    assert extract({name: tp()}) is None


# -- tracestate ----------------------------------------------------------------------------------

KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")
MEMBERS_32 = [f"k{i:02d}={i}" for i in range(32)]

TRACESTATE = [
    pytest.param(["rojo=00f067aa0ba902b7"], ("rojo=00f067aa0ba902b7",), id="one-member"),
    pytest.param(["rojo=1,congo=2"], ("rojo=1", "congo=2"), id="order-kept"),
    pytest.param(["foo=1 \t , \t bar=2, \t baz=3"], ("foo=1", "bar=2", "baz=3"), id="ows-around-members"),
    pytest.param([" foo=1", "\tbar=2\t"], ("foo=1", "bar=2"), id="ows-at-ends"),
    pytest.param(["foo=1,bar=2", "rojo=1,congo=2", "baz=3"],
                 ("foo=1", "bar=2", "rojo=1", "congo=2", "baz=3"), id="several-headers-in-order"),
    pytest.param([""], (), id="empty-header"),
    pytest.param(["", "foo=1"], ("foo=1",), id="empty-header-then-member"),
    pytest.param(["foo=1", ""], ("foo=1",), id="member-then-empty-header"),
    pytest.param([",,foo=1, ,\t,bar=2,"], ("foo=1", "bar=2"), id="empty-members-skipped"),
    pytest.param([" \t "], (), id="ows-only"),
    pytest.param(["foo= 1"], ("foo= 1",), id="leading-space-in-value-kept"),
    pytest.param(["foo=1 2"], ("foo=1 2",), id="inner-space-in-value"),
    pytest.param(["foo=1   "], ("foo=1",), id="trailing-spaces-are-ows"),
    pytest.param([KEY_CHARS + "=" + VALUE_CHARS.strip()],
                 (KEY_CHARS + "=" + VALUE_CHARS.strip(),), id="all-allowed-characters"),
    pytest.param(["tenant@system=1"], ("tenant@system=1",), id="multi-tenant-key"),
    pytest.param(["1tenant@sys=1"], ("1tenant@sys=1",), id="tenant-may-start-with-digit"),
    pytest.param([KEY_CHARS + "@a-z0-9_-*/=x"], (KEY_CHARS + "@a-z0-9_-*/=x",), id="tenant-all-chars"),
    pytest.param(["z" * 256 + "=1"], ("z" * 256 + "=1",), id="key-256"),
    pytest.param(["t" * 241 + "@" + "v" * 14 + "=1"], ("t" * 241 + "@" + "v" * 14 + "=1",), id="tenant-241-system-14"),
    pytest.param(["foo=" + "v" * 256], ("foo=" + "v" * 256,), id="value-256"),
    # A member that breaks the grammar discards the whole list (the W3C suite's strict level).
    pytest.param(["FOO=1,bar=2"], (), id="uppercase-key"),
    pytest.param(["foo.bar=1,bar=2"], (), id="dot-in-key"),
    pytest.param(["foo =1,bar=2"], (), id="space-before-equals"),
    pytest.param(["1foo=1,bar=2"], (), id="simple-key-starting-with-digit"),
    pytest.param(["_foo=1,bar=2"], (), id="key-starting-with-underscore"),
    pytest.param(["foo,bar=2"], (), id="no-equals"),
    pytest.param(["=1,bar=2"], (), id="empty-key"),
    pytest.param(["foo=,bar=2"], (), id="empty-value"),
    pytest.param(["foo=bar=baz,bar=2"], (), id="equals-in-value"),
    pytest.param(["foo=a\tb,bar=2"], (), id="tab-in-value"),
    pytest.param(["foo=\u00e9,bar=2"], (), id="non-ascii-value"),
    pytest.param(["foo=\x7f,bar=2"], (), id="del-in-value"),
    pytest.param(["foo@=1,bar=2"], (), id="empty-system"),
    pytest.param(["@foo=1,bar=2"], (), id="empty-tenant"),
    pytest.param(["foo@@bar=1,bar=2"], (), id="double-at"),
    pytest.param(["foo@bar@baz=1,bar=2"], (), id="two-ats"),
    pytest.param(["t@1sys=1,bar=2"], (), id="system-starting-with-digit"),
    pytest.param(["z" * 257 + "=1,bar=2"], (), id="key-257"),
    pytest.param(["t" * 242 + "@v=1,bar=2"], (), id="tenant-242"),
    pytest.param(["t@" + "v" * 15 + "=1,bar=2"], (), id="system-15"),
    pytest.param(["foo=" + "v" * 257 + ",bar=2"], (), id="value-257"),
    pytest.param(["a=1,FOO=2,b=3,=4,c=5"], (), id="invalid-in-the-middle"),
    # One entry per key: a repeated key spoils the whole list.
    pytest.param(["foo=1,foo=1"], (), id="duplicate-same-value"),
    pytest.param(["foo=1,foo=2"], (), id="duplicate-other-value"),
    pytest.param(["foo=1", "foo=2"], (), id="duplicate-across-headers"),
    pytest.param(["foo=1,bar=2,foo=3"], (), id="duplicate-not-adjacent"),
    pytest.param(["t@sys=1,t@sys2=2"], ("t@sys=1", "t@sys2=2"), id="same-tenant-other-system"),
    pytest.param(["foo=1,FOO=2"], (), id="invalid-lookalike-spoils-the-list"),
    # At most 32 members: a 33rd discards the list; empty members are not members.
    pytest.param([",".join(MEMBERS_32)], tuple(MEMBERS_32), id="32-members"),
    pytest.param([",".join([*MEMBERS_32, "k32=32"])], (), id="33-members"),
    pytest.param([",".join(MEMBERS_32[:16]), ",".join([*MEMBERS_32[16:], "x=1"])], (), id="33-members-over-headers"),
    pytest.param([",".join([*MEMBERS_32, ",, \t,"])], tuple(MEMBERS_32), id="32-and-empty-ones"),
    pytest.param(["", ",".join(MEMBERS_32), " "], tuple(MEMBERS_32), id="32-and-empty-headers"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "expected"), TRACESTATE)
def test_tracestate_members(values: list[str], expected: tuple[str, ...]) -> None:
    headers = CIMultiDict([("traceparent", tp()), *(("tracestate", v) for v in values)])
    ctx = ctx_of(headers)
    assert ctx.tracestate == expected
    assert ctx.trace_id == TID  # a bad tracestate never spoils traceparent


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"traceparent": tp(version="ff"), "tracestate": "foo=1", "b3": f"{B3_TID}-{B3_SID}"},
                     id="invalid-traceparent-with-b3"),
        pytest.param({"tracestate": "foo=1", "b3": f"{B3_TID}-{B3_SID}"}, id="no-traceparent-with-b3"),
        pytest.param({"tracestate": "foo=1", "x-b3-traceid": B3_TID, "x-b3-spanid": B3_SID},
                     id="no-traceparent-with-x-b3"),
    ],
)  # fmt: skip
def test_tracestate_ignored_without_valid_traceparent(headers: dict[str, str]) -> None:
    ctx = ctx_of(headers)
    assert ctx.trace_id == B3_TID
    assert ctx.tracestate == ()


def test_tracestate_alone_gives_nothing() -> None:
    assert extract({"tracestate": "foo=1"}) is None


def test_tracestate_read_with_future_version() -> None:
    ctx = ctx_of({"traceparent": tp(version="cc") + "-x", "tracestate": "foo=1, bar=2"})
    assert ctx.tracestate == ("foo=1", "bar=2")
    assert ctx_of({"traceparent": tp(version="cc") + "-x", "tracestate": "foo=1, BAD=2"}).tracestate == ()


# -- B3 single header ----------------------------------------------------------------------------

B3_SINGLE_VALID = [
    pytest.param(f"{B3_TID}-{B3_SID}", B3_TID, B3_SID, None, False, id="trace-span-defer"),
    pytest.param(f"{TID64}-{B3_SID}", TID64, B3_SID, None, False, id="64-bit-trace-id"),
    pytest.param(f"{B3_TID}-{B3_SID}-1", B3_TID, B3_SID, True, False, id="accept"),
    pytest.param(f"{B3_TID}-{B3_SID}-0", B3_TID, B3_SID, False, False, id="deny"),
    pytest.param(f"{B3_TID}-{B3_SID}-d", B3_TID, B3_SID, True, True, id="debug"),
    pytest.param(f"{B3_TID}-{B3_SID}-1-{B3_PID}", B3_TID, B3_SID, True, False, id="with-parent"),
    pytest.param(f"{TID64}-{B3_SID}-d-{B3_PID}", TID64, B3_SID, True, True, id="64-bit-debug-parent"),
    pytest.param(f"  {B3_TID}-{B3_SID}-1\t", B3_TID, B3_SID, True, False, id="ows-around"),
]


@pytest.mark.parametrize(("value", "trace_id", "span_id", "sampled", "debug"), B3_SINGLE_VALID)
def test_valid_b3_single_is_read(
    value: str, trace_id: str, span_id: str, sampled: bool | None, debug: bool
) -> None:
    ctx = ctx_of({"b3": value})
    assert (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.debug) == (trace_id, span_id, sampled, debug)
    assert ctx.origin is Origin.B3_SINGLE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("0", SamplingOnly(sampled=False), id="deny-only"),
        pytest.param("1", SamplingOnly(sampled=True), id="accept-only"),
        pytest.param("d", SamplingOnly(sampled=True, debug=True), id="debug-only"),
        pytest.param(" 0 ", SamplingOnly(sampled=False), id="deny-only-ows"),
    ],
)
def test_b3_sampling_state_alone_is_a_decision_without_context(value: str, expected: SamplingOnly) -> None:
    assert extract({"b3": value}) == expected


B3_SINGLE_INVALID = [
    pytest.param("", id="empty"),
    pytest.param("-", id="dash"),
    pytest.param("00", id="not-a-state"),
    pytest.param("D", id="uppercase-debug-only"),
    pytest.param("true", id="true-only"),
    pytest.param(B3_TID, id="trace-id-only"),
    pytest.param(f"{B3_TID.upper()}-{B3_SID}", id="uppercase-trace-id"),
    pytest.param(f"{B3_TID}-{B3_SID.upper()}", id="uppercase-span-id"),
    pytest.param(f"{B3_TID[:-1]}-{B3_SID}", id="trace-id-31"),
    pytest.param(f"{B3_TID}0-{B3_SID}", id="trace-id-33"),
    pytest.param(f"{TID64[:-1]}-{B3_SID}", id="trace-id-15"),
    pytest.param(f"{TID64}0-{B3_SID}", id="trace-id-17"),
    pytest.param(f"{B3_TID}-{B3_SID[:-1]}", id="span-id-15"),
    pytest.param(f"{B3_TID}-{B3_SID}0", id="span-id-17"),
    pytest.param(f"{'0' * 32}-{B3_SID}", id="trace-id-zero-128"),
    pytest.param(f"{'0' * 16}-{B3_SID}", id="trace-id-zero-64"),
    pytest.param(f"{B3_TID}-{'0' * 16}", id="span-id-zero"),
    pytest.param(f"{B3_TID}-{B3_SID}-2", id="unknown-state"),
    pytest.param(f"{B3_TID}-{B3_SID}-D", id="uppercase-debug"),
    pytest.param(f"{B3_TID}-{B3_SID}-true", id="state-true"),
    pytest.param(f"{B3_TID}-{B3_SID}-", id="empty-state"),
    pytest.param(f"{B3_TID}-{B3_SID}-{B3_PID}", id="parent-without-state"),
    pytest.param(f"{B3_TID}-{B3_SID}-1-{B3_PID[:-1]}", id="parent-15"),
    pytest.param(f"{B3_TID}-{B3_SID}-1-{B3_PID.upper()}", id="parent-uppercase"),
    pytest.param(f"{B3_TID}-{B3_SID}-1-{'0' * 16}", id="parent-zero"),
    pytest.param(f"{B3_TID}-{B3_SID}-1-", id="empty-parent"),
    pytest.param(f"{B3_TID}-{B3_SID}-1-{B3_PID}-x", id="five-fields"),
    pytest.param(f"{B3_TID}--{B3_SID}", id="empty-field"),
    pytest.param(f"{B3_TID} - {B3_SID}", id="inner-spaces"),
]


@pytest.mark.parametrize("value", B3_SINGLE_INVALID)
def test_invalid_b3_single_gives_nothing(value: str) -> None:
    assert extract({"b3": value}) is None


def test_b3_single_sent_twice_first_wins() -> None:
    headers = CIMultiDict([("b3", f"{B3_TID}-{B3_SID}-1"), ("b3", "0")])
    assert ctx_of(headers).sampled is True


# -- B3 multiple headers -------------------------------------------------------------------------

IDS = {"X-B3-TraceId": B3_TID, "X-B3-SpanId": B3_SID}

B3_MULTI_VALID = [
    pytest.param(IDS, B3_TID, None, False, id="ids-only-defer"),
    pytest.param({"X-B3-TraceId": TID64, "X-B3-SpanId": B3_SID}, TID64, None, False, id="64-bit-trace-id"),
    pytest.param({**IDS, "X-B3-Sampled": "1"}, B3_TID, True, False, id="sampled-1"),
    pytest.param({**IDS, "X-B3-Sampled": "0"}, B3_TID, False, False, id="sampled-0"),
    pytest.param({**IDS, "X-B3-Sampled": "true"}, B3_TID, True, False, id="sampled-true"),
    pytest.param({**IDS, "X-B3-Sampled": "false"}, B3_TID, False, False, id="sampled-false"),
    pytest.param({**IDS, "X-B3-Sampled": "True"}, B3_TID, True, False, id="sampled-True"),
    pytest.param({**IDS, "X-B3-Sampled": "FALSE"}, B3_TID, False, False, id="sampled-FALSE"),
    pytest.param({**IDS, "X-B3-Sampled": " 1 "}, B3_TID, True, False, id="sampled-ows"),
    pytest.param({**IDS, "X-B3-Sampled": "yes"}, B3_TID, None, False, id="sampled-junk-defers"),
    pytest.param({**IDS, "X-B3-Sampled": ""}, B3_TID, None, False, id="sampled-empty-defers"),
    pytest.param({**IDS, "X-B3-Flags": "1"}, B3_TID, True, True, id="flags-debug"),
    pytest.param({**IDS, "X-B3-Flags": "1", "X-B3-Sampled": "0"}, B3_TID, True, True, id="debug-beats-deny"),
    pytest.param({**IDS, "X-B3-Flags": "0", "X-B3-Sampled": "1"}, B3_TID, True, False, id="flags-0"),
    pytest.param({**IDS, "X-B3-Flags": "2"}, B3_TID, None, False, id="flags-other"),
    pytest.param({**IDS, "X-B3-ParentSpanId": B3_PID}, B3_TID, None, False, id="with-parent"),
    pytest.param({"x-b3-traceid": B3_TID, "x-b3-spanid": B3_SID, "x-b3-sampled": "1"}, B3_TID, True, False,
                 id="lowercase-names"),
    pytest.param({"X-B3-TRACEID": B3_TID, "X-B3-SPANID": B3_SID}, B3_TID, None, False, id="uppercase-names"),
    pytest.param({"X-B3-TraceId": f" {B3_TID}\t", "X-B3-SpanId": B3_SID}, B3_TID, None, False, id="ows"),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "trace_id", "sampled", "debug"), B3_MULTI_VALID)
def test_valid_b3_multi_is_read(
    headers: dict[str, str], trace_id: str, sampled: bool | None, debug: bool
) -> None:
    ctx = ctx_of(headers)
    assert (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.debug) == (trace_id, B3_SID, sampled, debug)
    assert ctx.origin is Origin.B3_MULTI


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"X-B3-Sampled": "0"}, SamplingOnly(sampled=False), id="deny-only"),
        pytest.param({"X-B3-Sampled": "1"}, SamplingOnly(sampled=True), id="accept-only"),
        pytest.param({"X-B3-Sampled": "false"}, SamplingOnly(sampled=False), id="false-only"),
        pytest.param({"X-B3-Flags": "1"}, SamplingOnly(sampled=True, debug=True), id="debug-only"),
        pytest.param(
            {"X-B3-Flags": "1", "X-B3-Sampled": "0"}, SamplingOnly(True, True), id="debug-beats-deny"
        ),
        pytest.param(
            {"X-B3-Sampled": "0", "X-B3-ParentSpanId": B3_PID}, SamplingOnly(False), id="with-parent"
        ),
        pytest.param({"X-B3-Sampled": "maybe"}, None, id="junk-only"),
        pytest.param({"X-B3-Flags": "0"}, None, id="flags-0-only"),
        pytest.param({"X-B3-ParentSpanId": B3_PID}, None, id="parent-only"),
    ],
)
def test_b3_multi_sampling_without_ids(headers: dict[str, str], expected: SamplingOnly | None) -> None:
    assert extract(headers) == expected


B3_MULTI_INVALID = [
    pytest.param({"X-B3-TraceId": B3_TID, "X-B3-Sampled": "1"}, id="trace-id-without-span-id"),
    pytest.param({"X-B3-SpanId": B3_SID, "X-B3-Sampled": "1"}, id="span-id-without-trace-id"),
    pytest.param({**IDS, "X-B3-TraceId": B3_TID.upper()}, id="uppercase-trace-id"),
    pytest.param({**IDS, "X-B3-SpanId": B3_SID.upper()}, id="uppercase-span-id"),
    pytest.param({**IDS, "X-B3-TraceId": B3_TID[:-1]}, id="trace-id-31"),
    pytest.param({**IDS, "X-B3-TraceId": B3_TID[:20]}, id="trace-id-20"),
    pytest.param({**IDS, "X-B3-TraceId": TID64[:-1]}, id="trace-id-15"),
    pytest.param({**IDS, "X-B3-SpanId": B3_SID + "0"}, id="span-id-17"),
    pytest.param({**IDS, "X-B3-TraceId": "0" * 32}, id="trace-id-zero"),
    pytest.param({**IDS, "X-B3-SpanId": "0" * 16}, id="span-id-zero"),
    pytest.param({**IDS, "X-B3-TraceId": ""}, id="trace-id-empty"),
    pytest.param({**IDS, "X-B3-TraceId": "0x" + B3_TID[2:]}, id="trace-id-0x"),
    pytest.param({**IDS, "X-B3-SpanId": "-" + B3_SID[1:]}, id="span-id-sign"),
    pytest.param({**IDS, "X-B3-ParentSpanId": B3_PID[:-1]}, id="parent-15"),
    pytest.param({**IDS, "X-B3-ParentSpanId": "zz" + B3_PID[2:]}, id="parent-not-hex"),
    pytest.param({**IDS, "X-B3-ParentSpanId": "0" * 16}, id="parent-zero"),
    pytest.param(
        {**IDS, "X-B3-Sampled": "1", "X-B3-TraceId": "garbage"}, id="garbage-trace-id-with-decision"
    ),
]


@pytest.mark.parametrize("headers", B3_MULTI_INVALID)
def test_invalid_b3_multi_gives_nothing(headers: dict[str, str]) -> None:
    assert extract(headers) is None


def test_b3_multi_first_value_wins() -> None:
    headers = CIMultiDict(
        [
            ("X-B3-TraceId", B3_TID),
            ("X-B3-TraceId", TID),
            ("X-B3-SpanId", B3_SID),
            ("X-B3-Sampled", "0"),
            ("X-B3-Sampled", "1"),
        ]
    )
    ctx = ctx_of(headers)
    assert (ctx.trace_id, ctx.sampled) == (B3_TID, False)


# -- precedence ----------------------------------------------------------------------------------

MULTI = {"X-B3-TraceId": TID64, "X-B3-SpanId": CHILD, "X-B3-Sampled": "1"}
SINGLE = f"{B3_TID}-{B3_SID}-0"

PRECEDENCE = [
    pytest.param({"traceparent": tp(), "b3": SINGLE, **MULTI}, Origin.TRACEPARENT, TID, id="traceparent-beats-all"),
    pytest.param({"traceparent": tp(flags="00"), "b3": "1"}, Origin.TRACEPARENT, TID, id="traceparent-beats-b3-1"),
    pytest.param({"traceparent": tp(), "b3": SINGLE}, Origin.TRACEPARENT, TID, id="traceparent-beats-b3"),
    pytest.param({"traceparent": tp(), **MULTI}, Origin.TRACEPARENT, TID, id="traceparent-beats-x-b3"),
    pytest.param({"traceparent": tp(version="ff"), "b3": SINGLE, **MULTI}, Origin.B3_SINGLE, B3_TID,
                 id="invalid-traceparent-falls-back-to-b3"),
    pytest.param({"traceparent": tp(version="ff"), **MULTI}, Origin.B3_MULTI, TID64,
                 id="invalid-traceparent-falls-back-to-x-b3"),
    pytest.param({"b3": SINGLE, **MULTI}, Origin.B3_SINGLE, B3_TID, id="b3-beats-x-b3"),
    pytest.param({"b3": "junk", **MULTI}, Origin.B3_MULTI, TID64, id="invalid-b3-falls-back-to-x-b3"),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "origin", "trace_id"), PRECEDENCE)
def test_format_precedence(headers: dict[str, str], origin: Origin, trace_id: str) -> None:
    ctx = ctx_of(headers)
    assert (ctx.origin, ctx.trace_id) == (origin, trace_id)


def test_b3_deny_only_beats_complete_x_b3() -> None:
    assert extract({"b3": "0", **MULTI}) == SamplingOnly(sampled=False)


def test_b3_deny_only_loses_to_valid_traceparent() -> None:
    ctx = ctx_of({"traceparent": tp(flags="01"), "b3": "0"})
    assert (ctx.origin, ctx.sampled) == (Origin.TRACEPARENT, True)


def test_b3_deny_only_honoured_when_traceparent_invalid() -> None:
    assert extract({"traceparent": tp(trace="0" * 32), "b3": "0"}) == SamplingOnly(sampled=False)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-headers"),
        pytest.param({"content-type": "application/json", "x-request-id": "abc"}, id="unrelated"),
        pytest.param({"traceparent": "junk", "b3": "junk", "X-B3-TraceId": "junk", "X-B3-SpanId": "x"},
                     id="all-invalid"),
    ],
)  # fmt: skip
def test_nothing_usable_gives_none(headers: dict[str, str]) -> None:
    assert extract(headers) is None


# -- injection -----------------------------------------------------------------------------------

CHILD_HEADERS = [
    pytest.param(
        TraceContext(TID, SID, True, tracestate=("rojo=1", "congo=2"), origin=Origin.TRACEPARENT), {},
        {"traceparent": f"00-{TID}-{CHILD}-01", "tracestate": "rojo=1,congo=2", "x-b3-traceid": TID,
         "x-b3-spanid": CHILD, "x-b3-parentspanid": SID, "x-b3-sampled": "1"},
        id="sampled-with-tracestate"),
    pytest.param(
        TraceContext(TID, SID, False), {},
        {"traceparent": f"00-{TID}-{CHILD}-00", "x-b3-traceid": TID, "x-b3-spanid": CHILD,
         "x-b3-parentspanid": SID, "x-b3-sampled": "0"},
        id="not-sampled-no-tracestate"),
    pytest.param(
        TraceContext(TID, SID, None), {},
        {"traceparent": f"00-{TID}-{CHILD}-00", "x-b3-traceid": TID, "x-b3-spanid": CHILD,
         "x-b3-parentspanid": SID},
        id="deferred-omits-sampled"),
    pytest.param(
        TraceContext(TID, SID, True, debug=True), {},
        {"traceparent": f"00-{TID}-{CHILD}-01", "x-b3-traceid": TID, "x-b3-spanid": CHILD,
         "x-b3-parentspanid": SID, "x-b3-flags": "1"},
        id="debug-sends-flags-not-sampled"),
    pytest.param(
        TraceContext(TID64, B3_SID, True, origin=Origin.B3_MULTI), {},
        {"traceparent": f"00-{'0' * 16}{TID64}-{CHILD}-01", "x-b3-traceid": TID64, "x-b3-spanid": CHILD,
         "x-b3-parentspanid": B3_SID, "x-b3-sampled": "1"},
        id="64-bit-padded-for-w3c-only"),
    pytest.param(
        TraceContext(TID, None, True), {},
        {"traceparent": f"00-{TID}-{CHILD}-01", "x-b3-traceid": TID, "x-b3-spanid": CHILD,
         "x-b3-sampled": "1"},
        id="root-has-no-parent"),
    pytest.param(
        TraceContext(TID, SID, True), {"b3_single": True},
        {"traceparent": f"00-{TID}-{CHILD}-01", "x-b3-traceid": TID, "x-b3-spanid": CHILD,
         "x-b3-parentspanid": SID, "x-b3-sampled": "1", "b3": f"{TID}-{CHILD}-1-{SID}"},
        id="b3-single-sampled"),
    pytest.param(
        TraceContext(TID64, SID, True, debug=True), {"b3_single": True},
        {"traceparent": f"00-{'0' * 16}{TID64}-{CHILD}-01", "x-b3-traceid": TID64, "x-b3-spanid": CHILD,
         "x-b3-parentspanid": SID, "x-b3-flags": "1", "b3": f"{TID64}-{CHILD}-d-{SID}"},
        id="b3-single-debug-64-bit"),
    pytest.param(
        TraceContext(TID, SID, None), {"b3_single": True},
        {"traceparent": f"00-{TID}-{CHILD}-00", "x-b3-traceid": TID, "x-b3-spanid": CHILD,
         "x-b3-parentspanid": SID, "b3": f"{TID}-{CHILD}"},
        id="b3-single-deferred-cannot-carry-parent"),
    pytest.param(
        TraceContext(TID, None, False), {"b3_single": True},
        {"traceparent": f"00-{TID}-{CHILD}-00", "x-b3-traceid": TID, "x-b3-spanid": CHILD,
         "x-b3-sampled": "0", "b3": f"{TID}-{CHILD}-0"},
        id="b3-single-root-deny"),
]  # fmt: skip


@pytest.mark.parametrize(("ctx", "kwargs", "expected"), CHILD_HEADERS)
def test_child_headers(ctx: TraceContext, kwargs: dict[str, bool], expected: dict[str, str]) -> None:
    assert child_headers(ctx, CHILD, **kwargs) == expected


def test_child_headers_names_are_all_propagation_headers() -> None:
    # The proxy strips PROPAGATION_HEADERS from the client's request; anything we write must be in it.
    written = child_headers(TraceContext(TID, SID, True, tracestate=("a=1",)), CHILD, b3_single=True)
    debug = child_headers(TraceContext(TID, SID, True, debug=True), CHILD)
    assert set(written) | set(debug) == PROPAGATION_HEADERS


@pytest.mark.parametrize(
    "child", ["", CHILD.upper(), CHILD[:-1], CHILD + "0", "0" * 16, "g" * 16, CHILD[:-1] + "\n"]
)
def test_child_headers_refuses_bad_child_span_id(child: str) -> None:
    with pytest.raises(ValueError, match="child_span_id"):
        child_headers(TraceContext(TID, SID, True), child)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"trace_id": TID.upper(), "span_id": SID}, "trace_id", id="uppercase-trace"),
        pytest.param({"trace_id": TID[:20], "span_id": SID}, "trace_id", id="trace-20"),
        pytest.param({"trace_id": "0" * 32, "span_id": SID}, "trace_id", id="zero-trace"),
        pytest.param({"trace_id": TID, "span_id": SID[:-1]}, "span_id", id="short-span"),
        pytest.param({"trace_id": TID, "span_id": "0" * 16}, "span_id", id="zero-span"),
        pytest.param(
            {"trace_id": TID, "span_id": SID, "debug": True, "sampled": None}, "debug", id="debug-defer"
        ),
        pytest.param(
            {"trace_id": TID, "span_id": SID, "debug": True, "sampled": False}, "debug", id="debug-deny"
        ),
    ],
)
def test_trace_context_refuses_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TraceContext(**kwargs)  # type: ignore[arg-type]


# -- round trips ---------------------------------------------------------------------------------

ROUND_TRIP = [
    pytest.param(TraceContext(TID, SID, True, tracestate=("rojo=1", "t@sys=2")), id="w3c-sampled-tracestate"),
    pytest.param(TraceContext(TID, SID, False), id="not-sampled"),
    pytest.param(TraceContext(TID, SID, None), id="deferred"),
    pytest.param(TraceContext(TID, SID, True, debug=True), id="debug"),
    pytest.param(TraceContext(TID64, SID, True), id="64-bit"),
    pytest.param(TraceContext(TID, None, True), id="root"),
]


@pytest.mark.parametrize("ctx", ROUND_TRIP)
def test_round_trip_through_traceparent(ctx: TraceContext) -> None:
    headers = child_headers(ctx, CHILD, b3_single=True)
    back = ctx_of({k: v for k, v in headers.items() if k in ("traceparent", "tracestate")})
    assert back.origin is Origin.TRACEPARENT
    assert back.trace_id == ctx.w3c_trace_id
    assert back.span_id == CHILD
    assert back.sampled is (ctx.sampled is True or ctx.debug)  # W3C has no defer, and no debug
    assert back.tracestate == ctx.tracestate


@pytest.mark.parametrize("b3_single", [False, True])
@pytest.mark.parametrize("ctx", ROUND_TRIP)
def test_round_trip_through_everything_written(ctx: TraceContext, b3_single: bool) -> None:
    """The next hop that reads what the gateway wrote (the chat API, another gateway) gets the
    context back whole: debug and a 64-bit trace id survive, though traceparent wins."""
    back = ctx_of(child_headers(ctx, CHILD, b3_single=b3_single))
    assert back.origin is Origin.TRACEPARENT
    assert (back.trace_id, back.span_id, back.debug, back.tracestate) == (
        ctx.trace_id,
        CHILD,
        ctx.debug,
        ctx.tracestate,
    )
    assert back.sampled is (ctx.sampled is True or ctx.debug)


B3_AGREEING = {"X-B3-TraceId": TID64, "X-B3-SpanId": SID, "X-B3-Flags": "1"}


@pytest.mark.parametrize(
    ("headers", "trace_id", "debug"),
    [
        pytest.param({"traceparent": tp(trace="0" * 16 + TID64, flags="01"), **B3_AGREEING}, TID64, True,
                     id="same-context-64-bit-debug"),
        pytest.param({"traceparent": tp(flags="00"), "b3": f"{TID}-{SID}-d"}, TID, True,
                     id="same-context-b3-debug-beats-w3c-deny"),
        pytest.param({"traceparent": tp(trace="0" * 16 + TID64), "b3": f"{TID64}-{SID}-1"}, TID64, False,
                     id="same-context-64-bit"),
        pytest.param({"traceparent": tp(), "b3": f"{TID}-{CHILD}-d"}, TID, False, id="other-span-ignored"),
        pytest.param({"traceparent": tp(), "b3": f"{B3_TID}-{SID}-d"}, TID, False, id="other-trace-ignored"),
        pytest.param({"traceparent": tp(trace="1" * 16 + TID64), **B3_AGREEING}, "1" * 16 + TID64, False,
                     id="64-bit-that-is-not-the-low-half-ignored"),
        pytest.param({"traceparent": tp(), "b3": "d"}, TID, False, id="b3-state-only-ignored"),
        pytest.param({"traceparent": tp(), "b3": "junk", "X-B3-TraceId": TID, "X-B3-SpanId": SID,
                      "X-B3-Flags": "1"}, TID, True, id="invalid-b3-then-x-b3"),
    ],
)  # fmt: skip
def test_b3_adds_what_w3c_cannot_say_when_it_names_the_same_context(
    headers: dict[str, str], trace_id: str, debug: bool
) -> None:
    ctx = ctx_of(headers)
    assert (ctx.origin, ctx.trace_id, ctx.span_id, ctx.debug) == (Origin.TRACEPARENT, trace_id, SID, debug)
    if debug:
        assert ctx.sampled is True


@pytest.mark.parametrize("ctx", ROUND_TRIP)
def test_round_trip_through_b3_multi(ctx: TraceContext) -> None:
    headers = child_headers(ctx, CHILD)
    b3_only = {k: v for k, v in headers.items() if k.startswith("x-b3-")}
    back = ctx_of(b3_only)
    assert back.origin is Origin.B3_MULTI
    assert (back.trace_id, back.span_id, back.sampled, back.debug) == (
        ctx.trace_id,
        CHILD,
        ctx.sampled,
        ctx.debug,
    )


@pytest.mark.parametrize("ctx", ROUND_TRIP)
def test_round_trip_through_b3_single(ctx: TraceContext) -> None:
    back = ctx_of({"b3": child_headers(ctx, CHILD, b3_single=True)["b3"]})
    assert back.origin is Origin.B3_SINGLE
    assert (back.trace_id, back.span_id, back.sampled, back.debug) == (
        ctx.trace_id,
        CHILD,
        ctx.sampled,
        ctx.debug,
    )


@given(
    trace_id=st.sampled_from([16, 32]).flatmap(lambda n: st.text("0123456789abcdef", min_size=n, max_size=n)),
    span_id=st.text("0123456789abcdef", min_size=16, max_size=16),
    child=st.text("0123456789abcdef", min_size=16, max_size=16),
    sampled=st.sampled_from([True, False, None]),
)
def test_round_trip_property(trace_id: str, span_id: str, child: str, sampled: bool | None) -> None:
    if not (trace_id.strip("0") and span_id.strip("0") and child.strip("0")):
        with pytest.raises(ValueError):
            child_headers(TraceContext(trace_id, span_id, sampled), child)
        return
    ctx = TraceContext(trace_id, span_id, sampled)
    back = ctx_of(child_headers(ctx, child))
    assert (back.trace_id, back.span_id) == (trace_id, child)


# -- id generation and new traces ----------------------------------------------------------------


@pytest.mark.parametrize(("make", "length"), [(new_trace_id, 32), (new_span_id, 16)])
def test_new_ids_are_lowercase_hex_and_distinct(make, length: int) -> None:
    ids = {make() for _ in range(64)}
    assert len(ids) == 64
    for value in ids:
        assert len(value) == length
        assert set(value) <= set("0123456789abcdef")


@pytest.mark.parametrize(("make", "bits"), [(new_trace_id, 128), (new_span_id, 64)])
def test_new_ids_are_never_all_zero(monkeypatch: pytest.MonkeyPatch, make, bits: int) -> None:
    outputs = iter([0, 0, 1])
    calls: list[int] = []

    def fake_bits(n: int) -> int:
        calls.append(n)
        return next(outputs)

    monkeypatch.setattr(tracecontext, "_bits", fake_bits)
    assert make() == "0" * (bits // 4 - 1) + "1"
    assert calls == [bits, bits, bits]


@pytest.mark.parametrize(
    ("kwargs", "sampled", "debug"),
    [
        pytest.param({}, None, False, id="defer"),
        pytest.param({"sampled": False}, False, False, id="deny"),
        pytest.param({"sampled": True}, True, False, id="accept"),
        pytest.param({"debug": True}, True, True, id="debug-implies-sampled"),
        pytest.param({"sampled": False, "debug": True}, True, True, id="debug-beats-deny"),
    ],
)
def test_new_root(kwargs: dict[str, bool], sampled: bool | None, debug: bool) -> None:
    ctx = new_root(**kwargs)
    assert (ctx.span_id, ctx.sampled, ctx.debug, ctx.origin, ctx.tracestate) == (
        None,
        sampled,
        debug,
        Origin.NEW,
        (),
    )
    assert len(ctx.trace_id) == 32
    assert new_root().trace_id != ctx.trace_id


def test_sampling_only_becomes_a_new_root_with_its_decision() -> None:
    decision = extract({"b3": "0"})
    assert isinstance(decision, SamplingOnly)
    ctx = new_root(sampled=decision.sampled, debug=decision.debug)
    headers = child_headers(ctx, CHILD)
    assert headers["x-b3-sampled"] == "0"
    assert headers["traceparent"].endswith("-00")


# -- never raises --------------------------------------------------------------------------------

latin1_junk = st.binary(max_size=80).map(lambda b: b.decode("latin-1"))
header_name = st.sampled_from(sorted(PROPAGATION_HEADERS)).flatmap(
    lambda name: st.sampled_from([name, name.upper(), name.title()])
)
near_valid = st.sampled_from(
    [tp(), tp(version="cc") + "-", f"{B3_TID}-{B3_SID}-1-{B3_PID}", B3_TID, B3_SID, "1", "d", "foo=1"]
)


@given(
    st.lists(
        st.tuples(
            header_name, st.one_of(st.text(max_size=80), latin1_junk, near_valid, near_valid.map(str.upper))
        ),
        max_size=10,
    )
)
def test_extract_never_raises(pairs: list[tuple[str, str]]) -> None:
    result = extract(CIMultiDict(pairs))
    assert result is None or isinstance(result, TraceContext | SamplingOnly)
    if isinstance(result, TraceContext):
        # Whatever was accepted can be propagated.
        assert child_headers(result, CHILD)["x-b3-traceid"] == result.trace_id


@given(
    st.dictionaries(
        st.one_of(header_name, st.text(max_size=20)), st.one_of(st.text(max_size=80), latin1_junk)
    )
)
def test_extract_never_raises_on_plain_dicts(headers: dict[str, str]) -> None:
    result = extract(headers)
    assert result is None or isinstance(result, TraceContext | SamplingOnly)
