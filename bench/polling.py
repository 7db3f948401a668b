"""polling: accounts on a Dovecot without IDLE, in three fixed tiers with intervals scaled down tenfold.

Dovecot counts every IMAP command it finishes (a ``metric`` on ``imap_command_finished`` grouped by
command name, read with ``doveadm stats dump``), so polls are counted by the server as well as by the
daemon's ``mailingestd_polls_total``; logins come from Dovecot's log (connections are kept open, so
a steady state has almost none). Lateness is the ``mailingestd_scheduler_lag_seconds`` histogram of
the textfile, differenced over the window: how late each poll was sent against its due time. The
histogram has buckets, so its p99 is a bucket's upper bound.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from bench import cpu
from bench.common import (
    command_counts,
    BenchDaemon,
    Scale,
    accounts_toml,
    cpu_seconds,
    histogram_delta,
    histogram_quantile,
    machine_busy_seconds,
    process_tree,
    prom_histogram,
    prom_value,
    rnd,
    wait_for,
)
from bench.idle import limits_for
from devtools.devservers import Dovecot, Postgres

INTERVALS = {"high": 6.0, "medium": 30.0, "low": 90.0}
TIER_SECTION = "[scheduler]\n" + "".join(f'{tier}_interval = "{seconds:g}s"\n' for tier, seconds in INTERVALS.items())
TIER_SHARE = {"high": 500, "medium": 7_000, "low": 2_500}  # of 10,000, the seed's proportions


def tiers(accounts: int) -> list[str]:
    plan: list[str] = []
    for tier, share in TIER_SHARE.items():
        plan += [tier] * round(accounts * share / 10_000)
    return (plan + ["low"] * accounts)[:accounts]


def snapshot(daemon: BenchDaemon, dovecot: Dovecot) -> dict[str, Any]:
    text = daemon.metrics()
    return {"at": time.monotonic(), "polls": prom_value(text, "mailingestd_polls_total"),
            "lag": prom_histogram(text, "mailingestd_scheduler_lag_seconds"),
            "commands": command_counts(dovecot), "logins": dovecot.login_count(),
            "daemon_cpu": cpu_seconds(process_tree(daemon.pid)), "machine_cpu": machine_busy_seconds()[0],
            "dovecot_cpu": cpu_seconds(process_tree(dovecot.master_pid or 0))}


def run_polling(scale: Scale, root: Path, dovecot: Dovecot, postgres: Postgres, plots: dict[str, Any]) -> dict[str, Any]:
    accounts = scale.poll_accounts
    users = [f"poll{index}" for index in range(1, accounts + 1)]
    tier_of = dict(zip(users, tiers(accounts)))
    expected_per_minute = sum(60 / INTERVALS[tier] for tier in tier_of.values())
    daemon = BenchDaemon(root / "polling", store_url=postgres.create_database(f"polling_{int(time.time())}"),
                         metrics_interval="1s",
                         accounts=accounts_toml(users, dovecot.port, per_user=lambda u: {"priority": tier_of[u]}),
                         sections=f"""
{TIER_SECTION}
{limits_for(accounts)}
""")
    logins_at_start = dovecot.login_count()
    try:
        daemon.start()
        # Warm-up: every account connected (the first polls are logins, not the steady state this
        # scenario measures), then poll_warmup more seconds.
        connected = wait_for(lambda: sum(int(server["connections"]) for server in
                                         (daemon.try_status() or {}).get("servers", {}).values()) >= accounts,
                             timeout=max(120, accounts / 20), interval=1.0)
        connected_after = time.time() - daemon.spawned_at if connected else None
        time.sleep(scale.poll_warmup)
        window = cpu.meter(daemon, dovecot=dovecot, postgres=postgres)
        before = snapshot(daemon, dovecot)
        series: list[tuple[float, float]] = []
        window_end = before["at"] + scale.poll_window
        while time.monotonic() < window_end:
            time.sleep(min(5.0, max(0.0, window_end - time.monotonic())))
            series.append((round(time.monotonic() - before["at"], 1),
                           prom_value(daemon.metrics(), "mailingestd_polls_total") - before["polls"]))
        after = snapshot(daemon, dovecot)
        by_process = window.stop()
        plots["polling_polls_over_time"] = series
        minutes = (after["at"] - before["at"]) / 60
        lag = histogram_delta(after["lag"], before["lag"])
        commands = {name: after["commands"].get(name, 0) - before["commands"].get(name, 0)
                    for name in after["commands"]}
        server_polls = commands.get("NOOP", 0) + commands.get("STATUS", 0)
        daemon_polls = after["polls"] - before["polls"]
        lag_p99 = histogram_quantile(lag, 0.99)
        result = {
            "accounts": accounts, "tiers": {t: sum(1 for v in tier_of.values() if v == t) for t in INTERVALS},
            "intervals_seconds": INTERVALS, "window_seconds": rnd(minutes * 60, 1),
            "seconds_until_all_connected": rnd(connected_after, 1),
            "expected_polls_per_minute": round(expected_per_minute),
            "daemon_polls_per_minute": round(daemon_polls / minutes),
            "server_noop_status_per_minute": round(server_polls / minutes),
            "server_commands_in_window": commands,
            "logins_in_window": after["logins"] - before["logins"],
            "logins_total": after["logins"] - logins_at_start,
            "lag_polls_counted": lag[-1][1] if lag else 0,
            "lag_p50_bucket_seconds": histogram_quantile(lag, 0.5),
            "lag_p99_bucket_seconds": lag_p99,
            "lag_target_seconds": 0.1 * INTERVALS["high"],
            "daemon_cpu_core_fraction": rnd((after["daemon_cpu"] - before["daemon_cpu"]) / (minutes * 60), 4),
            "machine_cores_busy": rnd((after["machine_cpu"] - before["machine_cpu"]) / (minutes * 60), 3),
            "dovecot_cpu_core_fraction": rnd((after["dovecot_cpu"] - before["dovecot_cpu"]) / (minutes * 60), 4),
            "cpu_by_process": {"window": by_process}, "queue": None,
            "target_polls_per_minute": round(20_000 * accounts / 10_000),
            "target_daemon_cores": round(0.8 * accounts / 10_000, 3),
            **daemon.errors_report(),
        }
        # A poll counts when both sides saw it: the daemon's counter and Dovecot's NOOP/STATUS count.
        result["polls_per_minute_achieved"] = min(result["daemon_polls_per_minute"],
                                                  result["server_noop_status_per_minute"])
        result["meets_target"] = bool(result["polls_per_minute_achieved"] >= result["target_polls_per_minute"]
                                      and lag_p99 is not None and lag_p99 < result["lag_target_seconds"]
                                      and result["daemon_cpu_core_fraction"] <= result["target_daemon_cores"])
        result["drain_and_exit"] = daemon.stop()
    finally:
        daemon.kill()
    print(f"polling: {accounts} accounts (no IDLE), {result['daemon_polls_per_minute']} polls/min by the daemon, "
          f"{result['server_noop_status_per_minute']} NOOP+STATUS/min counted by Dovecot (expected "
          f"{result['expected_polls_per_minute']}), logins in window {result['logins_in_window']}, lag p99 <= "
          f"{lag_p99} s, daemon CPU {result['daemon_cpu_core_fraction'] * 100:.1f}% of a core -> "
          f"{'met' if result['meets_target'] else 'MISSED'} (>= {result['target_polls_per_minute']}/min, "
          f"p99 < {result['lag_target_seconds']:g} s, daemon <= {result['target_daemon_cores']:g} cores)", flush=True)
    return result
