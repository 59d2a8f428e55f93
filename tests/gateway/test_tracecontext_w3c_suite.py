"""The W3C Trace Context test suite, ported: the gateway is the service under test.

The suite (w3c/trace-context, ``test/test.py``) sends requests to a service and checks the
``traceparent`` and ``tracestate`` on the calls that service makes to the harness. Here the service
is the gateway and the harness's callback is a recording upstream on loopback. Each row below is
one of the suite's tests, with its requests' headers as the suite sends them (written on a raw
socket, so repeated headers, odd casing, whitespace and empty values arrive as written) and what
it expects of the call that reached the upstream:

- ``SAME``: the trace is continued: the suite's trace id, a parent id other than the caller's.
- ``NEW``: the trace is restarted: a trace id that is none of those the request carried (and,
  as the spec says, no ``tracestate`` kept from a ``traceparent`` that could not be parsed).

and, for a continued trace, the ``tracestate`` members that must arrive, in order (the suite
checks that some keys are there or gone; the exact list is stricter). Every case of the suite's
default strictness (``STRICT_LEVEL=2``) is here. Whatever arrives is also read the way the suite
reads it: one ``traceparent`` of version ``00`` with non-zero ids and no reserved flag bits, and a
``tracestate`` whose every member fits the grammar, so a value its parser would refuse fails too.
The ``AdvancedTest`` cases ask the service for three calls; the gateway makes one call per request,
so they are three requests with the same headers.

Trace Context Level 2 adds the random-trace-id flag, checked at the end.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import get_request, one_service, parse_responses, raw_exchange

TRACE = "12345678901234567890123456789012"
PARENT = "1234567890123456"
TP = f"00-{TRACE}-{PARENT}-01"
TP00 = f"00-{TRACE}-{PARENT}-00"

SAME, NEW = "same", "new"

Headers = list[tuple[str, str]]

# The grammar the suite reads with (the spec's ABNF, Level 1 keys), written out independently of
# gateway.tracecontext so that the two cannot share a mistake.
_LC = "a-z"
_KEYCHARS = r"a-z0-9_\-*/"
_KEY = re.compile(
    rf"[{_LC}][{_KEYCHARS}]{{0,255}}"  # simple-key
    rf"|[{_LC}0-9][{_KEYCHARS}]{{0,240}}@[{_LC}][{_KEYCHARS}]{{0,13}}"  # tenant@system
)
_NBLK = r"\x21-\x2b\x2d-\x3c\x3e-\x7e"
_VALUE = re.compile(rf"[\x20{_NBLK}]{{0,255}}[{_NBLK}]")
_TRACEPARENT = re.compile(r"(00)-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

KEY_WITHOUT_VENDOR = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
KEY_WITH_VENDOR = KEY_WITHOUT_VENDOR + "@a-z0-9_-*/"
ALL_VALUE_CHARS = "".join(chr(c) for c in [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)])
BARS = [f"bar{n:02d}={n:02d}" for n in range(1, 34)]


@dataclass(frozen=True)
class Arrived:
    """The trace context on one call that reached the upstream, read as the suite reads it."""

    trace_id: str
    parent_id: str
    flags: int
    tracestate: tuple[tuple[str, str], ...]


def read_arrived(headers: list[tuple[str, str]]) -> Arrived:
    parents = [v for k, v in headers if k.lower() == "traceparent"]
    assert len(parents) == 1, f"expected one traceparent upstream, got {parents}"
    match = _TRACEPARENT.fullmatch(parents[0])
    assert match, f"traceparent {parents[0]!r} is not version 00 in lowercase hex"
    _, trace_id, parent_id, flags = match.groups()
    assert trace_id != "0" * 32 and parent_id != "0" * 16, parents[0]
    # Level 1: bits no level defines are sent as zero (02 is Level 2's random-trace-id flag).
    assert int(flags, 16) & ~0x03 == 0, parents[0]
    members: list[tuple[str, str]] = []
    for value in (v for k, v in headers if k.lower() == "tracestate"):
        for member in re.split(r"[ \t]*,[ \t]*", value):
            if not member:
                continue
            key, _, val = member.partition("=")
            assert _KEY.fullmatch(key) and _VALUE.fullmatch(val), f"invalid member {member!r} forwarded"
            assert key not in dict(members), f"key {key!r} forwarded twice"
            members.append((key, val))
    assert len(members) <= 32
    return Arrived(trace_id, parent_id, int(flags, 16), tuple(members))


def state(*members: str) -> tuple[tuple[str, str], ...]:
    return tuple(tuple(m.split("=", 1)) for m in members)  # type: ignore[misc]


# (headers sent, SAME or NEW, tracestate that must arrive when SAME)
Request = tuple[Headers, str, tuple[tuple[str, str], ...]]


def same(*headers: tuple[str, str], tracestate: tuple[tuple[str, str], ...] = ()) -> Request:
    return list(headers), SAME, tracestate


def new(*headers: tuple[str, str]) -> Request:
    return list(headers), NEW, ()


def tp_with(value: str, *more: tuple[str, str]) -> Request:
    """A traceparent the suite expects to be refused (a restart)."""
    return new(("traceparent", value), *more)


def ts(*values: str) -> list[tuple[str, str]]:
    """``traceparent`` (flags 00, as the suite's tracestate tests send it) and these tracestates."""
    return [("traceparent", TP00), *(("tracestate", v) for v in values)]


def ts_same(values: list[str], *members: str) -> Request:
    return same(*ts(*values), tracestate=state(*members))


SUITE: list[Any] = [
    pytest.param([new()], id="test_both_traceparent_and_tracestate_missing"),
    pytest.param([same(("traceparent", TP))], id="test_traceparent_included_tracestate_missing"),
    pytest.param(
        [new(("traceparent", f"00-{TRACE[:-1]}1-{PARENT}-01"), ("traceparent", TP))],
        id="test_traceparent_duplicated",
    ),
    pytest.param([new(("trace-parent", TP)), new(("trace.parent", TP))], id="test_traceparent_header_name"),
    pytest.param(
        [same((name, TP)) for name in ("TraceParent", "TrAcEpArEnT", "TRACEPARENT")],
        id="test_traceparent_header_name_valid_casing",
    ),
    pytest.param(
        [tp_with(TP + "."), tp_with(TP + "-what-the-future-will-be-like")], id="test_traceparent_version_0x00"
    ),
    pytest.param(
        [
            same(("traceparent", f"cc-{TRACE}-{PARENT}-01")),
            same(("traceparent", f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like")),
            tp_with(f"cc-{TRACE}-{PARENT}-01.what-the-future-will-be-like"),
        ],
        id="test_traceparent_version_0xcc",
    ),
    pytest.param([tp_with(f"ff-{TRACE}-{PARENT}-01")], id="test_traceparent_version_0xff"),
    pytest.param(
        [tp_with(f".0-{TRACE}-{PARENT}-01"), tp_with(f"0.-{TRACE}-{PARENT}-01")],
        id="test_traceparent_version_illegal_characters",
    ),
    pytest.param(
        [tp_with(f"000-{TRACE}-{PARENT}-01"), tp_with(f"0000-{TRACE}-{PARENT}-01")],
        id="test_traceparent_version_too_long",
    ),
    pytest.param([tp_with(f"0-{TRACE}-{PARENT}-01")], id="test_traceparent_version_too_short"),
    pytest.param([tp_with(f"00-{'0' * 32}-{PARENT}-01")], id="test_traceparent_trace_id_all_zero"),
    pytest.param(
        [tp_with(f"00-.{TRACE[1:]}-{PARENT}-01"), tp_with(f"00-{TRACE[:-1]}.-{PARENT}-01")],
        id="test_traceparent_trace_id_illegal_characters",
    ),
    pytest.param([tp_with(f"00-{TRACE}3-{PARENT}-01")], id="test_traceparent_trace_id_too_long"),
    pytest.param([tp_with(f"00-{TRACE[:-1]}-{PARENT}-01")], id="test_traceparent_trace_id_too_short"),
    pytest.param([tp_with(f"00-{TRACE}-{'0' * 16}-01")], id="test_traceparent_parent_id_all_zero"),
    pytest.param(
        [tp_with(f"00-{TRACE}-.{PARENT[1:]}-01"), tp_with(f"00-{TRACE}-{PARENT[:-1]}.-01")],
        id="test_traceparent_parent_id_illegal_characters",
    ),
    pytest.param([tp_with(f"00-{TRACE}-{PARENT}7-01")], id="test_traceparent_parent_id_too_long"),
    pytest.param([tp_with(f"00-{TRACE}-{PARENT[:-1]}-01")], id="test_traceparent_parent_id_too_short"),
    pytest.param(
        [tp_with(f"00-{TRACE}-{PARENT}-.0"), tp_with(f"00-{TRACE}-{PARENT}-0.")],
        id="test_traceparent_trace_flags_illegal_characters",
    ),
    pytest.param([tp_with(f"00-{TRACE}-{PARENT}-001")], id="test_traceparent_trace_flags_too_long"),
    pytest.param([tp_with(f"00-{TRACE}-{PARENT}-1")], id="test_traceparent_trace_flags_too_short"),
    pytest.param(
        [same(("traceparent", v)) for v in (" " + TP, "\t" + TP, TP + " ", TP + "\t", "\t " + TP + " \t")],
        id="test_traceparent_ows_handling",
    ),
    pytest.param(
        [new(("tracestate", "foo=1")), new(("tracestate", "foo=1,bar=2"))],
        id="test_tracestate_included_traceparent_missing",
    ),
    pytest.param([ts_same(["foo=1,bar=2"], "foo=1", "bar=2")], id="test_tracestate_included_traceparent_included"),
    pytest.param(
        [same(("traceparent", TP00), (name, "foo=1")) for name in ("trace-state", "trace.state")],
        id="test_tracestate_header_name",
    ),
    pytest.param(
        [
            same(("traceparent", TP00), (name, "foo=1"), tracestate=state("foo=1"))
            for name in ("TraceState", "TrAcEsTaTe", "TRACESTATE")
        ],
        id="test_tracestate_header_name_valid_casing",
    ),
    pytest.param(
        [ts_same([""]), ts_same(["foo=1", ""], "foo=1"), ts_same(["", "foo=1"], "foo=1")],
        id="test_tracestate_empty_header",
    ),
    pytest.param(
        [
            ts_same(
                ["foo=1,bar=2", "rojo=1,congo=2", "baz=3"], "foo=1", "bar=2", "rojo=1", "congo=2", "baz=3"
            )
        ],
        id="test_tracestate_multiple_headers_different_keys",
    ),
    pytest.param(
        [ts_same(["foo=1,foo=1"]), ts_same(["foo=1,foo=2"]), ts_same(["foo=1", "foo=1"]), ts_same(["foo=1", "foo=2"])],
        id="test_tracestate_duplicated_keys",
    ),
    pytest.param(
        [
            ts_same([f"{KEY_WITHOUT_VENDOR}={ALL_VALUE_CHARS}"], f"{KEY_WITHOUT_VENDOR}={ALL_VALUE_CHARS}"),
            ts_same([f"{KEY_WITH_VENDOR}={ALL_VALUE_CHARS}"], f"{KEY_WITH_VENDOR}={ALL_VALUE_CHARS}"),
        ],
        id="test_tracestate_all_allowed_characters",
    ),
    pytest.param(
        [
            ts_same(["foo=1 \t , \t bar=2, \t baz=3"], "foo=1", "bar=2", "baz=3"),
            ts_same(["foo=1\t \t,\t \tbar=2,\t \tbaz=3"], "foo=1", "bar=2", "baz=3"),
            *(ts_same([v], "foo=1") for v in (" foo=1", "\tfoo=1", "foo=1 ", "foo=1\t", "\t foo=1 \t")),
        ],
        id="test_tracestate_ows_handling",
    ),
    pytest.param(
        [ts_same(["foo =1"]), ts_same(["FOO=1"]), ts_same(["foo.bar=1"])], id="test_tracestate_key_illegal_characters"
    ),
    pytest.param(
        [ts_same([v + ",bar=2"]) for v in ("foo@=1", "@foo=1", "foo@@bar=1", "foo@bar@baz=1")],
        id="test_tracestate_key_illegal_vendor_format",
    ),
    pytest.param(
        [
            ts_same([",".join(BARS[:10]), ",".join(BARS[10:20]), ",".join(BARS[20:30]), ",".join(BARS[30:32])],
                    *BARS[:32]),
            ts_same([",".join(BARS[:10]), ",".join(BARS[10:20]), ",".join(BARS[20:30]), ",".join(BARS[30:33])]),
        ],
        id="test_tracestate_member_count_limit",
    ),
    pytest.param(
        [
            ts_same(["foo=1", "z" * 256 + "=1"], "foo=1", "z" * 256 + "=1"),
            ts_same(["foo=1", "z" * 257 + "=1"]),
            ts_same(["foo=1", "t" * 241 + "@" + "v" * 14 + "=1"], "foo=1", "t" * 241 + "@" + "v" * 14 + "=1"),
            ts_same(["foo=1", "t" * 242 + "@v=1"]),
            ts_same(["foo=1", "t@" + "v" * 15 + "=1"]),
        ],
        id="test_tracestate_key_length_limit",
    ),
    pytest.param([ts_same(["foo=bar=baz"]), ts_same(["foo=,bar=3"])], id="test_tracestate_value_illegal_characters"),
    # Not in the suite, from the spec: a traceparent that cannot be parsed takes its tracestate
    # with it, and a higher version's tracestate is read.
    pytest.param(
        [tp_with(f"00-{'0' * 32}-{PARENT}-01", ("tracestate", "foo=1")), tp_with(TP + ".", ("tracestate", "foo=1"))],
        id="spec_tracestate_dropped_with_an_invalid_traceparent",
    ),
    pytest.param(
        [same(("traceparent", f"cc-{TRACE}-{PARENT}-01-x"), ("tracestate", "foo=1"), tracestate=state("foo=1"))],
        id="spec_tracestate_kept_with_a_higher_version",
    ),
    pytest.param(
        [
            tp_with(f"00-{'abcdef0123456789' * 2}-{PARENT}-01".upper()),
            tp_with(f"00-{TRACE}-{PARENT.replace('1', 'A')}-01"),
            tp_with(f"00-{TRACE}-{PARENT}-0A"),
        ],
        id="spec_uppercase_hex_is_invalid",
    ),
]  # fmt: skip


Send = Callable[[Headers], Awaitable[Arrived]]


@pytest.fixture
async def through_gateway(make_gateway: Any, make_upstream: Any) -> Send:
    """Send one request with ``headers`` through the gateway; what reached the upstream."""
    upstream = await make_upstream()
    gateway = await make_gateway(one_service(upstream.url))

    async def send(headers: Headers) -> Arrived:
        before = len(upstream.requests)
        (response,) = parse_responses(await raw_exchange(gateway.port, get_request("/w3c", headers)))
        assert response.status == 200, response.body
        assert len(upstream.requests) == before + 1
        return read_arrived(upstream.requests[-1].headers)

    return send


@pytest.mark.parametrize("requests", SUITE)
async def test_w3c_trace_context_suite(through_gateway: Send, requests: list[Request]) -> None:
    for headers, expected, tracestate in requests:
        arrived = await through_gateway(headers)
        if expected == SAME:
            assert arrived.trace_id == TRACE, headers
            assert arrived.parent_id != PARENT, headers
            assert arrived.tracestate == tracestate, headers
        else:
            # Any id the request carried, read leniently (case ignored, the first 32 of 33).
            sent = {m.lower() for _, v in headers for m in re.findall("[0-9a-fA-F]{32}", v)}
            assert arrived.trace_id not in {TRACE, TRACE[1:] + "3", *sent}, headers
            assert arrived.tracestate == (), headers


async def test_multiple_requests_with_valid_traceparent(through_gateway: Send) -> None:
    arrived = [await through_gateway([("traceparent", TP)]) for _ in range(3)]
    assert {a.trace_id for a in arrived} == {TRACE}
    assert len({a.parent_id for a in arrived}) == 3


async def test_multiple_requests_without_traceparent(through_gateway: Send) -> None:
    arrived = [await through_gateway([]) for _ in range(3)]
    assert len({a.parent_id for a in arrived}) == 3
    assert len({a.trace_id for a in arrived}) == 3  # each request is a trace of its own


async def test_multiple_requests_with_illegal_traceparent(through_gateway: Send) -> None:
    arrived = [await through_gateway([("traceparent", f"00-{'0' * 32}-{PARENT}-01")]) for _ in range(3)]
    assert "0" * 32 not in {a.trace_id for a in arrived}
    assert len({a.parent_id for a in arrived}) == 3


# -- Level 2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("traceparent", "flags"),
    [
        pytest.param(f"00-{TRACE}-{PARENT}-00", 0x00, id="none"),
        pytest.param(f"00-{TRACE}-{PARENT}-01", 0x01, id="sampled"),
        pytest.param(f"00-{TRACE}-{PARENT}-02", 0x02, id="random"),
        pytest.param(f"00-{TRACE}-{PARENT}-03", 0x03, id="sampled-random"),
        pytest.param(f"00-{TRACE}-{PARENT}-ff", 0x03, id="reserved-bits-cleared"),
        pytest.param(f"cc-{TRACE}-{PARENT}-03-future", 0x03, id="higher-version"),
    ],
)
async def test_level_2_random_trace_id_flag_is_sent_as_received(
    through_gateway: Send, traceparent: str, flags: int
) -> None:
    """Level 2: a participant continuing a trace started upstream sets the random-trace-id flag
    to the value found in the incoming traceparent; the sampled flag is honoured, and bits no
    level defines go out as zero."""
    arrived = await through_gateway([("traceparent", traceparent)])
    assert (arrived.trace_id, arrived.flags) == (TRACE, flags)
