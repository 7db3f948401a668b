"""Scenarios on IDLE accounts: hold (time to idle, memory, quiet CPU), latency, quiet CPU, status time.

hold + latency share one daemon: N accounts idle on the local Dovecot (empty mailboxes), then a load
generator APPENDs realistic mail at a fixed rate to random accounts while (a) the store is read for
each message's ``ingested_at``, (b) bench/sqs_sink.py, the SQS endpoint the publisher sends to,
timestamps each envelope's arrival (moto_server, which takes 55-130 envelopes a second here, ran
near its limit at 50 appends a second and took up to half a core from the daemon), and (c) a bare imapclient IDLE watcher in its own process timestamps the EXISTS
Dovecot sends for a sample of the same mailboxes: the server's own notification floor.

Every time here is ``time.time()`` on this one host; it is compared across processes (the daemon's
``ingested_at``, the load generator, the watcher, the queue sink), which is sound on one machine.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import selectors
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imapclient
import psycopg

from bench import cpu
from bench.common import (
    command_counts,
    BIN,
    PASSWORD,
    PASSWORD_ENV,
    BenchDaemon,
    Scale,
    accounts_toml,
    cpu_of_tree_over,
    generate_messages,
    process_tree,
    pss_bytes,
    raise_fd_limit,
    rnd,
    summary,
)
from bench.sqs_sink import SqsSink
from devtools.devservers import Dovecot, Postgres
from mailingestd import control
from mailingestd.config import AccountConfig
from mailingestd.store.store import open_store

HOST = "127.0.0.1"


def limits_for(accounts: int) -> str:
    """Limits raised for the local server so the bucket is not what is measured."""
    return f"""
[limits.servers."{HOST}"]
max_connections_per_server = {max(100, 2 * accounts + 100)}
connects_per_minute = {max(200, 60 * accounts)}
"""


def wait_all_idle(daemon: BenchDaemon, accounts: int, timeout: float) -> tuple[float | None, list[tuple[float, int]]]:
    """Poll ``mailingestctl status --json`` until every account idles; return (seconds, samples)."""
    samples: list[tuple[float, int]] = []
    started = daemon.spawned_at
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = daemon.try_status()
        idle = int(status["traffic"]["idle_connections"]) if status else 0
        samples.append((round(time.time() - started, 2), idle))
        if idle >= accounts:
            return time.time() - started, samples
        time.sleep(0.5)
    return None, samples


def time_status(daemon: BenchDaemon, runs: int = 5) -> dict[str, Any]:
    """Wall time of ``mailingestctl status`` (the text screen a person runs), process start included."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        result = subprocess.run([str(BIN / "mailingestctl"), "--config", str(daemon.config_path), "status"],
                                env=daemon.env, capture_output=True, text=True, timeout=30, check=False)
        times.append(time.monotonic() - started)
        if result.returncode != 0:
            raise RuntimeError(f"mailingestctl status exited {result.returncode}: {result.stderr}")
    # The daemon's share: the control-socket round trip alone, without starting mailingestctl.
    replies = []
    for _ in range(runs):
        started = time.monotonic()
        control.call(str(daemon.root / "run"), control.Status(), timeout=30)
        replies.append(time.monotonic() - started)
    return {"runs": runs, "median_seconds": rnd(statistics.median(times)), "max_seconds": rnd(max(times)),
            "daemon_reply_median_seconds": rnd(statistics.median(replies)),
            "daemon_reply_max_seconds": rnd(max(replies)),
            "target_seconds": 1.0, "meets_target": max(times) < 1.0}


# --- the bare IDLE watcher (the floor) -------------------------------------------------------------

def _watch(port: int, users: list[str], ready: Any, stop: Any, results: Any) -> None:
    """Own process: log every user in, SELECT INBOX, IDLE; timestamp each new UID's EXISTS."""
    raise_fd_limit()

    def open_one(user: str) -> tuple[str, imapclient.IMAPClient, int, int]:
        client = imapclient.IMAPClient(HOST, port=port, ssl=False, timeout=30)
        client.login(user, PASSWORD)
        info = client.select_folder("INBOX", readonly=True)
        client.idle()
        return user, client, int(info[b"EXISTS"]), int(info[b"UIDNEXT"])

    selector = selectors.DefaultSelector()
    with ThreadPoolExecutor(32) as pool:
        for user, client, exists, uidnext in pool.map(open_one, users):
            # [user, client, EXISTS at SELECT, UIDNEXT at SELECT, messages seen so far]
            selector.register(client.socket(), selectors.EVENT_READ, [user, client, exists, uidnext, exists])
    ready.set()
    seen: list[tuple[str, int, float]] = []
    while not stop.is_set():
        for key, _ in selector.select(0.2):
            now = time.time()
            state = key.data
            user, client, exists_at_select, uidnext, _ = state
            for response in client.idle_check(timeout=0):
                if len(response) >= 2 and response[1] == b"EXISTS" and response[0] > state[4]:
                    # Mailboxes only grow during the run: sequence number n is UID uidnext + n - exists - 1.
                    for seq in range(state[4] + 1, response[0] + 1):
                        seen.append((user, uidnext + seq - exists_at_select - 1, now))
                    state[4] = response[0]
    results.put(seen)


# --- the queue's arrivals ---------------------------------------------------------------------------

class SinkArrivals:
    """When each envelope reached the queue, as bench/sqs_sink.py (run with ``record``) saw it:
    ``arrivals`` maps (account_id, uid) to the first arrival's Unix time, read afresh on each use."""

    def __init__(self, sink: SqsSink, queue_url: str) -> None:
        self.sink, self.queue_url = sink, queue_url
        self.duplicates = 0

    @property
    def arrivals(self) -> dict[tuple[str, int], float]:
        seen: dict[tuple[str, int], float] = {}
        duplicates = 0
        for account_id, uid, at in self.sink.stats(self.queue_url).get("arrivals", []):
            key = (str(account_id), int(uid))
            if key in seen:
                duplicates += 1
            else:
                seen[key] = float(at)
        self.duplicates = duplicates
        return seen


# --- the load generator -------------------------------------------------------------------------

def append_load(port: int, users: list[str], messages: list[bytes], rate: float, seed: int,
                threads: int = 32, folders: tuple[str, ...] = ("INBOX",)) -> list[dict[str, Any]]:
    """APPEND ``messages`` to random ``users`` (and a random one of ``folders``) at ``rate`` per second.

    Logged-in connections are kept per user and reused (a user's connection serves one APPEND at
    a time), so the generator's own logins do not compete with the daemon for the two cores.
    Returns one record per message: user, uid (APPENDUID), size, and ``acked`` = the wall time
    Dovecot answered OK (the message exists from then on; latencies are measured from it).
    """
    rng = random.Random(seed)
    plan = [(rng.choice(users), rng.choice(folders) if len(folders) > 1 else folders[0], raw) for raw in messages]
    jobs: queue.Queue[tuple[float, str, str, bytes] | None] = queue.Queue()
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    spare: dict[str, list[imapclient.IMAPClient]] = {}
    opened: list[imapclient.IMAPClient] = []

    def connection(user: str) -> imapclient.IMAPClient:
        with lock:
            if spare.get(user):
                return spare[user].pop()
        imap = imapclient.IMAPClient(HOST, port=port, ssl=False, timeout=60)
        imap.login(user, PASSWORD)
        with lock:
            opened.append(imap)
        return imap

    def worker() -> None:
        while (job := jobs.get()) is not None:
            due, user, folder, raw = job
            imap = connection(user)
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            sent = time.time()
            reply = imap.append(folder, raw)
            acked = time.time()
            uid = int(reply.split(b"APPENDUID ")[1].split(b" ")[1].rstrip(b"]"))
            with lock:
                spare.setdefault(user, []).append(imap)
                records.append({"user": user, "folder": folder, "uid": uid, "size": len(raw), "due": due,
                                "sent": sent, "acked": acked})

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    started = time.time() + 0.5
    for index, (user, folder, raw) in enumerate(plan):
        jobs.put((started + index / rate, user, folder, raw))
    for _ in pool:
        jobs.put(None)
    for thread in pool:
        thread.join()
    for imap in opened:
        try:
            imap.logout()
        except Exception:  # noqa: BLE001 (closing the generator's own sessions; nothing to report)
            pass
    return records


# --- scenarios ------------------------------------------------------------------------------------

def run_hold_and_latency(scale: Scale, root: Path, dovecot: Dovecot, postgres: Postgres, sink: SqsSink,
                         plots: dict[str, Any]) -> dict[str, dict[str, Any]]:
    accounts = scale.hold_accounts
    users = [f"hold{index}" for index in range(1, accounts + 1)]
    store_url = postgres.create_database(f"hold_{int(time.time())}")
    queue_url = sink.create_queue(f"hold-{int(time.time())}")
    messages = generate_messages(int(scale.latency_rate * scale.latency_seconds), seed=7)
    daemon = BenchDaemon(root / "hold", store_url=store_url, env=sink.env,
                         accounts=accounts_toml(users, dovecot.port), sections=f"""
[imap]
threads = {scale.hold_threads}

[queue]
kind = "sqs"
url = "{queue_url}"
endpoint_url = "{sink.endpoint_url}"
region = "{sink.region}"
{limits_for(accounts)}
""")
    logins_before = dovecot.login_count()
    servers = {"dovecot": dovecot, "postgres": postgres, "queue": sink}
    try:
        connecting = cpu.meter(daemon, **servers)
        daemon.start()
        seconds, samples = wait_all_idle(daemon, accounts, timeout=max(120, accounts / 20))
        connect_cpu = connecting.stop()
        plots["hold_idle_over_time"] = samples
        sessions = dovecot.connected_sessions()
        tree = process_tree(daemon.pid)
        pss = pss_bytes(tree)
        status = daemon.try_status() or {}
        time.sleep(5)  # let the last logins' bookkeeping settle before the quiet window
        idle_before = command_counts(dovecot).get("IDLE", 0)
        quiet, quiet_by_process = quiet_window(daemon, scale.quiet_seconds, **servers)
        # Each IDLE that ended in the window was a renewal (or a keepalive probe): the window must hold some.
        quiet["idle_renewals_in_window"] = command_counts(dovecot).get("IDLE", 0) - idle_before
        status_time = time_status(daemon)
        hold = {
            "cpu_by_process": {"connecting": connect_cpu, "quiet": quiet_by_process},
            "accounts": accounts, "imap_threads": scale.hold_threads,
            "seconds_until_all_idle": rnd(seconds, 1), "target_seconds": 45,
            "idle_connections_reported": samples[-1][1] if samples else 0,
            "dovecot_sessions": sessions, "dovecot_logins": dovecot.login_count() - logins_before,
            "processes": len(tree), "pss_mib": round(pss / 2**20, 1), "target_pss_mib": 400,
            "daemon_reported_memory_mib": round(status.get("supervisor", {}).get("memory_bytes", 0) / 2**20, 1),
            "quiet_cpu": quiet, "target_core_fraction": 0.03,
            "status_time": status_time,
        }
        hold["meets_target"] = bool(seconds is not None and seconds <= 45 and pss <= 400 * 2**20
                                    and quiet["core_fraction"] <= 0.03 and sessions >= accounts)
        print(f"hold: {accounts} accounts idle in {hold['seconds_until_all_idle']} s (Dovecot sessions {sessions}), "
              f"PSS {hold['pss_mib']} MiB over {len(tree)} processes, quiet CPU "
              f"{quiet['core_fraction'] * 100:.2f}% of a core, status {status_time['max_seconds']} s (machine busy "
              f"{connect_cpu['cores']['machine']:.1f} cores while connecting, {quiet['machine_cores_busy_meanwhile']:.1f} "
              f"while quiet) "
              f"-> {'met' if hold['meets_target'] else 'MISSED'} (45 s / 400 MiB / 3%)", flush=True)
        latency = measure_latency(scale, daemon, dovecot, postgres, sink, queue_url, users, messages, plots,
                                  rate=scale.latency_rate)
        latency.update(daemon.errors_report())
        # The same at a tenth of the rate, every message to a watched mailbox: the daemon's own
        # latency when the two cores are not saturated by the load generator and Dovecot.
        light = measure_latency(scale, daemon, dovecot, postgres, sink, queue_url, users,
                                messages[:int(scale.latency_rate * scale.latency_seconds / 10)], plots,
                                rate=scale.latency_rate / 10, name="latency_light", only_watched=True)
        hold["drain_and_exit"] = daemon.stop()
    finally:
        daemon.kill()
    return {"hold": hold, "latency": latency, "latency_light": light}


def measure_latency(scale: Scale, daemon: BenchDaemon, dovecot: Dovecot, postgres: Postgres, sink: SqsSink,
                    queue_url: str,
                    users: list[str], messages: list[bytes], plots: dict[str, Any], *, rate: float,
                    name: str = "latency", only_watched: bool = False) -> dict[str, Any]:
    """Append ``messages`` at ``rate``; with ``only_watched`` every message goes to a watched mailbox."""
    sample = random.Random(3).sample(users, min(scale.watcher_sample, len(users)))
    context = multiprocessing.get_context("fork")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    watcher = context.Process(target=_watch, args=(dovecot.port, sample, ready, stop, results), daemon=True)
    watcher.start()
    if not ready.wait(120):
        raise RuntimeError("the bare IDLE watcher did not log in within 120 s")
    receiver = SinkArrivals(sink, queue_url)
    load = cpu.meter(daemon, dovecot=dovecot, postgres=postgres, queue=sink)
    records = append_load(dovecot.port, sample if only_watched else users, messages, rate, seed=11)
    append_seconds = max(r["acked"] for r in records) - min(r["due"] for r in records)
    cpu_under_load = load.stop()
    # Everything appended must reach the store and the queue; give stragglers (10 MB messages) time.
    keys = {(r["user"], r["uid"]) for r in records}
    committed: dict[tuple[str, int], float] = {}
    deadline = time.time() + 60
    with psycopg.connect(daemon.store_url) as conn:
        while time.time() < deadline:
            rows = conn.execute("SELECT account_id, uid, ingested_at FROM messages").fetchall()
            conn.commit()
            committed = {(a, int(u)): float(t) for a, u, t in rows}
            if keys <= committed.keys() and keys <= receiver.arrivals.keys():
                break
            time.sleep(0.5)
    time.sleep(1)
    stop.set()
    floor_events = results.get(timeout=30)
    watcher.join(10)
    floor_seen = {(user, uid): t for user, uid, t in floor_events}
    store_lat = [committed[(r["user"], r["uid"])] - r["acked"] for r in records if (r["user"], r["uid"]) in committed]
    arrivals = receiver.arrivals
    sqs_lat = [arrivals[(r["user"], r["uid"])] - r["acked"] for r in records if (r["user"], r["uid"]) in arrivals]
    sampled = [r for r in records if (r["user"], r["uid"]) in floor_seen]
    floor_lat = [floor_seen[(r["user"], r["uid"])] - r["acked"] for r in sampled]
    store_on_sample = [committed[(r["user"], r["uid"])] - r["acked"] for r in sampled
                       if (r["user"], r["uid"]) in committed]
    small = [committed[(r["user"], r["uid"])] - r["acked"] for r in records
             if r["size"] < 1_000_000 and (r["user"], r["uid"]) in committed]
    plots[name] = {"store": store_lat, "sqs": sqs_lat, "floor": floor_lat}
    plots[f"{name}_timeline"] = [(r["acked"] - records[0]["due"], committed[(r["user"], r["uid"])] - r["acked"])
                                 for r in records if (r["user"], r["uid"]) in committed]
    result = {
        "rate_target_per_second": rate, "appended": len(records),
        "cpu_by_process": {"load": cpu_under_load}, "queue": cpu_under_load["queue"],
        "append_rate_achieved": rnd(len(records) / append_seconds, 1),
        "bytes_appended": sum(r["size"] for r in records),
        "large_messages": sum(1 for r in records if r["size"] >= 1_000_000),
        "stored": len(store_lat), "announced_on_sqs": len(sqs_lat), "sqs_duplicates": receiver.duplicates,
        "not_stored": sorted([r["user"], r["uid"], round(r["acked"], 3)] for r in records
                             if (r["user"], r["uid"]) not in committed),
        "append_to_store_seconds": summary(store_lat),
        "append_to_store_small_only_seconds": summary(small),
        "append_to_sqs_seconds": summary(sqs_lat),
        "watched_accounts": len(sample),
        "floor_append_to_idle_exists_seconds": summary(floor_lat),
        "append_to_store_on_watched_messages_seconds": summary(store_on_sample),
    }
    floor_p99 = result["floor_append_to_idle_exists_seconds"]["p99"]
    store_p99 = result["append_to_store_seconds"]["p99"]
    result["p99_minus_floor_p99"] = rnd(store_p99 - floor_p99) if store_p99 is not None and floor_p99 is not None else None
    result["target"] = "store p99 within 0.25 s of the floor's p99"
    result["meets_target"] = bool(result["p99_minus_floor_p99"] is not None and result["p99_minus_floor_p99"] <= 0.25
                                  and len(store_lat) == len(records))
    s, q, f = result["append_to_store_seconds"], result["append_to_sqs_seconds"], result["floor_append_to_idle_exists_seconds"]
    print(f"{name}: {len(records)} appends at {result['append_rate_achieved']}/s; append->store p50 {s['p50']} "
          f"p99 {s['p99']} max {s['max']} s; append->SQS p50 {q['p50']} p99 {q['p99']} max {q['max']} s; "
          f"bare IDLE floor p50 {f['p50']} p99 {f['p99']} s ({f['count']} msgs); stored {len(store_lat)}/{len(records)}; "
          f"machine busy {cpu_under_load['cores']['machine']:.1f} cores -> "
          f"{'met' if result['meets_target'] else 'MISSED'} (p99 within 0.25 s of floor)", flush=True)
    return result


def quiet_window(daemon: BenchDaemon, seconds: float, **servers: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """CPU while nothing happens: the daemon's whole tree (``core_fraction``, the figure with a target)
    and every process by group over the same window (nothing polls status meanwhile)."""
    window = cpu.meter(daemon, **servers)
    quiet = cpu_of_tree_over(daemon.pid, seconds)
    by_process = window.stop()
    quiet["machine_cores_busy_meanwhile"] = by_process["cores"]["machine"]
    return quiet, by_process


def run_quiet(scale: Scale, root: Path, dovecot: Dovecot, postgres: Postgres) -> dict[str, Any]:
    """1,000 idling accounts with the default imap.threads: time to idle and the daemon's quiet CPU."""
    accounts = scale.quiet_accounts
    users = [f"quiet{index}" for index in range(1, accounts + 1)]
    daemon = BenchDaemon(root / "quiet", store_url=postgres.create_database(f"quiet_{int(time.time())}"),
                         accounts=accounts_toml(users, dovecot.port), sections=limits_for(accounts))
    try:
        daemon.start()
        seconds, _ = wait_all_idle(daemon, accounts, timeout=180)
        time.sleep(5)
        quiet, by_process = quiet_window(daemon, scale.quiet_seconds, dovecot=dovecot, postgres=postgres)
        result = {"accounts": accounts, "imap_threads": 16, "seconds_until_all_idle": rnd(seconds, 1),
                  "pss_mib": round(pss_bytes(process_tree(daemon.pid)) / 2**20, 1), "quiet_cpu": quiet,
                  "cpu_by_process": {"quiet": by_process},
                  "target_core_fraction": 0.02, "meets_target": quiet["core_fraction"] < 0.02 and seconds is not None,
                  "drain_and_exit": daemon.stop()}
    finally:
        daemon.kill()
    print(f"quiet: {accounts} idle accounts (imap.threads 16) idle in {result['seconds_until_all_idle']} s; "
          f"CPU {quiet['core_fraction'] * 100:.2f}% of a core over {quiet['wall_seconds']:.0f} s (machine busy "
          f"{quiet['machine_cores_busy_meanwhile']:.1f} cores) "
          f"-> {'met' if result['meets_target'] else 'MISSED'} (< 2%)", flush=True)
    return result


def run_status(scale: Scale, root: Path, dovecot: Dovecot, postgres: Postgres) -> dict[str, Any]:
    """``mailingestctl status`` with 10,000 accounts (default limits: most wait for a connection slot).

    Twice: the accounts as ``[[accounts]]`` in the file (mailingestctl reads the whole file to find
    the control socket), and the accounts in the store (as ``mailingestctl account add`` puts them,
    here written through the store API in one go) with a file that has none.
    """
    accounts = scale.status_accounts
    users = [f"conf{index}" for index in range(1, accounts + 1)]
    by_process: dict[str, Any] = {}
    result: dict[str, Any] = {"accounts_configured": accounts, "target_seconds": 1.0, "cpu_by_process": by_process}
    for where in ("config_file", "store"):
        store_url = postgres.create_database(f"status_{where}_{int(time.time())}")
        if where == "store":
            store = open_store(store_url, 1, 2)
            store.upsert_accounts([AccountConfig(id=user, host=HOST, username=user, port=dovecot.port, tls="none",
                                                 password_env=PASSWORD_ENV) for user in users], source="store")
            store.close()
        daemon = BenchDaemon(root / f"status-{where}", store_url=store_url,
                             accounts=accounts_toml(users, dovecot.port) if where == "config_file" else "")
        try:
            startup = daemon.start()
            time.sleep(5)  # accounts loaded and connecting (at the default connect rate)
            status = daemon.try_status() or {}
            window = cpu.meter(daemon, dovecot=dovecot, postgres=postgres)
            timing = time_status(daemon)
            by_process[where] = window.stop()
            timing["machine_cores_busy_meanwhile"] = by_process[where]["cores"]["machine"]
            result[f"accounts_in_{where}"] = {
                "accounts_in_status": status.get("accounts", {}).get("total"),
                "daemon_startup_seconds": rnd(startup, 2), "status_time": timing,
                "drain_and_exit": daemon.stop()}
        finally:
            daemon.kill()
        print(f"status: {accounts} accounts in the {where.replace('_', ' ')} "
              f"({result[f'accounts_in_{where}']['accounts_in_status']} in status), mailingestctl status median "
              f"{timing['median_seconds']} s max {timing['max_seconds']} s, daemon's reply alone median "
              f"{timing['daemon_reply_median_seconds']} s (machine busy "
              f"{timing['machine_cores_busy_meanwhile']:.1f} cores) -> {'met' if timing['meets_target'] else 'MISSED'} "
              f"(< 1 s)", flush=True)
    result["meets_target"] = all(result[f"accounts_in_{w}"]["status_time"]["meets_target"]
                                 for w in ("config_file", "store"))
    return result
