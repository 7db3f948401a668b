"""What every scenario shares: scale knobs, the report, /proc readings, the daemon as a subprocess.

Measurements here are taken from outside the daemon: PSS from ``/proc/<pid>/smaps_rollup`` and CPU
ticks from ``/proc/<pid>/stat``, summed over the supervisor and every process below it; message rows
and their ``ingested_at`` from the store; sessions and logins from Dovecot.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import imapclient

from devtools.devservers import Dovecot
from devtools.samplemail import random_message
from mailingestd import control

BIN = Path(sys.executable).parent
PASSWORD = "bench-secret"
PASSWORD_ENV = "BENCH_IMAP_PASSWORD"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Scale:
    """Every knob that differs between quick and full; the scenarios' code is the same."""

    mode: str
    hold_accounts: int
    hold_threads: int
    quiet_accounts: int
    quiet_seconds: float
    status_accounts: int
    latency_rate: float
    latency_seconds: float
    watcher_sample: int
    backlog_accounts: int
    backlog_messages: int
    poll_accounts: int
    poll_warmup: float
    poll_window: float
    scheduler_accounts: int
    folders_accounts: int
    folders_rate: float
    folders_seconds: float


SCALES = {
    # quick: no separate quiet scenario (hold measures CPU while quiet too); the polling window
    # stays one low-tier interval (90 s), or low-tier accounts would not be polled inside it.
    "quick": Scale("quick", hold_accounts=1_000, hold_threads=64, quiet_accounts=0, quiet_seconds=15,
                   status_accounts=10_000, latency_rate=50, latency_seconds=10, watcher_sample=100,
                   backlog_accounts=20, backlog_messages=5_000, poll_accounts=1_000, poll_warmup=5,
                   poll_window=90, scheduler_accounts=100_000, folders_accounts=100, folders_rate=10,
                   folders_seconds=30),
    "full": Scale("full", hold_accounts=10_000, hold_threads=64, quiet_accounts=1_000, quiet_seconds=60,
                  status_accounts=10_000, latency_rate=50, latency_seconds=60, watcher_sample=500,
                  backlog_accounts=100, backlog_messages=100_000, poll_accounts=10_000, poll_warmup=30,
                  poll_window=180, scheduler_accounts=1_000_000, folders_accounts=1_000, folders_rate=20,
                  folders_seconds=60),
}


# --- the report ---------------------------------------------------------------------------------

class Report:
    """``bench/results/<date>/report.json``: one entry per mode, rewritten after every scenario so a
    crash keeps what was measured before it."""

    def __init__(self, scale: Scale, directory: Path | None = None) -> None:
        self.directory = directory or BENCH_DIR / "results" / datetime.date.today().isoformat()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "report.json"
        self.mode = scale.mode
        self.data: dict[str, Any] = {"started_at": now_iso(), "machine": machine(),
                                     "scale": dataclasses.asdict(scale), "scenarios": {}}
        # A run of some scenarios (--only) adds to the same mode's earlier ones of that day.
        earlier = json.loads(self.path.read_text()).get(self.mode) if self.path.exists() else None
        if earlier:
            self.data["scenarios"] = earlier.get("scenarios", {})

    def add(self, name: str, result: dict[str, Any]) -> None:
        result["commit"] = self.data["machine"]["commit"]  # passes with --only may differ
        result["finished_at"] = now_iso()  # and so may their day and hour (bench/summarize.py picks the newest)
        self.data["scenarios"][name] = result
        self.save()

    def save(self) -> None:
        self.data["finished_at"] = now_iso()
        whole = json.loads(self.path.read_text()) if self.path.exists() else {}
        whole[self.mode] = self.data
        self.path.write_text(json.dumps(whole, indent=2, sort_keys=True, default=str) + "\n")


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    mem_kib = int(re.search(r"^MemTotal:\s+(\d+)", meminfo, re.MULTILINE).group(1))
    dovecot = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH_DIR, check=False).stdout.strip()
    if not commit and (BENCH_DIR.parent / "COMMIT").exists():  # a `git archive` snapshot (bench/README.md)
        commit = (BENCH_DIR.parent / "COMMIT").read_text().strip()
    return {"cpus_online": cpuinfo.count("processor\t:"), "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": model.group(1) if model else "?", "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": os.uname().release, "python": sys.version.split()[0], "dovecot": dovecot,
            "commit": commit}


# --- numbers --------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summary(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50": rnd(percentile(values, 50)), "p90": rnd(percentile(values, 90)),
            "p99": rnd(percentile(values, 99)), "max": rnd(max(values) if values else None)}


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --- /proc ----------------------------------------------------------------------------------------

def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and every descendant, from /proc/<pid>/task/<tid>/children."""
    found, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return found


def pss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of ``pids`` (not of their reaped children), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def cpu_of_tree_over(root_pid: int, seconds: float) -> dict[str, float]:
    """Fraction of one core used by the whole tree over ``seconds`` of wall time (nothing else runs)."""
    pids = process_tree(root_pid)
    before, started = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    after, elapsed = cpu_seconds(pids), time.monotonic() - started
    return {"cpu_seconds": round(after - before, 3), "wall_seconds": round(elapsed, 2),
            "core_fraction": round((after - before) / elapsed, 5)}


def machine_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds, wall seconds) of the whole machine since boot, from /proc/stat and uptime."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK, float(Path("/proc/uptime").read_text().split()[0])


def raise_fd_limit() -> None:
    """Soft descriptor limit up to the hard one, as the unit's LimitNOFILE= does for the daemon."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- mail -----------------------------------------------------------------------------------------

def _fill_user(args: tuple[str, int, int, int, str, int]) -> tuple[str, int, int]:
    """In a pool process: generate ``count`` messages for one user and APPEND them over one connection."""
    user, count, seed, port, password, chunk = args
    rng = random.Random(seed)
    size = done = 0
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=False, timeout=120) as imap:
        imap.login(user, password)
        while done < count:
            batch = [random_message(rng) for _ in range(min(chunk, count - done))]
            for raw in batch:
                imap.append("INBOX", raw)
            size += sum(map(len, batch))
            done += len(batch)
    return user, count, size


def fill_mailboxes(dovecot: Dovecot, counts: dict[str, int], seed: int) -> dict[str, Any]:
    """APPEND ``counts[user]`` realistic random messages to each user, one process per CPU.

    Mail goes in through IMAP APPEND (one connection per user, as Dovecot.append_many does), so the bytes on the server are exactly
    what ``random_message`` produced and Dovecot assigns UIDs 1..n.
    """
    started = time.monotonic()
    jobs = [(user, count, seed * 1_000_003 + index, dovecot.port, dovecot.password, 200)
            for index, (user, count) in enumerate(counts.items()) if count]
    total_bytes = 0
    with multiprocessing.get_context("fork").Pool(len(os.sched_getaffinity(0))) as pool:
        for _, _, size in pool.imap_unordered(_fill_user, jobs):
            total_bytes += size
    return {"messages": sum(counts.values()), "bytes": total_bytes,
            "seconds": round(time.monotonic() - started, 1)}


def _generate(args: tuple[int, int]) -> list[bytes]:
    seed, count = args
    rng = random.Random(seed)
    return [random_message(rng) for _ in range(count)]


def generate_messages(count: int, seed: int) -> list[bytes]:
    """``count`` realistic random messages, generated on every CPU."""
    workers = len(os.sched_getaffinity(0))
    shares = [count // workers + (1 if index < count % workers else 0) for index in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_generate, [(seed * 7919 + index, share) for index, share in enumerate(shares)])
    return [raw for part in parts for raw in part]


# --- the daemon -----------------------------------------------------------------------------------

def accounts_toml(users: Iterable[str], port: int, per_user: Callable[[str], dict[str, Any]] | None = None,
                  **extra: Any) -> str:
    """``[[accounts]]`` tables for ``users`` on the local Dovecot (id = username), plus ``extra`` keys
    and whatever ``per_user(user)`` adds."""
    blocks = []
    for user in users:
        keys = {**extra, **(per_user(user) if per_user else {})}
        lines = [f'id = "{user}"', 'host = "127.0.0.1"', f"port = {port}", 'tls = "none"',
                 f'username = "{user}"', f'password_env = "{PASSWORD_ENV}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
        blocks.append("[[accounts]]\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks)


class BenchDaemon:
    """``mailingestd --config`` as an operator runs it, with a config this bench writes."""

    def __init__(self, root: Path, *, store_url: str, accounts: str, workers: str = '"auto"',
                 sections: str = "", env: dict[str, str] | None = None, metrics_interval: str = "15s") -> None:
        """``metrics_interval``: the textfile's rewrite interval; the default is the daemon's own
        (CPU while quiet is measured as shipped), scenarios that read counters off the textfile
        over a window ask for 1 s."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "mailingestd.toml"
        self.metrics_path = root / "metrics" / "mailingestd.prom"
        self.log_path = root / "mailingestd.log"
        self.store_url = store_url
        self.config_path.write_text(f"""
[daemon]
workers = {workers}
runtime_dir = "{root / 'run'}"
state_dir = "{root / 'state'}"
shutdown_timeout = "30s"
heartbeat_timeout = "30s"

[store]
url = "{store_url}"

[metrics]
textfile = "{self.metrics_path}"
interval = "{metrics_interval}"

{sections}

{accounts}
""")
        self.env = dict(os.environ, **{PASSWORD_ENV: PASSWORD, "MAILINGESTD_SECRETS_ALLOWED_ENV": f'["{PASSWORD_ENV}"]'},
                        **(env or {}))  # store rows may name it (docs/security.md)
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    def start(self, timeout: float = 120) -> float:
        """Spawn the daemon; return seconds until ``status`` says running.

        It inherits this process's descriptor limit, which ``python -m bench`` raised to the hard
        limit first (as the unit's LimitNOFILE= does for the real daemon)."""
        self.log = self.log_path.open("ab")
        self.spawned_at = time.time()
        started = time.monotonic()
        self.proc = subprocess.Popen([str(BIN / "mailingestd"), "--allow-root", "--config", str(self.config_path)],
                                     env=self.env, stdout=self.log, stderr=self.log)
        while True:
            status = self.try_status()
            if status and status["supervisor"]["state"] == "running":
                return time.monotonic() - started
            if self.proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"mailingestd did not come up:\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "mailingestctl"), "--config", str(self.config_path), *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def try_status(self) -> dict[str, Any] | None:
        """The status reply (what ``mailingestctl status --json`` prints), asked over the control
        socket from this process: polling with a new ``mailingestctl`` process every half second
        would spend a third of a core of this two-core machine on Python start-ups. The CLI's own
        wall time is measured apart (``status_time``)."""
        try:
            reply = control.call(str(self.root / "run"), control.Status(), timeout=20)
        except control.DaemonUnreachable:
            return None
        return reply.data if reply.ok else None

    def metrics(self) -> str:
        try:
            return self.metrics_path.read_text()
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def error_lines(self) -> list[str]:
        """The daemon's error lines so far (its log goes with the bench's directory)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if " ERROR " in line or "level=error" in line]

    def errors_logged(self) -> int:
        return len(self.error_lines())

    def errors_report(self, keep: int = 5) -> dict[str, Any]:
        """For report.json: how many error lines the daemon logged, and the first ``keep`` of them."""
        lines = self.error_lines()
        return {"daemon_errors_logged": len(lines), "daemon_error_lines": [line[:300] for line in lines[:keep]]}

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM (drain, then exit); return the exit code and how long it took."""
        if self.proc is None or self.proc.poll() is not None:
            return {"exit_code": self.proc.returncode if self.proc else None, "seconds": 0}
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in process_tree(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            code = self.proc.wait(10)
        self.log.close()
        return {"exit_code": code, "seconds": round(time.monotonic() - started, 2)}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in process_tree(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)


def prom_value(text: str, name: str, labels: str | None = None) -> float:
    """Sum of the samples of ``name`` in a Prometheus text file (optionally one label set)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if match and match.group(1) == name and (labels is None or match.group(2) == labels):
            total += float(match.group(3))
    return total


def prom_histogram(text: str, name: str) -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` buckets of histogram ``name`` (summed over label sets)."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        match = re.match(rf'{name}_bucket\{{(?:[^}}]*,)?le="([^"]+)"[^}}]*\}}\s+(\S+)', line)
        if match:
            le = math.inf if match.group(1) == "+Inf" else float(match.group(1))
            buckets[le] = buckets.get(le, 0.0) + float(match.group(2))
    return sorted(buckets.items())


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (0..1) of cumulative ``buckets``."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    for le, count in buckets:
        if count >= rank:
            return le
    return math.inf


def histogram_delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# Dovecot counts each IMAP command it finished (doveadm stats dump), read by command_counts().
COMMAND_METRIC = """
metric imap_command {
  filter = event=imap_command_finished
  group_by = cmd_name
}
"""


def command_counts(dovecot: Dovecot) -> dict[str, int]:
    output = subprocess.run(["doveadm", "-c", str(dovecot.config_path), "stats", "dump"], capture_output=True,
                            text=True, timeout=30, check=True).stdout
    counts = {}
    for line in output.splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) > 2 and fields[0].startswith("imap_command_") and fields[1] == "duration":
            counts[fields[0][len("imap_command_"):]] = int(fields[2])
    return counts
