"""The scheduler against a real polling-only Dovecot, a couple of hundred accounts, short intervals.

Everything asserted about the IMAP side is counted by the server: Dovecot writes a rawlog of every
command per user (``rawlog_dir = .../%u``, timestamped), so polls per account are STATUS commands
in that user's rawlog; logins and failed logins (with their second) come from Dovecot's log;
concurrent sessions from ``doveadm who``. The daemon's own view (``mailingestctl status --json``
and the metrics file) is checked beside it.

Two "servers" share the one Dovecot: accounts on ``127.0.0.1`` (the tiers, promotion, demotion,
the connect rate, a wrong password, an unreachable port) and accounts on ``localhost`` (a small
connection cap, so accounts wait on it).
"""

from __future__ import annotations

import datetime
import os
import re
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import Daemon, account_toml, wait_until

from devtools.devservers import Dovecot, free_port

A_RATE, A_BURST = 300, 50           # connects_per_minute on 127.0.0.1 and its bucket (10 s of the rate)
B_CAP, B_RATE = 12, 120             # the small server: connection cap and connects_per_minute
TIERS = {"high": 2.0, "medium": 3.0, "low": 5.0}  # the harness's [scheduler] intervals
PER_TIER, QUIET_AUTO, ON_B = 40, 20, 30


@pytest.fixture
def polling_dovecot(tmp_path: Path):
    """A private Dovecot without IDLE that rawlogs every session (the session one does not)."""
    raw = tmp_path / "rawlog"
    raw.mkdir()
    os.chmod(raw, 0o777)
    server = Dovecot(tmp_path / "dovecot", users=1, idle=False,
                     extra_conf=f"protocol imap {{\n  rawlog_dir = {raw}/%u\n}}\n")
    server.start()
    server.rawlog = raw
    yield server
    server.stop()


def rawlog_dir(server: Dovecot, user: str) -> Path:
    path = server.rawlog / user
    path.mkdir()  # Dovecot writes a user's rawlog only when the directory exists
    os.chmod(path, 0o777)
    return path


def status_commands(server: Dovecot, user: str, start: float, end: float) -> int:
    """STATUS commands the server received from ``user`` between two wall-clock times."""
    count = 0
    for path in (server.rawlog / user).glob("*.in"):
        for line in path.read_text(errors="replace").splitlines():
            stamp, _, command = line.partition(" ")
            if " STATUS " in f" {command.split(' ', 1)[-1]}" and start <= float(stamp) < end:
                count += 1
    return count


LOG_TIME = re.compile(r"^(\w{3} +\d+ \d\d:\d\d:\d\d) ")


def log_events(server: Dovecot, needle: str, user_prefix: str) -> list[float]:
    """Wall-clock seconds of Dovecot log lines containing ``needle`` for users starting with a prefix."""
    year = datetime.date.today().year
    times = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if needle in line and f"user=<{user_prefix}" in line:
            stamp = datetime.datetime.strptime(f"{year} {LOG_TIME.match(line).group(1)}", "%Y %b %d %H:%M:%S")
            times.append(stamp.timestamp())
    return times


def max_in_window(times: list[float], seconds: int) -> int:
    """The most events in any window of ``seconds`` whole seconds (the log has second resolution)."""
    per_second = Counter(int(t) for t in times)
    return max((sum(per_second.get(s, 0) for s in range(start, start + seconds)) for start in per_second),
               default=0)


def metric_value(daemon: Daemon, name: str, labels: str) -> float:
    text = (daemon.metrics_dir / "mailingestd.prom").read_text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels.split(",")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_tiers_promotion_demotion_limits_and_auth_circuit(polling_dovecot: Dovecot, tmp_path: Path) -> None:
    server = polling_dovecot
    port = server.port
    tag = f"s{os.getpid() % 1000}"
    accounts = []
    users: dict[str, list[str]] = {tier: [f"{tag}{tier[0]}{n}" for n in range(PER_TIER)] for tier in TIERS}
    for tier, names in users.items():
        accounts += [account_toml(name, "127.0.0.1", port, priority=tier) for name in names]
    quiet = [f"{tag}q{n}" for n in range(QUIET_AUTO)]
    accounts += [account_toml(name, "127.0.0.1", port, priority="auto") for name in quiet]
    burst = f"{tag}burst"
    # One message before the start: mail into a never-synced (empty) folder counts as its backlog
    # and does not promote, so the burst must come after a first sync that stored something.
    server.append(burst, b"Subject: before\r\n\r\nbody\r\n")
    accounts.append(account_toml(burst, "127.0.0.1", port, priority="auto"))
    on_b = [f"{tag}lh{n}" for n in range(ON_B)]
    accounts += [account_toml(name, "localhost", port, priority="high") for name in on_b]
    bad = f"{tag}bad"
    secret = tmp_path / "bad.secret"
    secret.write_text("not-the-password\n")
    accounts.append(f'\n[[accounts]]\nid = "{bad}"\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\n'
                    f'username = "{bad}"\npassword_file = "{secret}"\npriority = "high"\n')
    accounts.append(account_toml(f"{tag}down", "127.0.0.1", free_port(), priority="high"))
    for name in [*(name for names in users.values() for name in names), *quiet, burst, *on_b, bad]:
        rawlog_dir(server, name)
    limits = f"""
[limits]
max_connections_per_server = 1000
connects_per_minute = {A_RATE}

[limits.servers."localhost"]
max_connections_per_server = {B_CAP}
connects_per_minute = {B_RATE}
"""
    env = {"MAILINGESTD_SCHEDULER_PROMOTE_MESSAGES": "3", "MAILINGESTD_SCHEDULER_PROMOTE_WINDOW": "20s",
           "MAILINGESTD_SCHEDULER_DEMOTE_AFTER": "12s", "MAILINGESTD_SCHEDULER_AUTH_FAILURE_LIMIT": "3",
           "MAILINGESTD_SCHEDULER_FIRST_POLL_SPREAD": "2s"}
    with Daemon(tmp_path / "daemon", accounts="".join(accounts), password=server.password, sections=limits,
                env=env) as daemon:
        started = time.time()
        # Connect rate and cap, sampled while everyone connects (a loaded machine takes a while);
        # auth failures and backoff meanwhile.
        b_sessions, states_seen, waiting_seen = [], set(), 0
        metrics_file = daemon.metrics_dir / "mailingestd.prom"
        while True:
            b_sessions.append(server.connected_sessions(f"{tag}lh*"))
            text = metrics_file.read_text() if metrics_file.exists() else ""
            states_seen |= set(re.findall(r'^mailingestd_accounts\{[^}]*state="(\w+)"[^}]*\} [1-9]', text,
                                          re.MULTILINE))
            status = daemon.status()
            localhost = status["servers"].get("localhost", {})
            waiting_seen = max(waiting_seen, localhost.get("waiting", 0))
            if time.time() - started > 15 and waiting_seen and status["accounts"]["by_state"].get("auth_failed"):
                break
            assert time.time() - started < 60, status
            time.sleep(0.3)
        assert 0 < waiting_seen <= ON_B - 1, "accounts held back by the cap are visible in status"
        # Lag is measured and shown: the accounts time-sharing localhost's capped, rate-limited
        # connections run late (each of their polls needs a new connection), so the tail is long.
        traffic = status["traffic"]
        assert 0 < traffic["lag_p50"] <= traffic["lag_p99"] and traffic["lag_p99"] >= 5.0, traffic

        # The wrong password: exactly auth_failure_limit tries, then auth_failed, in status and metrics.
        assert len(log_events(server, "auth failed", bad)) == 3, server.log_path.read_text()[-2000:]
        assert status["accounts"]["by_state"].get("auth_failed") == 1
        assert "backoff" in states_seen, states_seen  # the unreachable port, between its tries
        wait_until(lambda: metric_value(daemon, "mailingestd_accounts", 'state="auth_failed"') == 1, 5, 0.3,
                   "auth_failed in the metrics")

        # Quiet auto accounts demote (medium -> low after demote_after = 12 s without mail); then a
        # burst of mail promotes one of them back (one tier per burst), visible in status.
        def tier_counts() -> dict[str, float]:
            return daemon.status()["accounts"]["by_priority"]

        wait_until(lambda: tier_counts().get("medium") == PER_TIER, 20, 0.5, "quiet auto accounts to demote")
        assert tier_counts()["low"] == PER_TIER + QUIET_AUTO + 1
        assert metric_value(daemon, "mailingestd_accounts", 'priority="low"') == PER_TIER + QUIET_AUTO + 1
        server.append_many(burst, [f"Subject: burst {n}\r\n\r\nbody\r\n".encode() for n in range(4)])
        wait_until(lambda: tier_counts().get("medium") == PER_TIER + 1, 30, 0.3, "the burst account to be promoted")

        # Poll rates per fixed tier, over a window after everyone connected, from the rawlog.
        window_start = time.time()
        time.sleep(20)
        window_end = time.time()
        rates = {tier: statistics.median(status_commands(server, name, window_start, window_end)
                                         for name in names) / (window_end - window_start)
                 for tier, names in users.items()}
        for tier, interval in TIERS.items():
            assert 0.6 / interval <= rates[tier] <= 1.3 / interval, rates
        assert rates["high"] > rates["medium"] > rates["low"]

        # Quiet again: the burst account demotes after demote_after.
        wait_until(lambda: tier_counts().get("medium") == PER_TIER, 20, 0.5, "the burst account to demote")

        # Not tried again while auth_failed; a credential change (new secret, reload) lifts it.
        assert len(log_events(server, "auth failed", bad)) == 3
        secret.write_text(server.password + "\n")
        daemon.ctl("reload")
        wait_until(lambda: log_events(server, "Login:", bad), 15, 0.3, "the fixed account to log in")
        wait_until(lambda: daemon.status()["accounts"]["by_state"].get("auth_failed", 0) == 0, 10, 0.3,
                   "auth_failed to clear")

    # Server side, over the whole run: the cap and the connect rates held.
    assert max(b_sessions) <= B_CAP and max(b_sessions) > 0, b_sessions
    b_logins = log_events(server, "Login:", f"{tag}lh")
    # 127.0.0.1's logins: every one of this test's users but localhost's (the test's own APPEND
    # session for the burst is one more, well inside the bound).
    a_times = list((Counter(log_events(server, "Login:", tag)) - Counter(b_logins)).elements())
    for seconds in (1, 2, 5, 10, 30):
        # Any W seconds: at most the burst plus the rate over W (+1 s for the log's resolution).
        assert max_in_window(a_times, seconds) <= A_BURST + A_RATE * (seconds + 1) / 60, (seconds, a_times)
        assert max_in_window(b_logins, seconds) <= B_RATE / 6 + B_RATE * (seconds + 1) / 60
    # The cap is time-shared, not held by the first accounts forever: every account got its turn.
    starved = [name for name in on_b if not status_commands(server, name, 0, time.time())]
    assert not starved, f"{len(starved)} of {ON_B} accounts on the capped server were never polled"
    assert len(b_logins) > B_CAP
