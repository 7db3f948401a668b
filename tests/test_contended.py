"""A contended server: more accounts than its connection cap (docs/contended-servers.md).

The planner's part with a fake clock (who holds, who rotates, who gets a freed slot, who is late
when the limits cannot carry the tiers), then the whole daemon against a polling-only Dovecot.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Self

import pytest
from harness import Daemon, account_toml, wait_until
from test_scheduler_integration import log_events, max_in_window

from mailingestd.config import LimitsConfig, SchedulerConfig
from devtools.devservers import Dovecot
from mailingestd.sched.planner import AccountPlan, Planner
from mailingestd.sched.ratelimit import ServerShare, deficit_line, share_server

TIERED = SchedulerConfig(high_interval=10, medium_interval=20, low_interval=40, tick=0.1, jitter=0.1,
                         first_poll_spread=2)


def contended_planner(cap: int, rate: int, tiers: dict[str, int]) -> Planner:
    limits = LimitsConfig(max_connections_per_server=cap, connects_per_minute=rate, max_connections_per_account=2)
    planner = Planner(TIERED, limits, now=0.0, rng=random.Random(7))
    for tier, count in tiers.items():
        for n in range(count):
            planner.add(AccountPlan(account_id=f"{tier}{n}", server="imap.example", priority=tier), 0.0)
    return planner


def simulate(planner: Planner, until: float, session: float = 0.3, cap: int | None = None,
             step: float = 0.1) -> dict[str, list[tuple[float, float, bool]]]:
    """Run orders and results on a fake clock: every poll takes ``session`` seconds; an order with
    ``release`` logs out, the others keep their connection. Returns, per account, (due_at, ordered
    at, release) of every order; asserts the planner never has more than ``cap`` connections open."""
    orders: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    finishing: list[tuple[float, str, bool]] = []
    connected: set[str] = set()
    now = 0.0
    while now <= until:
        while finishing and finishing[0][0] <= now:
            _, account_id, release = heapq.heappop(finishing)
            if release:
                connected.discard(account_id)
            planner.on_result(account_id, now, ok=True, connected=not release, idling=False)
        for order in planner.due(now, 10_000):
            orders[order.account_id].append((order.due_at, now, order.release))
            if order.need_connect:
                connected.add(order.account_id)
            heapq.heappush(finishing, (now + session, order.account_id, order.release))
        if cap is not None:
            assert len(connected) <= cap
        now = round(now + step, 6)
    return orders


def worst_gap(times: list[tuple[float, float, bool]], after: float) -> float:
    """The longest time between two polls of one account after ``after`` (its first poll's start)."""
    started = [ordered for _, ordered, _ in times if ordered >= after]
    return max((b - a for a, b in itertools.pairwise(started)), default=float("inf"))


def test_the_often_polled_accounts_hold_connections_and_the_rarely_polled_rotate() -> None:
    # 20 high (10 s), 60 medium (20 s), 40 low (40 s) behind a cap of 90: the high and medium
    # accounts keep their connections, low ones log in for each poll; every tier on time.
    planner = contended_planner(90, 600, {"high": 20, "medium": 60, "low": 40})
    orders = simulate(planner, 200.0, cap=90)
    late = [a for a in orders if worst_gap(orders[a], 40.0) > {"h": 10, "m": 20, "l": 40}[a[0]] * 1.15 + 0.5]
    assert not late, late[:10]
    share = planner.share_of("imap.example")
    rotating = set()
    for account_id, times in orders.items():
        released = [release for _, ordered, release in times if ordered >= 40.0]
        assert all(released) or not any(released), account_id  # the choice is stable
        if all(released):
            rotating.add(account_id)
    # The low tier rotates, the first low accounts fill the connections left after the reserve.
    assert len(rotating) == share.rotating and all(account_id.startswith("low") for account_id in rotating)
    assert share.holders == 90 - share.reserve and share.rotating == 120 - share.holders
    assert share.polls_needed == pytest.approx(20 * 6 + 60 * 3 + 40 * 1.5)
    assert share.polls_possible == pytest.approx(share.polls_needed) and not any(share.late)


def test_a_freed_slot_goes_to_the_nearest_deadline_not_the_first_in_line() -> None:
    # Cap 1, taken by low0; low1 starts waiting before high0, but when the slot frees, high0's
    # deadline (due + 10 s) is nearer than low1's (due + 40 s).
    planner = contended_planner(1, 600, {})
    for account_id, tier in (("low0", "low"), ("low1", "low"), ("high0", "high")):
        planner.add(AccountPlan(account_id=account_id, server="imap.example", priority=tier), 0.0, spread=False)
    assert [order.account_id for order in planner.due(0.0, 10)] == ["low0"]
    assert planner.due(1.0, 10) == []
    planner.on_result("low0", 2.0, ok=True, connected=False, idling=False)
    assert [order.account_id for order in planner.due(2.0, 10)] == ["high0"]


def test_overloaded_limits_make_the_lowest_tier_late_and_say_so() -> None:
    # 10 high, 40 medium, 100 low behind a cap of 30 and 120 logins a minute: 330 polls/min
    # wanted; 28 hold connections, and the 122 rotating would need 216 logins a minute of the 108
    # they may use. High and medium keep their intervals, the low tier is late (about 3.6 times
    # its interval) but polled: nothing starves.
    planner = contended_planner(30, 120, {"high": 10, "medium": 40, "low": 100})
    orders = simulate(planner, 700.0, cap=30)
    share = planner.share_of("imap.example")
    assert share.polls_needed == pytest.approx(10 * 6 + 40 * 3 + 100 * 1.5)
    assert share.polls_possible == pytest.approx(10 * 6 + 18 * 3 + 108)  # 10 high, 18 medium hold
    assert share.late == [0, 0, 100]
    gaps = {tier: sorted(worst_gap(orders[f"{tier}{n}"], 200.0) for n in range(count))
            for tier, count in (("high", 10), ("medium", 40), ("low", 100))}
    assert gaps["high"][-1] <= 10 * 1.5 + 2 and gaps["medium"][-1] <= 20 * 1.5 + 2, gaps
    assert 40 * 1.5 < gaps["low"][len(gaps["low"]) // 2] and gaps["low"][-1] < 40 * 3.6 * 1.5, gaps["low"]
    line = deficit_line("imap.example", share.polls_needed, share.polls_possible, share.late)
    assert line.startswith(f"imap.example: needs {share.polls_needed:,.0f} polls/min, limits allow ")
    assert line.endswith(f"{share.late[2]:,} low accounts will be late")


def test_the_worked_example_of_the_docs() -> None:
    # docs/contended-servers.md: 10,000 accounts (500 high at 1 m, 7,000 medium at 5 m, 2,500 low
    # at 15 m) on one server, 100 connections, 200 connects a minute, 1 s a rotating session.
    intervals = [60.0] * 500 + [300.0] * 7000 + [900.0] * 2500
    tiers = [0] * 500 + [1] * 7000 + [2] * 2500
    share = share_server(intervals, tiers, cap=100, connects_per_minute=200, session_seconds=1.0)
    assert isinstance(share, ServerShare)
    assert round(share.polls_needed) == 500 + 1400 + 167
    assert share.reserve == 6 and share.holders == 94 and share.rotating == 9906
    assert round(share.polls_possible) == 94 + 180
    assert share.late == [406, 7000, 2500]
    assert deficit_line("imap.example", share.polls_needed, share.polls_possible, share.late) == (
        "imap.example: needs 2,067 polls/min, limits allow 274: "
        "406 high, 7,000 medium and 2,500 low accounts will be late")


# ---------------------------------------------------------------------------------------------
# The daemon against a polling-only Dovecot: 300 accounts behind a cap of 250 (issue #23).

INTERVALS = {"high": 10, "medium": 20, "low": 40}
TIER_SIZES = {"high": 20, "medium": 200, "low": 80}
CAP, RATE, AUTH_LIMIT = 250, 900, 3


class SessionSampler:
    """Samples the server's logged-in sessions of some users (``doveadm who``) in a thread."""

    def __init__(self, server: Dovecot, users: str) -> None:
        self.server, self.users, self.samples = server, users, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            self.samples.append(self.server.connected_sessions(self.users))

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)


def contended_accounts(server: Dovecot, tag: str, tmp_path: Path,
                       wrong_passwords: int = 2) -> tuple[dict[str, list[str]], list[str], str]:
    """The accounts' TOML: the tiers on 127.0.0.1, plus some with a wrong password (medium)."""
    users = {tier: [f"{tag}{tier[0]}{n}" for n in range(count)] for tier, count in TIER_SIZES.items()}
    text = "".join(account_toml(name, "127.0.0.1", server.port, priority=tier)
                   for tier, names in users.items() for name in names)
    secret = tmp_path / "wrong.secret"
    secret.write_text("not-the-password\n")
    bad = [f"{tag}x{n}" for n in range(wrong_passwords)]
    text += "".join(f'\n[[accounts]]\nid = "{name}"\nhost = "127.0.0.1"\nport = {server.port}\ntls = "none"\n'
                    f'username = "{name}"\npassword_file = "{secret}"\npriority = "medium"\n' for name in bad)
    return users, bad, text


def append_and_time(server: Dovecot, users: dict[str, list[str]], tiers: tuple[str, ...], seconds: float,
                    every: float) -> tuple[dict[tuple[str, int], tuple[str, float]], list[float]]:
    """Append one message every ``every`` seconds for ``seconds``, to a random account of each
    tier in turn; returns (account, uid) -> (tier, appended at) and the appends' login times."""
    rng = random.Random(23)
    appended, logins = {}, []
    start = time.time()
    n = 0
    while time.time() - start < seconds:
        tier = tiers[n % len(tiers)]
        user = rng.choice(users[tier])
        at = time.time()
        uid = server.append(user, f"Subject: contended {n}\r\n\r\nbody {n}\r\n".encode())
        appended[(user, uid)] = (tier, at)
        logins.append(at)
        n += 1
        time.sleep(max(0.0, start + n * every - time.time()))
    return appended, logins


def store_latency(daemon: Daemon, appended: dict[tuple[str, int], tuple[str, float]],
                  timeout: float) -> dict[str, list[float]]:
    """Per tier, seconds from each append to its row in the store (waits for all of them)."""
    def stored() -> dict[tuple[str, int], float]:
        rows = daemon.query("SELECT account_id, uid, ingested_at FROM messages")
        return {(account, uid): at for account, uid, at in rows if (account, uid) in appended}

    def all_stored() -> dict[tuple[str, int], float] | None:
        found = stored()
        return found if len(found) == len(appended) else None

    rows = wait_until(all_stored, timeout, 1.0, "every appended message to be stored")
    latency: dict[str, list[float]] = defaultdict(list)
    for key, (tier, at) in appended.items():
        latency[tier].append(rows[key] - at)
    return latency


def p95(values: list[float]) -> float:
    return sorted(values)[math.ceil(0.95 * len(values)) - 1]


def daemon_env() -> dict[str, str]:
    return {"MAILINGESTD_SCHEDULER_HIGH_INTERVAL": f"{INTERVALS['high']}s",
            "MAILINGESTD_SCHEDULER_MEDIUM_INTERVAL": f"{INTERVALS['medium']}s",
            "MAILINGESTD_SCHEDULER_LOW_INTERVAL": f"{INTERVALS['low']}s",
            "MAILINGESTD_SCHEDULER_AUTH_FAILURE_LIMIT": str(AUTH_LIMIT),
            "MAILINGESTD_SCHEDULER_BACKOFF_MAX": "5s",
            "MAILINGESTD_SCHEDULER_FIRST_POLL_SPREAD": "5s"}


def limits_toml(cap: int, rate: int) -> str:
    return f"\n[limits]\nmax_connections_per_server = {cap}\nconnects_per_minute = {rate}\n"


@pytest.mark.slow
def test_a_contended_server_keeps_every_tiers_deadline(tmp_path: Path) -> None:
    server = Dovecot(tmp_path / "dovecot", users=1, idle=False)
    server.start()
    tag = f"c{os.getpid() % 1000}"
    users, bad, accounts = contended_accounts(server, tag, tmp_path)
    try:
        with SessionSampler(server, f"{tag}*") as sampler, Daemon(
                tmp_path / "daemon", accounts=accounts, password=server.password, env=daemon_env(),
                sections=limits_toml(CAP, RATE)) as daemon:
            started = time.time()
            wait_until(lambda: daemon.status()["servers"].get("127.0.0.1", {}).get("rotating"), 30, 0.5,
                       "the planner to choose who rotates")
            time.sleep(max(0.0, started + 15 - time.time()))  # the first polls, then steady state
            window = time.time()
            appended, append_logins = append_and_time(server, users, ("high", "medium", "low"), 36, 0.3)
            window = (window, time.time())
            latency = store_latency(daemon, appended, 2 * INTERVALS["low"])
            status = daemon.status()
            text = daemon.ctl("status").stdout
        logins = log_events(server, "Login:", tag)
        failed = {name: len(log_events(server, "auth failed", name)) for name in bad}
    finally:
        server.stop()
    report = {tier: round(p95(values), 2) for tier, values in latency.items()}
    for tier, interval in INTERVALS.items():
        assert p95(latency[tier]) <= 1.5 * interval + 2, (tier, report)
    # The cap, counted by the server (the test's own APPEND session is one more at most).
    assert sampler.samples and max(sampler.samples) <= CAP + 1, max(sampler.samples)
    assert max(sampler.samples) >= CAP - 20, max(sampler.samples)  # the cap is used, not avoided
    # The connect rate over any 60 s (+1 s for the log's resolution), the appends' own logins apart.
    daemon_logins = list((Counter(int(t) for t in logins) - Counter(int(t) for t in append_logins)).elements())
    assert max_in_window(daemon_logins, 60) <= RATE / 6 + RATE * 61 / 60, max_in_window(daemon_logins, 60)
    assert failed == {name: AUTH_LIMIT for name in bad}, failed
    # In steady state the high and medium accounts keep their connections: no login of theirs
    # but the test's own APPEND sessions (time-sharing the cap logged them out and in again).
    for tier in ("high", "medium"):
        relogins = [t for t in log_events(server, "Login:", f"{tag}{tier[0]}") if window[0] + 1 <= t <= window[1]]
        appends = [at for tier_of, at in appended.values() if tier_of == tier and window[0] + 1 <= int(at) <= window[1]]
        assert len(relogins) <= len(appends) + 3, (tier, len(relogins), len(appends))  # +3: second boundaries
    capacity = status["servers"]["127.0.0.1"]
    assert capacity["late"] == {"high": 0, "medium": 0, "low": 0} and capacity["deficit"] is None, capacity
    assert capacity["polls_needed"] == pytest.approx(20 * 6 + 200 * 3 + 80 * 1.5)
    assert 0 < capacity["rotating"] <= 80 and capacity["logins_allowed"] == RATE, capacity
    assert "polls/min" in text and "will be late" not in text, text


@pytest.mark.slow
def test_limits_that_cannot_carry_the_tiers_make_the_low_tier_late_and_say_so(tmp_path: Path) -> None:
    # Cap 70 and 600 connects a minute: about 60 accounts hold (20 high, 40 medium); the 160 or
    # so rotating medium accounts need about 480 logins a minute, the 80 low ones 120 more, of the
    # 540 they may use: the low tier is late, medium keeps its interval.
    server = Dovecot(tmp_path / "dovecot", users=1, idle=False)
    server.start()
    tag = f"d{os.getpid() % 1000}"
    users, _, accounts = contended_accounts(server, tag, tmp_path, wrong_passwords=0)
    try:
        with Daemon(tmp_path / "daemon", accounts=accounts, password=server.password, env=daemon_env(),
                    sections=limits_toml(70, 600)) as daemon:
            line = wait_until(lambda: next((line for line in daemon.ctl("status").stdout.splitlines()
                                            if "will be late" in line), None), 30, 0.5, "the deficit line")
            time.sleep(10)
            appended, _ = append_and_time(server, users, ("high", "medium"), 24, 0.4)
            latency = store_latency(daemon, appended, 2 * INTERVALS["medium"])
            status = daemon.status()
            metrics = (daemon.metrics_dir / "mailingestd.prom").read_text()
    finally:
        server.stop()
    capacity = status["servers"]["127.0.0.1"]
    assert capacity["late"] == {"high": 0, "medium": 0, "low": 80}, capacity
    assert capacity["polls_possible"] < capacity["polls_needed"] == pytest.approx(840), capacity
    # What the limits allow moves a little with the measured session time (the rotating reserve).
    assert re.fullmatch(r"127\.0\.0\.1: needs 840 polls/min, limits allow \d{3}: 80 low accounts will be late",
                        line.strip()), line
    assert 'mailingestd_accounts_late{priority="low",server="127.0.0.1"} 80.0' in metrics, metrics
    assert 'mailingestd_accounts_late{priority="medium",server="127.0.0.1"} 0.0' in metrics
    for tier in ("high", "medium"):  # the tiers above the late one keep their deadlines
        assert p95(latency[tier]) <= 1.5 * INTERVALS[tier] + 2, (tier, latency[tier])
