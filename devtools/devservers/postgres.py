"""PostgreSQL as a throwaway server (initdb as the postgres user; databases per test)."""


from __future__ import annotations

import os
import pwd
import signal
import subprocess
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal



from ._common import LOOPBACK, ServerStartError, _Server, _find_binary, _make_traversable, _run


def _postgres_user() -> pwd.struct_passwd:
    """The ``postgres`` system user, created when missing (initdb refuses to run as root)."""
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        _run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/postgresql",
              "--shell", "/bin/bash", "postgres"])
        return pwd.getpwnam("postgres")


class Postgres(_Server):
    """A PostgreSQL 15 cluster under ``root/data``, run as the ``postgres`` user on 127.0.0.1.

    ``initdb`` on first start, then the postmaster runs in the foreground as our child (rather than
    detached by ``pg_ctl start``) so that it dies with the test process; ``pg_ctl stop -m MODE``
    stops it. Trust authentication on loopback, ``fsync = off`` (throwaway data, fast tests), the
    Unix socket in ``root/run``. ``stop(mode="immediate")`` is a crash as far as the data is
    concerned; the next start runs crash recovery.
    """

    name = "postgres"
    _bin_dirs = ("/usr/lib/postgresql/15/bin",)

    def __init__(self, root: Path, port: int | None = None) -> None:
        super().__init__(root, port)
        package = "apt-get install postgresql-15"
        self._initdb = _find_binary("initdb", package, self._bin_dirs)
        self._pg_ctl = _find_binary("pg_ctl", package, self._bin_dirs)
        self._postgres = _find_binary("postgres", package, self._bin_dirs)
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "run"

    @property
    def url(self) -> str:
        """Connection URL of the ``postgres`` database as the ``postgres`` superuser."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _as_postgres(self) -> dict[str, Any]:
        """Popen arguments that run a command as the postgres user (initdb and pg_ctl refuse root)."""
        user = _postgres_user()
        return {
            "user": user.pw_uid,
            "group": user.pw_gid,
            "extra_groups": [],
            "cwd": self.root,
            "env": {**os.environ, "HOME": str(self.root), "LC_ALL": "C.UTF-8"},
        }

    def _initialise(self) -> None:
        user = _postgres_user()
        _make_traversable(self.root)
        for directory in (self.data_dir, self.socket_dir):
            directory.mkdir(exist_ok=True)
            os.chown(directory, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)
        _run(
            [self._initdb, "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync"],
            timeout=120,
            **self._as_postgres(),
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                textwrap.dedent(
                    f"""
                    # devtools.devservers: throwaway test cluster. fsync off only risks data on
                    # a machine crash; synchronous_commit stays on so a killed server (stop
                    # mode immediate) keeps every acknowledged commit, as crash tests expect.
                    listen_addresses = '{LOOPBACK}'
                    port = {self.port}
                    unix_socket_directories = '{self.socket_dir}'
                    fsync = off
                    full_page_writes = off
                    max_connections = 300
                    """
                )
            )

    def _launch(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            try:
                self._initialise()
            except RuntimeError as exc:
                raise ServerStartError(f"initdb failed: {exc}") from exc
        self._spawn([self._postgres, "-D", str(self.data_dir)], **self._as_postgres())

    def _ready(self) -> bool:
        # Line 8 of postmaster.pid turns to "ready" once connections are accepted (PostgreSQL 10+).
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """``pg_ctl stop -m mode`` and wait; ``immediate`` skips the shutdown checkpoint (a crash)."""
        if self.running:
            subprocess.run(
                [self._pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w",
                 "-t", str(int(self.stop_timeout)), "stop"],
                capture_output=True,
                timeout=self.stop_timeout + 10,
                **self._as_postgres(),
            )
        self._terminate(signal.SIGQUIT)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop with ``mode``, then start again on the same port with the same data."""
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; return its URL."""
        import psycopg  # only the PostgreSQL users of this module need the driver
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{urllib.parse.quote(name)}"


# ---------------------------------------------------------------------------------------------
# moto (SQS, S3)


