"""``mailingestd --check-config`` changes nothing; ``mailingestd migrate`` is the explicit migration.

Real SQLite files and the session PostgreSQL: the check must leave every file byte for byte (and
no -wal/-shm pair behind) and create no table; supported PostgreSQL versions are checked.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from mailingestd.cli import POSTGRESQL_MIN_VERSION, StoreProbe, supported_problem
from mailingestd.store.schema import MIGRATIONS as _MIGRATIONS

BIN = Path(sys.executable).parent
LATEST = _MIGRATIONS[-1][0]


def mailingestd(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(config.parent)}  # no MAILINGESTD_* from outside
    return subprocess.run([str(BIN / "mailingestd"), *args, "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def write_config(root: Path, store_url: str = "") -> Path:
    path = root / "mailingestd.toml"
    path.write_text(f'[daemon]\nstate_dir = "{root / "state"}"\n'
                    + (f'[store]\nurl = "{store_url}"\n' if store_url else ""))
    return path


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.iterdir())}


def test_check_on_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = mailingestd("--check-config", config=config)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "state").exists(), "--check-config created the store"
    assert "configuration OK" in result.stdout and "does not exist yet" in result.stdout


def test_check_leaves_an_older_store_as_it_is_and_migrate_upgrades_it(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert mailingestd("migrate", config=config).returncode == 0
    db = tmp_path / "state" / "mailingestd.sqlite3"
    # An older release's store: the latest migration not applied yet (its row removed; migration 7
    # has no SQLite statement, so that is exactly the schema of version 6).
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = ?", (LATEST,))
    conn.close()
    before = snapshot(db.parent)
    result = mailingestd("--check-config", config=config)
    assert result.returncode == 0, result.stderr
    assert f"schema {LATEST - 1} of {LATEST}, 1 migration to apply" in result.stdout
    assert snapshot(db.parent) == before, "--check-config changed the store directory"

    result = mailingestd("migrate", config=config)
    assert result.returncode == 0, result.stderr
    assert f"schema {LATEST - 1} -> {LATEST}" in result.stdout
    assert "up to date" in mailingestd("--check-config", config=config).stdout


def test_a_store_newer_than_this_version_fails_the_check(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert mailingestd("migrate", config=config).returncode == 0
    with sqlite3.connect(tmp_path / "state" / "mailingestd.sqlite3") as conn:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)", (LATEST + 1,))
    conn.close()
    result = mailingestd("--check-config", config=config)
    assert result.returncode == 78
    assert f"schema version {LATEST + 1} is newer than this mailingestd" in result.stderr


def test_check_creates_no_table_in_postgresql_and_migrate_does(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, pg_url)

    def tables() -> int:
        with psycopg.connect(pg_url) as conn:
            return conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]

    result = mailingestd("--check-config", config=config)
    assert result.returncode == 0, result.stderr
    assert "store postgresql 15." in result.stdout and f"schema 0 of {LATEST}" in result.stdout
    assert tables() == 0
    result = mailingestd("migrate", config=config)
    assert result.returncode == 0, result.stderr
    assert tables() > 0
    assert "up to date" in mailingestd("--check-config", config=config).stdout


@pytest.mark.parametrize("server_version,supported", [(130011, False), (140000, True), (150004, True)])
def test_supported_postgresql_versions(server_version: int, supported: bool) -> None:
    probe = StoreProbe(backend="postgresql", exists=True, schema_version=LATEST, server_version=server_version)
    problem = supported_problem(probe)
    assert (problem is None) == supported
    if problem:
        assert f"needs PostgreSQL {POSTGRESQL_MIN_VERSION} or newer" in problem
