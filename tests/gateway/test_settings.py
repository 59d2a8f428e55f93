"""Settings: bad config files fail with one line naming the key; overrides from the environment."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2.extensions
import pytest
import yaml
from aiohttp import web

from gateway.keys import lifecycle_key
from gateway.settings import SettingsError, Timeouts, load_settings
from gateway.validation import media_type_allowed
from tests.helpers import one_service, refusal, wait_for

WORKTREE = Path(__file__).resolve().parents[2]
GOOD = {
    "services": {
        "cluster-registry": {"url": "http://127.0.0.1:9001", "timeout": {"connect": 1, "read": 5}},
        "metrics": {"urls": ["http://127.0.0.1:9002", "http://127.0.0.1:9003"], "eject_seconds": 2},
    },
    "routes": [
        {
            "prefix": "/api/v1/clusters",
            "service": "cluster-registry",
            "max_body": "128KB",
            "rate_limit": "100/minute",
        },
        {"prefix": "/api/v1/metrics", "service": "metrics", "auth": "none", "strip_prefix": True},
        {"prefix": "/", "service": "metrics", "max_body": "unlimited", "scopes": ["read"]},
    ],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """GOOD with one dotted key (``routes.0.max_body``) set to ``value``."""
    config = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node: Any = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


def write(tmp_path: Path, config: Any) -> str:
    path = tmp_path / "gateway.yaml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    else:
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("config", "names"),
    [
        pytest.param(with_change("colour", "red"), "'colour'", id="unknown-top-level-key"),
        pytest.param(
            with_change("services.cluster-registry.colour", "red"),
            "services.cluster-registry",
            id="unknown-service-key",
        ),
        pytest.param(with_change("routes.0.colour", "red"), "routes[0]", id="unknown-route-key"),
        pytest.param(
            with_change("services.cluster-registry.timeout.total", 3),
            "services.cluster-registry.timeout",
            id="unknown-timeout-key",
        ),
        pytest.param(with_change("routes.0.max_body", "12 parsecs"), "routes[0].max_body", id="bad-size"),
        pytest.param(with_change("routes.0.max_body", -1), "routes[0].max_body", id="negative-size"),
        pytest.param(with_change("routes.0.rate_limit", "lots"), "routes[0].rate_limit", id="bad-rate"),
        pytest.param(with_change("routes.0.rate_limit", "0/minute"), "routes[0].rate_limit", id="zero-rate"),
        pytest.param(
            with_change("routes.0.rate_limit", "5/fortnight"), "routes[0].rate_limit", id="bad-period"
        ),
        pytest.param(with_change("routes.1.service", "nope"), "routes[1].service", id="unknown-service"),
        pytest.param(
            with_change("services.cluster-registry.urls", ["http://127.0.0.1:9004"]),
            "services.cluster-registry: give exactly one of url or urls",
            id="url-and-urls",
        ),
        pytest.param(
            with_change("services.cluster-registry.health_path", "health"),
            "services.cluster-registry.health_path",
            id="health-path-not-a-path",
        ),
        pytest.param(
            with_change("services.cluster-registry.timeout", {"connect": 0, "read": 5}),
            "services.cluster-registry.timeout.connect",
            id="zero-connect-timeout",
        ),
        pytest.param(
            with_change("routes.0.content_types", []), "routes[0].content_types", id="no-content-types"
        ),
        pytest.param(
            {
                "services": {"Cluster Registry": {"url": "http://a"}},
                "routes": [{"prefix": "/", "service": "a"}],
            },
            "'Cluster Registry' is not a valid name",
            id="service-name-not-a-name",
        ),
        pytest.param(
            with_change("services.cluster-registry.url", "ftp://127.0.0.1"),
            "services.cluster-registry.url",
            id="bad-url-scheme",
        ),
        pytest.param(
            with_change("services.cluster-registry.url", "not a url"),
            "services.cluster-registry.url",
            id="bad-url",
        ),
        pytest.param(
            with_change("services.metrics.urls", ["http://127.0.0.1:1", "http://127.0.0.1:1"]),
            "services.metrics.urls",
            id="duplicate-target",
        ),
        pytest.param(
            with_change("routes.1.prefix", "/api/v1/clusters/"), "routes[1].prefix", id="duplicate-prefix"
        ),
        pytest.param(with_change("routes.0.prefix", "api"), "routes[0].prefix", id="prefix-without-slash"),
        pytest.param(with_change("routes.0.prefix", "/api/../x"), "routes[0].prefix", id="prefix-with-dots"),
        pytest.param(with_change("routes.0.auth", "maybe"), "routes[0].auth", id="bad-auth-mode"),
        pytest.param(
            with_change("services.cluster-registry.timeout.read", "soon"),
            "services.cluster-registry.timeout.read",
            id="bad-timeout",
        ),
        pytest.param(
            with_change("services.metrics.eject_seconds", -1),
            "services.metrics.eject_seconds",
            id="negative-eject",
        ),
        pytest.param(with_change("routes", []), "routes", id="no-routes"),
        pytest.param(
            with_change("routes.0.content_types", ["application/"]),
            "routes[0].content_types",
            id="no-subtype",
        ),
        pytest.param(
            with_change("routes.0.content_types", ["*/json"]), "routes[0].content_types", id="wildcard-type"
        ),
        pytest.param(
            with_change("routes.0.content_types", ["application/json", "text"]),
            "routes[0].content_types",
            id="not-a-media-type",
        ),
        pytest.param(
            with_change("routes.2.scopes", ["read", "a b"]), "routes[2].scopes", id="scope-with-space"
        ),
        pytest.param(with_change("routes.2.scopes", ['say"hi']), "routes[2].scopes", id="scope-with-quote"),
        pytest.param(
            with_change("routes.2.scopes", ["\u00e9crire"]), "routes[2].scopes", id="scope-not-ascii"
        ),
        pytest.param("services: {a: [unclosed\n", "not valid YAML", id="invalid-yaml"),
        pytest.param("- just\n- a list\n", "expected a mapping", id="not-a-mapping"),
        pytest.param(
            "services:\n  a:\n    url: http://a\n    url: http://b\nroutes: [{prefix: /, service: a}]\n",
            "services.a.url is given twice, at lines 3 and 4",
            id="duplicate-service-key",
        ),
        pytest.param(
            "services: {a: {url: 'http://a'}}\nroutes:\n  - {prefix: /, service: a}\n"
            "  - {prefix: /b, service: a, auth: none, auth: required}\n",
            "routes[1].auth is given twice, on line 4",
            id="duplicate-route-key",
        ),
        pytest.param(
            "services: {a: {url: 'http://a'}}\nroutes: [{prefix: /, service: a}]\nroutes: []\n",
            "routes is given twice, at lines 2 and 3",
            id="duplicate-top-level-key",
        ),
        pytest.param("[" * 5000 + "]" * 5000, "nested too deeply", id="deep-nesting"),
        pytest.param(b"\xff\xfe\x00bad", "not UTF-8 at byte 0 (line 1)", id="not-utf8"),
        pytest.param(
            yaml.safe_dump(with_change("routes.2.scopes", ["caf\xe9"]), allow_unicode=True).encode("latin-1"),
            "not UTF-8 at byte",
            id="latin1-in-a-valid-file",
        ),
        pytest.param(
            "services: {a: {url: 'http://x\x01'}}\n", "not valid YAML at line 1", id="control-character"
        ),
    ],
)
def test_bad_config_file_names_the_key(tmp_path: Path, config: Any, names: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"GATEWAY_CONFIG": write(tmp_path, config)})
    message = str(error.value)
    assert names in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("rate", "problem"),
    [
        ("0/second", "at least one request"),
        ("-1/minute", "expected a rate"),
        ("10/fortnight", "expected a rate"),
        ("10/0s", "period must be at least one second"),
        pytest.param("\u0661\u0660/second", "expected a rate", id="arabic-indic-digits"),  # int() reads them
        # Past a million a second the interval is below the clock's resolution: nothing is limited.
        ("1000001/second", "at most 1000000 requests per second"),
        ("99999999999999999999999999/second", "at most 1000000 requests per second"),
        pytest.param("9" * 5000 + "/second", "at most 1000000", id="5000-digit-count"),  # int() refuses
        # Past a year Redis refuses the key's expiry, and every request fell back to local limits.
        ("1/366days", "period must be at most 365 days"),
        ("1/99999999999999999999day", "period must be at most 365 days"),
        pytest.param("1/" + "9" * 5000 + "s", "period must be at most 365 days", id="5000-digit-period"),
    ],
)
def test_a_rate_outside_what_can_be_limited_is_refused_naming_the_key(
    tmp_path: Path, rate: str, problem: str
) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"GATEWAY_CONFIG": write(tmp_path, with_change("routes.0.rate_limit", rate))})
    message = str(error.value)
    assert message.startswith("routes[0].rate_limit: ") and problem in message
    assert "\n" not in message

    with pytest.raises(SettingsError, match=f"^RATE_LIMIT_DEFAULT: .*{problem}"):
        load_settings({"RATE_LIMIT_DEFAULT": rate})


@pytest.mark.parametrize("rate", ["1000000/second", "1/365days", "10/5m", "007/minute", " 3 / 2 h "])
def test_rates_at_the_bounds_are_taken(rate: str) -> None:
    assert load_settings({"RATE_LIMIT_DEFAULT": rate}).rate_limit_default.limit >= 1


@pytest.mark.parametrize(
    ("rate", "shown"),
    [
        ("1/365days", "1/365days"),
        ("600/minute", "600/minute"),
        ("1000/5m", "1000/5minutes"),
        ("2/3seconds", "2/3seconds"),
        ("10/90s", "10/90seconds"),
        ("4/2h", "4/2hours"),
        ("5/120minutes", "5/2hours"),
    ],
)
def test_a_rate_is_shown_as_it_could_be_written_and_reads_back_the_same(rate: str, shown: str) -> None:
    # check-config's route table; it showed 1/365days as 1/3.1536e+07s.
    limit = load_settings({"RATE_LIMIT_DEFAULT": rate}).rate_limit_default
    assert str(limit) == shown
    assert load_settings({"RATE_LIMIT_DEFAULT": shown}).rate_limit_default == limit


@pytest.mark.parametrize("key", ["GATEWAY_HOST", "INTELLIGENCE_HOST"])
@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3", "http://gateway", "10.0.0.1:8080", "two words"])
def test_a_listen_host_that_is_no_address_names_the_key(key: str, host: str) -> None:
    with pytest.raises(SettingsError, match=f"^{key}: "):
        load_settings({key: host})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "localhost", "gateway-1.internal", "chat_api", ""])
def test_listen_hosts_that_are_addresses_or_names_are_kept(host: str) -> None:
    settings = load_settings({"GATEWAY_HOST": host, "INTELLIGENCE_HOST": host})
    assert (settings.host, settings.intelligence_host) == (host, host)


@pytest.mark.parametrize(("host", "kept"), [("[::]", "::"), ("[::1]", "::1"), ("[fd00::2]", "fd00::2")])
def test_an_ipv6_listen_host_may_be_written_in_brackets(host: str, kept: str) -> None:
    """As in URLs and nginx's ``listen [::]:80``; it was refused as no address."""
    settings = load_settings({"GATEWAY_HOST": host, "INTELLIGENCE_HOST": host})
    assert (settings.host, settings.intelligence_host) == (kept, kept)


@pytest.mark.parametrize(
    ("key", "host", "port_key"),
    [
        ("GATEWAY_HOST", "[::1]:8080", "GATEWAY_PORT"),
        ("GATEWAY_HOST", "10.0.0.1:8080", "GATEWAY_PORT"),
        ("INTELLIGENCE_HOST", "chat:8081", "INTELLIGENCE_PORT"),
        ("REDIS_HOST", "redis:6379", "REDIS_PORT"),
    ],
)
def test_a_host_with_a_port_says_which_key_takes_the_port(key: str, host: str, port_key: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({key: host})
    assert str(refused.value) == (
        f"{key}: {host!r} is neither an IP address nor a host name (the port goes in {port_key})"
    )


@pytest.mark.parametrize("host", ["[::1", "::1]", "[127.0.0.1]", "[localhost]", "[::1]x"])
def test_a_listen_host_with_stray_brackets_is_refused(host: str) -> None:
    with pytest.raises(SettingsError, match=r"^GATEWAY_HOST: .* is neither an IP address nor a host name$"):
        load_settings({"GATEWAY_HOST": host})


@pytest.mark.parametrize(
    ("entry", "request_type"),
    [
        ("application/json", "application/json"),
        ("Application/JSON; charset=utf-8", "application/json"),
        ("application/merge-patch+json", "application/merge-patch+json"),
        ("text/*", "text/csv"),
        ("*/*", "image/png"),
    ],
)
def test_content_types_the_file_takes_are_ones_requests_can_match(
    tmp_path: Path, entry: str, request_type: str
) -> None:
    settings = load_settings(
        {"GATEWAY_CONFIG": write(tmp_path, with_change("routes.0.content_types", [entry]))}
    )
    route = next(r for r in settings.routes if r.prefix == "/api/v1/clusters")
    assert media_type_allowed(request_type, route.content_types)


def test_keys_merged_in_with_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    config = (
        "services:\n"
        "  a: {url: 'http://a', timeout: &slow {connect: 1, read: 60}}\n"
        "  b: {url: 'http://b', timeout: {<<: *slow, read: 5}}\n"
        "routes: [{prefix: /, service: a}, {prefix: /b, service: b}]\n"
    )
    settings = load_settings({"GATEWAY_CONFIG": write(tmp_path, config)})
    assert settings.services["b"].timeout == Timeouts(connect=1, read=5)


@pytest.mark.parametrize(
    "url", ["http://admin:hunter2@127.0.0.1:9001", "http://:hunter2@127.0.0.1", "http://hunter2@127.0.0.1"]
)
def test_a_service_url_with_credentials_is_refused_without_showing_them(tmp_path: Path, url: str) -> None:
    for env in (
        {"GATEWAY_CONFIG": write(tmp_path, with_change("services.cluster-registry.url", url))},
        {"SERVICE_CLUSTER_REGISTRY_URL": f"http://127.0.0.1:9001,{url}"},
    ):
        with pytest.raises(SettingsError) as error:
            load_settings(env)
        message = str(error.value)
        assert message.startswith(("services.cluster-registry.url", "SERVICE_CLUSTER_REGISTRY_URL[1]"))
        assert "takes no user or password" in message
        assert "hunter2" not in message


@pytest.mark.parametrize(
    "value", ["ftp://admin:hunter2@host", "http://admin:hunter2@host/x?y#z", "http://admin:hunter2@[bad"]
)
def test_other_url_errors_hide_credentials_too(value: str) -> None:
    with pytest.raises(SettingsError, match=r"^SERVICE_CLUSTER_REGISTRY_URL\[0\]: ") as error:
        load_settings({"SERVICE_CLUSTER_REGISTRY_URL": value})
    assert "hunter2" not in str(error.value)


def test_the_zipkin_url_may_carry_credentials_which_aiohttp_sends() -> None:
    url = "http://spans:secret@zipkin:9411/api/v2/spans"
    assert load_settings({"ZIPKIN_URL": url}).zipkin_url == url


def test_missing_config_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="GATEWAY_CONFIG"):
        load_settings({"GATEWAY_CONFIG": str(tmp_path / "absent.yaml")})


def test_good_config_file_is_parsed(tmp_path: Path) -> None:
    settings = load_settings({"GATEWAY_CONFIG": write(tmp_path, GOOD)})

    routes = {route.prefix: route for route in settings.routes}
    assert routes["/api/v1/clusters"].max_body == 128 * 1024
    assert routes["/api/v1/clusters"].rate_limit is not None
    assert (routes["/api/v1/clusters"].rate_limit.limit, routes["/api/v1/clusters"].rate_limit.period) == (
        100,
        60,
    )
    assert routes["/"].max_body is None
    assert routes["/api/v1/metrics"].strip_prefix is True
    assert settings.services["metrics"].urls == ("http://127.0.0.1:9002", "http://127.0.0.1:9003")
    assert settings.services["metrics"].eject_seconds == 2
    assert settings.services["cluster-registry"].timeout.read == 5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://127.0.0.1:7001", ("http://127.0.0.1:7001",)),
        ("http://127.0.0.1:7001/", ("http://127.0.0.1:7001",)),
        ("http://127.0.0.1:7001, http://127.0.0.1:7002", ("http://127.0.0.1:7001", "http://127.0.0.1:7002")),
    ],
)
def test_service_url_variable_overrides_the_file(
    tmp_path: Path, value: str, expected: tuple[str, ...]
) -> None:
    settings = load_settings({"GATEWAY_CONFIG": write(tmp_path, GOOD), "SERVICE_CLUSTER_REGISTRY_URL": value})
    assert settings.services["cluster-registry"].urls == expected
    assert settings.services["metrics"].urls == ("http://127.0.0.1:9002", "http://127.0.0.1:9003")


def test_service_url_variable_overrides_the_default_table() -> None:
    settings = load_settings(
        {"SERVICE_INTELLIGENCE_ENGINE_URL": "http://127.0.0.1:7100,http://127.0.0.1:7101"}
    )
    assert settings.services["intelligence-engine"].urls == ("http://127.0.0.1:7100", "http://127.0.0.1:7101")


def test_bad_service_url_variable_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SERVICE_CLUSTER_REGISTRY_URL"):
        load_settings({"GATEWAY_CONFIG": write(tmp_path, GOOD), "SERVICE_CLUSTER_REGISTRY_URL": "nonsense"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("AUTH_ALGORITHMS", ""),
        ("AUTH_ALGORITHMS", " "),
        ("AUTH_ALGORITHMS", ","),
        ("AUTH_ALGORITHMS", "RS256,"),
        ("TRUSTED_PROXIES", ","),
        ("TRUSTED_PROXIES", "10.0.0.1,,10.0.0.2"),
        ("CORS_ALLOW_ORIGINS", ","),
        ("CORS_ALLOW_ORIGINS", "https://a.example,"),
        ("SERVICE_CLUSTER_REGISTRY_URL", ","),
        ("SERVICE_CLUSTER_REGISTRY_URL", "http://127.0.0.1:7001,,http://127.0.0.1:7002"),
    ],
)
def test_a_comma_list_with_an_empty_item_names_the_key(key: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{key}: .*empty"):
        load_settings({key: value, "AUTH_JWT_SECRET": "s"})  # with the secret HS256 would be added


@pytest.mark.parametrize(
    ("origin", "problem"),
    [
        ("https://a.example:99999", "the port must be between 1 and 65535"),
        ("https://a.example:0", "the port must be between 1 and 65535"),
        ("https://*.a.example", "wildcards are not origins"),
        ("*.a.example", "wildcards are not origins"),
        ("https://a.example/", "not an origin"),
        ("https://user@a.example", "not an origin"),
        ("a.example", "not an origin"),
    ],
)
def test_a_cors_origin_that_no_browser_sends_names_the_key(origin: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=f"^CORS_ALLOW_ORIGINS: .*{re.escape(problem)}"):
        load_settings({"CORS_ALLOW_ORIGINS": f"https://ok.example,{origin}"})


def test_cors_origins_are_kept_as_a_browser_sends_them() -> None:
    settings = load_settings(
        {
            "CORS_ALLOW_ORIGINS": "https://App.Example.com:443,HTTP://a.example:8080,http://[::1],https://b\u00fccher.example"
        }
    )
    assert settings.cors_allow_origins == (
        "https://app.example.com",
        "http://a.example:8080",
        "http://[::1]",
        "https://xn--bcher-kva.example",
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"REDIS_URL": "http://cache:6379/0"}, "REDIS_URL: expected redis://, rediss:// or unix://"),
        ({"TRACE_SAMPLE_RATE": "1.5"}, "TRACE_SAMPLE_RATE: must be between 0 and 1"),
        ({"CORS_ALLOW_ORIGINS": "*,https://a.example"}, "CORS_ALLOW_ORIGINS: '*' cannot be combined"),
        ({"AUTH_ALGORITHMS": "RS256,none"}, "AUTH_ALGORITHMS: 'none' is not a supported signing algorithm"),
        ({"AUTH_ALGORITHMS": "HS1"}, "AUTH_ALGORITHMS: 'HS1' is not a supported signing algorithm"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR"),
        ({"POSTGRES_HOST": "db", "POSTGRES_PORT": "99999"}, "POSTGRES_PORT"),
    ],
)
def test_a_bad_environment_value_names_the_variable(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(env)
    assert str(error.value).startswith(problem), str(error.value)


def test_postgres_parts_with_quotes_and_backslashes_make_a_dsn_libpq_reads_back() -> None:
    parts = {"host": "db.internal", "user": "chat o'neil", "password": "p'w\\d x=1", "dbname": "chat"}
    dsn = load_settings(
        {f"POSTGRES_{k.upper() if k != 'dbname' else 'DB'}": v for k, v in parts.items()}
    ).postgres_dsn
    assert dsn is not None
    assert psycopg2.extensions.parse_dsn(dsn) == parts


def test_a_routes_default_body_limit_is_the_default_tables_only_at_a_path_boundary(tmp_path: Path) -> None:
    """A file's route without ``max_body`` takes the contract's default for its prefix: 64KB for
    /api/v1/chat and what is under it, not for /api/v1/chatbots, which is another path."""
    config = {
        "services": {"a": {"url": "http://127.0.0.1:9001"}},
        "routes": [
            {"prefix": p, "service": "a"} for p in ("/api/v1/chat", "/api/v1/chat/x", "/api/v1/chatbots")
        ],
    }
    limits = [route.max_body for route in load_settings({"GATEWAY_CONFIG": write(tmp_path, config)}).routes]
    assert limits == [64 * 1024, 64 * 1024, 1024 * 1024]


def test_the_streaming_service_reads_for_minutes_by_default_the_others_for_seconds() -> None:
    """An event stream may say nothing for a long while; a request/response backend that does is
    stuck."""
    services = load_settings({}).services
    assert services["realtime-streaming"].timeout.read == 300.0
    assert services["cluster-registry"].timeout.read == Timeouts.read < 300.0


@pytest.mark.parametrize(
    "url", ["redis://cache:99999/0", "redis://cache:port/0", "redis://cache/0?socket_timeout=x"]
)
def test_a_redis_url_its_client_cannot_use_names_the_key(url: str) -> None:
    with pytest.raises(SettingsError, match=r"^REDIS_URL: "):
        load_settings({"REDIS_URL": url})


@pytest.mark.parametrize("host", ["redis:6379", "bad host", "redis://cache"])
def test_check_config_refuses_a_redis_host_that_is_no_host_in_one_line(
    host: str, run_in_process: Any
) -> None:
    result = run_in_process("gateway", "check-config", REDIS_HOST=host)

    hint = " (the port goes in REDIS_PORT)" if host == "redis:6379" else ""
    assert refusal(result) == (
        f"gateway: configuration error: REDIS_HOST: {host!r} is neither an IP address nor a host name{hint}"
    )


@pytest.mark.parametrize(
    ("host", "url"),
    [("::1", "redis://[::1]:6379/0"), ("cache_1", "redis://cache_1:6379/0"), (" ", None)],
)
def test_a_redis_host_that_is_an_address_or_a_name_makes_the_url(host: str, url: str | None) -> None:
    assert load_settings({"REDIS_HOST": host}).redis_url == url


def test_an_ipv4_mapped_trusted_proxy_network_is_its_ipv4_network() -> None:
    """Peers are matched as the gateway names them, an IPv4 client of a dual-stack socket as IPv4:
    written IPv4-mapped, as it shows in ``ss`` on such a socket, the entry matched no peer at all."""
    settings = load_settings({"TRUSTED_PROXIES": "::ffff:10.0.0.0/104,::ffff:192.0.2.7,2001:db8::/32"})
    assert [str(net) for net in settings.trusted_proxies] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]


def test_blank_lists_that_default_to_none_stay_none() -> None:
    settings = load_settings({"TRUSTED_PROXIES": "", "CORS_ALLOW_ORIGINS": " "})
    assert (settings.trusted_proxies, settings.cors_allow_origins) == ((), ())


def test_check_config_refuses_an_empty_auth_algorithms(run_in_process: Any) -> None:
    result = run_in_process("gateway", "check-config", AUTH_ALGORITHMS="")

    assert refusal(result).startswith("gateway: configuration error: AUTH_ALGORITHMS: empty")
    assert result.stdout == ""


async def test_service_url_override_sends_traffic_to_the_new_target(
    make_gateway: Any, make_upstream: Any, refused_url: str
) -> None:
    upstream = await make_upstream()
    client = await make_gateway(one_service(refused_url), env={"SERVICE_SVC_URL": upstream.url})

    assert (await client.get("/x")).status == 200
    assert [r.raw_path for r in upstream.requests] == ["/x"]


# -- python -m gateway check-config -------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This process's environment minus gateway settings; imports come from this worktree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVICE_", "GATEWAY_", "AUTH_"))}
    env["PYTHONPATH"] = str(WORKTREE)
    return env


def check_config(path: str) -> subprocess.CompletedProcess[str]:
    """The real ``python -m gateway check-config``; the other tests of the command run its ``main``
    in this process (``run_in_process``), which is the same code without an interpreter's start."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", path],
        cwd=WORKTREE,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_prints_the_table_for_a_good_file(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, GOOD))

    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    for text in ("/api/v1/clusters", "/api/v1/metrics", "cluster-registry", "128KB", "unlimited"):
        assert text in result.stdout
    assert "100/minute" in result.stdout and "600/minute (default)" in result.stdout
    # A size shown in the largest unit that holds it whole, never rounded.
    result = check_config(write(tmp_path, with_change("routes.0.max_body", "1536KB")))
    (line,) = [line for line in result.stdout.splitlines() if "/api/v1/clusters" in line]
    assert line.split()[2] == "1536KB", line


def test_check_config_keeps_its_columns_for_long_prefixes_and_service_names(
    tmp_path: Path, run_in_process: Any
) -> None:
    config = {
        "services": {"observability-collector-for-the-eu-west-clusters": {"url": "http://127.0.0.1:9001"}},
        "routes": [
            {
                "prefix": "/api/v1/clusters/eu-west/nodes/pods",
                "service": "observability-collector-for-the-eu-west-clusters",
            },
            {"prefix": "/a", "service": "observability-collector-for-the-eu-west-clusters", "auth": "none"},
        ],
    }
    result = run_in_process("gateway", "check-config", write(tmp_path, config))
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("routes (longest prefix wins):\n", 1)[1].splitlines()
    header, rows = table[0], table[1:]
    assert len(rows) == 2
    for column in ("service", "rate_limit", "auth"):
        start = header.index(column)
        for row in rows:
            assert row[start - 1] == " " and row[start] != " ", (column, header, row)
    auth = header.index("auth")
    assert [row[auth:].split()[0] for row in rows] == ["none", "required"]


def test_check_config_shows_each_services_ejection_and_each_routes_body_types(
    tmp_path: Path, run_in_process: Any
) -> None:
    config = {
        "services": {"svc": {"url": "http://127.0.0.1:9001", "eject_seconds": 12.5}},
        "routes": [
            {"prefix": "/upload", "service": "svc", "content_types": ["image/png", "application/pdf"]},
            {"prefix": "/api", "service": "svc"},
        ],
    }
    result = run_in_process("gateway", "check-config", write(tmp_path, config))
    assert result.returncode == 0, result.stderr
    assert "(health /health, connect 2s, read 30s, eject 12.5s)" in result.stdout
    table = result.stdout.split("routes (longest prefix wins):\n", 1)[1].splitlines()
    assert table[0].split()[-1] == "content_types"
    assert [row.split()[-1] for row in table[1:]] == ["application/json", "image/png,application/pdf"]


def test_check_config_of_a_missing_file_names_the_file_not_gateway_config(
    tmp_path: Path, run_in_process: Any
) -> None:
    result = run_in_process("gateway", "check-config", str(tmp_path / "nowhere.yaml"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"gateway: configuration error: cannot read {tmp_path / 'nowhere.yaml'}: No such file or directory\n"
    )


def test_check_config_fails_with_one_clear_line_for_a_bad_file(tmp_path: Path, run_in_process: Any) -> None:
    path = write(tmp_path, with_change("routes.0.max_body", "12 parsecs"))
    result = run_in_process("gateway", "check-config", path)

    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "routes[0].max_body" in lines[0]


def test_check_config_refuses_a_file_that_is_not_utf8_in_one_line(
    tmp_path: Path, run_in_process: Any
) -> None:
    path = write(tmp_path, b"\xff\xfe\x00bad")

    assert refusal(run_in_process("gateway", "check-config", path)) == (
        f"gateway: configuration error: {path}: not UTF-8 at byte 0 (line 1); save it as UTF-8"
    )


def test_check_config_never_prints_a_service_urls_password(tmp_path: Path, run_in_process: Any) -> None:
    path = write(tmp_path, with_change("services.metrics.urls", ["http://u:hunter2@127.0.0.1"]))
    result = run_in_process("gateway", "check-config", path)

    assert refusal(result).startswith("gateway: configuration error: services.metrics.urls[0]: ")
    assert "hunter2" not in result.stdout + result.stderr


# -- draining -----------------------------------------------------------------------------------


async def test_readiness_is_503_while_draining(make_gateway: Any, make_upstream: Any) -> None:
    client = await make_gateway(one_service((await make_upstream()).url))
    assert (await client.get("/health/ready")).status == 200

    await client.app.shutdown()  # what AppRunner.cleanup does first on SIGTERM: on_shutdown

    response = await client.get("/health/ready")
    assert response.status == 503
    assert client.app[lifecycle_key].draining


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_sigterm_lets_the_in_flight_request_finish_and_exits_0(
    make_upstream: Any, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 15)
        return web.Response(text="finished")

    upstream = await make_upstream(slow)
    port = free_port()
    env = {
        **clean_env(),
        "GATEWAY_CONFIG": write(tmp_path, one_service(upstream.url)),
        "GATEWAY_PORT": str(port),
        "LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "gateway.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", cwd=WORKTREE, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 15
            while True:  # poll until the process listens and is ready
                try:
                    async with session.get(f"{base}/health/ready") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert process.returncode is None, (tmp_path / "gateway.log").read_text()
                assert time.monotonic() < deadline, "the gateway did not become ready"
                await asyncio.sleep(0.01)

            in_flight = asyncio.create_task(session.get(f"{base}/slow"))
            await wait_for(lambda: bool(upstream.requests), what="the slow request to reach the upstream")

            process.send_signal(signal.SIGTERM)

            def refuses_connections() -> bool:
                with socket.socket() as probe:
                    return probe.connect_ex(("127.0.0.1", port)) != 0

            await wait_for(refuses_connections, what="the listening socket to close")
            assert process.returncode is None  # still draining the in-flight request

            release.set()
            async with asyncio.timeout(10):
                response = await in_flight
                assert response.status == 200
                assert await response.text() == "finished"
                assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()
