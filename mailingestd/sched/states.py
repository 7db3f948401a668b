"""The states an account goes through in the planner, and the transitions allowed between them.

An account is in exactly one state; ``Planner`` changes single accounts through one guarded
move, and whole batches (orders handed out, results classified) only along edges listed here.
"""

from __future__ import annotations

from enum import IntEnum


class AccountState(IntEnum):
    """Where an account is in its cycle (supervisord states.py style: transitions are guarded)."""

    NEW = 0          # added, first poll not yet ordered (in the wheel at a jittered time)
    SCHEDULED = 1    # in the wheel for its next poll
    WAITING = 2      # due, but its server refused a new connection; in the server's wait queue
    POLLING = 3      # an order is out, no result yet
    IDLING = 4       # the worker holds it in IDLE; in the wheel for the slow safety poll
    BACKOFF = 5      # failed; in the wheel at a jittered backoff time
    AUTH_FAILED = 6  # circuit open after auth_failure_limit auth failures; never scheduled
    DISABLED = 7     # disabled by the operator; never scheduled


S = AccountState
ALLOWED: dict[AccountState, frozenset[AccountState]] = {
    S.NEW: frozenset({S.SCHEDULED, S.WAITING, S.POLLING, S.DISABLED}),
    S.SCHEDULED: frozenset({S.WAITING, S.POLLING, S.IDLING, S.BACKOFF, S.AUTH_FAILED, S.DISABLED}),
    S.WAITING: frozenset({S.POLLING, S.SCHEDULED, S.DISABLED}),
    S.POLLING: frozenset({S.SCHEDULED, S.IDLING, S.BACKOFF, S.AUTH_FAILED, S.DISABLED}),
    S.IDLING: frozenset({S.SCHEDULED, S.POLLING, S.WAITING, S.BACKOFF, S.AUTH_FAILED, S.DISABLED}),
    S.BACKOFF: frozenset({S.SCHEDULED, S.WAITING, S.POLLING, S.IDLING, S.DISABLED}),
    S.AUTH_FAILED: frozenset({S.SCHEDULED, S.DISABLED}),
    S.DISABLED: frozenset({S.SCHEDULED}),
}
STATES = list(AccountState)
# Bit masks over state numbers, for the hot paths: the states each state may move to (itself
# included), and the states whose accounts are in the timing wheel.
ALLOWED_MASK = [sum(1 << target for target in ALLOWED[state]) | (1 << state) for state in AccountState]
IN_WHEEL_MASK = (1 << S.NEW) | (1 << S.SCHEDULED) | (1 << S.IDLING) | (1 << S.BACKOFF)
# Plain ints of the states the numpy paths compare with (an IntEnum member is slower there).
POLLING, IDLING, SCHEDULED, WAITING = int(S.POLLING), int(S.IDLING), int(S.SCHEDULED), int(S.WAITING)
DISABLED, AUTH_FAILED = int(S.DISABLED), int(S.AUTH_FAILED)


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow (a bug in the caller or the planner)."""
