"""contended: the seed's provider, 10,000 accounts on one server behind its default limits, scaled.

docs/contended-servers.md works the arithmetic through: 10,000 accounts (500 high, 7,000 medium,
2,500 low) on one server with 100 connections and 200 connects a minute need 2,067 polls a minute
and the limits allow 274. Here the tier intervals are the polling scenario's (tenfold shorter:
6/30/90 s), so the connect rate is scaled tenfold as well (2,000 a minute for 10,000 accounts), and
both limits scale with the number of accounts (quick mode runs 1,000): the arithmetic, and so the
status line, keep the worked example's proportions.

Measured from outside: per tier, seconds from an APPEND to its row in the store (a sample of
accounts of each tier, spread over the window); the status line the daemon prints; its view of
the capacity (holding, rotating, logins and polls per minute); Dovecot's logins and the peak of
its sessions (``doveadm who``) against the cap.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import cpu
from bench.common import BenchDaemon, Scale, accounts_toml, rnd, wait_for
from bench.idle import HOST
from bench.polling import INTERVALS, TIER_SECTION, tiers
from devtools.devservers import Dovecot, Postgres

SAMPLE_PER_TIER = 20


def limits(accounts: int) -> tuple[int, int]:
    """The seed's limits (100 connections, 200 connects a minute per 10,000 accounts), the rate
    scaled tenfold with the intervals."""
    return max(10, accounts // 100), max(20, round(2_000 * accounts / 10_000))


def run_contended(scale: Scale, root: Path, dovecot: Dovecot, postgres: Postgres) -> dict[str, Any]:
    accounts = scale.poll_accounts
    cap, rate = limits(accounts)
    users = [f"busy{index}" for index in range(1, accounts + 1)]
    tier_of = dict(zip(users, tiers(accounts)))
    store_url = postgres.create_database(f"contended_{int(time.time())}")
    daemon = BenchDaemon(root / "contended", store_url=store_url, metrics_interval="1s",
                         accounts=accounts_toml(users, dovecot.port, per_user=lambda u: {"priority": tier_of[u]}),
                         sections=f"""
{TIER_SECTION}
[limits.servers."{HOST}"]
max_connections_per_server = {cap}
connects_per_minute = {rate}
""")
    rng = random.Random(23)
    sample = {tier: rng.sample([u for u, t in tier_of.items() if t == tier], SAMPLE_PER_TIER) for tier in INTERVALS}
    logins_at_start = dovecot.login_count()
    try:
        daemon.start()
        wait_for(lambda: (daemon.try_status() or {}).get("servers", {}).get(HOST, {}).get("polls_needed"), timeout=60)
        time.sleep(scale.poll_warmup + INTERVALS["high"])
        line = next((text.strip() for text in daemon.ctl("status").stdout.splitlines() if "will be late" in text),
                    None)
        appended: dict[tuple[str, int], tuple[str, float]] = {}
        peak_sessions = 0
        order = [(tier, user) for tier in INTERVALS for user in sample[tier]]
        rng.shuffle(order)
        every = scale.poll_window / len(order)
        window = cpu.meter(daemon, dovecot=dovecot, postgres=postgres)
        window_started = time.monotonic()
        for n, (tier, user) in enumerate(order):
            at = time.time()
            uid = dovecot.append(user, f"Subject: contended {n}\r\n\r\nbody\r\n".encode())
            appended[(user, uid)] = (tier, at)
            if n % 10 == 0:
                peak_sessions = max(peak_sessions, dovecot.connected_sessions())
            time.sleep(max(0.0, window_started + (n + 1) * every - time.monotonic()))
        by_process = window.stop()
        time.sleep(2 * INTERVALS["medium"])  # high and medium mail is in; late low mail may not be
        status = daemon.try_status() or {}
        with psycopg.connect(store_url) as conn:
            rows = conn.execute("SELECT account_id, uid, ingested_at FROM messages WHERE account_id = ANY(%s)",
                                ([user for user, _ in appended],)).fetchall()
        stored = {(account, uid): at for account, uid, at in rows if (account, uid) in appended}
        per_tier = {}
        for tier, interval in INTERVALS.items():
            keys = [key for key, (t, _) in appended.items() if t == tier]
            delays = sorted(stored[key] - appended[key][1] for key in keys if key in stored)
            per_tier[tier] = {
                "interval_seconds": interval, "appended": len(keys), "stored_in_window": len(delays),
                "p50_seconds": rnd(statistics.median(delays), 2) if delays else None,
                "p95_seconds": rnd(delays[max(0, round(0.95 * len(delays)) - 1)], 2) if delays else None,
                "bound_seconds": 1.5 * interval + 2,
            }
        server = status.get("servers", {}).get(HOST, {})
        result = {
            "accounts": accounts, "tiers": {t: sum(1 for v in tier_of.values() if v == t) for t in INTERVALS},
            "intervals_seconds": INTERVALS, "max_connections_per_server": cap, "connects_per_minute": rate,
            "status_line": line, "capacity": {key: server.get(key) for key in (
                "holding", "rotating", "logins_last_minute", "logins_allowed", "polls_needed", "polls_possible",
                "late")},
            "append_to_store": per_tier, "peak_sessions": peak_sessions,
            "cpu_by_process": {"window": by_process}, "queue": None,
            "logins_total": dovecot.login_count() - logins_at_start,
            **daemon.errors_report(),
        }
        late_tiers = [tier for tier, count in (server.get("late") or {}).items() if count]
        # Met: the tiers the limits can carry keep their deadline, the cap holds, and the late ones
        # are the lowest tiers (no tier on time below a late one).
        on_time = [tier for tier in INTERVALS if tier not in late_tiers]
        result["meets_target"] = bool(
            peak_sessions <= cap + 1
            and all(per_tier[t]["p95_seconds"] is not None and per_tier[t]["stored_in_window"] == SAMPLE_PER_TIER
                    and per_tier[t]["p95_seconds"] <= per_tier[t]["bound_seconds"] for t in on_time)
            and list(INTERVALS)[:len(on_time)] == on_time)
        result["drain_and_exit"] = daemon.stop()
    finally:
        daemon.kill()
    print(f"contended: {accounts} accounts on one server, cap {cap}, {rate} connects/min; {result['status_line']}; "
          + "; ".join(f"{tier} p95 {v['p95_seconds']} s ({v['stored_in_window']}/{v['appended']} stored)"
                      for tier, v in per_tier.items())
          + f"; peak sessions {peak_sessions} -> {'met' if result['meets_target'] else 'MISSED'}", flush=True)
    return result
