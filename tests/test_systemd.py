"""The systemd files: the unit verifies cleanly, its hardening stays measured, and the daemon behaves
under it as systemd expects (sd_notify READY / WATCHDOG / RELOADING / STOPPING, exit 0 on SIGTERM).

systemd is not PID 1 on the test machines, so nothing here starts the unit itself:
``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` read the unit file, and
the daemon is started with the unit's own ExecStart command line, a notify socket of the test's own
and WATCHDOG_USEC, the way systemd would start it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "mailingestd.service"
SYSUSERS = ROOT / "systemd" / "mailingestd.sysusers"
TMPFILES = ROOT / "systemd" / "mailingestd.tmpfiles"
INSTALLED_BIN = "/opt/mailingestd/bin/"
VENV_BIN = Path(sys.executable).parent
MAX_EXPOSURE = 3.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package systemd (apt-get install systemd)")
    return path


def unit_setting(text: str, key: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^{key}=(.*)$", text, re.MULTILINE)]


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with its /opt/mailingestd/bin/ commands pointed at this virtual environment's."""
    text = UNIT.read_text()
    assert text.count(INSTALLED_BIN) == 2, f"expected ExecStart and ExecReload under {INSTALLED_BIN}"
    path = tmp_path / "mailingestd.service"
    path.write_text(text.replace(INSTALLED_BIN, f"{VENV_BIN}/"))
    return path


def test_unit_verifies_without_any_warning(local_unit: Path) -> None:
    # --man=no: Documentation= is checked below against man/, without needing man-db installed.
    result = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(local_unit)], capture_output=True,
                            text=True, timeout=60, cwd=local_unit.parent, check=False)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify {UNIT.name}:\n{output}"


def test_unit_documentation_names_the_shipped_man_pages() -> None:
    pages = re.findall(r"man:([\w.-]+)\((\d)\)", " ".join(unit_setting(UNIT.read_text(), "Documentation")))
    assert pages, "Documentation= names no man page"
    for name, section in pages:
        assert (ROOT / "man" / f"{name}.{section}").is_file(), f"Documentation= names man:{name}({section})"


def test_unit_security_exposure(local_unit: Path) -> None:
    result = subprocess.run([tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(local_unit)],
                            capture_output=True, text=True, timeout=60, cwd=local_unit.parent, check=False)
    match = re.search(r"Overall exposure level for mailingestd\.service: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, f"no exposure level in:\n{result.stdout}{result.stderr}"
    assert float(match.group(1)) <= MAX_EXPOSURE, f"exposure {match.group(1)} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_unit_keeps_what_the_daemon_needs() -> None:
    """Hardening must not take away what the daemon uses (see the comments in the unit)."""
    text = UNIT.read_text()
    filters = unit_setting(text, "SystemCallFilter")
    assert filters == ["@system-service"], filters
    allowed = subprocess.run([tool("systemd-analyze"), "syscall-filter", "@system-service"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    groups = {"@system-service"}
    for line in allowed.splitlines():  # @system-service lists groups; expand one level of them
        if re.match(r"^\s+@", line):
            groups.add(line.strip())
    expanded = subprocess.run([tool("systemd-analyze"), "syscall-filter", *sorted(groups)], capture_output=True,
                              text=True, check=True, timeout=60).stdout
    names = {line.strip() for line in expanded.splitlines()}
    for syscall in ("sched_setaffinity", "sched_getaffinity", "prctl", "clone", "clone3", "socket", "flock"):
        assert syscall in names, f"{syscall} is not allowed by SystemCallFilter=@system-service"
    assert set(unit_setting(text, "RestrictAddressFamilies")[0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert unit_setting(text, "Type") == ["notify"] and unit_setting(text, "NotifyAccess") == ["main"]
    assert unit_setting(text, "KillMode") == ["mixed"]
    assert "-/var/lib/prometheus/node-exporter" in unit_setting(text, "ReadWritePaths")


def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = subprocess.run([tool("systemd-sysusers"), f"--root={root}", "-"], input=SYSUSERS.read_text(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^mailingestd:x:\d+:\d+:.*:/var/lib/mailingestd:/usr/sbin/nologin$",
                     (root / "etc" / "passwd").read_text(), re.MULTILINE)
    # The ACL entry names the user through the host's user database even with --root; where the
    # host has no mailingestd user, name root instead so the line is still parsed and applied.
    tmpfiles = TMPFILES.read_text()
    try:
        import pwd

        pwd.getpwnam("mailingestd")
    except KeyError:
        tmpfiles = tmpfiles.replace("u:mailingestd:", "u:root:")
    result = subprocess.run([tool("systemd-tmpfiles"), f"--root={root}", "--create", "-"], input=tmpfiles,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for directory, mode in (("var/lib/mailingestd", 0o750), ("etc/mailingestd", 0o750),
                            ("etc/mailingestd/secrets", 0o750)):
        assert (root / directory).stat().st_mode & 0o7777 == mode, directory
    assert (root / "var/lib/prometheus/node-exporter").is_dir()


# --- the daemon as the unit starts it ------------------------------------------------------------------
class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def wait_for(self, field: str, timeout: float, proc: subprocess.Popen) -> list[str]:
        """Read datagrams until one holds ``field`` (a line such as READY=1); returns that datagram's lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.2)
            try:
                lines = self.sock.recv(65536).decode().splitlines()
            except TimeoutError:
                if proc.poll() is not None:
                    break
                continue
            self.seen.extend(lines)
            if field in lines:
                return lines
        pytest.fail(f"no {field} within {timeout}s (daemon exit {proc.poll()}); received: {self.seen}")


def test_daemon_started_like_the_unit_notifies_systemd(tmp_path: Path) -> None:
    text = UNIT.read_text()
    config = _minimal_config(tmp_path, daemon="", metrics=f"""\
textfile = "{tmp_path / 'textfile' / 'mailingestd.prom'}"
interval = "1s"
""")

    def command(setting: str) -> list[str]:
        argv = _as_test_user(shlex.split(unit_setting(text, setting)[0].replace(INSTALLED_BIN, f"{VENV_BIN}/")))
        assert argv.count("/etc/mailingestd/mailingestd.toml") == 1, argv
        return [str(config) if arg == "/etc/mailingestd/mailingestd.toml" else arg for arg in argv]

    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MAILINGESTD_") and k not in ("WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS")}
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    proc = subprocess.Popen(command("ExecStart"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = notify.wait_for("READY=1", 30, proc)
        assert f"MAINPID={proc.pid}" in ready, ready
        notify.wait_for("WATCHDOG=1", 5, proc)
        notify.wait_for("WATCHDOG=1", 2, proc)  # every WATCHDOG_USEC/2 = 1 s, not just once

        reload = subprocess.run(command("ExecReload"), env=env, capture_output=True, text=True, timeout=40, check=False)
        assert reload.returncode == 0, reload.stderr
        notify.wait_for("RELOADING=1", 5, proc)
        notify.wait_for("READY=1", 5, proc)

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 20, proc)
        assert proc.wait(timeout=40) == 0, proc.stdout.read() if proc.stdout else ""
        assert (tmp_path / "textfile" / "mailingestd.prom").read_text().count("mailingestd_build_info") >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.sock.close()


def _as_test_user(argv: list[str]) -> list[str]:
    """The unit runs mailingestd as User=mailingestd; the tests run as root, which it refuses
    unless told --allow-root."""
    if os.geteuid() == 0 and argv[0].endswith("/mailingestd"):
        return [argv[0], "--allow-root", *argv[1:]]
    return argv


def _daemon_command(config: Path) -> list[str]:
    argv = _as_test_user(shlex.split(unit_setting(UNIT.read_text(), "ExecStart")[0].replace(INSTALLED_BIN, f"{VENV_BIN}/")))
    return [str(config) if arg == "/etc/mailingestd/mailingestd.toml" else arg for arg in argv]


def _minimal_config(tmp_path: Path, daemon: str = 'heartbeat_interval = "0.2s"\n',
                    metrics: str = 'textfile = ""\n') -> Path:
    """One worker, runtime and state under tmp_path; ``daemon`` and ``metrics`` add to those sections."""
    config = tmp_path / "mailingestd.toml"
    config.write_text(f"""\
[daemon]
workers = 1
runtime_dir = "{tmp_path / 'run'}"
state_dir = "{tmp_path / 'state'}"
{daemon}[metrics]
{metrics}""")
    (tmp_path / "state").mkdir()
    return config


def _unit_env(notify_path: Path, watchdog_usec: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MAILINGESTD_") and k not in ("WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS")}
    env.update(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC=str(watchdog_usec))
    return env


def test_sigterm_while_the_notify_socket_is_not_read_exits_0_with_stopping(tmp_path: Path) -> None:
    """systemd reading its notify socket late must not matter: the supervisor's sd_notify never blocks,
    a signal arriving meanwhile never raises out of it, and STOPPING=1 still reaches systemd."""
    notify = NotifySocket(tmp_path / "notify.sock")
    # Keep-alives every 0.1 s fill the socket's queue (net.unix.max_dgram_qlen, 10 by default) in a second.
    proc = subprocess.Popen(_daemon_command(_minimal_config(tmp_path)), env=_unit_env(notify.path, 200_000),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        notify.wait_for("READY=1", 30, proc)
        time.sleep(3.0)  # nobody reads: every further send finds the queue full
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        notify.wait_for("STOPPING=1", 20, proc)
        code = proc.wait(timeout=30)
        output = proc.stdout.read() if proc.stdout else ""
        assert code == 0, output
        assert "Traceback" not in output, output
        assert output.count("event=notify_failed") == 1, output  # logged once, not once per keep-alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.sock.close()


def test_a_worker_crash_loop_keeps_the_watchdog_fed_and_still_ends_in_exit_70(tmp_path: Path) -> None:
    """Keep-alives say "the supervisor and the scheduler make progress": a worker waiting out its
    restart backoff (up to 16 s here) must not get the whole daemon SIGABRTed by WatchdogSec (every
    IDLE connection dropped); the crash loop itself still ends the daemon with exit 70."""
    watchdog_sec = 3.0
    notify = NotifySocket(tmp_path / "notify.sock")
    config = _minimal_config(tmp_path)
    proc = subprocess.Popen(_daemon_command(config), env=_unit_env(notify.path, int(watchdog_sec * 1e6)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    keepalives: list[float] = []
    killed: set[int] = set()
    try:
        notify.wait_for("READY=1", 30, proc)
        scheduler = _scheduler_pid(config)
        keepalives.append(time.monotonic())
        notify.sock.settimeout(0.05)
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if "WATCHDOG=1" in notify.sock.recv(65536).decode().splitlines():
                    keepalives.append(time.monotonic())
            except TimeoutError:
                pass
            gap = time.monotonic() - keepalives[-1]
            assert gap <= watchdog_sec, f"no WATCHDOG=1 for {gap:.1f}s after {len(killed)} worker kills"
            for pid in set(_children(proc.pid)) - {scheduler} - killed:  # the worker, each time it is back
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        code = proc.wait(timeout=30)
        output = proc.stdout.read() if proc.stdout else ""
        assert code == 70, output[-3000:]
        assert "reason=crash_loop role=worker" in output, output[-3000:]
        assert len(killed) == 8, killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.sock.close()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _scheduler_pid(config: Path) -> int:
    """The scheduler's pid, from ``mailingestctl status --json`` (forked children share one command line)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = subprocess.run([str(VENV_BIN / "mailingestctl"), "--config", str(config), "status", "--json"],
                                capture_output=True, text=True, timeout=20, check=False)
        if result.returncode == 0:
            pids = [c["pid"] for c in json.loads(result.stdout)["children"] if c["role"] == "scheduler" and c["pid"]]
            if pids:
                return pids[0]
        time.sleep(0.2)
    pytest.fail("no scheduler in mailingestctl status")
