"""What the supervisor says about the daemon: the ``mailingestctl status`` reply, the metrics
snapshot and the one-line systemd status, all built from the children's last typed heartbeats
(``frames.SchedulerStats``/``WorkerStats``/``PublisherStats``) and the banked totals.

Nothing here changes state: every function reads a ``Daemon`` (the supervisor) and returns a
Struct. The status reply's Structs are in ``control.py`` (``StatusReply``), beside the request,
because mailingestctl reads them too.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Protocol

import msgspec

from .. import __version__, frames
from ..control import (AccountsStatus, ChildStatus, DrainStatus, OutboxStatus, ServerStatus, StatusReply,
                       SupervisorStatus, TrafficStatus)
from ..child import pss_bytes
from ..config import Config
from ..histogram import LAG_BUCKETS, Histogram
from ..sched.ratelimit import TIER_NAMES, deficit_line
from ..store.leases import cluster_status, lease_counts
from . import metrics, notify
from .metrics import CAPACITY_STATS, Totals
from .slots import ChildSlot, State, slot_of


class TrafficSample(msgspec.Struct, frozen=True):
    """Cumulative polls and messages at one moment (monotonic), for the last-minute rates."""

    at: float
    polls: float
    messages: float


class Daemon(Protocol):
    """What the views read of the supervisor."""

    pid: int
    state: State
    started_mono: float
    started_wall: float
    config: Config
    slots: list[ChildSlot]
    totals: Totals
    traffic: list[TrafficSample]
    memory: int


# --- reading the heartbeats ---------------------------------------------------------------------------
def beats(daemon: Daemon) -> list[frames.Heartbeat]:
    return [s.beat for s in daemon.slots if s.beat is not None]


def beat_of(daemon: Daemon, role: str) -> frames.Heartbeat | None:
    slot = slot_of(daemon.slots, role)
    return slot.beat if slot else None


def scheduler_stats(daemon: Daemon) -> frames.SchedulerStats:
    beat = beat_of(daemon, "scheduler")
    if beat is not None and isinstance(beat.stats, frames.SchedulerStats):
        return beat.stats
    return frames.SchedulerStats(accounts=0, in_flight=0, uidvalidity_changes=0, drain_in_flight_accounts=0,
                                 drain_in_flight_messages=0)


def worker_stats(daemon: Daemon) -> list[frames.WorkerStats]:
    return [b.stats for b in beats(daemon) if isinstance(b.stats, frames.WorkerStats)]


def publisher_stats(daemon: Daemon) -> frames.PublisherStats:
    beat = beat_of(daemon, "publisher")
    if beat is not None and isinstance(beat.stats, frames.PublisherStats):
        return beat.stats
    return frames.PublisherStats(published=0, publish_errors=0, outbox_depth=0, parked=0)


def child_pss(slot: ChildSlot) -> int:
    """A child's own report (children are not dumpable: their smaps_rollup is closed to us
    unless we are root), else a read of it."""
    reported = slot.beat.stats.pss_bytes if slot.beat is not None and slot.beat.stats is not None else 0
    return reported or pss_bytes(slot.pid)


def memory(daemon: Daemon) -> int:
    """PSS of the supervisor and every running child."""
    return pss_bytes(daemon.pid) + sum(child_pss(s) for s in daemon.slots if s.pid)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def sample_traffic(daemon: Daemon, now: float) -> list[TrafficSample]:
    """The traffic samples of the last hour with one taken now."""
    polls = sum(daemon.totals.labeled("polls", beats(daemon)).values())
    messages = daemon.totals.counter("messages_ingested", beats(daemon))
    return [t for t in (*daemon.traffic, TrafficSample(now, polls, messages)) if now - t.at <= 3600]


def status_line(daemon: Daemon) -> str:
    accounts = scheduler_stats(daemon).accounts
    idle = sum(w.idle_connections for w in worker_stats(daemon))
    messages = int(daemon.totals.counter("messages_ingested", beats(daemon)))
    return f"{daemon.state.value}; {accounts} accounts, {int(idle)} idling; {messages} messages stored"


def node_id(config: Config) -> str:
    return config.daemon.node_id or socket.gethostname()


# --- metrics -------------------------------------------------------------------------------------------
def metrics_snapshot(daemon: Daemon) -> metrics.Snapshot:
    now = time.monotonic()
    sched_beat = beat_of(daemon, "scheduler")
    sched_labeled = sched_beat.labeled if sched_beat else {}
    children: dict[str, float] = {"scheduler": 0, "worker": 0, "publisher": 0}
    restarts: dict[str, float] = {"scheduler": 0, "worker": 0, "publisher": 0}
    ages: dict[str, float] = {}
    for slot in daemon.slots:
        restarts[slot.role] = restarts.get(slot.role, 0) + slot.restarts
        if slot.pid is not None:
            children[slot.role] = children.get(slot.role, 0) + 1
            age = now - (slot.last_heartbeat if slot.last_heartbeat is not None else slot.started_at)
            ages[slot.role] = max(ages.get(slot.role, 0.0), age)
    accounts: dict[tuple[str, str], float] = {}
    for key, value in sched_labeled.get("accounts", {}).items():
        state, _, priority = key.partition("/")
        accounts[(state, priority)] = value
    connections: dict[str, float] = {}
    for beat in beats(daemon):
        if beat.role == "worker":
            for server, value in beat.labeled.get("connections", {}).items():
                connections[server] = connections.get(server, 0) + value
    pub = publisher_stats(daemon)
    config = daemon.config
    return metrics.Snapshot(
        beats=beats(daemon), totals=daemon.totals, state=daemon.state.value, start_time=daemon.started_wall,
        children=children, restarts=restarts, heartbeat_age=ages, memory_bytes=daemon.memory,
        memory_budget=config.daemon.memory_budget, accounts=accounts, connections=connections,
        connection_limit=sched_labeled.get("connection_limit", {}), waiting=sched_labeled.get("waiting", {}),
        capacity={name: sched_labeled.get(name, {}) for name in CAPACITY_STATS},
        last_ingest=daemon.totals.last_ingest_at(beats(daemon)),
        idle_connections=sum(w.idle_connections for w in worker_stats(daemon)),
        outbox_depth=pub.outbox_depth, outbox_parked=pub.parked,
        folders_stuck=sum(w.stuck_folders for w in worker_stats(daemon)),
        outbox_oldest_age=pub.outbox_oldest_age, publish_rate=pub.publish_rate, node_id=node_id(config),
        high_interval=config.scheduler.high_interval,
        leases=lease_counts(config, sched_beat.detail if sched_beat else None), notify_failures=notify.failures())


# --- status ------------------------------------------------------------------------------------------
class ServerCapacity(msgspec.Struct):
    """A contended server's capacity: connections holding and rotating, logins and polls per
    minute, late accounts per priority and the one-line deficit (None when the limits suffice)."""

    holding: int
    rotating: int
    logins_last_minute: int
    logins_allowed: int
    polls_needed: float
    polls_possible: float
    late: dict[str, int]
    deficit: str | None


def server_capacity(server: str, capacity: dict[str, dict[str, float]]) -> ServerCapacity | None:
    """One server's capacity from the scheduler's labeled stats (docs/contended-servers.md)."""
    if server not in capacity.get("polls_needed", {}):
        return None
    late = {tier: int(capacity["late_accounts"].get(f"{server}/{tier}", 0)) for tier in TIER_NAMES}
    needed, possible = capacity["polls_needed"][server], capacity["polls_possible"][server]
    return ServerCapacity(holding=int(capacity["accounts_holding"].get(server, 0)),
                          rotating=int(capacity["accounts_rotating"].get(server, 0)),
                          logins_last_minute=int(capacity["logins_last_minute"].get(server, 0)),
                          logins_allowed=int(capacity["connects_per_minute"].get(server, 0)),
                          polls_needed=needed, polls_possible=possible, late=late,
                          deficit=deficit_line(server, needed, possible, list(late.values())))


def _servers(snap: metrics.Snapshot) -> dict[str, ServerStatus]:
    servers = {}
    for server in sorted(set(snap.connections) | set(snap.connection_limit) | set(snap.waiting)):
        capacity = server_capacity(server, snap.capacity)
        servers[server] = ServerStatus(connections=snap.connections.get(server, 0),
                                       limit=snap.connection_limit.get(server),
                                       waiting=snap.waiting.get(server, 0),
                                       **(msgspec.structs.asdict(capacity) if capacity else {}))
    return servers


def _children(daemon: Daemon, now: float) -> list[ChildStatus]:
    return [ChildStatus(role=slot.role, slot=slot.slot, pid=slot.pid, cpu=slot.cpu,
                        state=slot.beat.state if slot.beat else ("starting" if slot.pid else "restarting"),
                        rss_bytes=rss_bytes(slot.pid) if slot.pid else 0, restarts=slot.restarts,
                        heartbeat_age=round(now - slot.last_heartbeat, 3) if slot.last_heartbeat is not None else None,
                        last_exit=slot.last_exit or None)
            for slot in daemon.slots if not (slot.retired and slot.pid is None)]


def status(daemon: Daemon) -> StatusReply:
    now = time.monotonic()
    snap = metrics_snapshot(daemon)
    live = snap.beats
    config, totals, sched = daemon.config, daemon.totals, scheduler_stats(daemon)
    polls_total = sum(totals.labeled("polls", live).values())
    messages_total = totals.counter("messages_ingested", live)
    minute_ago = next((t for t in daemon.traffic if now - t.at <= 65), None)
    sched_beat = beat_of(daemon, "scheduler")
    by_state: dict[str, float] = {}
    by_priority: dict[str, float] = {}
    for (state, priority), value in snap.accounts.items():
        by_state[state] = by_state.get(state, 0) + value
        by_priority[priority] = by_priority.get(priority, 0) + value
    lag = totals.histogram("scheduler_lag_seconds", live)
    errors: list[str] = []
    for beat in live:
        for line in beat.errors:
            if line not in errors:
                errors.append(line)
    pub_beat = beat_of(daemon, "publisher")
    return StatusReply(
        supervisor=SupervisorStatus(pid=daemon.pid, version=__version__, state=daemon.state.value,
                                    uptime=round(now - daemon.started_mono, 1), node_id=node_id(config),
                                    store=config.store_url.split("://")[0], memory_bytes=daemon.memory,
                                    memory_budget=int(config.daemon.memory_budget)),
        children=_children(daemon, now),
        accounts=AccountsStatus(total=sched.accounts, by_state=by_state, by_priority=by_priority),
        servers=_servers(snap),
        traffic=TrafficStatus(
            polls_total=polls_total, messages_total=messages_total,
            polls_last_minute=polls_total - minute_ago.polls if minute_ago else polls_total,
            messages_last_minute=messages_total - minute_ago.messages if minute_ago else messages_total,
            idle_connections=snap.idle_connections,
            lag_p50=Histogram.quantile(LAG_BUCKETS, lag, 0.5) if lag else None,
            lag_p99=Histogram.quantile(LAG_BUCKETS, lag, 0.99) if lag else None),
        outbox=OutboxStatus(enabled=config.queue.kind != "none", depth=snap.outbox_depth, parked=snap.outbox_parked,
                            published_total=totals.counter("published", live),
                            oldest_age=round(snap.outbox_oldest_age, 1), publish_rate=snap.publish_rate,
                            node_id=snap.node_id, publish_errors_total=totals.counter("publish_errors", live),
                            publisher_state=pub_beat.state if pub_beat else None),
        drain=DrainStatus(in_flight_accounts=sched.drain_in_flight_accounts,
                          in_flight_messages=sched.drain_in_flight_messages),
        cluster=cluster_status(config, sched_beat.detail if sched_beat else None),
        stuck_folders=sorted(line for beat in live if beat.role == "worker"
                             for line in beat.detail.get("stuck_folders", "").splitlines()),
        errors=errors[:10],
    )


# --- health ---------------------------------------------------------------------------------------------
def heartbeat_limit(config: Config) -> float:
    return min(config.daemon.heartbeat_timeout, 3 * config.daemon.heartbeat_interval + 1)


def making_progress(daemon: Daemon, now: float) -> bool:
    """What WATCHDOG=1 vouches for: the supervisor's loop runs (it is the one sending) and the
    scheduler heartbeats in time. Workers are not part of it: one that dies and waits out its
    restart backoff is the supervisor's job, and withholding keep-alives for it got the whole
    daemon SIGABRTed (every IDLE connection dropped); a worker's crash loop still ends in exit 70."""
    sched = slot_of(daemon.slots, "scheduler")
    return (sched is not None and not sched.killed and sched.last_heartbeat is not None
            and now - sched.last_heartbeat <= heartbeat_limit(daemon.config))


def healthy(daemon: Daemon) -> bool:
    """Scheduler and every worker heartbeat in time (``/health``)."""
    now = time.monotonic()
    for slot in daemon.slots:
        if slot.role == "publisher" or slot.retired:
            continue
        if slot.killed or slot.last_heartbeat is None or now - slot.last_heartbeat > heartbeat_limit(daemon.config):
            return False
    return True
