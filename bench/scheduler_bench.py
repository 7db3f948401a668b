"""Scheduler benchmark: the full Planner against a bare wheel loop, no network, simulated time.

Simulates ``--accounts`` accounts over ``--hours`` of simulated time with the scheduler's tick
(0.1 s): a mix of fixed high/medium/low and auto priorities on 20 servers whose limits are raised
so they do not dominate; every order gets its result at once (most succeed, some with mail, about
1 in 1000 fail, 1 in 10,000 are throttled with a retry_after). A "decision" is one account taken
off the wheel, ordered and put back by its result. The planner is driven through the calls the
scheduler process makes each loop turn: ``due_batch`` for the orders, ``on_results`` for the
results read in that turn.

The bare loop is the reference (the floor of a per-account Python loop): pop a bucket of a plain
list-of-lists wheel and re-append each account at its fixed interval, nothing else. The
informational "wheel loop" does the same through ``TimingWheel``'s API (numpy batches, so it can
beat the bare loop). Each phase runs in its own forked process so its peak RSS
(ru_maxrss) is its own; CPU time is ``time.process_time`` of the simulated loop only (setup is
reported apart).

    .venv/bin/python bench/scheduler_bench.py                     # 1,000,000 accounts, 1 hour
    .venv/bin/python bench/scheduler_bench.py --accounts 100000   # quick mode for developers
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailingestd.config import LimitsConfig, SchedulerConfig
from mailingestd.histogram import LAG_BUCKETS, Histogram
from mailingestd.sched.planner import AccountPlan, Planner
from mailingestd.sched.wheel import TimingWheel

SERVERS = [f"imap{index}.example" for index in range(20)]
PRIORITY_MIX = ["high"] * 10 + ["medium"] * 30 + ["low"] * 40 + ["auto"] * 20
SCHEDULER = SchedulerConfig()
LIMITS = LimitsConfig(max_connections_per_server=10**9, connects_per_minute=10**9, max_connections_per_account=2)
INTERVALS = {"high": SCHEDULER.high_interval, "medium": SCHEDULER.medium_interval,
             "low": SCHEDULER.low_interval, "auto": SCHEDULER.medium_interval}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_planner(accounts: int, hours: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    setup_started = time.process_time()
    planner = Planner(SCHEDULER, LIMITS, now=0.0, rng=random.Random(seed + 1))
    for index in range(accounts):
        planner.add(AccountPlan(account_id=f"acct{index}", server=SERVERS[index % len(SERVERS)],
                                priority=PRIORITY_MIX[index % len(PRIORITY_MIX)], idle=False), 0.0)
    setup_seconds = time.process_time() - setup_started
    # Outcomes drawn up front so the loop measures the planner, not the simulation's dice; the
    # simulated workers answer each batch of orders with one batch of results, as the scheduler
    # process does with the results it reads in one turn.
    outcomes = np.array([rng.random() for _ in range(65536)])
    tick = SCHEDULER.tick
    ticks = int(hours * 3600 / tick)
    decisions = failures = mail = 0
    on_results = planner.on_results
    due_batch = planner.due_batch
    positions = np.arange(1 << 20)
    started = time.process_time()
    for step in range(1, ticks + 1):
        now = step * tick
        orders = due_batch(now, 1 << 30)
        count = len(orders)
        if not count:
            continue
        draw = outcomes[(positions[:count] + decisions) & 65535]
        decisions += count
        ok = draw >= 0.0011
        with_mail = ok & (draw < 0.05)
        failures += count - int(np.count_nonzero(draw >= 0.001))
        mail += int(np.count_nonzero(with_mail))
        new_messages = np.where(with_mail, 1 + (draw * 100).astype(np.int64), 0)
        retry_after = np.where((draw >= 0.001) & ~ok, 60.0, np.nan)
        on_results(now, orders.index, ok, ok & (draw < 0.5), np.zeros(count, dtype=bool), new_messages,
                   np.zeros(count, dtype=bool), retry_after)
    cpu_seconds = time.process_time() - started
    snapshot = planner.snapshot(ticks * tick)
    lag = snapshot.lag.to_wire()
    return {"decisions": decisions, "cpu_seconds": cpu_seconds, "setup_cpu_seconds": setup_seconds,
            "peak_rss_mib": peak_rss_mib(), "failures": failures, "results_with_mail": mail,
            "lag_p50": Histogram.quantile(LAG_BUCKETS, lag, 0.5), "lag_p99": Histogram.quantile(LAG_BUCKETS, lag, 0.99),
            "tiers": snapshot.tiers,
            "states": {state: count for state, count in snapshot.states.items() if count}}


def run_bare_loop(accounts: int, hours: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tick = SCHEDULER.tick
    slots = 4096
    interval_ticks = [int(INTERVALS[PRIORITY_MIX[index % len(PRIORITY_MIX)]] / tick) for index in range(accounts)]
    buckets: list[list[int]] = [[] for _ in range(slots)]
    for account in range(accounts):
        # Intervals beyond the wheel's span would need rounds or levels; the bare loop folds them.
        buckets[rng.randrange(slots)].append(account)
    interval_slots = [ticks % slots or 1 for ticks in interval_ticks]
    ticks = int(hours * 3600 / tick)
    decisions = 0
    started = time.process_time()
    for step in range(1, ticks + 1):
        index = step % slots
        bucket = buckets[index]
        buckets[index] = []
        for account in bucket:
            buckets[(index + interval_slots[account]) % slots].append(account)
        decisions += len(bucket)
    cpu_seconds = time.process_time() - started
    return {"decisions": decisions, "cpu_seconds": cpu_seconds, "peak_rss_mib": peak_rss_mib()}


def run_wheel_loop(accounts: int, hours: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tick = SCHEDULER.tick
    wheel = TimingWheel(tick, 0.0, capacity=accounts)
    interval_of = np.array([INTERVALS[PRIORITY_MIX[index % len(PRIORITY_MIX)]] for index in range(accounts)])
    for index in range(accounts):
        wheel.schedule(index, rng.random() * interval_of[index])
    ticks = int(hours * 3600 / tick)
    decisions = 0
    schedule_many = wheel.schedule_many
    started = time.process_time()
    for step in range(1, ticks + 1):
        now = step * tick
        keys = wheel.advance(now)
        schedule_many(keys, interval_of[keys] + now)
        decisions += len(keys)
    cpu_seconds = time.process_time() - started
    return {"decisions": decisions, "cpu_seconds": cpu_seconds, "peak_rss_mib": peak_rss_mib()}


def _child(function: Callable[..., dict[str, Any]], args: tuple, queue: Any) -> None:
    queue.put(function(*args))


def in_own_process(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one phase in a forked child, so its peak RSS is not another phase's."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(function, args, queue))
    child.start()
    result = queue.get()
    child.join()
    result["decisions_per_cpu_second"] = result["decisions"] / result["cpu_seconds"] if result["cpu_seconds"] else 0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None,
                        help="results file, updated in place (default bench/results/<date>/scheduler.json)")
    args = parser.parse_args(argv)
    bare = in_own_process(run_bare_loop, args.accounts, args.hours, args.seed)
    wheel = in_own_process(run_wheel_loop, args.accounts, args.hours, args.seed)
    planner = in_own_process(run_planner, args.accounts, args.hours, args.seed)
    ratio = planner["decisions_per_cpu_second"] / bare["decisions_per_cpu_second"]
    key = f"accounts={args.accounts},hours={args.hours:g}"
    record = {"accounts": args.accounts, "hours": args.hours, "python": sys.version.split()[0],
              "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
              "planner": planner, "bare_loop": bare, "wheel_loop": wheel,
              "planner_to_bare_ratio": round(ratio, 3), "target_ratio": 0.5, "meets_target": ratio >= 0.5}
    path = Path(args.json) if args.json else (
        Path(__file__).resolve().parent / "results" / datetime.date.today().isoformat() / "scheduler.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = record
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"scheduler {key}: planner {planner['decisions_per_cpu_second']:,.0f} decisions/cpu-s "
          f"({planner['decisions']:,} in {planner['cpu_seconds']:.1f} s, peak RSS {planner['peak_rss_mib']:.0f} MiB, "
          f"lag p99 {planner['lag_p99']:.2f} s) | bare loop {bare['decisions_per_cpu_second']:,.0f}/s "
          f"(peak RSS {bare['peak_rss_mib']:.0f} MiB) | wheel loop {wheel['decisions_per_cpu_second']:,.0f}/s "
          f"| ratio {ratio:.2f} (target 0.50) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
