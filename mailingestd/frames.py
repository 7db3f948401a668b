"""Every frame the daemon's processes exchange, in one screen (msgspec msgpack, tagged Structs).

Sockets (all ZeroMQ PUSH/PULL over ``ipc://`` in runtime_dir, mode 0700):

    scheduler.sock   PULL bound by the scheduler   <- workers (Result, NewMail, WorkerReady, Drained)
                                                   <- supervisor (Control)
    worker-N.sock    PULL bound by worker slot N   <- scheduler (Assign, Poll, Drain, Resume)
    supervisor.sock  PULL bound by the supervisor  <- every child (Heartbeat)

PUSH/PULL cannot address one peer, so each worker has its own PULL; in-flight polls are bounded
by credits the scheduler keeps per worker, not by ZeroMQ's high-water mark. A frame that does
not decode is counted and dropped by the receiver (``decode`` returns None).
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec

from .config import AccountConfig


class FailureKind(enum.StrEnum):
    """Why a job failed: one vocabulary for the IMAP edge, the worker, the scheduler and the planner.

    What the scheduler does with each (``Scheduler.on_result``, whatever started the job):

    ``NETWORK``: connection refused, reset or closed, or the server said BYE: back off, reconnect.
    ``TIMEOUT``: the server went silent or answered too slowly: drop the connection, back off.
    ``TLS``: handshake or certificate verification failed, or the server wants TLS for login:
    a configuration problem, retrying soon will not help.
    ``AUTH``: the credentials were refused: counts towards the account's circuit breaker.
    ``THROTTLED``: the provider limits this account or client (rate, bandwidth, simultaneous
    connections): wait ``retry_after`` when given, otherwise back off; open fewer connections.
    ``SERVER_BUSY``: the server is temporarily unavailable for everyone: back off and retry.
    ``MAILBOX``: a folder does not exist or may not be read: a per-folder configuration problem.
    ``PROTOCOL``: the server broke IMAP or our limits (garbage, oversized line or literal,
    unexpected reply): back off long and make it visible.
    ``REAUTH``: the OAuth2 provider refused the refresh token: only a person can fix it
    (``reauth_required``, no retries until the credentials change).
    ``DISCONNECTED``, ``DRAINING``, ``UNASSIGNED``: not the account's fault (no connection to use
    and no grant to open one, the worker is draining, the account moved): due again at once.
    """

    NETWORK = "network"
    TIMEOUT = "timeout"
    TLS = "tls"
    AUTH = "auth"
    THROTTLED = "throttled"
    SERVER_BUSY = "server_busy"
    MAILBOX = "mailbox"
    PROTOCOL = "protocol"
    REAUTH = "reauth"
    DISCONNECTED = "disconnected"
    DRAINING = "draining"
    UNASSIGNED = "unassigned"


NOT_THE_ACCOUNTS_FAULT = frozenset({FailureKind.DISCONNECTED, FailureKind.DRAINING, FailureKind.UNASSIGNED})


class Trigger(enum.StrEnum):
    """What started a worker job. Every trigger runs the same job and reports the same Result."""

    ORDER = "order"            # a Poll from the scheduler
    PUSH = "push"              # IDLE or NOTIFY announced new mail (in the folders it named)
    RENEWAL = "renewal"        # IDLE renewal or keepalive probe answered: every folder is checked
    CONNECTION = "connection"  # the worker's loop found the connection broken


class Frame(msgspec.Struct, tag=True, kw_only=True):
    pass


# --- scheduler -> worker ------------------------------------------------------------------------
class Assign(Frame):
    """The complete set of accounts this worker slot owns now (replaces any earlier set).

    ``secrets``: per account, its stored secrets as ciphertexts (the worker holds the key).
    """

    accounts: list[AccountConfig]
    secrets: dict[str, dict[str, str]] = {}


class Poll(Frame):
    """Check the account now. ``may_connect``: a connection slot and a token were granted.
    ``release``: others wait on this server's connection cap, so log out after this poll
    (connections are time-shared instead of held by the first accounts forever)."""

    account_id: str
    order_id: int
    may_connect: bool
    release: bool = False


class Drain(Frame):
    """Finish in-flight batches, commit, LOGOUT every connection, then answer Drained."""


class Resume(Frame):
    """Undo a drain: accept orders again."""


# --- worker -> scheduler ------------------------------------------------------------------------
class WorkerReady(Frame):
    """A worker started. ``incarnation``: how many times its slot was restarted before (0 = first)."""

    slot: int
    pid: int
    incarnation: int = 0


class Result(Frame):
    """The outcome of one job, whatever started it (``trigger``; ``order_id`` > 0 for an order).

    ``watches_all``: while idling, the server pushes news for every configured folder (NOTIFY,
    or IDLE on the account's only folder); otherwise the other folders need polls at the tier
    interval. ``missing_folders``: configured folders the server does not have (the others go on).
    """

    slot: int
    account_id: str
    order_id: int
    ok: bool
    connected: bool
    idling: bool
    trigger: Trigger = Trigger.ORDER
    watches_all: bool = True
    new_messages: int = 0  # arrivals; a first sync's backlog is not counted (it is not a burst of mail)
    new_bytes: int = 0
    failure_kind: FailureKind | None = None
    detail: str | None = None
    retry_after: float | None = None
    uidvalidity_changed: bool = False
    missing_folders: list[str] = []


class NewMail(Frame):
    """Mail seen and committed through IDLE (no order involved); feeds adaptive priority."""

    slot: int
    account_id: str
    count: int


class Drained(Frame):
    slot: int
    in_flight_accounts: int
    in_flight_messages: int


# --- supervisor -> scheduler --------------------------------------------------------------------
class Control(Frame):
    """``command``: drain, resume, reload; ``workers`` is the slot count after a reload."""

    command: str
    workers: int = 0


# --- every child -> supervisor ------------------------------------------------------------------
class ChildStats(msgspec.Struct, tag=True, kw_only=True):
    """A role's numbers in its Heartbeat: one Struct per role, so that a number the supervisor
    reads and no child sends is a type error, not a gauge stuck at 0. Counters are cumulative
    since the child started; ``frames_dropped`` and ``pss_bytes`` (the child's own proportional
    set size: children are not dumpable, so the supervisor cannot read it) are filled in by
    ``child.Child.heartbeat``."""

    frames_dropped: int = 0
    pss_bytes: int = 0


class SchedulerStats(ChildStats):
    accounts: int
    in_flight: int
    uidvalidity_changes: int
    drain_in_flight_accounts: int
    drain_in_flight_messages: int


class WorkerStats(ChildStats):
    messages_ingested: int
    bytes_ingested: int
    idle_connections: int
    accounts: int
    busy: int
    last_ingest: float  # Unix time this worker last stored a message (within a heartbeat); 0: not yet
    stuck_folders: int  # folders halted below a message over imap.max_message_size
    uids_vanished: int  # UIDs settled as expunged: missing from the size reply, or BODY[] NIL
    oversize_skipped: int  # messages stored without their body (imap.oversize = "skip")


class PublisherStats(ChildStats):
    published: int
    publish_errors: int
    outbox_depth: int
    parked: int  # outbox entries that failed publisher.PARK_AFTER times (still retried)
    outbox_oldest_age: float = 0.0  # seconds the oldest outbox row has waited (0: empty)
    publish_rate: float = 0.0  # envelopes this node's publisher had acknowledged per second, last minute


AnyStats = Union[SchedulerStats, WorkerStats, PublisherStats]


class Heartbeat(Frame):
    """Sent every heartbeat_interval.

    ``stats`` carries the role's numbers, ``histograms`` and ``labeled`` its histogram buckets
    and bounded-label counters, ``errors`` the most recent distinct error lines; all are bounded
    by the sender. A heartbeat without ``stats`` comes from no child of ours.
    """

    role: str
    slot: int
    pid: int
    state: str
    stats: AnyStats | None = None
    histograms: dict[str, list[float]] = {}
    labeled: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    detail: dict[str, str] = {}


AnyFrame = Union[Assign, Poll, Drain, Resume, WorkerReady, Result, NewMail, Drained, Control, Heartbeat]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyFrame)
MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode(frame: Frame) -> bytes:
    return _encoder.encode(frame)


def decode(data: bytes) -> AnyFrame | None:
    """The frame, or None for bytes that are not one of ours (the caller counts the drop)."""
    if len(data) > MAX_FRAME_BYTES:
        return None
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
