"""Settings are read from the environment once and fail with the key's name; fixtures never skip."""

from __future__ import annotations

import pytest
from chat_helpers import PG_HINT, REDIS_HINT, redis_sync

from intelligence.settings import SettingsError, load_settings


def test_postgres_is_required() -> None:
    with pytest.raises(SettingsError, match="POSTGRES_DSN"):
        load_settings({})


def test_settings_from_the_contracts_variables() -> None:
    settings = load_settings(
        {
            "POSTGRES_HOST": "db", "POSTGRES_USER": "chat", "POSTGRES_DB": "chat",
            "REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_DB": "2",
            "INTELLIGENCE_HOST": "0.0.0.0", "INTELLIGENCE_PORT": "9000", "CHAT_CACHE_TTL": "60",
        }
    )  # fmt: skip
    assert settings.postgres.dsn == "host='db' user='chat' dbname='chat'"
    assert settings.cache.url == "redis://cache:6380/2"
    assert (settings.host, settings.port, settings.cache.session_ttl) == ("0.0.0.0", 9000, 60)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"INTELLIGENCE_PORT": "http"}, "INTELLIGENCE_PORT"),
        ({"INTELLIGENCE_HOST": "999.1.1.1"}, "INTELLIGENCE_HOST"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"REDIS_HOST": "redis:6379"}, "REDIS_HOST: 'redis:6379' is neither an IP address nor a host name"),
        ({"POSTGRES_DSN": "garbage"}, "POSTGRES_DSN: not a valid connection string"),
        ({"POSTGRES_DSN": "host=db colour=red"}, 'POSTGRES_DSN: .*"colour"'),
        ({"INTELLIGENCE_MIGRATIONS_DIR": "/nope"}, "INTELLIGENCE_MIGRATIONS_DIR: /nope does not exist"),
        ({"INTELLIGENCE_MIGRATIONS_DIR": __file__}, "INTELLIGENCE_MIGRATIONS_DIR: .* is not a directory"),
        # A pool of no connections, a connect timeout below libpq's whole second, a cache entry
        # that expires as it is written.
        ({"POSTGRES_POOL_MAX": "0"}, "POSTGRES_POOL_MAX"),
        ({"POSTGRES_CONNECT_TIMEOUT": "0.5"}, "POSTGRES_CONNECT_TIMEOUT"),
        ({"CHAT_CACHE_TTL": "0"}, "CHAT_CACHE_TTL"),
    ],
)
def test_bad_values_name_their_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(SettingsError, match=key):
        load_settings({"POSTGRES_DSN": "dbname=x", **env})


def test_an_unreachable_redis_fails_the_test_with_how_to_start_it() -> None:
    with pytest.raises(pytest.fail.Exception, match="redis-server --daemonize yes"):
        redis_sync("redis://127.0.0.1:1/0")
    assert "pg_ctlcluster --skip-systemctl-redirect" in PG_HINT and REDIS_HINT


def test_a_database_found_by_other_means_is_the_address_and_postgres_variables_tune_the_pool() -> None:
    """``python -m gateway up`` passes its embedded server's address: a stray ``POSTGRES_HOST``
    must not send the chat elsewhere, while ``POSTGRES_POOL_MAX`` still applies."""
    settings = load_settings(
        {"POSTGRES_HOST": "elsewhere", "POSTGRES_POOL_MAX": "5"}, dsn="host=/tmp/embedded dbname=chat"
    )
    assert settings.postgres.dsn == "host=/tmp/embedded dbname=chat"
    assert settings.postgres.pool_max == 5
