"""CPU by process over a window: the daemon's roles, the servers, the queue, the bench's own load.

A group is named with its root pids, asked for when the window opens and again when it closes (so a
daemon spawned inside the window counts, and so does every Dovecot login process forked
meanwhile); its members are the roots and their descendants, down to the root of another group.
The daemon's roles come from its status reply (the ``children`` list ``mailingestctl status --json``
prints, with their pids): no process title is needed, and a restarted child is found under its
new pid.

CPU is utime + stime + cutime + cstime from ``/proc/<pid>/stat``, read for every process on the
machine at both ends and matched by (pid, start time): a process that exited inside the window was
reaped into its parent's cutime, and its reading at the start is taken off, so short-lived processes
(Dovecot's logins, ``mailingestctl``, ``doveadm``, mbsync) are not lost. ``other`` is the machine's
busy time (``/proc/stat``) less every group: other users' processes and the kernel's threads.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import CLK_TCK, BenchDaemon, machine_busy_seconds
from bench.sqs_sink import SqsSink

Roots = dict[str, list[int]]

# Column order of the breakdown (bench/summarize.py shows it in this order); workers are summed.
DAEMON_ROLES = ("supervisor", "scheduler", "workers", "publisher")
GROUPS = (*DAEMON_ROLES, "postgresql", "dovecot", "queue", "bench")


@dataclasses.dataclass(frozen=True)
class Proc:
    start: int  # clock ticks after boot: with the pid, names one process
    ppid: int
    ticks: int  # utime + stime + cutime + cstime


def snapshot() -> dict[int, Proc]:
    """Every process on the machine, by pid."""
    found: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14) ... starttime(19)
        found[int(entry.name)] = Proc(start=int(fields[19]), ppid=int(fields[1]),
                                      ticks=int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]))
    return found


def members(procs: dict[int, Proc], roots: Roots) -> dict[str, set[int]]:
    """Each group's pids: its roots and their descendants, down to another group's root."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, proc in procs.items():
        children[proc.ppid].append(pid)
    owner = {pid: name for name, pids in roots.items() for pid in pids}
    out: dict[str, set[int]] = {}
    for name, pids in roots.items():
        found: set[int] = set()
        pending = [pid for pid in pids if pid in procs]
        while pending:
            pid = pending.pop()
            if pid not in found:
                found.add(pid)
                pending.extend(child for child in children[pid] if owner.get(child, name) == name)
        out[name] = found
    return out


class CpuMeter:
    """``meter = CpuMeter(roots, queue=...).start()`` ... ``meter.stop()``: cores used by each group.

    ``roots()`` returns {group: root pids}; it is called at both ends. Group names ``worker.<slot>``
    are summed into ``workers`` (each kept in ``workers_each``)."""

    def __init__(self, roots: Callable[[], Roots], queue: str | None = None) -> None:
        self.roots, self.queue = roots, queue
        self.before: dict[int, Proc] = {}
        self.members_before: dict[str, set[int]] = {}
        self.machine_before = self.started = 0.0

    def start(self) -> CpuMeter:
        roots = self.roots()
        self.before = snapshot()
        self.machine_before, self.started = machine_busy_seconds()[0], time.monotonic()
        self.members_before = members(self.before, roots)
        return self

    def stop(self) -> dict[str, Any]:
        roots = self.roots()
        after = snapshot()
        machine_after, elapsed = machine_busy_seconds()[0], time.monotonic() - self.started
        members_after = members(after, roots)
        seconds: dict[str, float] = {}
        for name in {*self.members_before, *members_after}:
            ticks = 0
            for pid in members_after.get(name, ()):
                old = self.before.get(pid)
                ticks += after[pid].ticks - (old.ticks if old and old.start == after[pid].start else 0)
            for pid in self.members_before.get(name, ()):
                now = after.get(pid)
                if now is None or now.start != self.before[pid].start:
                    ticks -= self.before[pid].ticks  # exited: its whole time is in its parent's cutime
            seconds[name] = ticks / CLK_TCK
        workers = sorted(name for name in seconds if name.startswith("worker."))
        if workers:
            seconds["workers"] = sum(seconds[name] for name in workers)
        machine = machine_after - self.machine_before
        cores = {name: round(seconds[name] / elapsed, 3) for name in (*GROUPS, *sorted(seconds))
                 if name in seconds and not name.startswith("worker.")}
        cores["other"] = round(max(0.0, machine - sum(seconds[name] for name in seconds
                                                      if not name.startswith("worker."))) / elapsed, 3)
        cores["machine"] = round(machine / elapsed, 3)
        return {"window_seconds": round(elapsed, 2), "machine_cpus": os.cpu_count() or 0, "queue": self.queue,
                "cores": cores, "workers_each": [round(seconds[name] / elapsed, 3) for name in workers]}


def daemon_roots(daemon: BenchDaemon) -> Roots:
    """The supervisor and its children by role, from the status reply (empty before the spawn)."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        return {}
    roots: Roots = {"supervisor": [daemon.pid]}
    for child in (daemon.try_status() or {}).get("children", []):
        if child.get("pid"):
            name = f"worker.{child['slot']}" if child["role"] == "worker" else child["role"]
            roots.setdefault(name, []).append(int(child["pid"]))
    return roots


def server_roots(*, dovecot: Any = None, postgres: Any = None, queue: Any = None) -> Roots:
    """Dovecot's master, PostgreSQL's postmaster and the queue's process (moto_server or the sink)."""
    roots: Roots = {"bench": [os.getpid()]}
    if dovecot is not None and dovecot.master_pid:
        roots["dovecot"] = [dovecot.master_pid]
    if postgres is not None:
        try:
            roots["postgresql"] = [int((Path(postgres.data_dir) / "postmaster.pid").read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            pass
    pid = getattr(getattr(queue, "proc", None), "pid", None) or getattr(queue, "pid", None)
    if pid:
        roots["queue"] = [int(pid)]
    return roots


def queue_name(queue: Any) -> str | None:
    """What the ``queue`` group is, for the report."""
    if queue is None:
        return None
    return "bench/sqs_sink.py" if isinstance(queue, SqsSink) else "moto_server"


def meter(daemon: BenchDaemon | None = None, *, dovecot: Any = None, postgres: Any = None,
          queue: Any = None) -> CpuMeter:
    """A started meter over the daemon's roles, the servers given, the queue and the bench itself."""
    return CpuMeter(lambda: {**server_roots(dovecot=dovecot, postgres=postgres, queue=queue),
                             **(daemon_roots(daemon) if daemon is not None else {})},
                    queue=queue_name(queue)).start()
