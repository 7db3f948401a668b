"""backlog: mailboxes full of mail, pulled by the daemon into PostgreSQL, by mbsync and by a bare loop.

The three pull the very same mailboxes in the same run, one after the other, each with as many
processes as the daemon has workers (``daemon.workers = "auto"``, as shipped: one per CPU): the
daemon's workers; mbsync, one process per share of the channels; the bare loop, one imapclient
process per share of the accounts. The mail sits in the page cache for all three: it was just
APPENDed, and the machine has memory to spare. Each pull reports its CPU by process
(``cpu_by_process``, bench/cpu.py).

- daemon: PostgreSQL store with the outbox (queue.kind = "sqs" into bench/sqs_sink.py, publisher
  running), PostgreSQL set to its default durability for this pull (``fsync``, ``full_page_writes``
  on; the bench's cluster runs with them off otherwise), as users run it. Rate = messages / (last row's ``ingested_at`` - the moment ``mailingestd`` was spawned,
  start-up included); read from the store, not from the daemon's counters. Then the time until
  the outbox is empty, from the last commit (target: within 10 s), and the envelopes the sink
  counted. moto_server is no sink for this: it takes 55-130 envelopes a second here.
- mbsync (isync): ``Sync Pull`` into a local Maildir with its default ``FSync yes``, as users run it.
- bare loop: LOGIN, EXAMINE, UID SEARCH ALL, ``UID FETCH (BODY.PEEK[] RFC822.SIZE)`` in batches of
  100, nothing stored: the floor any client in Python pays.
"""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import imapclient
import psycopg

from bench import cpu
from bench.common import (
    PASSWORD,
    BenchDaemon,
    Scale,
    accounts_toml,
    fill_mailboxes,
    rnd,
)
from bench.idle import HOST, limits_for
from bench.sqs_sink import SqsSink
from devtools.devservers import Dovecot, Postgres
from mailingestd.config import Config

OUTBOX_EMPTY_TARGET = 10.0  # seconds from the last commit until every envelope is on the queue


def _bare_fetch(args: tuple[int, list[str]]) -> tuple[int, int]:
    port, users = args
    messages = size = 0
    for user in users:
        with imapclient.IMAPClient(HOST, port=port, ssl=False, timeout=120) as imap:
            imap.login(user, PASSWORD)
            imap.select_folder("INBOX", readonly=True)
            uids = imap.search("ALL")
            for start in range(0, len(uids), 100):
                for data in imap.fetch(uids[start:start + 100], [b"BODY.PEEK[]", b"RFC822.SIZE"]).values():
                    messages += 1
                    size += len(data[b"BODY[]"])
    return messages, size


def shares(users: list[str], parts: int) -> list[list[str]]:
    return [users[index::parts] for index in range(parts) if users[index::parts]]


def run_bare(dovecot: Dovecot, users: list[str], processes: int) -> dict[str, Any]:
    started = time.monotonic()
    window = cpu.meter(dovecot=dovecot)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.map(_bare_fetch, [(dovecot.port, share) for share in shares(users, processes)])
    seconds = time.monotonic() - started
    by_process = window.stop()
    messages, size = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"machine_cores_busy": by_process["cores"]["machine"], "cpu_by_process": {"pull": by_process},
            "processes": processes, "messages": messages, "bytes": size, "seconds": rnd(seconds, 2),
            "messages_per_second": rnd(messages / seconds, 1), "mb_per_second": rnd(size / seconds / 1e6, 1)}


def mbsync_config(path: Path, maildir: Path, port: int, users: list[str]) -> None:
    blocks = []  # no FSync line: mbsync's default, FSync yes
    for user in users:
        blocks.append(f"""
IMAPAccount {user}
Host {HOST}
Port {port}
User {user}
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore {user}-far
Account {user}

MaildirStore {user}-near
Path {maildir}/{user}/
Inbox {maildir}/{user}/INBOX
SubFolders Verbatim

Channel {user}
Far :{user}-far:
Near :{user}-near:
Patterns INBOX
Sync Pull
Create Near
SyncState *
""")
    path.write_text("".join(blocks))


def run_mbsync(root: Path, dovecot: Dovecot, users: list[str], processes: int) -> dict[str, Any]:
    maildir = root / "maildir"
    shutil.rmtree(maildir, ignore_errors=True)
    maildir.mkdir(parents=True)
    for user in users:
        (maildir / user).mkdir()  # mbsync creates the folders (Create Near), not the store's root
    configs = []
    for index, share in enumerate(shares(users, processes)):
        config = root / f"mbsyncrc.{index}"
        mbsync_config(config, maildir, dovecot.port, share)
        configs.append(config)
    started = time.monotonic()
    window = cpu.meter(dovecot=dovecot)
    procs = [subprocess.Popen(["mbsync", "-q", "-c", str(config), "-a"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for config in configs]
    outputs = [proc.communicate(timeout=3600)[0].decode(errors="replace") for proc in procs]
    seconds = time.monotonic() - started
    by_process = window.stop()
    codes = [proc.returncode for proc in procs]
    files = [path for path in maildir.rglob("*") if path.is_file() and path.parent.name in ("cur", "new")]
    size = sum(path.stat().st_size for path in files)
    result = {"machine_cores_busy": by_process["cores"]["machine"], "cpu_by_process": {"pull": by_process},
              "processes": len(procs), "exit_codes": codes, "messages": len(files), "bytes": size,
              "seconds": rnd(seconds, 2), "messages_per_second": rnd(len(files) / seconds, 1),
              "mb_per_second": rnd(size / seconds / 1e6, 1), "fsync": True,
              "maildir_filesystem": filesystem(maildir)}
    if any(codes):
        result["output_tail"] = "\n".join(outputs)[-2000:]
    shutil.rmtree(maildir, ignore_errors=True)
    return result


DURABILITY = ("fsync", "full_page_writes", "synchronous_commit", "wal_sync_method")


def default_durability(postgres: Postgres) -> dict[str, str]:
    """PostgreSQL's own defaults for the settings the bench's cluster turns off; what is in force after."""
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        for name in ("fsync", "full_page_writes"):
            conn.execute(f"ALTER SYSTEM SET {name} = on")
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the postmaster and its backends read the file on SIGHUP
        return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in DURABILITY}


def restore_durability(postgres: Postgres) -> None:
    """Back to the cluster's own settings (devtools.devservers: fsync and full_page_writes off)."""
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        for name in ("fsync", "full_page_writes"):
            conn.execute(f"ALTER SYSTEM RESET {name}")
        conn.execute("SELECT pg_reload_conf()")


def filesystem(path: Path) -> str:
    """The file system type under ``path`` (``stat -f``), for the report: fsync's cost depends on it."""
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=False).stdout.strip()


def run_daemon(root: Path, dovecot: Dovecot, postgres: Postgres, sink: SqsSink, users: list[str],
               total: int, plots: dict[str, Any]) -> dict[str, Any]:
    store_url = postgres.create_database(f"backlog_{int(time.time())}")
    queue_url = sink.create_queue(f"backlog-{int(time.time())}")
    daemon = BenchDaemon(root / "daemon", store_url=store_url, env=sink.env,
                         accounts=accounts_toml(users, dovecot.port), sections=f"""
[scheduler]
first_poll_spread = "100ms"

[queue]
kind = "sqs"
url = "{queue_url}"
endpoint_url = "{sink.endpoint_url}"
region = "{sink.region}"
{limits_for(len(users))}
""")
    samples: list[tuple[float, int, int]] = []
    durability = default_durability(postgres)
    try:
        window = cpu.meter(daemon, dovecot=dovecot, postgres=postgres, queue=sink)
        daemon.start()
        running_at = time.time()
        deadline = running_at + max(600, total / 20)
        with psycopg.connect(store_url, autocommit=True) as conn:
            count = 0
            while count < total and time.time() < deadline:
                count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
                samples.append((round(time.time() - running_at, 2), int(count), int(size)))
                time.sleep(0.5)
            count, size, first, last = conn.execute(
                "SELECT count(*), sum(size), min(ingested_at), max(ingested_at) FROM messages").fetchone()
            by_process = {"pull": window.stop()}
            window = cpu.meter(daemon, dovecot=dovecot, postgres=postgres, queue=sink)
            raw_bytes = conn.execute("SELECT sum(length(raw)) FROM messages").fetchone()[0]
            outbox = 0
            # Waited for to the end (or 120 s past the last commit): announcing is part of the job.
            while time.time() < float(last) + 120:
                outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
                if outbox == 0:
                    break
                time.sleep(0.2)
            outbox_drained_after = time.time() - running_at if outbox == 0 else None
            empty_after_last_commit = time.time() - float(last) if outbox == 0 else None
            by_process["outbox drain"] = window.stop()
        plots["backlog_rows_over_time"] = samples
        status = daemon.try_status() or {}
        # From spawning the daemon (start-up included): status may say "running" only after ingest
        # began when the machine is busy, so that moment is no fair start.
        seconds = float(last) - daemon.spawned_at
        workers = sum(1 for child in status.get("children", []) if child["role"] == "worker")
        result = {"cpu_by_process": by_process, "workers": workers, "postgresql": durability,
                  "messages": int(count), "bytes": int(size), "raw_bytes_stored": int(raw_bytes or 0),
                  "seconds_from_running_to_last_commit": rnd(seconds, 2),
                  "seconds_from_spawn_to_last_commit": rnd(float(last) - daemon.spawned_at, 2),
                  "seconds_first_to_last_commit": rnd(float(last) - float(first), 2),
                  "messages_per_second": rnd(int(count) / seconds, 1),
                  "mb_per_second": rnd(int(size) / seconds / 1e6, 1),
                  "outbox_empty_after_seconds": rnd(outbox_drained_after, 1),
                  "outbox_empty_seconds_after_last_commit": rnd(empty_after_last_commit, 1),
                  "outbox_left_when_measured": outbox,
                  "published_total_reported": status.get("outbox", {}).get("published_total"),
                  "envelopes_received_by_sink": sink.stats(queue_url).get("entries", 0),
                  "publisher_restarts": next((c["restarts"] for c in status.get("children", [])
                                              if c["role"] == "publisher"), None),
                  **daemon.errors_report(),
                  "drain_and_exit": daemon.stop()}
    finally:
        daemon.kill()
        restore_durability(postgres)
    return result


def run_backlog(scale: Scale, root: Path, dovecot: Dovecot, postgres: Postgres, plots: dict[str, Any]) -> dict[str, Any]:
    users = [f"backlog{index}" for index in range(1, scale.backlog_accounts + 1)]
    per_user = scale.backlog_messages // len(users)
    filled = fill_mailboxes(dovecot, {user: per_user for user in users}, seed=5)
    print(f"backlog: {filled['messages']} messages ({filled['bytes'] / 1e6:.0f} MB) appended to {len(users)} "
          f"mailboxes in {filled['seconds']} s", flush=True)
    workers = Config().worker_count  # daemon.workers = "auto", as the backlog's daemon runs
    bare = run_bare(dovecot, users, workers)
    mbsync = run_mbsync(root / "mbsync", dovecot, users, workers)
    with SqsSink() as sink:
        daemon = run_daemon(root, dovecot, postgres, sink, users, filled["messages"], plots)
    result = {"accounts": len(users), "mail": filled, "queue": "bench/sqs_sink.py", "daemon": daemon, "mbsync": mbsync, "bare_loop": bare,
              "ratio_to_mbsync": rnd(daemon["messages_per_second"] / mbsync["messages_per_second"], 2)
              if mbsync["messages_per_second"] else None,
              "ratio_to_bare_loop": rnd(daemon["messages_per_second"] / bare["messages_per_second"], 2),
              "target": "daemon >= 1.5x mbsync and >= 0.8x the bare loop (messages per second); the outbox "
                        f"empty within {OUTBOX_EMPTY_TARGET:g} s of the last commit"}
    empty_after = daemon["outbox_empty_seconds_after_last_commit"]
    result["outbox_met"] = empty_after is not None and empty_after <= OUTBOX_EMPTY_TARGET
    result["meets_target"] = bool(result["ratio_to_mbsync"] and result["ratio_to_mbsync"] >= 1.5
                                  and result["ratio_to_bare_loop"] >= 0.8
                                  and daemon["messages"] == filled["messages"] and result["outbox_met"])
    print(f"backlog: daemon {daemon['messages']} msgs at {daemon['messages_per_second']}/s "
          f"({daemon['mb_per_second']} MB/s) into PostgreSQL+outbox | mbsync {mbsync['messages_per_second']}/s "
          f"({mbsync['mb_per_second']} MB/s) | bare loop {bare['messages_per_second']}/s ({bare['mb_per_second']} MB/s)"
          f" | ratios {result['ratio_to_mbsync']}x mbsync, {result['ratio_to_bare_loop']}x bare | outbox empty "
          f"{empty_after} s after the last commit ({'met' if result['outbox_met'] else 'MISSED'}, <= "
          f"{OUTBOX_EMPTY_TARGET:g} s) -> {'met' if result['meets_target'] else 'MISSED'} (1.5x / 0.8x)", flush=True)
    return result
