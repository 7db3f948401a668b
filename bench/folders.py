"""Scenario ``latency-folders``: new mail in INBOX and in other folders of idling accounts.

Each account lists three folders (INBOX, Work, Archive) on the local Dovecot, which offers NOTIFY:
one connection per account watches all three. A load generator APPENDs mail at a fixed rate to
random folders of random accounts; the latency is APPEND acknowledged -> row committed in the
store (``ingested_at``), reported per folder kind. The target: other folders' p99 within 0.5 s
of INBOX's p99, i.e. a reply filed into a folder by a server-side rule is seen as fast as one in
INBOX. No queue is configured: only the path to the store is measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from bench import cpu
from bench.common import (
    BenchDaemon,
    Scale,
    accounts_toml,
    generate_messages,
    rnd,
    summary,
)
from bench.idle import append_load, limits_for, wait_all_idle
from devtools.devservers import Dovecot, Postgres

FOLDERS = ("INBOX", "Work", "Archive")


def run_latency_folders(scale: Scale, root: Path, dovecot: Dovecot, postgres: Postgres) -> dict[str, Any]:
    accounts = scale.folders_accounts
    users = [f"folders{index}" for index in range(1, accounts + 1)]
    for user in users:  # every folder exists (with one old message) before the daemon starts
        for folder in FOLDERS[1:]:
            dovecot.append(user, b"Subject: old\r\n\r\nold\r\n", folder=folder)
    store_url = postgres.create_database(f"folders_{int(time.time())}")
    daemon = BenchDaemon(root / "folders", store_url=store_url,
                         accounts=accounts_toml(users, dovecot.port, folders=list(FOLDERS)),
                         sections=f"[queue]\nkind = \"none\"\n{limits_for(accounts)}")
    messages = generate_messages(int(scale.folders_rate * scale.folders_seconds), seed=17)
    try:
        daemon.start()
        seconds, _ = wait_all_idle(daemon, accounts, timeout=max(120, accounts / 10))
        if seconds is None:
            raise RuntimeError(f"{accounts} accounts with three folders did not all idle")
        time.sleep(2)  # the old messages' first syncs are done before the load starts
        load = cpu.meter(daemon, dovecot=dovecot, postgres=postgres)
        records = append_load(dovecot.port, users, messages, scale.folders_rate, seed=19, folders=FOLDERS)
        by_process = load.stop()
        committed = wait_committed(store_url, {(r["user"], r["folder"], r["uid"]) for r in records}, timeout=60)
        daemon.stop()
    finally:
        daemon.kill()
    latency = {folder: [committed[(r["user"], folder, r["uid"])] - r["acked"] for r in records
                        if r["folder"] == folder and (r["user"], folder, r["uid"]) in committed]
               for folder in FOLDERS}
    inbox = summary(latency["INBOX"])
    others = summary(latency["Work"] + latency["Archive"])
    result: dict[str, Any] = {
        "accounts": accounts, "folders_per_account": len(FOLDERS), "rate_target_per_second": scale.folders_rate,
        "appended": len(records), "stored": sum(len(values) for values in latency.values()),
        "seconds_until_all_idle": rnd(seconds, 1), "cpu_by_process": {"load": by_process}, "queue": None,
        "append_to_store_inbox_seconds": inbox, "append_to_store_other_folders_seconds": others,
        "append_to_store_by_folder_seconds": {folder: summary(values) for folder, values in latency.items()},
        "push": "NOTIFY (Dovecot 2.3): one connection per account watches every folder",
        "target": "other folders' store p99 within 0.5 s of INBOX's",
    }
    gap = None if others["p99"] is None or inbox["p99"] is None else others["p99"] - inbox["p99"]
    result["other_minus_inbox_p99"] = rnd(gap)
    result["meets_target"] = bool(gap is not None and gap <= 0.5 and result["stored"] == len(records))
    print(f"latency-folders: {len(records)} appends to {accounts} accounts x {len(FOLDERS)} folders at "
          f"{scale.folders_rate}/s; append->store INBOX p50 {inbox['p50']} p99 {inbox['p99']} s, other folders "
          f"p50 {others['p50']} p99 {others['p99']} s; stored {result['stored']}/{len(records)} -> "
          f"{'met' if result['meets_target'] else 'MISSED'} (other folders' p99 within 0.5 s of INBOX's)", flush=True)
    return result


def wait_committed(store_url: str, keys: set[tuple[str, str, int]], timeout: float) -> dict[tuple[str, str, int], float]:
    """``ingested_at`` of each (account, folder, uid), waiting until all are committed or ``timeout``."""
    committed: dict[tuple[str, str, int], float] = {}
    deadline = time.time() + timeout
    with psycopg.connect(store_url) as conn:
        while time.time() < deadline:
            rows = conn.execute("SELECT account_id, folder, uid, ingested_at FROM messages").fetchall()
            conn.commit()
            committed = {(a, f, int(u)): float(t) for a, f, u, t in rows}
            if keys <= committed.keys():
                break
            time.sleep(0.5)
    return committed

