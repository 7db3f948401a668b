"""Metrics: the supervisor adds up every child's heartbeat numbers into one set of series.

Children send cumulative counters since they started. When a child is replaced, its last
numbers are banked so that ``_total`` counters never go backwards across restarts. The result
is written atomically (temp file + rename) as one ``.prom`` file for node_exporter's textfile
collector and, when ``metrics.http_listen`` is set, served on ``/metrics`` beside ``/health``.
Labels are only ever of bounded sets: state, priority, result, server, role.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import msgspec

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from .. import __version__, frames
from ..config import parse_listen
from ..histogram import LAG_BUCKETS, LATENCY_BUCKETS, Histogram

log = logging.getLogger(__name__)

HISTOGRAMS = {
    "fetch_duration_seconds": (LATENCY_BUCKETS, "Time spent fetching message batches from IMAP servers."),
    "new_mail_latency_seconds": (LATENCY_BUCKETS, "From an IDLE notification to the store commit of that mail."),
    "scheduler_lag_seconds": (LAG_BUCKETS, "How late polls were sent against their due time."),
}
# Cumulative per-child numbers (banked across child restarts): stat name -> (metric, help).
COUNTERS = {
    "messages_ingested": ("messages_ingested", "Messages stored (new rows)."),
    "bytes_ingested": ("bytes_ingested", "Raw bytes of messages stored."),
    "published": ("published", "Envelopes acknowledged by the queue."),
    "publish_errors": ("publish_errors", "Envelopes the queue refused or could not take (retried)."),
    "uidvalidity_changes": ("uidvalidity_changes", "UIDVALIDITY changes seen (folder started over)."),
    "uids_vanished": ("uids_vanished", "UIDs settled as expunged: missing from the size reply or BODY[] NIL."),
    "oversize_skipped": ("oversize_skipped", "Messages over imap.max_message_size stored without their body."),
}
# Per-server capacity of contended servers, from the scheduler's heartbeat (docs/contended-servers.md).
CAPACITY_STATS = ("polls_needed", "polls_possible", "logins_last_minute", "connects_per_minute",
                  "accounts_holding", "accounts_rotating", "late_accounts")
LABELED_COUNTERS = {
    "polls": ("polls", "result", "Account checks, by result."),
    "connects": ("connects", "server", "New IMAP connections established, by server."),
}


def stat(beat: frames.Heartbeat, name: str) -> float:
    """A counter of the beat's role (``COUNTERS`` names fields of frames.*Stats); 0 for other roles."""
    return float(getattr(beat.stats, name, 0))


def _capacity_families(capacity: dict[str, dict[str, float]]) -> Iterable[GaugeMetricFamily]:
    """Gauges of what each server's limits allow against what the tiers need, per second."""
    for name, metric, help_text in (
            ("polls_needed", "server_polls_needed_per_second", "Polls the accounts' tiers need, by server."),
            ("polls_possible", "server_polls_possible_per_second",
             "Polls the server's connection cap and connect rate allow, by server."),
            ("logins_last_minute", "server_logins_per_second", "New connections over the last minute, by server."),
            ("connects_per_minute", "server_logins_allowed_per_second",
             "limits.connects_per_minute in force, by server."),
            ("accounts_holding", "server_accounts_holding", "Accounts that keep their connection, by server."),
            ("accounts_rotating", "server_accounts_rotating",
             "Accounts that log in for each poll (more accounts than the cap), by server.")):
        family = GaugeMetricFamily(f"mailingestd_{metric}", help_text, labels=["server"])
        per_second = 60.0 if name in ("polls_needed", "polls_possible", "logins_last_minute",
                                      "connects_per_minute") else 1.0
        for server, value in sorted(capacity.get(name, {}).items()):
            family.add_metric([server], value / per_second)
        yield family
    late = GaugeMetricFamily("mailingestd_accounts_late", "Accounts a server's limits cannot poll at their "
                             "tier's interval (lowest tiers first), by server and priority.",
                             labels=["server", "priority"])
    for key, value in sorted(capacity.get("late_accounts", {}).items()):
        server, _, tier = key.rpartition("/")
        late.add_metric([server, tier], value)
    yield late


class Totals:
    """Adds live heartbeats to the banked numbers of children that are gone."""

    def __init__(self) -> None:
        self.banked: dict[str, float] = {}
        self.banked_labeled: dict[str, dict[str, float]] = {}
        self.banked_hist: dict[str, list[float]] = {}
        self.banked_dropped: dict[str, float] = {}
        self.banked_last_ingest = 0.0

    def bank(self, beat: frames.Heartbeat) -> None:
        if isinstance(beat.stats, frames.WorkerStats):
            self.banked_last_ingest = max(self.banked_last_ingest, beat.stats.last_ingest)
        for name in COUNTERS:
            self.banked[name] = self.banked.get(name, 0) + stat(beat, name)
        self.banked_dropped[beat.role] = self.banked_dropped.get(beat.role, 0) + stat(beat, "frames_dropped")
        for name in LABELED_COUNTERS:
            into = self.banked_labeled.setdefault(name, {})
            for label, value in beat.labeled.get(name, {}).items():
                into[label] = into.get(label, 0) + value
        for name, wire in beat.histograms.items():
            self.banked_hist[name] = Histogram.add_wire(self.banked_hist.get(name, []), wire)

    def counter(self, name: str, beats: Iterable[frames.Heartbeat]) -> float:
        return self.banked.get(name, 0) + sum(stat(b, name) for b in beats)

    def last_ingest_at(self, beats: Iterable[frames.Heartbeat]) -> float:
        """Unix time a message was last stored by any worker, gone ones included (never goes back)."""
        return max([self.banked_last_ingest] + [b.stats.last_ingest for b in beats
                                                if isinstance(b.stats, frames.WorkerStats)])

    def labeled(self, name: str, beats: Iterable[frames.Heartbeat]) -> dict[str, float]:
        out = dict(self.banked_labeled.get(name, {}))
        for beat in beats:
            for label, value in beat.labeled.get(name, {}).items():
                out[label] = out.get(label, 0) + value
        return out

    def histogram(self, name: str, beats: Iterable[frames.Heartbeat]) -> list[float]:
        out = list(self.banked_hist.get(name, []))
        for beat in beats:
            if name in beat.histograms:
                out = Histogram.add_wire(out, beat.histograms[name])
        return out

    def frames_dropped(self, beats: Iterable[frames.Heartbeat]) -> dict[str, float]:
        out = dict(self.banked_dropped)
        for beat in beats:
            out[beat.role] = out.get(beat.role, 0) + stat(beat, "frames_dropped")
        return out


class Snapshot(msgspec.Struct, kw_only=True):
    """The supervisor's live view the collector reads (built by daemon/view.py)."""

    beats: list[frames.Heartbeat] = []
    totals: Totals = msgspec.field(default_factory=Totals)
    state: str = "starting"
    start_time: float = 0.0
    children: dict[str, float] = {}  # running, by role
    restarts: dict[str, float] = {}  # by role
    heartbeat_age: dict[str, float] = {}  # the oldest, by role
    memory_bytes: int = 0
    memory_budget: int = 0
    accounts: dict[tuple[str, str], float] = {}  # by (state, priority)
    connections: dict[str, float] = {}  # by server
    connection_limit: dict[str, float] = {}
    waiting: dict[str, float] = {}
    capacity: dict[str, dict[str, float]] = {}  # CAPACITY_STATS name -> by server (late_accounts: server/tier)
    last_ingest: float = 0.0
    idle_connections: int = 0
    outbox_depth: int = 0
    outbox_parked: int = 0
    folders_stuck: int = 0
    outbox_oldest_age: float = 0.0
    publish_rate: float = 0.0
    node_id: str = ""
    high_interval: float = 0.0
    leases: dict[str, float] = {}  # by node
    notify_failures: int = 0


def _histogram_family(name: str, bounds: tuple[float, ...], help_text: str, wire: list[float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(f"mailingestd_{name}", help_text)
    counts = wire[: len(bounds) + 1] if wire else [0] * (len(bounds) + 1)
    total = wire[-2] if wire else 0.0
    running = 0.0
    buckets = []
    for bound, count in zip((*bounds, float("inf")), counts):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    family.add_metric([], buckets, total)
    return family


class DaemonCollector:
    """A prometheus_client collector over the supervisor's live view (``snapshot()``)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        snap = self.snapshot()
        beats, totals = snap.beats, snap.totals

        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"mailingestd_{name}", help_text, value=value)

        def labeled_gauge(name: str, help_text: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"mailingestd_{name}", help_text, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            return family

        info = GaugeMetricFamily("mailingestd_build_info", "Version of the running daemon.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield labeled_gauge("supervisor_state", "1 for the supervisor's current state.", "state",
                            {s: float(s == snap.state) for s in ("starting", "running", "draining", "drained",
                                                                    "stopping")})
        yield gauge("start_time_seconds", "Unix time the supervisor started.", snap.start_time)
        yield labeled_gauge("children", "Running child processes, by role.", "role", snap.children)
        restarts = CounterMetricFamily("mailingestd_process_restarts", "Child restarts, by role.", labels=["role"])
        for role, value in sorted(snap.restarts.items()):
            restarts.add_metric([role], value)
        yield restarts
        yield labeled_gauge("heartbeat_age_seconds", "Oldest heartbeat among the children of a role.", "role",
                            snap.heartbeat_age)
        yield gauge("memory_bytes", "Proportional set size summed over every daemon process.", snap.memory_bytes)
        yield gauge("memory_budget_bytes", "Configured memory budget (daemon.memory_budget).", snap.memory_budget)
        accounts = GaugeMetricFamily("mailingestd_accounts", "Accounts by scheduling state and priority.",
                                     labels=["state", "priority"])
        for (state, priority), value in sorted(snap.accounts.items()):
            accounts.add_metric([state, priority], value)
        yield accounts
        yield labeled_gauge("connections", "Open IMAP connections, by server.", "server", snap.connections)
        yield labeled_gauge("connection_limit", "Connection cap in force, by server.", "server", snap.connection_limit)
        yield labeled_gauge("accounts_waiting", "Accounts due but held back by a server limit.", "server",
                            snap.waiting)
        yield from _capacity_families(snap.capacity)
        for stat, (name, label, help_text) in LABELED_COUNTERS.items():
            family = CounterMetricFamily(f"mailingestd_{name}", help_text, labels=[label])
            for key, value in sorted(totals.labeled(stat, beats).items()):
                family.add_metric([key], value)
            yield family
        for stat, (name, help_text) in COUNTERS.items():
            yield CounterMetricFamily(f"mailingestd_{name}", help_text, value=totals.counter(stat, beats))
        dropped = CounterMetricFamily("mailingestd_frames_dropped", "Malformed IPC frames dropped, by role.",
                                      labels=["role"])
        for role, value in sorted(totals.frames_dropped(beats).items()):
            dropped.add_metric([role], value)
        yield dropped
        yield CounterMetricFamily("mailingestd_notify_failures", "sd_notify datagrams systemd had no room for "
                                  "(keep-alives dropped, state notifications retried).", value=snap.notify_failures)
        yield gauge("last_ingest_timestamp_seconds", "Unix time a message was last stored.", snap.last_ingest)
        yield gauge("idle_connections", "Connections in IDLE (a renewal in progress included).",
                    snap.idle_connections)
        yield gauge("outbox_depth", "Messages stored but not yet announced on the queue.", snap.outbox_depth)
        yield gauge("folders_stuck", "Folders halted below a message over imap.max_message_size.",
                    snap.folders_stuck)
        yield gauge("outbox_parked", "Outbox entries the queue refused again and again (retried every "
                    "queue.retry_max).", snap.outbox_parked)
        yield labeled_gauge("leases", "Unexpired account leases held, by cluster node (PostgreSQL store).", "node",
                            snap.leases)
        yield gauge("scheduler_high_interval_seconds", "Configured high-priority poll interval.",
                    snap.high_interval)
        yield gauge("outbox_oldest_age_seconds", "How long the oldest outbox row has waited (0: empty).",
                    snap.outbox_oldest_age)
        yield labeled_gauge("publish_rate_per_second", "Envelopes this node's publisher had acknowledged per "
                            "second over the last minute, by node.", "node",
                            {snap.node_id: snap.publish_rate} if snap.node_id else {})
        for name, (bounds, help_text) in HISTOGRAMS.items():
            yield _histogram_family(name, bounds, help_text, totals.histogram(name, beats))


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def write_textfile(path: str, registry: CollectorRegistry) -> None:
    """Write the .prom file atomically: node_exporter must never read half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mailingestd.", suffix=".prom.tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(render(registry))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _IPv6HTTPServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve_http(listen: str, registry: CollectorRegistry, healthy: Callable[[], bool]) -> http.server.ThreadingHTTPServer:
    """Serve /metrics and /health on ``IP:PORT`` or ``[IPV6]:PORT`` in a daemon thread."""
    host, port = parse_listen(listen)  # validated when the configuration was loaded

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/metrics":
                body, status, ctype = render(registry), 200, "text/plain; version=0.0.4"
            elif self.path == "/health":
                ok = healthy()
                body, status, ctype = (b"ok\n" if ok else b"unhealthy\n"), (200 if ok else 503), "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            return

    server = (_IPv6HTTPServer if ":" in host else http.server.ThreadingHTTPServer)((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
