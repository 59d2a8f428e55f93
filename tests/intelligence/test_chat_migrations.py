"""``python -m intelligence migrate``: idempotent, one transaction per file, safe in parallel."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import aiopg
import pytest
from chat_helpers import ROOT

from intelligence.models import MigrationError
from intelligence.schema import apply_migrations, load_migrations


async def applied_versions(dsn: str) -> list[int]:
    async with aiopg.connect(dsn) as conn, conn.cursor() as cur:
        await cur.execute("SELECT version FROM schema_migrations ORDER BY version")
        return [v for (v,) in await cur.fetchall()]


async def test_migrate_twice_applies_once(empty_database: str) -> None:
    first = await apply_migrations(empty_database)
    second = await apply_migrations(empty_database)
    assert first == [m.name for m in load_migrations()] and first
    assert second == []
    assert await applied_versions(empty_database) == [m.version for m in load_migrations()]


async def test_concurrent_migrations_on_separate_connections_apply_each_file_once(
    empty_database: str,
) -> None:
    results = await asyncio.gather(*(apply_migrations(empty_database) for _ in range(4)))
    names = [name for result in results for name in result]
    assert sorted(names) == sorted(m.name for m in load_migrations())  # once, by exactly one runner
    assert await applied_versions(empty_database) == [m.version for m in load_migrations()]


def copy_shipped_migrations(directory: Path, *, suffix: str = "") -> None:
    for migration in load_migrations():
        (directory / migration.name).write_text(migration.sql + suffix)


def migrate_env(dsn: str, **extra: str) -> dict[str, str]:
    """``python -m intelligence migrate``'s environment: this worktree's code against ``dsn``."""
    return {**_base_env(), "POSTGRES_DSN": dsn, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING", **extra}


def test_two_migrate_processes_at_once(empty_database: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "intelligence", "migrate"],
            cwd=ROOT,
            env=migrate_env(empty_database),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summary = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert summary == ["applied 0 migration(s)", f"applied 1 migration(s): {load_migrations()[0].name}"]
    assert asyncio.run(applied_versions(empty_database)) == [1]


def test_serve_refuses_to_start_while_migrations_are_pending(empty_database: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "intelligence"], cwd=ROOT,
        env={**_base_env(), "POSTGRES_DSN": empty_database, "PYTHONPATH": str(ROOT), "INTELLIGENCE_PORT": "0"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "migration(s) pending" in result.stderr
    assert "python -m intelligence migrate" in result.stderr


async def test_a_failing_migration_leaves_no_trace(empty_database: str, tmp_path: Path) -> None:
    copy_shipped_migrations(tmp_path)
    (tmp_path / "9999_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_function();\n"
    )
    with pytest.raises(Exception, match="no_such_function"):
        await apply_migrations(empty_database, load_migrations(tmp_path))
    async with aiopg.connect(empty_database) as conn, conn.cursor() as cur:
        await cur.execute("SELECT to_regclass('half_done') IS NULL, to_regclass('chat_messages') IS NOT NULL")
        assert await cur.fetchone() == (True, True)  # the earlier files stay, the broken one is gone
    assert await applied_versions(empty_database) == [1]


async def test_an_applied_migration_that_was_edited_is_refused(empty_database: str, tmp_path: Path) -> None:
    await apply_migrations(empty_database)
    copy_shipped_migrations(tmp_path, suffix="\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await apply_migrations(empty_database, load_migrations(tmp_path))


def test_migrations_are_package_data() -> None:
    files = {entry.name for entry in resources.files("migrations").iterdir()}
    assert {m.name for m in load_migrations()} <= files


def _base_env() -> dict[str, Any]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "REDIS_"))}


def test_a_migrations_directory_that_cannot_be_read_is_a_migration_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match=r"cannot read the migrations in .*absent: No such file"):
        load_migrations(tmp_path / "absent")


def test_a_migration_file_that_is_not_utf8_is_a_migration_error(tmp_path: Path) -> None:
    (tmp_path / "0001_latin1.sql").write_bytes("SELECT 1;\n-- caf\xe9\n".encode("latin-1"))
    with pytest.raises(MigrationError, match=r"0001_latin1\.sql: not UTF-8 at byte 16 \(line 2\)$"):
        load_migrations(tmp_path)


async def test_a_database_migrated_by_newer_code_is_refused(empty_database: str, tmp_path: Path) -> None:
    """An older release started against a schema a newer one migrated: it does not know what
    the later migration changed, so it refuses rather than run on it (a rollback of the code
    alone). ``serve`` reports it through the same check."""
    copy_shipped_migrations(tmp_path)
    (tmp_path / "9999_newer.sql").write_text("CREATE TABLE newer_release (id int);\n")
    await apply_migrations(empty_database, load_migrations(tmp_path))
    with pytest.raises(MigrationError, match="migration 9999 applied, which this code does not know"):
        await apply_migrations(empty_database)


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (["1_init.sql"], r"'1_init\.sql': expected NNNN_description\.sql"),
        (["0001_Init.sql"], r"'0001_Init\.sql': expected NNNN_description\.sql"),
        (["0002_a.sql", "0002_b.sql"], r"two migrations share version 2: 0002_a\.sql, 0002_b\.sql"),
    ],
)
def test_a_misnamed_or_duplicate_migration_file_is_a_migration_error(
    tmp_path: Path, names: list[str], problem: str
) -> None:
    for name in names:
        (tmp_path / name).write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match=problem):
        load_migrations(tmp_path)


def test_migrations_run_in_version_order_not_name_order(tmp_path: Path) -> None:
    for name in ("10000_later.sql", "9999_earlier.sql", "README.txt"):
        (tmp_path / name).write_text("SELECT 1;\n")
    assert [m.version for m in load_migrations(tmp_path)] == [9999, 10000]


def test_migrate_applies_the_migrations_of_intelligence_migrations_dir(
    empty_database: str, tmp_path: Path
) -> None:
    copy_shipped_migrations(tmp_path)
    (tmp_path / "0002_extra.sql").write_text("CREATE TABLE extra_from_the_operator (id int);\n")
    result = subprocess.run(
        [sys.executable, "-m", "intelligence", "migrate"],
        cwd=ROOT, env=migrate_env(empty_database, INTELLIGENCE_MIGRATIONS_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = ", ".join([*(m.name for m in load_migrations()), "0002_extra.sql"])
    assert result.stdout.strip().splitlines()[-1] == f"applied 2 migration(s): {names}"
