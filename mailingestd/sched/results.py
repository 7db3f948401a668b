"""The results of one scheduler turn, gathered for the planner's batched ``on_results``.

The scheduler reads up to thousands of ``frames.Result`` per loop turn; the planner classifies
them in one numpy pass (the same call the scheduler benchmark drives), not one call per result.
Each account appears at most once in a batch, and a batch is handed over before any other
frame or special result is handled, so the order of events per account is the order read.
"""

from __future__ import annotations

import math

from .. import frames
from .planner import Planner
from .states import AccountState


class ResultRows:
    """Parallel columns of ordinary results (not requeues, not reauth), one row per account."""

    __slots__ = ("accounts", "auth", "before", "connected", "idling", "indexes", "mail", "ok", "ordered", "results",
                 "retry_after", "watches_all")

    def __init__(self) -> None:
        self.results: list[frames.Result] = []
        self.before: list[AccountState | None] = []  # each account's state before the batch
        self.accounts: set[str] = set()
        self.indexes: list[int] = []
        self.ok: list[bool] = []
        self.connected: list[bool] = []
        self.idling: list[bool] = []
        self.mail: list[int] = []
        self.auth: list[bool] = []
        self.retry_after: list[float] = []
        self.ordered: list[bool] = []
        self.watches_all: list[bool] = []

    def __len__(self) -> int:
        return len(self.results)

    def add(self, result: frames.Result, index: int, before: AccountState | None) -> None:
        self.results.append(result)
        self.before.append(before)
        self.accounts.add(result.account_id)
        self.indexes.append(index)
        self.ok.append(result.ok)
        self.connected.append(result.connected)
        self.idling.append(result.idling)
        self.mail.append(result.new_messages)
        self.auth.append(result.failure_kind is frames.FailureKind.AUTH)
        self.retry_after.append(math.nan if result.retry_after is None else result.retry_after)
        self.ordered.append(result.order_id > 0)
        self.watches_all.append(result.watches_all)

    def apply(self, planner: Planner, now: float) -> None:
        """Every row through ``Planner.on_results`` in one call."""
        planner.on_results(now, self.indexes, self.ok, self.connected, self.idling, self.mail, self.auth,
                           self.retry_after, self.ordered, self.watches_all)
