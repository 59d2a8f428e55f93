"""Request-body validation: pure functions the validation middleware calls.

    find_schema(method, path)          -> (pattern, schema) | None
    parse_json_object(raw)             -> dict, or raises BodyError
    validate_body(raw, schema)         -> [] when valid, else the contract's field errors; never raises
    is_json_media_type(content_type)   -> application/json, */*+json
    media_type_allowed(content_type, allowed)
    content_codings(values)            -> the codings of Content-Encoding other than identity
    foreign_charset(content_type)      -> a charset parameter other than UTF-8, or None

An error is ``{"field": "labels.env", "message": "...", "value": ...}``; the middleware answers
``ApiError(422, "Validation Error", errors)``. Validation only reads the body: what passes is
forwarded byte for byte as the client sent it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from marshmallow import Schema

from .routing import fold_case, lenient_reading, may_read_otherwise
from .schemas import SCHEMAS

__all__ = [
    "MAX_DEPTH",
    "MAX_ERRORS",
    "BodyError",
    "SchemaTable",
    "content_codings",
    "find_schema",
    "foreign_charset",
    "is_json_media_type",
    "media_type_allowed",
    "parse_json_object",
    "validate_body",
]

log = logging.getLogger("gateway")

MAX_DEPTH = 32  # nesting of objects and arrays, the top-level object being depth 1
MAX_ERRORS = 100  # per response: a 64KB body must not turn into a megabyte of errors
MAX_VALUE_JSON = 64  # an offending value is echoed only when its JSON is this short
MAX_FIELD_SEGMENT = 64  # longer keys are cut in ``field`` (they are client-chosen: labels, metadata)
INT64 = 2**63

REQUIRED_MESSAGE = "Missing data for required field."
UNKNOWN_MESSAGE = "Unknown field."

# Values under a field whose name looks like one of these are never echoed back.
SECRET_FIELD_RE = re.compile(
    r"pass(word|wd|phrase)?|secret|token|key|auth|credential|cookie|private|signature|cert", re.IGNORECASE
)
_URL_WITH_USERINFO_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")
_BAD_CHARACTER_RE = re.compile("[\x00\ud800-\udfff]")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE_RE = re.compile(rf"^\s*({_TOKEN})/({_TOKEN})\s*(;.*)?$", re.DOTALL)


class BodyError(ValueError):
    """The body is not a JSON object the gateway will check: ``errors`` says why, per field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors


# -- which schema ------------------------------------------------------------------------------


def _segments(path: str) -> tuple[str, ...]:
    # Split before decoding, so that %2F stays inside its segment; drop empty segments so that
    # ``/api/v1//clusters/`` cannot slip past a schema that the backend would still apply to it.
    return tuple(unquote(segment) for segment in path.split("/") if segment)


class SchemaTable:
    """Patterns compiled once; ``find`` picks the most specific match (literal beats ``{param}``,
    segment by segment from the left)."""

    def __init__(self, schemas: Mapping[tuple[str, str], Schema]) -> None:
        self._by_method: dict[str, list[tuple[tuple[str | None, ...], str, Schema]]] = {}
        for (method, pattern), schema in schemas.items():
            parts = tuple(
                None if segment.startswith("{") and segment.endswith("}") else segment
                for segment in pattern.split("/")
                if segment
            )
            self._by_method.setdefault(method.upper(), []).append((parts, pattern, schema))
        for candidates in self._by_method.values():
            # Most literal segments first, and earlier literals before later ones.
            candidates.sort(key=lambda c: tuple(part is None for part in c[0]))
        # The same, as a backend that ignores case compares them.
        self._folded_by_method = {
            method: [
                (tuple(p if p is None else fold_case(p) for p in parts), *rest) for parts, *rest in candidates
            ]
            for method, candidates in self._by_method.items()
        }

    def find(self, method: str, path: str) -> tuple[str, Schema] | None:
        candidates = self._by_method.get(method.upper())
        if not candidates:
            return None
        path = path.split("?", 1)[0]
        found = _first_match(candidates, _segments(path))
        if found is None and may_read_otherwise(path):
            # A backend that decodes %2F, honours "\\", drops ";params" or ignores case may still
            # route this spelling to a pattern's handler: the body is checked as that handler's.
            lenient = lenient_reading(path)
            found = _first_match(candidates, tuple(s for s in lenient.split("/") if s))
            if found is None:
                folded = tuple(s for s in fold_case(lenient).split("/") if s)
                found = _first_match(self._folded_by_method[method.upper()], folded)
        return found


def _first_match(
    candidates: list[tuple[tuple[str | None, ...], str, Schema]], segments: tuple[str, ...]
) -> tuple[str, Schema] | None:
    for parts, pattern, schema in candidates:
        if len(parts) == len(segments) and all(
            part is None or part == segment for part, segment in zip(parts, segments, strict=True)
        ):
            return pattern, schema
    return None


_default_table = SchemaTable(SCHEMAS)


def find_schema(method: str, path: str) -> tuple[str, Schema] | None:
    """The schema for ``method`` and ``path`` (pass ``request.raw_path``; a query is ignored)."""
    return _default_table.find(method, path)


# -- parsing -----------------------------------------------------------------------------------


class _Rejected:
    """Stands in for a JSON value the parser must not accept; reported with its field path."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers the keys it had more than once."""

    __slots__ = ("duplicates",)
    duplicates: tuple[str, ...]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    obj.duplicates = ()
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicates = []
        for key, _ in pairs:
            if key in seen and key not in duplicates:
                duplicates.append(key)
            seen.add(key)
        obj.duplicates = tuple(duplicates)
    return obj


def _parse_int(text: str) -> int | _Rejected:
    if len(text) > 20:  # also keeps int() away from 4300-digit strings
        return _Rejected("Integer out of range: must fit in a signed 64-bit integer.")
    number = int(text)
    if not -INT64 <= number < INT64:
        return _Rejected("Integer out of range: must fit in a signed 64-bit integer.")
    return number


def _parse_float(text: str) -> float | _Rejected:
    number = float(text)
    if not math.isfinite(number):
        return _Rejected("Number out of range: too large for a 64-bit float.")
    return number


def _parse_constant(name: str) -> _Rejected:
    return _Rejected(f"{name} is not valid JSON (RFC 8259); use a number or null.")


_decoder = json.JSONDecoder(
    object_pairs_hook=_object, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - text.rfind("\n", 0, index)
    return f"line {line}, column {column}"


_STRING_OR_BRACKET_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep_at(text: str) -> int:
    """Where the nesting first exceeds MAX_DEPTH (only called once the parser gave up)."""
    depth = 0
    for match in _STRING_OR_BRACKET_RE.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return match.start()
        elif token in "]}":
            depth -= 1
    return 0


def _body_error(message: str) -> BodyError:
    return BodyError([{"field": "body", "message": message}])


_KINDS = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or BodyError.

    Strict where parsers disagree, because the body goes on as sent and the backend parses it
    again: no duplicate keys (which one wins differs between parsers), no NaN/Infinity, numbers
    that fit 64 bits, UTF-8 only and without a BOM, at most MAX_DEPTH levels, and no strings the
    backends cannot store (NUL, unpaired surrogates: PostgreSQL rejects both).
    """
    value = _parse(raw)
    problems = _check_values(value)
    if problems.errors:
        raise BodyError(problems.errors)
    return value


def _parse(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or BodyError with one error on ``body``: the checks that need
    the body as a whole. What is wrong with single values is left to ``_check_values``."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise _body_error(
            "Invalid JSON at line 1, column 1: the body starts with a UTF-8 byte order mark; "
            "send JSON without one (RFC 8259, section 8.1)."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start].decode("utf-8")
        where = _position(before, len(before))
        raise _body_error(f"Invalid UTF-8 at {where} (byte {exc.start}): JSON must be UTF-8.") from None
    if not text.strip():
        raise _body_error("Invalid JSON at line 1, column 1: the body is empty; expected a JSON object.")
    try:
        value = _decoder.decode(text)
    except json.JSONDecodeError as exc:
        reason = exc.msg.removesuffix(" at")  # "Invalid control character at"
        raise _body_error(f"Invalid JSON at line {exc.lineno}, column {exc.colno}: {reason}.") from None
    except RecursionError:
        where = _position(text, _too_deep_at(text))
        raise _body_error(f"Invalid JSON at {where}: nested deeper than {MAX_DEPTH} levels.") from None
    if not isinstance(value, dict):
        start = len(text) - len(text.lstrip(" \t\r\n"))
        kind = _KINDS.get(type(value), "a number")
        raise _body_error(f"Expected a JSON object at {_position(text, start)}, got {kind}.")
    return value


FieldPath = tuple[str | int, ...]


class _Problems:
    """What ``_check_values`` found: the errors, and the paths they are about (the schema's own
    findings there would only repeat them)."""

    __slots__ = ("errors", "paths")

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []
        self.paths: set[FieldPath] = set()

    def add(self, path: FieldPath, error: dict[str, Any]) -> None:
        self.errors.append(error)
        self.paths.add(path)

    def covers(self, path: FieldPath) -> bool:
        return any(path[:end] in self.paths for end in range(len(path) + 1))


def _check_values(root: dict[str, Any]) -> _Problems:
    """Every value of ``root`` the parser must not accept, reported with its path and replaced
    by ``None`` in ``root``, so that the schema can still check the rest of the body."""
    problems = _Problems()
    # Iterative, so that depth is bounded by MAX_DEPTH and not by Python's stack. Each entry is
    # a value with the container holding it, to replace it there.
    stack: list[tuple[Any, FieldPath, Any]] = [(root, (), None)]
    while stack and len(problems.errors) < MAX_ERRORS:
        value, path, parent = stack.pop()
        if isinstance(value, dict | list) and len(path) >= MAX_DEPTH:
            problems.add(path, _error(path, f"Nested deeper than {MAX_DEPTH} levels.", None))
            parent[path[-1]] = None
        elif isinstance(value, dict):
            for key in getattr(value, "duplicates", ()):
                message = f"Duplicate key {_quote(key)} in a JSON object."
                problems.add((*path, key), {"field": _field((*path, key)), "message": message})
            for key in reversed(value):
                if _BAD_CHARACTER_RE.search(key):
                    message = "Key contains NUL or an unpaired surrogate."
                    problems.add((*path, key), _error((*path, key), message, None))
                    value[key] = None  # unchecked below, so not for the schema to see either
                    continue
                stack.append((value[key], (*path, key), value))
        elif isinstance(value, list):
            stack.extend((item, (*path, index), value) for index, item in reversed(list(enumerate(value))))
        elif isinstance(value, str):
            if _BAD_CHARACTER_RE.search(value):
                problems.add(path, _error(path, "Contains NUL (\\u0000) or an unpaired surrogate.", None))
                parent[path[-1]] = None
        elif isinstance(value, _Rejected):
            problems.add(path, _error(path, value.reason, None))
            parent[path[-1]] = None
    return problems


# -- validating --------------------------------------------------------------------------------

_MISSING = object()


def validate_body(raw: bytes, schema: Schema) -> list[dict[str, Any]]:
    """Every problem with ``raw`` against ``schema`` (at most MAX_ERRORS), or [] when it is valid.

    A body that is not a JSON object is one error on ``body``. In one that is, values the parser
    refuses (duplicate keys, NaN, numbers out of range, NUL...) are reported on their paths and
    the schema checks the rest, so that one 422 lists every field.
    """
    try:
        data = _parse(raw)
    except BodyError as exc:
        return _capped(exc.errors)
    problems = _check_values(data)
    if len(problems.errors) >= MAX_ERRORS:
        return _capped(problems.errors)
    try:
        messages = schema.validate(data)
    except Exception:
        # A bug in a schema must not take the gateway down; the test suite fuzzes for this.
        log.exception("schema raised while validating", extra={"schema": type(schema).__name__})
        return [*problems.errors, {"field": "body", "message": "The body could not be validated."}]
    return _capped([*problems.errors, *field_errors(messages, data, skip=problems.covers)])


def field_errors(
    messages: Mapping[Any, Any], data: Any, skip: Callable[[FieldPath], bool] | None = None
) -> Iterable[dict[str, Any]]:
    """marshmallow's nested messages as the contract's flat list, in the order marshmallow found them.

    ``_schema`` (a whole-object error) belongs to the object's own path, ``body`` at the top. Several
    reasons for one field become one entry, joined with ``; ``. Paths ``skip`` accepts are left out.
    """
    by_path: dict[tuple[Any, ...], list[str]] = {}
    _flatten(messages, (), by_path)
    for path, reasons in by_path.items():
        if skip is not None and skip(path):
            continue
        field = _field(path)
        if REQUIRED_MESSAGE in reasons:
            yield {"field": field, "message": f"Field {_quote(field)} is required"}
            reasons = [r for r in reasons if r != REQUIRED_MESSAGE]
        if UNKNOWN_MESSAGE in reasons:
            yield _error(path, f"Unknown field {_quote(field)}", data)
            reasons = [r for r in reasons if r != UNKNOWN_MESSAGE]
        if reasons:
            if path:
                yield _error(path, f"Invalid value for field {_quote(field)}: {'; '.join(reasons)}", data)
            else:
                yield {"field": "body", "message": " ".join(reasons)}


def _flatten(messages: Any, path: tuple[Any, ...], out: dict[tuple[Any, ...], list[str]]) -> None:
    if isinstance(messages, Mapping):
        for key, sub in messages.items():
            _flatten(sub, path if key == "_schema" else (*path, key), out)
    elif isinstance(messages, list | tuple):
        for item in messages:
            _flatten(item, path, out)
    else:
        reasons = out.setdefault(path, [])
        if str(messages) not in reasons:
            reasons.append(str(messages))


def _field(path: tuple[Any, ...]) -> str:
    if not path:
        return "body"
    return ".".join(
        segment if len(segment) <= MAX_FIELD_SEGMENT else segment[: MAX_FIELD_SEGMENT - 3] + "..."
        for segment in map(str, path)
    )


def _quote(name: str) -> str:
    return "'" + name + "'"


def _error(path: tuple[Any, ...], message: str, data: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"field": _field(path), "message": message}
    value = _lookup(data, path) if data is not None else _MISSING
    if value is not _MISSING and _echoable(path, value):
        error["value"] = value
    return error


def _lookup(data: Any, path: tuple[Any, ...]) -> Any:
    for segment in path:
        if isinstance(data, dict) and segment in data:
            data = data[segment]
        elif isinstance(data, list) and isinstance(segment, int) and 0 <= segment < len(data):
            data = data[segment]
        else:
            return _MISSING
    return data


def _echoable(path: tuple[Any, ...], value: Any) -> bool:
    if any(isinstance(segment, str) and SECRET_FIELD_RE.search(segment) for segment in path):
        return False
    if value is not None and not isinstance(value, str | int | float | bool):
        return False  # objects and arrays are never echoed, nor a _Rejected stand-in
    if isinstance(value, str) and (_URL_WITH_USERINFO_RE.match(value) or _BAD_CHARACTER_RE.search(value)):
        return False
    return len(json.dumps(value, ensure_ascii=False)) <= MAX_VALUE_JSON


def _capped(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(errors) <= MAX_ERRORS:
        return errors
    return [
        *errors[:MAX_ERRORS],
        {"field": "body", "message": f"{len(errors) - MAX_ERRORS} more errors not shown."},
    ]


# -- media types -------------------------------------------------------------------------------


def _media_type(content_type: str | None) -> tuple[str, str] | None:
    match = _MEDIA_TYPE_RE.match(content_type or "")
    if match is None:
        return None
    return match.group(1).lower(), match.group(2).lower()


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` (with any parameters, such as ``charset=utf-8``) or any ``+json`` type."""
    media = _media_type(content_type)
    return media is not None and (media == ("application", "json") or media[1].endswith("+json"))


def foreign_charset(content_type: str | None) -> str | None:
    """The ``charset`` parameter of ``content_type`` when it names anything but UTF-8, else None.

    JSON is UTF-8 (RFC 8259 section 8.1) and defines no charset parameter, but aiohttp's
    ``request.json()`` and other decoders honour one: the gateway would check the UTF-8 reading of
    a body that the backend reads as Latin-1 (``é`` as ``Ã©``, each string up to four times
    longer than the length that was checked)."""
    if content_type is None or ";" not in content_type:
        return None
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"')
            if charset.lower() not in ("utf-8", "utf8"):
                return charset
    return None


def media_type_allowed(content_type: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request's ``Content-Type`` is one the route accepts.

    ``*/*`` accepts anything, even no ``Content-Type``; ``type/*`` a whole top-level type;
    ``application/json`` also every ``+json`` type (``application/merge-patch+json``). Parameters
    are ignored on both sides; comparison is case-insensitive.
    """
    if "*/*" in allowed:
        return True
    media = _media_type(content_type)
    if media is None:
        return False
    for entry in allowed:
        wanted = _media_type(entry)
        if wanted is None:
            continue
        if wanted == media or (wanted[1] == "*" and wanted[0] == media[0]):
            return True
        if wanted == ("application", "json") and is_json_media_type(content_type):
            return True
    return False


# -- content codings ---------------------------------------------------------------------------


def content_codings(values: Iterable[str]) -> list[str]:
    """The codings the ``Content-Encoding`` field lines list, in order, without ``identity``
    (which means none: RFC 9110 section 8.4.1) and empty list items. ``[]``: the body is plain."""
    codings = []
    for value in values:
        for item in value.split(","):
            coding = item.strip()
            if coding and coding.lower() != "identity":
                codings.append(coding)
    return codings
