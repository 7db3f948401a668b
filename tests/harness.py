"""Run the real daemon in tests: a generated config, ``mailingestd`` as a subprocess, ``mailingestctl``.

The daemon is started exactly as an operator starts it (console script, ``--config``), so tests
exercise the same code path as production, including forking, pinning and the control socket.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BIN = Path(sys.executable).parent
PASSWORD_ENV = "TEST_IMAP_PASSWORD"


def account_toml(user: str, host: str, port: int, **extra: Any) -> str:
    lines = [f'id = "{extra.pop("id", user)}"', f'host = "{host}"', f"port = {port}", 'tls = "none"',
             f'username = "{user}"', f'password_env = "{PASSWORD_ENV}"']
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n[[accounts]]\n" + "\n".join(lines) + "\n"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """One mailingestd under test. ``sections`` are extra TOML text (e.g. a [queue] table)."""

    def __init__(self, root: Path, *, accounts: str = "", store_url: str = "", workers: int = 2,
                 password: str = "secret", sections: str = "", env: dict[str, str] | None = None,
                 heartbeat_timeout: str = "5s", runtime_dir: Path | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "mailingestd.toml"
        self.metrics_dir = root / "metrics"
        # Unix socket paths must fit in 108 bytes; a deep pytest tmp_path may not.
        self.runtime_dir = runtime_dir or Path(tempfile.mkdtemp(prefix="mi-run-"))
        self.store_url = store_url or f"sqlite:///{root / 'state' / 'mailingestd.sqlite3'}"
        self.config_path.write_text(f"""
[daemon]
workers = {workers}
runtime_dir = "{self.runtime_dir}"
state_dir = "{root / 'state'}"
heartbeat_interval = "0.5s"
heartbeat_timeout = "{heartbeat_timeout}"
shutdown_timeout = "20s"

[store]
url = "{self.store_url}"

[scheduler]
high_interval = "2s"
medium_interval = "3s"
low_interval = "5s"
idle_safety_interval = "30s"
backoff_base = "1s"
backoff_max = "5s"

[metrics]
textfile = "{self.metrics_dir / 'mailingestd.prom'}"
interval = "1s"
{sections}
{accounts}
""")
        # Store rows (mailingestctl account add, plain SQL) may name this variable and files under
        # root/secrets: the configuration allows them (docs/security.md, "Where secrets may come from").
        # MAILINGESTCTL_ENV_FILE empty: mailingestctl must not read the host's mailingestd.env.
        self.env = dict(os.environ, **{PASSWORD_ENV: password, "MAILINGESTCTL_ENV_FILE": "",
                                       "MAILINGESTD_SECRETS_ALLOWED_ENV": json.dumps([PASSWORD_ENV]),
                                       "MAILINGESTD_SECRETS_ALLOWED_DIRS": json.dumps([str(root / "secrets")])},
                        **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "mailingestd.log"

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> "Daemon":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN / "mailingestd"), "--allow-root", "--config", str(self.config_path)],
                                     env=self.env, stdout=self.log, stderr=self.log)
        if wait:
            wait_until(lambda: self.try_status() is not None and self.try_status()["supervisor"]["state"] == "running",
                       30, 0.2, "the daemon to be running\n" + self.log_tail())
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"daemon did not stop within {timeout}s\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for child in self.child_pids():
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(10)

    def child_pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as handle:
                return [int(p) for p in handle.read().split()]
        except OSError:
            return []

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- talking to it ----------------------------------------------------------------------------
    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "mailingestctl"), "--config", str(self.config_path), *args],
                                env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"mailingestctl {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def try_status(self) -> dict[str, Any] | None:
        result = self.ctl("status", "--json", check=False, timeout=10)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def status(self) -> dict[str, Any]:
        status = self.try_status()
        assert status is not None, "the daemon does not answer\n" + self.log_tail()
        return status

    def children(self, role: str) -> list[dict[str, Any]]:
        return [c for c in self.status()["children"] if c["role"] == role]

    def stored_keys(self) -> list[tuple[str, str, int, int]]:
        """Every stored message key, read from the store directly (SQLite or PostgreSQL)."""
        sql = "SELECT account_id, folder, uidvalidity, uid FROM messages"
        if self.store_url.startswith("sqlite:///"):
            with sqlite3.connect(self.store_url[len("sqlite://"):], timeout=30) as conn:
                return [tuple(r) for r in conn.execute(sql)]
        import psycopg

        with psycopg.connect(self.store_url) as conn:
            return [tuple(r) for r in conn.execute(sql)]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.store_url.startswith("sqlite:///"):
            with sqlite3.connect(self.store_url[len("sqlite://"):], timeout=30) as conn:
                return [tuple(r) for r in conn.execute(sql, params)]
        import psycopg

        with psycopg.connect(self.store_url) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), params)]

    def wait_stored(self, count: int, timeout: float = 30) -> None:
        wait_until(lambda: len(self.stored_keys()) >= count, timeout, 0.2,
                   f"{count} stored messages (have {len(self.stored_keys())})\n{self.log_tail()}")

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop(signal.SIGINT, timeout=15)
        finally:
            self.kill()
            self.log.close()


def established_connections(port: int) -> int:
    """ESTABLISHED TCP connections to ``port`` on this host, read from /proc/net/tcp{,6}."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and fields[3] == "01":
                        count += 1
        except OSError:
            continue
    return count
