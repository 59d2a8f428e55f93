"""Trace context: read W3C and B3 headers from a request, write them for a downstream call.

Pure functions over header mappings: no aiohttp request objects, no I/O, so every rule below is
tested by a table. The tracing middleware calls :func:`extract` once per request and
:func:`child_headers` once per upstream call; whatever the client sent under
:data:`PROPAGATION_HEADERS` must be removed before the fresh headers are added, or a stale ``b3``
from the client would outrank them at the next hop.

Formats, in order of precedence (the first *valid* one wins; a present but invalid one is ignored
as if absent, so a garbled ``traceparent`` next to a good ``b3`` still joins the trace):

1. W3C Trace Context (Level 1, and Level 2's random-trace-id flag): ``traceparent`` (+ ``tracestate``).
2. B3 single header ``b3`` (openzipkin/b3-propagation: "the single-header variant takes
   precedence over the multiple header one").
3. B3 multiple headers ``X-B3-*``.

What :func:`extract` returns:

- :class:`TraceContext`: join the caller's trace.
- :class:`SamplingOnly`: the caller sent a sampling decision without ids (``b3: 0``, ``b3: 1``,
  ``b3: d``, or a lone ``X-B3-Sampled`` / ``X-B3-Flags``). Start a new trace, but with this
  decision instead of ``TRACE_SAMPLE_RATE``: a deny must be honoured or the callee would report
  fragments of a trace its caller chose to drop. A separate type rather than a TraceContext with
  empty ids, so that no code holding a TraceContext ever has to check for missing ids.
- ``None``: nothing usable; start a new trace and sample it by rate.

Decisions where the specs leave room:

- ``traceparent`` sent more than once is invalid (the W3C test suite expects a restart: which
  copy names the parent is unknowable). Leading and trailing OWS around a value are stripped.
- W3C flags ``00`` is read as sampled=False, not "defer": W3C has no defer state. On output a
  deferred decision (sampled=None) is written as ``00``.
- ``tracestate`` (the W3C spec lets a vendor discard invalid entries or the whole header): a list
  that breaks the grammar anywhere (a bad key or value, a key twice, more than 32 members) is
  discarded whole, as the W3C test suite (``test/test.py``) requires at its default strictness
  and as OpenTelemetry's Python propagator does; dropping only the bad member would forward a
  list its sender never wrote, and the next reader could not tell. Empty and OWS-only members
  are allowed (the spec says so: joined headers make them) and skipped; a valid list passes on
  unchanged, in order. Keys follow the Level 1 grammar (``simple-key`` / ``tenant@system``), the
  one the test suite checks. No length limit beyond the grammar (32 members of at most 256 + 1 +
  256 characters); the HTTP parser's header-size limit bounds it long before that.
- Trace Context Level 2's random-trace-id flag (``02``) is kept as received when the trace is
  continued (the spec says a participant continuing a trace sets it to the value it received);
  the other reserved bits are cleared, as Level 1 requires. Traces started here, or read from B3,
  do not claim it.
- B3 ids are lowercase hex as the spec says; uppercase, wrong lengths and all-zero ids are
  malformed and make that format invalid. A present ``X-B3-ParentSpanId`` must be well formed too.
- ``X-B3-Sampled`` accepts ``1``/``0`` and, as the spec allows for old clients, ``true``/``false``
  (any case). Any other value is treated as absent (defer) rather than voiding good ids.
  ``X-B3-Flags: 1`` is debug, which implies sampled whatever ``X-B3-Sampled`` says.
- Repeated B3 headers: the first value wins (the B3 spec says so for multiple headers; the same
  is applied to ``b3``).
- When ``traceparent`` and B3 name the same context (same span, same trace once a 64-bit B3 id
  is padded), B3 adds what W3C cannot carry: debug, and the trace id's 64-bit form. Both formats
  written by one sender (this gateway, the chat API) then survive the next hop unchanged. When
  they name different contexts, ``traceparent`` wins: it is the standard, OpenTelemetry's default
  propagator reads nothing else, and a B3 left stale by a W3C-only hop in between is the likelier
  mistake. (Envoy's ``USE_B3_WITH_W3C_PROPAGATION`` and an OpenTelemetry composite listing ``b3``
  last prefer B3 instead; either choice joins one of the two traces.)
- A ``b3`` holding only a sampling state wins over complete ``X-B3-*`` ids: the spec gives the
  single header precedence without exception. An invalid ``b3`` falls back to ``X-B3-*``.
- 64-bit B3 trace ids are kept as received, so ``X-B3-TraceId`` goes on unchanged; ``traceparent``
  needs 32 hex, so it gets the id left-padded with zeros (Zipkin reads a 128-bit id whose high
  half is zero as the 64-bit one; a 64-bit caller reading B3 sees its own id).
- :func:`child_headers` writes ``traceparent``/``tracestate`` and the multi-header B3 set named in
  the contract. The single ``b3`` header is off by default: every B3 reader understands the
  multi form, and sending both only doubles the bytes; ``b3_single=True`` adds it for receivers
  that read nothing else (JMS-style transports).

Why not aiozipkin's helpers (``aiozipkin.helpers`` 1.1.1, checked against its source):

- ``make_context`` never sees ``X-B3-Flags``: it lower-cases the header names, then
  ``parse_debug_header`` looks up ``"X-B3-Flags"`` in mixed case, so debug is always False.
- ``make_headers`` always sends ``X-B3-Flags: 0`` (debug is never propagated) and
  ``X-B3-Sampled: 0`` when the decision is deferred (sampled=None), turning defer into deny;
  ``make_single_header`` does the same (``-0`` instead of omitting the state).
- ``b3: 0`` makes ``make_context`` return None, so the deny is lost and the callee may sample the
  request; ``b3: 1`` and ``b3: d`` (sampling state only) are lost the same way.
- ``X-B3-*`` wins over ``b3`` when both are present, the reverse of the spec.
- No id is validated (its own TODO): ``b3: foo-bar`` yields trace_id ``foo``, all-zero ids pass,
  a bad sampling state in ``b3`` silently becomes "defer", extra ``-`` fields are ignored, and
  uppercase ids pass everywhere (lower-cased in ``b3``, kept verbatim in ``X-B3-*``).
- ``X-B3-Sampled: true`` is read as not sampled (only ``"1"`` counts), as is any junk value.
- Repeated headers: the last value wins; B3 says the first.
- It knows nothing of W3C ``traceparent``/``tracestate``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

__all__ = [
    "PROPAGATION_HEADERS",
    "Origin",
    "SamplingOnly",
    "TraceContext",
    "child_headers",
    "extract",
    "new_root",
    "new_span_id",
    "new_trace_id",
    "trusted_child_headers",
    "trusted_context",
]

# Every header this module reads or writes. The proxy removes the client's copies of all of them
# before adding child_headers(), so the next hop never sees two disagreeing contexts.
PROPAGATION_HEADERS: Final = frozenset(
    {
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    }
)

# RFC 9110 optional whitespace: what may surround a field value or a tracestate list member.
_OWS: Final = " \t"
_MAX_TRACESTATE_MEMBERS: Final = 32

_TRACE_ID = re.compile(r"[0-9a-f]{16}(?:[0-9a-f]{16})?")  # B3: 64 or 128 bit
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
# Version 00 is exact: no extra fields, nothing after the flags.
_TRACEPARENT_00 = re.compile(
    r"00-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
)
# A higher version: the first four fields as in 00, then either the end or a dash and fields we
# must not interpret. The fixed prefix also enforces the spec's minimum length of 55.
_TRACEPARENT_FUTURE = re.compile(
    r"[0-9a-f]{2}-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})(?:-.*)?",
    re.DOTALL,
)
_SAMPLED_FLAG: Final = 0x01
_RANDOM_FLAG: Final = 0x02  # Level 2: the trace id's right-most 7 bytes are random

# W3C tracestate key: simple-key / multi-tenant-key (tenant-id "@" system-id).
_TRACESTATE_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
# value = 0*255(chr) nblk-chr; printable ASCII except "," and "=", not ending in a space.
_TRACESTATE_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")

# B3 single-header sampling state -> (sampled, debug).
_B3_STATES: Final[Mapping[str, tuple[bool, bool]]] = {
    "0": (False, False),
    "1": (True, False),
    "d": (True, True),
}
# X-B3-Sampled; true/false only because the spec says old tracers send them.
_B3_SAMPLED: Final[Mapping[str, bool]] = {"1": True, "0": False, "true": True, "false": False}


class Origin(StrEnum):
    """Which header format a context was read from (NEW: started here by :func:`new_root`)."""

    TRACEPARENT = "traceparent"
    B3_SINGLE = "b3"
    B3_MULTI = "x-b3"
    NEW = "new"


def _is_id(value: str, pattern: re.Pattern[str]) -> bool:
    # All-zero ids are invalid in both W3C and B3: they mean "no id" to most tracers.
    return pattern.fullmatch(value) is not None and value.strip("0") != ""


class _TraceFields(NamedTuple):
    trace_id: str
    span_id: str | None
    sampled: bool | None = None
    debug: bool = False
    tracestate: tuple[str, ...] = ()
    origin: Origin = Origin.NEW
    random_trace_id: bool = False


class TraceContext(_TraceFields):
    """The caller's position in a trace, as read from its headers.

    ``span_id`` is the caller's span: the parent of whatever span this process creates. It is
    None only for a trace started here (:func:`new_root`). ``trace_id`` is 32 hex, or 16 when a
    64-bit B3 id was received. ``sampled`` None means the decision is deferred to us.
    ``random_trace_id`` is the W3C Level 2 flag as received (False for every other origin).

    An immutable tuple rather than a frozen dataclass: every request makes one, and a tuple is
    made in one call where a frozen dataclass sets its seven fields one by one.
    """

    __slots__ = ()

    def __new__(
        cls,
        trace_id: str,
        span_id: str | None,
        sampled: bool | None = None,
        debug: bool = False,
        tracestate: tuple[str, ...] = (),
        origin: Origin = Origin.NEW,
        random_trace_id: bool = False,
    ) -> TraceContext:
        # Contexts are built by hand in the middleware (new_root()); a bad id there is a bug that
        # should fail at once, not go out on the wire.
        if not _is_id(trace_id, _TRACE_ID):
            raise ValueError(f"trace_id must be 16 or 32 lowercase hex, not all zero: {trace_id!r}")
        if span_id is not None and not _is_id(span_id, _SPAN_ID):
            raise ValueError(f"span_id must be 16 lowercase hex, not all zero: {span_id!r}")
        if debug and sampled is not True:
            raise ValueError("debug implies sampled=True")
        return _tuple_new(cls, (trace_id, span_id, sampled, debug, tracestate, origin, random_trace_id))

    @property
    def w3c_trace_id(self) -> str:
        """The trace id as ``traceparent`` needs it: 32 hex, 64-bit B3 ids left-padded."""
        return self.trace_id.rjust(32, "0")


@dataclass(frozen=True, slots=True)
class SamplingOnly:
    """A sampling decision received without trace ids (``b3: 0`` and friends).

    Start a new trace with :func:`new_root` using this decision instead of the sample rate.
    """

    sampled: bool
    debug: bool = False


# Ids need to be unique, not secret: the process's Mersenne Twister (reseeded by Python in every
# forked worker) costs ~0.1 us where os.urandom is a system call per id.
_bits = random.getrandbits


def new_trace_id() -> str:
    """32 random lowercase hex characters, never all zero."""
    while not (value := _bits(128)):
        pass
    return f"{value:032x}"


def new_span_id() -> str:
    """16 random lowercase hex characters, never all zero."""
    while not (value := _bits(64)):
        pass
    return f"{value:016x}"


def new_root(*, sampled: bool | None = None, debug: bool = False) -> TraceContext:
    """A context for a trace that starts here: new trace id, no parent span."""
    # trusted_context(), without the extra call: every request without a context starts here.
    return _tuple_new(
        TraceContext, (new_trace_id(), None, True if debug else sampled, debug, (), Origin.NEW, False)
    )


_tuple_new = tuple.__new__


def trusted_context(
    trace_id: str,
    span_id: str | None,
    sampled: bool | None,
    debug: bool,
    tracestate: tuple[str, ...],
    origin: Origin,
    random_trace_id: bool = False,
) -> TraceContext:
    """A TraceContext from ids this process made or already checked, without checking them again.

    Every request that arrives without a context starts one here; the regular constructor's
    validation (two regex matches) is for contexts assembled elsewhere.
    """
    return _tuple_new(TraceContext, (trace_id, span_id, sampled, debug, tracestate, origin, random_trace_id))


def _collect(headers: Mapping[str, str]) -> dict[str, list[str]]:
    # One pass over items() rather than getall(): it sees every repeated header in a multidict,
    # and matches names case-insensitively for plain dicts and case-sensitive MultiDicts too
    # (W3C: "vendors MUST expect the header name in any case").
    found: dict[str, list[str]] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            continue
        lowered = name.lower()
        if lowered in PROPAGATION_HEADERS:
            found.setdefault(lowered, []).append(value)
    return found


def extract(headers: Mapping[str, str]) -> TraceContext | SamplingOnly | None:
    """Read the caller's trace context; see the module docstring for precedence and rules.

    ``headers`` is any mapping of names to values (a plain dict, or a multidict whose repeated
    headers all count). Never raises on malformed values: they make a format invalid.
    """
    found = _collect(headers)
    if "traceparent" in found:
        context = _from_traceparent(found["traceparent"], found.get("tracestate", []))
        if context is not None:
            if "b3" in found or "x-b3-traceid" in found:
                return _with_b3_of_the_same_context(context, found)
            return context
    if "b3" in found:
        result = _from_b3_single(found["b3"][0])
        if result is not None:
            return result
    return _from_b3_multi(found)


def _with_b3_of_the_same_context(context: TraceContext, found: dict[str, list[str]]) -> TraceContext:
    """``context`` (from ``traceparent``) with what only B3 can say, when B3 names the same context:
    the same span and the same trace (a 64-bit B3 id is the W3C one without its 16 zeros). That
    is one sender writing both formats (this gateway does, and so does the chat API): W3C has no
    debug, and would widen a 64-bit trace id at every hop. A B3 context that names another span
    is ignored, as the precedence says."""
    b3 = _from_b3_single(found["b3"][0]) if "b3" in found else None
    if not isinstance(b3, TraceContext):
        b3 = _from_b3_multi(found)
    if (
        isinstance(b3, TraceContext)
        and b3.span_id == context.span_id
        and b3.trace_id.rjust(32, "0") == context.trace_id
        and (b3.debug or len(b3.trace_id) == 16)
    ):
        return context._replace(
            trace_id=b3.trace_id, sampled=True if b3.debug else context.sampled, debug=b3.debug
        )
    return context


def _from_traceparent(values: list[str], tracestate: list[str]) -> TraceContext | None:
    if len(values) != 1:
        return None
    value = values[0].strip(_OWS)
    version = value[:2]
    if version == "ff":
        return None
    pattern = _TRACEPARENT_00 if version == "00" else _TRACEPARENT_FUTURE
    match = pattern.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, flags = match.group("trace_id", "span_id", "flags")
    if not _is_id(trace_id, _TRACE_ID) or not _is_id(span_id, _SPAN_ID):
        return None
    # Sampled and (Level 2) random are defined; the other bits are reserved and change nothing.
    bits = int(flags, 16)
    return TraceContext(
        trace_id=trace_id,
        span_id=span_id,
        sampled=bool(bits & _SAMPLED_FLAG),
        tracestate=_parse_tracestate(tracestate),
        origin=Origin.TRACEPARENT,
        random_trace_id=bool(bits & _RANDOM_FLAG),
    )


def _parse_tracestate(values: list[str]) -> tuple[str, ...]:
    # Several tracestate headers are one list joined with commas (RFC 9110 field order), so
    # splitting each value in turn is the same as splitting the joined value. Any member that
    # breaks the grammar discards the whole list (see the module docstring).
    members: list[str] = []
    keys: set[str] = set()
    for value in values:
        for raw in value.split(","):
            member = raw.strip(_OWS)
            if not member:
                continue
            key, equals, val = member.partition("=")
            if (
                not equals
                or key in keys
                or not _TRACESTATE_KEY.fullmatch(key)
                or not _TRACESTATE_VALUE.fullmatch(val)
                or len(members) == _MAX_TRACESTATE_MEMBERS
            ):
                return ()
            keys.add(key)
            members.append(member)
    return tuple(members)


def _from_b3_single(value: str) -> TraceContext | SamplingOnly | None:
    value = value.strip(_OWS)
    parts = value.split("-")
    if len(parts) == 1:
        state = _B3_STATES.get(value)
        return None if state is None else SamplingOnly(*state)
    if len(parts) > 4:
        return None
    trace_id, span_id = parts[0], parts[1]
    if not _is_id(trace_id, _TRACE_ID) or not _is_id(span_id, _SPAN_ID):
        return None
    sampled: bool | None = None
    debug = False
    if len(parts) >= 3:
        state = _B3_STATES.get(parts[2])
        if state is None:
            return None
        sampled, debug = state
    if len(parts) == 4 and not _is_id(parts[3], _SPAN_ID):
        return None
    return TraceContext(trace_id, span_id, sampled, debug, (), Origin.B3_SINGLE)


def _from_b3_multi(found: dict[str, list[str]]) -> TraceContext | SamplingOnly | None:
    def first(name: str) -> str | None:
        values = found.get(name)
        return values[0].strip(_OWS) if values else None

    trace_id = first("x-b3-traceid")
    span_id = first("x-b3-spanid")
    parent_id = first("x-b3-parentspanid")
    sampled_raw = first("x-b3-sampled")
    debug = first("x-b3-flags") == "1"
    sampled = _B3_SAMPLED.get(sampled_raw.lower()) if sampled_raw else None
    if debug:
        sampled = True

    if trace_id is None and span_id is None:
        # "While valid to propagate only a reject sampling decision (X-B3-Sampled: 0)".
        return SamplingOnly(sampled, debug) if sampled is not None else None
    if trace_id is None or span_id is None:
        return None
    if not _is_id(trace_id, _TRACE_ID) or not _is_id(span_id, _SPAN_ID):
        return None
    if parent_id is not None and not _is_id(parent_id, _SPAN_ID):
        return None
    return TraceContext(trace_id, span_id, sampled, debug, (), Origin.B3_MULTI)


def child_headers(ctx: TraceContext, child_span_id: str, *, b3_single: bool = False) -> dict[str, str]:
    """Headers for a downstream call made from the span ``child_span_id``, a child of ``ctx.span_id``.

    ``traceparent`` names the child as parent (version 00; flag 01 when sampled or debug, 02 when
    the received trace id was flagged random), ``tracestate`` is passed on unchanged, and the B3
    set carries the child as ``x-b3-spanid`` and ``ctx.span_id`` as ``x-b3-parentspanid`` (absent
    for a trace started here). ``x-b3-sampled`` is omitted when the decision is deferred, and
    replaced by ``x-b3-flags: 1`` when debug, as B3 says. With ``b3_single`` the single ``b3``
    header is added as well.
    """
    if not _is_id(child_span_id, _SPAN_ID):
        raise ValueError(f"child_span_id must be 16 lowercase hex, not all zero: {child_span_id!r}")
    return trusted_child_headers(ctx, child_span_id, parent_id=ctx.span_id, b3_single=b3_single)


def trusted_child_headers(
    ctx: TraceContext, child_span_id: str, *, parent_id: str | None, b3_single: bool = False
) -> dict[str, str]:
    """:func:`child_headers` for a span id this process made (see :func:`new_span_id`), whose
    parent is ``parent_id`` rather than ``ctx.span_id`` (a span of this process in ``ctx``'s trace)."""
    if ctx.random_trace_id:
        flags = "03" if ctx.sampled or ctx.debug else "02"
    else:
        flags = "01" if ctx.sampled or ctx.debug else "00"
    headers = {"traceparent": f"00-{ctx.w3c_trace_id}-{child_span_id}-{flags}"}
    if ctx.tracestate:
        headers["tracestate"] = ",".join(ctx.tracestate)
    headers["x-b3-traceid"] = ctx.trace_id
    headers["x-b3-spanid"] = child_span_id
    if parent_id is not None:
        headers["x-b3-parentspanid"] = parent_id
    if ctx.debug:
        headers["x-b3-flags"] = "1"
    elif ctx.sampled is not None:
        headers["x-b3-sampled"] = "1" if ctx.sampled else "0"
    if b3_single:
        state = "d" if ctx.debug else {True: "1", False: "0", None: ""}[ctx.sampled]
        fields = [ctx.trace_id, child_span_id]
        if state:
            fields.append(state)
            # The parent can only follow a sampling state: its position is the fourth field.
            if parent_id is not None:
                fields.append(parent_id)
        headers["b3"] = "-".join(fields)
    return headers
