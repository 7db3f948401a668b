"""Per-server connection limits: a token bucket for new connections and caps on open ones.

Reconnect storms get accounts locked (docs/architecture.md rule 7), so every new IMAP connection to a
server must pass three checks at once: the server's token bucket (``connects_per_minute``), the
server's cap on concurrent connections (``max_connections_per_server``) and the account's cap
(``max_connections_per_account``). The planner admits connections a batch at a time
(``ServerConnections.admit_many``) for accounts that hold none (it opens at most one per
account, so the account's cap only decides whether any may be opened). Limits come from
``LimitsConfig.for_server(host)``.

Pure logic: no clock of its own, every call takes ``now`` (monotonic seconds).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import msgspec
import numpy as np

from ..config import LimitsConfig, ServerLimits

# A fresh or idle server may open this many seconds' worth of its rate at once; any window of W
# seconds then sees at most rate * (W + BURST_SECONDS) / 60 connects (7/6 of the rate per minute).
DEFAULT_BURST_SECONDS = 10.0


class TokenBucket:
    """Tokens refill continuously at ``rate_per_minute`` up to ``burst``; one token per connect.

    Over any window of W seconds it grants at most ``burst + rate_per_minute * W / 60`` tokens.
    """

    __slots__ = ("rate_per_second", "burst", "tokens", "updated_at")

    def __init__(self, rate_per_minute: float, burst: float, now: float) -> None:
        if rate_per_minute < 0 or burst < 0:
            raise ValueError("rate_per_minute and burst must not be negative")
        self.rate_per_second = rate_per_minute / 60.0
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated_at = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated_at
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_second)
            self.updated_at = now

    def try_take(self, now: float) -> bool:
        """Take one token if there is a whole one; True when taken."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_time(self, now: float) -> float:
        """Seconds until a token is available (0 when one is now; inf when the rate is 0)."""
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        if self.rate_per_second <= 0 or self.burst < 1.0:
            return math.inf
        return (1.0 - self.tokens) / self.rate_per_second


class ServerConnections:
    """One IMAP server's limits in force, its connect bucket and its open connection counts."""

    __slots__ = ("connect_bucket", "limits", "open_connections", "recent_connects", "server")

    def __init__(self, server: str, limits: ServerLimits, now: float,
                 burst_seconds: float = DEFAULT_BURST_SECONDS) -> None:
        self.server = server
        self.limits = limits
        rate = limits.connects_per_minute or 0
        self.connect_bucket = TokenBucket(rate, connect_burst(rate, burst_seconds), now)
        self.open_connections = 0
        # [whole second, connects admitted in it] over the last minute, for the logins/min used.
        self.recent_connects: deque[list[int]] = deque(maxlen=61)

    def connects_last_minute(self, now: float) -> int:
        """New connections admitted in the last 60 seconds."""
        since = math.floor(now) - 59
        return sum(count for second, count in self.recent_connects if second >= since)

    def admit_many(self, count: int, now: float) -> int:
        """Admit up to ``count`` new connections, each for an account with none open (the planner's
        accounts hold at most one): as many as the server cap and the bucket allow, in one step."""
        limits = self.limits
        if count <= 0 or (limits.max_connections_per_account or 0) < 1:
            return 0
        room = (limits.max_connections_per_server or 0) - self.open_connections
        bucket = self.connect_bucket
        bucket.wait_time(now)  # refills
        admitted = max(0, min(count, room, int(bucket.tokens)))
        if admitted:
            bucket.tokens -= admitted
            self.open_connections += admitted
            second = math.floor(now)
            recent = self.recent_connects
            if recent and recent[-1][0] == second:
                recent[-1][1] += admitted
            else:
                recent.append([second, admitted])
        return admitted

    def occupy_many(self, count: int) -> None:
        """Count connections that exist without having been admitted (found open after a restart)."""
        self.open_connections += count

    def release_many(self, count: int) -> None:
        """Connections closed (never below zero)."""
        self.open_connections = max(0, self.open_connections - count)


def connect_burst(connects_per_minute: float, burst_seconds: float) -> float:
    """The bucket depth: ``burst_seconds`` of the rate, at least one token when the rate is not 0."""
    if connects_per_minute <= 0:
        return 0.0
    return float(max(1, math.ceil(connects_per_minute * burst_seconds / 60.0)))


class ServerStatus(msgspec.Struct, frozen=True):
    """Connections to one server against its limits, for ``mailingestctl status``."""

    server: str
    connections: int
    max_connections: int
    max_connections_per_account: int
    connects_per_minute: int
    connect_tokens: float


class ConnectionLimits:
    """Every server's ``ServerConnections``, created with its configured limits on first use."""

    def __init__(self, limits: LimitsConfig, burst_seconds: float = DEFAULT_BURST_SECONDS) -> None:
        self.limits = limits
        self.burst_seconds = burst_seconds
        self._servers: dict[str, ServerConnections] = {}

    def server(self, server: str, now: float) -> ServerConnections:
        """The state of one server, created with its configured limits on first use."""
        state = self._servers.get(server)
        if state is None:
            state = ServerConnections(server, self.limits.for_server(server), now, self.burst_seconds)
            self._servers[server] = state
        return state

    def servers(self) -> list[str]:
        """Every server seen so far, sorted."""
        return sorted(self._servers)

    def status(self, server: str, now: float) -> ServerStatus:
        """Connections against limits for one server."""
        state = self.server(server, now)
        state.connect_bucket.wait_time(now)
        limits = state.limits
        return ServerStatus(
            server=server,
            connections=state.open_connections,
            max_connections=limits.max_connections_per_server or 0,
            max_connections_per_account=limits.max_connections_per_account or 0,
            connects_per_minute=limits.connects_per_minute or 0,
            connect_tokens=round(state.connect_bucket.tokens, 3),
        )

    def reconfigure(self, limits: LimitsConfig, now: float) -> None:
        """New limits after a reload: open counts are kept, buckets get the new rate and depth."""
        self.limits = limits
        for name, state in self._servers.items():
            state.limits = limits.for_server(name)
            rate = state.limits.connects_per_minute or 0
            bucket = state.connect_bucket
            bucket.wait_time(now)
            bucket.rate_per_second = rate / 60.0
            bucket.burst = connect_burst(rate, self.burst_seconds)
            bucket.tokens = min(bucket.tokens, bucket.burst)


# -- sharing a capped server (docs/contended-servers.md) -------------------------------------------

# Rotating accounts may use this share of connects_per_minute; the rest is left for held
# connections that must log in again (a server restart, a dropped connection).
ROTATION_LOGIN_SHARE = 0.9
# Connections kept free for rotating accounts are sized to be at most this busy, so a rotating
# account due finds a free one without waiting behind others.
ROTATION_UTILISATION = 0.5
MIN_ROTATION_RESERVE = 2
# When the logins cannot carry every rotating account, each tier first gets an equal part of this
# share of them (so no tier starves), the rest goes to the tiers in order, high first.
LATE_FLOOR_SHARE = 0.1
TIER_NAMES = ("high", "medium", "low")


class ServerShare(msgspec.Struct, frozen=True):
    """How one server's connections and logins are shared among its accounts (per minute).

    ``holders`` keep a connection between polls; ``rotating`` log in, poll and log out, through
    ``reserve`` connections kept for them. ``polls_needed``: what the tiers ask for;
    ``polls_possible``: what the cap and the connect rate allow. ``late[t]``: accounts of tier t
    (0 high, 1 medium, 2 low) polled less often than their interval, by ``stretch[t]``."""

    holders: int
    rotating: int
    reserve: int
    polls_needed: float
    polls_possible: float
    logins_needed: float
    logins_allowed: float
    late: list[int]
    stretch: list[float]


def share_server(intervals: Sequence[float] | np.ndarray, tiers: Sequence[int] | np.ndarray, cap: int,
                 connects_per_minute: float, session_seconds: float) -> ServerShare:
    """Who holds and who rotates on one server, and what the limits allow.

    ``intervals`` and ``tiers``: the server's schedulable accounts, most often polled first (the
    first ``holders`` of them keep connections). ``session_seconds``: how long a rotating
    account's login, poll and logout take (the planner measures it).
    """
    per_minute = 60.0 / np.asarray(intervals, dtype=float)
    tier_of = np.asarray(tiers, dtype=np.int64)
    needed = float(per_minute.sum())
    count = len(per_minute)
    if count <= cap:
        return ServerShare(holders=count, rotating=0, reserve=0, polls_needed=needed, polls_possible=needed,
                           logins_needed=0.0, logins_allowed=float(connects_per_minute), late=[0, 0, 0],
                           stretch=[1.0, 1.0, 1.0])
    budget = max(0.0, connects_per_minute * ROTATION_LOGIN_SHARE)
    cumulative = np.concatenate([[0.0], np.cumsum(per_minute)])
    reserve = MIN_ROTATION_RESERVE
    for _ in range(4):  # more reserve means fewer holders and more logins: settles in two or three
        holders = max(0, cap - reserve)
        logins = min(needed - cumulative[holders], budget)
        wanted = math.ceil(logins / 60.0 * session_seconds / ROTATION_UTILISATION)
        reserve = min(cap, max(MIN_ROTATION_RESERVE, wanted))
    holders = max(0, cap - reserve)
    rotating_tiers = tier_of[holders:]
    demand = np.bincount(rotating_tiers, weights=per_minute[holders:], minlength=3)[:3]
    if demand.sum() <= budget:
        allotted = demand
    else:
        wanting = np.count_nonzero(demand)
        allotted = np.minimum(demand, budget * LATE_FLOOR_SHARE / max(1, wanting))
        left = budget - allotted.sum()
        for tier in range(3):
            more = min(demand[tier] - allotted[tier], left)
            allotted[tier] += more
            left -= more
    short = demand > allotted * (1 + 1e-9)
    # No logins at all (connects_per_minute = 0): late without end, but scheduled as usual.
    stretch = [float(d / a) if s and a > 0 else 1.0 for d, a, s in zip(demand, allotted, short)]
    accounts_per_tier = np.bincount(rotating_tiers, minlength=3)[:3]
    late = [int(accounts_per_tier[tier]) if short[tier] else 0 for tier in range(3)]
    return ServerShare(holders=holders, rotating=count - holders, reserve=reserve, polls_needed=needed,
                       polls_possible=float(cumulative[holders] + allotted.sum()),
                       logins_needed=float(demand.sum()), logins_allowed=float(connects_per_minute),
                       late=late, stretch=stretch)


def deficit_line(server: str, polls_needed: float, polls_possible: float, late: Sequence[int]) -> str | None:
    """One line for ``mailingestctl status`` when the limits cannot carry the tiers (``late``:
    accounts per tier, high first), else None: ``imap.example: needs 2,067 polls/min, limits
    allow 274: 406 high, 7,000 medium and 2,500 low accounts will be late``."""
    named = [f"{count:,} {TIER_NAMES[tier]}" for tier, count in enumerate(late) if count]
    if not named:
        return None
    who = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    return (f"{server}: needs {polls_needed:,.0f} polls/min, limits allow {polls_possible:,.0f}: "
            f"{who} accounts will be late")
