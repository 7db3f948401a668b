"""Nothing from outside takes the daemon down or makes it forget: hostile server delays, restarts
against the auth breaker, the watchdog while one worker crash-loops (docs/reliability.md)."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given, strategies as st

from harness import Daemon, account_toml, wait_until
from hostile_imap import HostileServer, Session
from mailingestd.backoff import retry_delay
from mailingestd.config import LimitsConfig, SchedulerConfig
from mailingestd.imap import classify
from mailingestd.planner import AccountPlan, AccountState, Planner

SCHEDULER = SchedulerConfig(high_interval=60, medium_interval=300, low_interval=900, idle_safety_interval=900,
                            backoff_base=5, backoff_max=900, auth_failure_limit=3, tick=0.1)
LIMITS = LimitsConfig(max_connections_per_server=100, connects_per_minute=10**6, max_connections_per_account=2)
ABSURD = b"Request is throttled. Suggested Backoff Time: 999999999999999999999 milliseconds"


# --- a delay the server suggests --------------------------------------------------------------------
@given(retry_after=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30)),
       attempt=st.integers(0, 100), seed=st.integers())
def test_a_suggested_delay_is_clamped_to_backoff_max(retry_after: float, attempt: int, seed: int) -> None:
    delay = retry_delay(attempt, 5.0, 900.0, random.Random(seed), retry_after)
    assert math.isfinite(delay) and 0.0 <= delay <= 900.0


def test_the_imap_edge_never_reports_an_absurd_delay() -> None:
    error = classify(Exception(b"NO [THROTTLED] " + ABSURD))
    assert error.retry_after is not None and math.isfinite(error.retry_after) and error.retry_after <= 86400


@pytest.mark.parametrize("retry_after", [1e18, math.inf, math.nan, -5.0])
def test_one_absurd_retry_after_parks_one_account_and_the_planner_goes_on(retry_after: float) -> None:
    planner = Planner(SCHEDULER, LIMITS, now=0.0, rng=random.Random(1))
    for name in ("bad", "good"):
        planner.add(AccountPlan(account_id=name, server="imap.example", priority="high"), 0.0)
    due = {order.account_id for order in planner.due(20.0, 10)}
    assert due == {"bad", "good"}
    planner.on_result("bad", 20.0, ok=False, failure_kind="throttled", retry_after=retry_after, connected=False,
                      idling=False)
    planner.on_result("good", 20.0, ok=True, connected=False, idling=False)
    assert planner.state_of("bad") == AccountState.BACKOFF
    wakeup = planner.next_wakeup(20.0)
    assert wakeup is not None and wakeup <= 20.0 + SCHEDULER.backoff_max
    seen = {order.account_id for order in planner.due(20.0 + SCHEDULER.backoff_max + 100, 10)}
    assert seen == {"bad", "good"}


def absurd_backoff(session: Session) -> None:
    """Office 365's throttling reply, with a Suggested Backoff Time of 10**21 milliseconds."""
    session.greet()
    tag, _ = session.serve_until(b"EXAMINE")
    session.send(tag + b" NO [THROTTLED] " + ABSURD + b"\r\n")
    session.serve_until(b"NEVER")


def test_an_absurd_suggested_backoff_leaves_every_child_in_place(dovecot, tmp_path) -> None:
    good = dovecot.new_user()
    with HostileServer(absurd_backoff) as server:
        accounts = (account_toml(good, dovecot.host, dovecot.port)
                    + account_toml("u", server.host, server.port, id="throttled"))
        with Daemon(tmp_path, accounts=accounts, password=dovecot.password, workers=1) as daemon:
            wait_until(lambda: server.connections >= 1, 20, what="the throttled account to connect")
            wait_until(lambda: any("throttled" in line for line in daemon.status()["errors"]), 15,
                       what="the throttled account's error in status\n" + daemon.log_tail())
            for n in range(5):
                sent = time.monotonic()
                dovecot.append(good, f"Message-ID: <absurd-{n}@t>\r\nSubject: {n}\r\n\r\nbody\r\n".encode())
                daemon.wait_stored(n + 1, timeout=10)
                assert time.monotonic() - sent < 3.0, daemon.log_tail()
            status = daemon.status()
            restarts = {c["role"]: c["restarts"] for c in status["children"]}
            assert restarts == {"scheduler": 0, "worker": 0}, daemon.log_tail()
            assert "Traceback" not in daemon.log_path.read_text()
