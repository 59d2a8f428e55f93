"""Sizes in the config file (``max_body``): every spelling the regex admits must parse or be refused."""

from __future__ import annotations

import pytest

from gateway.settings import SettingsError, parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("16", 16),
        ("16B", 16),
        ("16 b", 16),
        ("64K", 64 * 1024),
        ("64KB", 64 * 1024),
        ("64kib", 64 * 1024),
        ("1.5MB", 1536 * 1024),
        ("2GiB", 2 * 1024**3),
        (1024, 1024),
        ("unlimited", None),
    ],
)
def test_sizes_parse(value: object, expected: int | None) -> None:
    assert parse_size(value, "max_body") == expected


@pytest.mark.parametrize("value", ["16i", "16ib", "16 bytes", "KB", "-1KB", "1.2.3", "1XB", True, -1])
def test_bad_sizes_are_a_settings_error_naming_the_key(value: object) -> None:
    with pytest.raises(SettingsError, match="max_body"):
        parse_size(value, "max_body")
