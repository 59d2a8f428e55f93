"""Settings: the environment and the optional YAML file, parsed once into typed objects.

Everything is validated here so that a bad value stops the start with one line naming the key,
instead of surfacing on the first request. ``create_app`` never reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis.connection
import yaml
from yarl import URL

from .claims import is_scope_token

__all__ = [
    "AuthSettings",
    "RateLimit",
    "Route",
    "ServiceSettings",
    "Settings",
    "SettingsError",
    "Timeouts",
    "decode_utf8",
    "load_settings",
    "parse_host",
    "parse_int",
    "parse_logging",
    "parse_number",
    "parse_rate",
    "parse_sample_rate",
    "parse_size",
    "parse_url",
    "postgres_dsn",
    "redis_url",
]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the key and the problem."""


DEFAULT_SERVICE_URLS: Mapping[str, str] = {
    "cluster-registry": "http://127.0.0.1:9001",
    "observability-collector": "http://127.0.0.1:9002",
    "intelligence-engine": "http://127.0.0.1:8081",
    "realtime-streaming": "http://127.0.0.1:9004",
}

DEFAULT_ROUTES: Sequence[tuple[str, str]] = (
    ("/api/v1/clusters", "cluster-registry"),
    ("/api/v1/metrics", "observability-collector"),
    ("/api/v1/logs", "observability-collector"),
    ("/api/v1/traces", "observability-collector"),
    ("/api/v1/alerts", "observability-collector"),
    ("/api/v1/chat", "intelligence-engine"),
    ("/api/v1/reports", "intelligence-engine"),
    ("/api/v1/stream", "realtime-streaming"),
    ("/ws", "realtime-streaming"),
)

# The seed's per-endpoint limits; they apply to any route whose prefix lies under one of these.
DEFAULT_BODY_LIMITS: Sequence[tuple[str, int]] = (
    ("/api/v1/chat", 64 * 1024),
    ("/api/v1/reports", 16 * 1024),
    ("/api/v1/clusters", 128 * 1024),
)
DEFAULT_MAX_BODY = 1024 * 1024

# Long-lived streams (SSE, chunked feeds) may sit quiet between events for longer than an API call.
STREAMING_SERVICES = frozenset({"realtime-streaming"})
STREAMING_READ_TIMEOUT = 300.0

AUTH_MODES = ("required", "optional", "none")
JSON_CONTENT_TYPES: tuple[str, ...] = ("application/json",)

# A number, then bytes (``B`` or nothing) or a binary multiple (``K``, ``KB``, ``KiB``, ...).
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# A media range as the validation middleware compares them (RFC 9110 section 8.3.1): type/subtype,
# with "*" only as "type/*" or "*/*"; parameters are allowed, and ignored there.
_MEDIA_TOKEN = r"[!#$%&'+.^_`|~0-9a-z-]+"
_MEDIA_RANGE_RE = re.compile(
    rf"(?:\*/\*|{_MEDIA_TOKEN}/(?:\*|{_MEDIA_TOKEN}))\s*(?:;.*)?", re.IGNORECASE | re.DOTALL
)
# RFC 1123 host names, plus ``_`` (container and compose service names have it).
_HOSTNAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?", re.IGNORECASE)
# "10.0.0.1:8080", "[::1]:8080", "redis:6379": a URL's authority where only the host belongs.
_HOST_AND_PORT_RE = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+):[0-9]+", re.IGNORECASE)
# ASCII digits only: ``\d`` would take Arabic-Indic or other Unicode digits, and int() reads them.
_RATE_RE = re.compile(r"^\s*([0-9]+)\s*/\s*([0-9]*)\s*([a-z]+)\s*$", re.IGNORECASE)
_PERIODS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
# Beyond these a limit is not a limit. An interval (period / count) under a microsecond is below
# what a double of the limiter's clock can add to a bucket's TAT (a few hundredths of a microsecond
# ulp in Redis), so the bucket stops filling and nothing is limited; no gateway process serves a
# million requests a second to one client anyway. A period over a year overflows the millisecond
# expiry Redis is given, and every request then fails over to in-process limits.
MAX_RATE_PER_SECOND = 1_000_000
MAX_RATE_PERIOD = 365 * 86400


@dataclass(frozen=True)
class Timeouts:
    connect: float = 2.0
    read: float = 30.0


@dataclass(frozen=True)
class ServiceSettings:
    name: str
    urls: tuple[str, ...]
    health_path: str = "/health"
    timeout: Timeouts = Timeouts()
    # Passive health: how long a target that refused or timed out is left out of the rotation.
    eject_seconds: float = 5.0


@dataclass(frozen=True)
class RateLimit:
    limit: int
    period: float  # seconds

    def __str__(self) -> str:
        """As it could be written in the config file, in the largest unit that divides the
        period: ``600/minute``, ``1000/5minutes``, ``1/365days`` (not ``1/3.1536e+07s``)."""
        for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
            count, rest = divmod(self.period, seconds)
            if count and not rest:
                return f"{self.limit}/{unit}" if count == 1 else f"{self.limit}/{count:g}{unit}s"
        return f"{self.limit}/{self.period:g}seconds"  # pragma: no cover - periods are whole seconds


@dataclass(frozen=True)
class Route:
    prefix: str
    service: str
    max_body: int | None = DEFAULT_MAX_BODY  # None: unlimited
    rate_limit: RateLimit | None = None
    auth: str = "required"
    scopes: tuple[str, ...] = ()
    content_types: tuple[str, ...] = JSON_CONTENT_TYPES
    strip_prefix: bool = False


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = True
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwt_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    services: Mapping[str, ServiceSettings] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    config_file: str | None = None
    workers: int = 1
    redis_url: str | None = field(default=None, repr=False)
    postgres_dsn: str | None = field(default=None, repr=False)
    zipkin_url: str | None = None
    trace_sample_rate: float = 1.0
    auth: AuthSettings = AuthSettings()
    rate_limit_default: RateLimit = RateLimit(600, 60.0)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    data_dir: str = "./.data"
    intelligence_host: str = "127.0.0.1"
    intelligence_port: int = 8081
    log_format: str = "json"
    log_level: str = "INFO"
    shutdown_timeout: float = 30.0


# -- small parsers, shared with the config file ------------------------------------------------


def parse_size(value: Any, key: str) -> int | None:
    """``64KB`` -> 65536. Units are binary (K = 1024), as in nginx; ``unlimited`` -> None."""
    if isinstance(value, bool):
        raise SettingsError(f"{key}: expected a size such as 64KB or 1MB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SettingsError(f"{key}: size must not be negative, got {value}")
        return value
    if isinstance(value, str) and value.strip().lower() in ("unlimited", "none"):
        return None
    match = _SIZE_RE.match(str(value)) if isinstance(value, (str, float)) else None
    if not match:
        raise SettingsError(f"{key}: expected a size such as 64KB or 1MB, got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


def parse_rate(value: Any, key: str) -> RateLimit:
    """``100/minute``, ``10/s``, ``1000/5m``."""
    match = _RATE_RE.match(value) if isinstance(value, str) else None
    if not match or match.group(3).lower() not in _PERIODS:
        raise SettingsError(f"{key}: expected a rate such as 100/minute or 10/second, got {value!r}")
    count_digits, multiplier, unit = match.groups()
    count = _whole_number(count_digits)
    period = _PERIODS[unit.lower()] * (_whole_number(multiplier) if multiplier else 1)
    if count < 1:
        raise SettingsError(f"{key}: rate must allow at least one request, got {value!r}")
    if period < 1:
        raise SettingsError(f"{key}: period must be at least one second, got {value!r}")
    if period > MAX_RATE_PERIOD:
        raise SettingsError(f"{key}: period must be at most 365 days, got {value!r}")
    if count > MAX_RATE_PER_SECOND * period:
        raise SettingsError(
            f"{key}: at most {MAX_RATE_PER_SECOND} requests per second can be limited, got {value!r}"
        )
    return RateLimit(count, float(period))


def _whole_number(digits: str) -> int:
    """``int(digits)``; a number too long to be within any bound is read as 10**20, since int()
    refuses strings of more than 4300 digits (a ValueError and a traceback at start)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 20 else 10**20


def _redacted(value: Any) -> str:
    """``repr(value)`` for an error message, a URL's user and password hidden: messages reach logs."""
    # Up to the last "@": a password may hold any character, and hiding a path as well costs nothing.
    return re.sub(r"(?<=//).*@", "***@", repr(value))


def parse_url(value: Any, key: str, *, credentials: bool = True) -> str:
    """An http(s) URL. ``credentials=False``: a user or password in it is refused."""
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{key}: expected an http(s) URL, got {_redacted(value)}")
    try:
        url = URL(value.strip())
    except ValueError:
        raise SettingsError(f"{key}: not a valid URL: {_redacted(value)}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise SettingsError(f"{key}: expected an http:// or https:// URL with a host, got {_redacted(value)}")
    if url.query_string or url.fragment:
        raise SettingsError(f"{key}: a service URL takes no query or fragment, got {_redacted(value)}")
    if not credentials and "@" in (url.raw_authority or ""):
        raise SettingsError(
            f"{key}: a service URL takes no user or password ({_redacted(value)}): the proxy never "
            "sends them, and the URL is shown by check-config and in logs, traces and /health/detailed"
        )
    return str(url).rstrip("/")


def _url_list(value: Any, key: str) -> tuple[str, ...]:
    items = list(_csv(value, key)) if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise SettingsError(f"{key}: expected one URL or a list of URLs, got {_redacted(value)}")
    urls = tuple(parse_url(item, f"{key}[{i}]", credentials=False) for i, item in enumerate(items))
    if len(set(urls)) != len(urls):
        raise SettingsError(f"{key}: the same target is listed twice")
    return urls


def parse_number(value: Any, key: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingsError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise SettingsError(f"{key}: expected a number, got {value!r}") from exc
    if number != number or number < minimum:  # NaN or too small
        raise SettingsError(f"{key}: must be a number >= {minimum:g}, got {value!r}")
    return number


def parse_int(value: Any, key: str, *, minimum: int, maximum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise SettingsError(f"{key}: expected a whole number, got {value!r}") from exc
    if not minimum <= number <= maximum:
        raise SettingsError(f"{key}: must be between {minimum} and {maximum}, got {number}")
    return number


def parse_host(value: str, key: str) -> str:
    """An address or host name to listen on; ``""`` (every interface) passes as it always did.

    An IPv6 address may come in the brackets of URLs and nginx's ``listen [::]:80``: ``[::]`` is
    ``::``. A port after the host is refused with the key that takes it.
    """
    host = value.strip()
    if not host:
        return host
    bracketed = host.startswith("[") and host.endswith("]")
    literal = host[1:-1] if bracketed else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        pass
    else:
        if not bracketed or address.version == 6:
            return literal
    # A name's last label is never all digits (RFC 1123 2.1), so 999.1.1.1 is a mistyped address
    # that would only fail, with a resolver's message, when the socket is bound.
    if not _HOSTNAME_RE.fullmatch(host) or host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        problem = f"{key}: {host!r} is neither an IP address nor a host name"
        if _HOST_AND_PORT_RE.fullmatch(host) and key.endswith("_HOST"):
            problem += f" (the port goes in {key.removesuffix('_HOST')}_PORT)"
        raise SettingsError(problem)
    return host


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key}: expected true or false, got {value!r}")


def _csv(value: str | None, key: str) -> tuple[str, ...]:
    """A comma-separated list; unset or blank is an empty one. An empty item (``a,,b``, ``a,``,
    ``,``) is refused rather than skipped: it is most often a variable that expanded to nothing."""
    if value is None or not value.strip():
        return ()
    items = tuple(item.strip() for item in value.split(","))
    for position, item in enumerate(items, 1):
        if not item:
            raise SettingsError(f"{key}: item {position} of {len(items)} is empty (a stray comma?)")
    return items


def _origin(value: str, key: str) -> str:
    """An origin as a browser serialises it in ``Origin`` (RFC 6454 section 6.2), which the CORS
    middleware compares byte for byte: lowercase, the default port left out, IDN hosts in punycode."""
    if "*" in value:
        raise SettingsError(
            f"{key}: {value!r}: wildcards are not origins; list each origin, or give '*' alone "
            "(any origin, without credentials)"
        )
    if not re.fullmatch(r"https?://[^/?#@\s]+", value, re.IGNORECASE):
        raise SettingsError(f"{key}: {value!r} is not an origin (scheme://host[:port], no path)")
    port = re.search(r":(\d+)$", value)
    if port and not 1 <= int(port.group(1)) <= 65535:
        raise SettingsError(f"{key}: {value!r} is not an origin: the port must be between 1 and 65535")
    try:
        url = URL(value)
    except ValueError as exc:
        raise SettingsError(f"{key}: {value!r} is not an origin: {exc}") from None
    return f"{url.scheme.lower()}://{url.host_port_subcomponent}"


def _prefix(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise SettingsError(f"{key}: a prefix is a path starting with '/', got {value!r}")
    if "?" in value or "#" in value or any(seg in (".", "..") for seg in value.split("/")):
        raise SettingsError(f"{key}: a prefix is a plain path, got {value!r}")
    return value.rstrip("/") or "/"


def _check_keys(raw: Mapping[str, Any], allowed: set[str], key: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SettingsError(
            f"{key}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(allowed))})"
        )


def default_max_body(prefix: str) -> int:
    for limited, size in DEFAULT_BODY_LIMITS:
        if prefix == limited or prefix.startswith(limited + "/"):
            return size
    return DEFAULT_MAX_BODY


# -- the config file ----------------------------------------------------------------------------

_SERVICE_KEYS = {"url", "urls", "health_path", "timeout", "eject_seconds"}
_ROUTE_KEYS = {
    "prefix", "service", "max_body", "rate_limit", "auth", "scopes", "content_types",
    "strip_prefix",
}  # fmt: skip


def _parse_service(name: str, raw: Any) -> ServiceSettings:
    key = f"services.{name}"
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{key}: expected a mapping with url or urls")
    _check_keys(raw, _SERVICE_KEYS, key)
    if ("url" in raw) == ("urls" in raw):
        raise SettingsError(f"{key}: give exactly one of url or urls")
    urls = _url_list(
        raw["url"] if "url" in raw else raw["urls"], f"{key}.{'url' if 'url' in raw else 'urls'}"
    )
    health_path = raw.get("health_path", "/health")
    if not isinstance(health_path, str) or not health_path.startswith("/"):
        raise SettingsError(f"{key}.health_path: expected a path starting with '/', got {health_path!r}")
    default_read = STREAMING_READ_TIMEOUT if name in STREAMING_SERVICES else Timeouts.read
    timeout_raw = raw.get("timeout", {})
    if not isinstance(timeout_raw, Mapping):
        raise SettingsError(f"{key}.timeout: expected {{connect: SECONDS, read: SECONDS}}")
    _check_keys(timeout_raw, {"connect", "read"}, f"{key}.timeout")
    timeout = Timeouts(
        connect=parse_number(
            timeout_raw.get("connect", Timeouts.connect), f"{key}.timeout.connect", minimum=0.001
        ),
        read=parse_number(timeout_raw.get("read", default_read), f"{key}.timeout.read", minimum=0.001),
    )
    eject = parse_number(raw.get("eject_seconds", 5.0), f"{key}.eject_seconds")
    return ServiceSettings(name, urls, health_path, timeout, eject)


def _parse_route(index: int, raw: Any, services: Mapping[str, ServiceSettings]) -> Route:
    key = f"routes[{index}]"
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{key}: expected a mapping with prefix and service")
    _check_keys(raw, _ROUTE_KEYS, key)
    for required in ("prefix", "service"):
        if required not in raw:
            raise SettingsError(f"{key}.{required}: missing")
    prefix = _prefix(raw["prefix"], f"{key}.prefix")
    service = raw["service"]
    if service not in services:
        known = ", ".join(sorted(services)) or "none"
        raise SettingsError(f"{key}.service: unknown service {service!r} (defined: {known})")
    auth = raw.get("auth", "required")
    if auth not in AUTH_MODES:
        raise SettingsError(f"{key}.auth: expected one of {', '.join(AUTH_MODES)}, got {auth!r}")
    scopes = raw.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
        raise SettingsError(f"{key}.scopes: expected a list of scope names")
    for scope in scopes:
        if not is_scope_token(scope):
            # A token's scopes are space-separated: "a b" is two grants, and no token has this one.
            raise SettingsError(
                f"{key}.scopes: {scope!r} can never be granted: a scope is printable ASCII without "
                "spaces, '\"' or '\\' (RFC 6749 section 3.3); list each scope separately"
            )
    content_types = raw.get("content_types", list(JSON_CONTENT_TYPES))
    if not isinstance(content_types, list) or not content_types:
        raise SettingsError(f"{key}.content_types: expected a list of media types such as application/json")
    for content_type in content_types:
        if not isinstance(content_type, str) or not _MEDIA_RANGE_RE.fullmatch(content_type.strip()):
            raise SettingsError(
                f"{key}.content_types: {content_type!r} is not a media type such as application/json "
                "(type/subtype, type/* or */*)"
            )
    return Route(
        prefix=prefix,
        service=service,
        max_body=(
            parse_size(raw["max_body"], f"{key}.max_body") if "max_body" in raw else default_max_body(prefix)
        ),
        rate_limit=parse_rate(raw["rate_limit"], f"{key}.rate_limit") if "rate_limit" in raw else None,
        auth=auth,
        scopes=tuple(scopes),
        content_types=tuple(c.strip().lower() for c in content_types),
        strip_prefix=_bool(raw.get("strip_prefix", False), f"{key}.strip_prefix"),
    )


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_duplicate_keys(node: yaml.Node, where: str, path: str, seen: set[int]) -> None:
    """PyYAML keeps the last of two equal keys without a word: a service's second ``url`` would
    silently replace its first. Keys merged in with ``<<`` are overridable by design."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            child = f"{where}.{name}" if where else name
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                line = key_node.start_mark.line + 1
                identity = (key_node.tag, key_node.value)
                if identity in first:
                    lines = (
                        f"on line {line}"
                        if first[identity] == line
                        else f"at lines {first[identity]} and {line}"
                    )
                    raise SettingsError(f"{path}: {child} is given twice, {lines}; only one can apply")
                first[identity] = line
            _refuse_duplicate_keys(value_node, child, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{where}[{index}]", path, seen)


def decode_utf8(data: bytes) -> str:
    """``data`` as UTF-8 text, or ValueError saying where it stops being UTF-8, in words fit for
    one line about a file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"not UTF-8 at byte {exc.start} (line {line})") from None


def _read_yaml(path: str) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"GATEWAY_CONFIG: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = decode_utf8(data)
    except ValueError as exc:
        raise SettingsError(f"{path}: {exc}; save it as UTF-8") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _refuse_duplicate_keys(node, "", path, set())
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise SettingsError(f"{path}: not valid YAML: nested too deeply") from None
    except yaml.reader.ReaderError as exc:  # a control character; its text spans two lines
        line = text.count("\n", 0, exc.position) + 1
        raise SettingsError(
            f"{path}: not valid YAML at line {line}: character #x{exc.character:04x} is not allowed"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SettingsError(f"{path}: not valid YAML{where}: {' '.join(str(problem).split())}") from exc


def load_config_file(path: str) -> tuple[dict[str, ServiceSettings], tuple[Route, ...]]:
    raw = _read_yaml(path)
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{path}: expected a mapping with 'services' and 'routes'")
    _check_keys(raw, {"services", "routes"}, path)
    services_raw = raw.get("services") or {}
    if not isinstance(services_raw, Mapping):
        raise SettingsError("services: expected a mapping of service name to settings")
    services = {}
    for name, service_raw in services_raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise SettingsError(
                f"services: {name!r} is not a valid name (lowercase letters, digits, - and _)"
            )
        services[name] = _parse_service(name, service_raw)
    routes_raw = raw.get("routes")
    if not isinstance(routes_raw, list) or not routes_raw:
        raise SettingsError("routes: expected a non-empty list of routes")
    routes = tuple(_parse_route(i, r, services) for i, r in enumerate(routes_raw))
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if route.prefix in seen:
            raise SettingsError(f"routes[{i}].prefix: {route.prefix!r} is listed twice")
        seen.add(route.prefix)
    return services, routes


def _default_table() -> tuple[dict[str, ServiceSettings], tuple[Route, ...]]:
    services = {name: _parse_service(name, {"url": url}) for name, url in DEFAULT_SERVICE_URLS.items()}
    routes = tuple(
        Route(prefix=prefix, service=service, max_body=default_max_body(prefix))
        for prefix, service in DEFAULT_ROUTES
    )
    return services, routes


def service_env_name(service: str) -> str:
    return "SERVICE_" + re.sub(r"[^A-Z0-9]", "_", service.upper()) + "_URL"


# -- the environment ----------------------------------------------------------------------------


def redis_url(env: Mapping[str, str]) -> str | None:
    if env.get("REDIS_URL"):
        url = env["REDIS_URL"].strip()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("REDIS_URL: expected redis://, rediss:// or unix://")
        try:
            # redis-py's own parser, as its client runs it when the app is built: a port out of
            # range or a bad option would otherwise stop the start with a traceback.
            redis.connection.parse_url(url)
        except ValueError as exc:
            raise SettingsError(f"REDIS_URL: {exc}") from None
        return url
    # Checked as the listen hosts are: yarl refuses "redis:6379" or "bad host" only while it builds
    # the URL, with a traceback. Blank is unset: "every interface" means nothing for a server.
    host = parse_host(env.get("REDIS_HOST", ""), "REDIS_HOST")
    if not host:
        return None
    port = parse_int(env.get("REDIS_PORT", "6379"), "REDIS_PORT", minimum=1, maximum=65535)
    db = parse_int(env.get("REDIS_DB", "0"), "REDIS_DB", minimum=0, maximum=1024)
    url = URL.build(
        scheme="redis", host=host, port=port, path=f"/{db}",
        password=env.get("REDIS_PASSWORD") or None,
    )  # fmt: skip
    return str(url)


def parse_logging(env: Mapping[str, str]) -> tuple[str, str]:
    """``LOG_LEVEL`` and ``LOG_FORMAT``, checked."""
    log_format = env.get("LOG_FORMAT", "json").strip().lower()
    if log_format not in ("json", "text"):
        raise SettingsError(f"LOG_FORMAT: expected json or text, got {log_format!r}")
    log_level = env.get("LOG_LEVEL", "INFO").strip().upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SettingsError(f"LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    return log_level, log_format


def parse_sample_rate(value: str) -> float:
    rate = parse_number(value, "TRACE_SAMPLE_RATE")
    if rate > 1:
        raise SettingsError(f"TRACE_SAMPLE_RATE: must be between 0 and 1, got {rate:g}")
    return rate


def postgres_dsn(env: Mapping[str, str]) -> str | None:
    """``POSTGRES_DSN`` as given, or one built from the ``POSTGRES_*`` parts; None when unset."""
    if env.get("POSTGRES_DSN"):
        return env["POSTGRES_DSN"]
    parts = {
        "host": env.get("POSTGRES_HOST"),
        "port": env.get("POSTGRES_PORT"),
        "user": env.get("POSTGRES_USER"),
        "password": env.get("POSTGRES_PASSWORD"),
        "dbname": env.get("POSTGRES_DB"),
    }
    if not any(parts.values()):
        return None
    if parts["port"]:
        parse_int(parts["port"], "POSTGRES_PORT", minimum=1, maximum=65535)

    def quote(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{k}={quote(v)}" for k, v in parts.items() if v)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the environment (and ``GATEWAY_CONFIG``) once; raise SettingsError on any bad value."""
    env = os.environ if environ is None else environ
    config_file = env.get("GATEWAY_CONFIG") or None
    services, routes = load_config_file(config_file) if config_file else _default_table()
    for name, service in list(services.items()):
        override = env.get(service_env_name(name))
        if override:
            services[name] = replace(service, urls=_url_list(override, service_env_name(name)))

    log_level, log_format = parse_logging(env)
    sample_rate = parse_sample_rate(env.get("TRACE_SAMPLE_RATE", "1.0"))

    trusted = []
    for item in _csv(env.get("TRUSTED_PROXIES"), "TRUSTED_PROXIES"):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise SettingsError(f"TRUSTED_PROXIES: {item!r} is not an address or CIDR") from exc
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None
        if mapped is not None and network.prefixlen >= 96:
            # A peer is compared as the gateway names it, an IPv4-mapped one as IPv4 (clientip):
            # ::ffff:10.0.0.0/104, as written for a dual-stack socket, is 10.0.0.0/8.
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        trusted.append(network)

    origins = _csv(env.get("CORS_ALLOW_ORIGINS"), "CORS_ALLOW_ORIGINS")
    if "*" in origins and len(origins) > 1:
        raise SettingsError("CORS_ALLOW_ORIGINS: '*' cannot be combined with explicit origins")
    origins = tuple(origin if origin == "*" else _origin(origin, "CORS_ALLOW_ORIGINS") for origin in origins)

    algorithms = _csv(env.get("AUTH_ALGORITHMS", "RS256,ES256"), "AUTH_ALGORITHMS")
    if not algorithms:
        # Set but empty: no token could ever verify. Unset means the default.
        raise SettingsError("AUTH_ALGORITHMS: empty; name at least one, such as RS256,ES256 (the default)")
    allowed_algs = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "HS256", "HS384", "HS512", "EdDSA"}  # fmt: skip
    for alg in algorithms:
        if alg not in allowed_algs:
            raise SettingsError(f"AUTH_ALGORITHMS: {alg!r} is not a supported signing algorithm")
    if env.get("AUTH_JWT_SECRET") and "HS256" not in algorithms:
        # The shared secret is explicit intent; HS256 tokens verify only against it, never
        # against a JWKS key, so accepting them opens no RS/HS confusion.
        algorithms = (*algorithms, "HS256")
    auth = AuthSettings(
        enabled=_bool(env.get("AUTH_ENABLED", "true"), "AUTH_ENABLED"),
        jwks_url=parse_url(env["AUTH_JWKS_URL"], "AUTH_JWKS_URL") if env.get("AUTH_JWKS_URL") else None,
        issuer=env.get("AUTH_ISSUER") or None,
        audience=env.get("AUTH_AUDIENCE") or None,
        algorithms=algorithms,
        jwt_secret=env.get("AUTH_JWT_SECRET") or None,
    )

    return Settings(
        host=parse_host(env.get("GATEWAY_HOST", "127.0.0.1"), "GATEWAY_HOST"),
        port=parse_int(env.get("GATEWAY_PORT", "8080"), "GATEWAY_PORT", minimum=0, maximum=65535),
        services=services,
        routes=routes,
        config_file=config_file,
        workers=parse_int(env.get("GATEWAY_WORKERS", "1"), "GATEWAY_WORKERS", minimum=1, maximum=256),
        redis_url=redis_url(env),
        postgres_dsn=postgres_dsn(env),
        zipkin_url=parse_url(env["ZIPKIN_URL"], "ZIPKIN_URL") if env.get("ZIPKIN_URL") else None,
        trace_sample_rate=sample_rate,
        auth=auth,
        rate_limit_default=parse_rate(env.get("RATE_LIMIT_DEFAULT", "600/minute"), "RATE_LIMIT_DEFAULT"),
        trusted_proxies=tuple(trusted),
        cors_allow_origins=origins,
        data_dir=env.get("GATEWAY_DATA_DIR", "./.data"),
        intelligence_host=parse_host(env.get("INTELLIGENCE_HOST", "127.0.0.1"), "INTELLIGENCE_HOST"),
        intelligence_port=parse_int(
            env.get("INTELLIGENCE_PORT", "8081"), "INTELLIGENCE_PORT", minimum=0, maximum=65535
        ),
        log_format=log_format,
        log_level=log_level,
        shutdown_timeout=parse_number(env.get("GATEWAY_SHUTDOWN_TIMEOUT", "30"), "GATEWAY_SHUTDOWN_TIMEOUT"),
    )
