"""What the supervisor keeps of its children: one ``ChildSlot`` per role and slot, and its own
``State`` with the transitions allowed between states. Read by the supervisor (which changes
them) and by the views (which only read them)."""

from __future__ import annotations

import enum
from typing import Iterable

from .. import frames


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    DRAINED = "drained"
    STOPPING = "stopping"


TRANSITIONS = {
    State.STARTING: {State.RUNNING, State.DRAINING, State.STOPPING},
    State.RUNNING: {State.DRAINING, State.STOPPING},
    State.DRAINING: {State.DRAINED, State.RUNNING, State.STOPPING},
    State.DRAINED: {State.RUNNING, State.STOPPING, State.DRAINING},
    State.STOPPING: set(),
}


class ChildSlot:
    """One role/slot the supervisor keeps filled, across incarnations of its process."""

    def __init__(self, role: str, slot: int, cpu: int | None) -> None:
        self.role = role
        self.slot = slot
        self.cpu = cpu
        self.pid: int | None = None
        self.started_at = 0.0
        self.last_heartbeat: float | None = None
        self.beat: frames.Heartbeat | None = None
        self.restarts = 0
        self.failures = 0  # consecutive short runs: the restart backoff
        self.crashes = 0  # the same, but not counting exits for an unreachable store: the crash-loop fatal
        self.start_after = 0.0
        self.retired = False
        self.killed = False  # SIGKILLed as stuck, not yet reaped
        self.last_exit = ""

    @property
    def name(self) -> str:
        return self.role if self.role != "worker" else f"worker-{self.slot}"


def slot_of(slots: Iterable[ChildSlot], role: str) -> ChildSlot | None:
    """The live (not retired) slot of a one-slot role: scheduler or publisher."""
    return next((s for s in slots if s.role == role and not s.retired), None)
