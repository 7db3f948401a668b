"""``python -m bench quick|full [--only SCENARIO,...] [--keep]``: run the benchmarks, write the report.

Scenarios in order: hold (+ latency on the same daemon), latency-folders, quiet, status, backlog, publish,
polling, contended, scheduler.
Results: bench/results/<date>/report.json (one entry per mode) and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import backlog, contended, cpu, folders, idle, plots, polling
from bench.common import BENCH_DIR, COMMAND_METRIC, SCALES, Report, Scale, raise_fd_limit
from bench.publish import run_publish
from bench.sqs_sink import SqsSink
from devtools.devservers import Dovecot, Postgres

# Mailbox files of the test servers that hold 10,000 small mailboxes go to tmpfs when it has room:
# on this machine's ext4, creating 10,000 fresh Maildirs (LOGIN's mkdirs, EXAMINE's index files) is
# the server's slowest step (ext4's inode allocator skipping recently deleted inodes, one Dovecot
# process doing it for a thousand sessions), and that is the test server's provisioning, not
# connecting. The backlog's 13 GB of mail stays on disk, as does everything the daemon, PostgreSQL
# and mbsync write.
TMPFS = Path("/dev/shm")
TMPFS_NEEDED = 4 * 2**30


def small_mailboxes_dir(fallback: Path) -> Path:
    """A fresh directory on tmpfs for the servers of small mailboxes, else ``fallback``."""
    try:
        if TMPFS.is_dir() and shutil.disk_usage(TMPFS).free >= TMPFS_NEEDED:
            return Path(tempfile.mkdtemp(prefix="mailingestd-bench-mail-", dir=TMPFS))
    except OSError:
        pass
    return fallback


SCENARIOS = ("hold", "latency-folders", "quiet", "status", "backlog", "publish", "polling", "contended", "scheduler")


def run_scheduler(scale: Scale, report: Report) -> dict[str, Any]:
    path = report.directory / f"scheduler-{scale.mode}.json"  # not scheduler_bench's own default file
    window = cpu.meter()  # the simulation is a child of this process: the "bench" group
    subprocess.run([sys.executable, str(BENCH_DIR / "scheduler_bench.py"), "--accounts", str(scale.scheduler_accounts),
                    "--json", str(path)], check=True, timeout=1800)
    result = json.loads(path.read_text())[f"accounts={scale.scheduler_accounts},hours=1"]
    result["cpu_by_process"] = {"simulation": window.stop()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(SCALES), nargs="?", default="quick")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (hold includes latency)")
    parser.add_argument("--results", type=Path, default=None,
                        help="directory for report.json and plots (default bench/results/<date>)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' files (printed at the end)")
    args = parser.parse_args(argv)
    wanted = [name for name in args.only.split(",") if name]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    scale = SCALES[args.mode]
    raise_fd_limit()
    report = Report(scale, args.results)
    root = Path(tempfile.mkdtemp(prefix=f"mailingestd-bench-{scale.mode}-"))
    mail_root = small_mailboxes_dir(root)
    report.data["imap_server_files"] = {
        "small mailboxes (hold, latency, quiet, status, polling, contended)":
            "tmpfs" if mail_root != root else "disk",
        "backlog": "disk"}
    drawn: dict[str, Any] = {}
    started = time.monotonic()
    print(f"bench {scale.mode}: {', '.join(wanted)}; servers under {root}; report {report.path}", flush=True)
    servers: list[Any] = []

    def server(instance: Any) -> Any:
        instance.start()
        servers.append(instance)
        return instance

    lazy: dict[str, Any] = {}

    def get(name: str, make: Callable[[], Any]) -> Any:
        if name not in lazy:
            lazy[name] = server(make())
        return lazy[name]

    def dovecot() -> Dovecot:
        return get("dovecot", lambda: Dovecot(mail_root / "dovecot", users=[], password=idle.PASSWORD,
                                                 extra_conf=COMMAND_METRIC))

    def dovecot_backlog() -> Dovecot:
        return get("dovecot_backlog", lambda: Dovecot(root / "dovecot-backlog", users=[], password=idle.PASSWORD,
                                                         extra_conf=COMMAND_METRIC))

    def postgres() -> Postgres:
        return get("postgres", lambda: Postgres(root / "postgres"))

    def dovecot_noidle() -> Dovecot:
        return get("dovecot_noidle", lambda: Dovecot(mail_root / "dovecot-noidle", users=[], password=idle.PASSWORD,
                                                     idle=False, extra_conf=COMMAND_METRIC))

    def sink() -> SqsSink:
        return get("sink", lambda: SqsSink(record=True))

    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "hold": lambda: idle.run_hold_and_latency(scale, root, dovecot(), postgres(), sink(), drawn),
        "latency-folders": lambda: folders.run_latency_folders(scale, root, dovecot(), postgres()),
        "quiet": lambda: idle.run_quiet(scale, root, dovecot(), postgres()),
        "status": lambda: idle.run_status(scale, root, dovecot(), postgres()),
        "backlog": lambda: backlog.run_backlog(scale, root, dovecot_backlog(), postgres(), drawn),
        "publish": lambda: run_publish(root, postgres()),
        "polling": lambda: polling.run_polling(scale, root, dovecot_noidle(), postgres(), drawn),
        "contended": lambda: contended.run_contended(scale, root, dovecot_noidle(), postgres()),
        "scheduler": lambda: run_scheduler(scale, report),
    }
    failed = []
    try:
        for name in SCENARIOS:
            if name not in wanted or (name == "quiet" and not scale.quiet_accounts):
                continue
            step_started = time.monotonic()
            try:
                result = steps[name]()
            except Exception as exc:  # noqa: BLE001 (one broken scenario must not lose the others)
                traceback.print_exc()
                failed.append(name)
                result = {"error": f"{type(exc).__name__}: {exc}"}
            if name == "hold" and "hold" in result:
                for part, value in result.items():
                    value["scenario_seconds"] = round(time.monotonic() - step_started, 1)
                    report.add(part, value)
            else:
                result["scenario_seconds"] = round(time.monotonic() - step_started, 1)
                report.add(name, result)
            if name == "hold" and "dovecot" in lazy:
                # The Dovecot that held N sessions is restarted so later scenarios start from a clean server.
                lazy["dovecot"].restart()
    finally:
        for instance in reversed(servers):
            instance.stop()
        report.data["plots"] = plots.render(drawn, report.directory, scale.mode)
        report.data["total_seconds"] = round(time.monotonic() - started, 1)
        report.save()
        if args.keep:
            print(f"servers' files kept in {root}" + (f" and {mail_root}" if mail_root != root else ""))
        else:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(mail_root, ignore_errors=True)
    print(f"bench {scale.mode}: done in {report.data['total_seconds']:.0f} s; {report.path}; plots "
          f"{', '.join(report.data['plots'])}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
