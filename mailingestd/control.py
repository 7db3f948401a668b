"""The control protocol between mailingestctl and the supervisor, request and reply side by side.

Transport: one JSON object per line over the Unix stream socket ``control.sock`` in runtime_dir
(mode 0600, or 0660 to ``daemon.control_group``). Each command is a class whose docstring is its
help text; the supervisor implements ``handle_<name>``. Anything that is not a known request gets
one error reply and the connection is closed; it never reaches the daemon's logic. The ``status``
reply's data is a ``StatusReply`` (daemon/view.py builds it, mailingestctl reads it typed).

Who may ask what is checked on the peer's credentials (``SO_PEERCRED``, ``SO_PEERGROUPS``), not
only on the socket's mode: ``status`` for root, the daemon's user and members of
``daemon.control_group``; ``drain``, ``resume`` and ``reload`` for root and the daemon's user only
(:func:`authorize`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

MAX_REQUEST_BYTES = 64 * 1024


class Request(msgspec.Struct, tag_field="command", forbid_unknown_fields=True):
    """A control request; the tag (``command``) names it on the wire."""


class Status(Request, tag="status"):
    """Everything the supervisor knows now: processes, accounts, servers, traffic, errors."""


class Drain(Request, tag="drain"):
    """Stop starting new work, finish what is in flight, commit, LOGOUT every connection."""

    exit: bool = False


class Resume(Request, tag="resume"):
    """Undo a drain: accounts are scheduled again."""


class Reload(Request, tag="reload"):
    """Re-read the configuration (same as SIGHUP)."""


class Reply(msgspec.Struct):
    ok: bool
    error: str | None = None
    data: dict[str, Any] = {}


AnyRequest = Status | Drain | Resume | Reload
READ_ONLY = (Status,)  # what daemon.control_group may ask


# --- the status reply -----------------------------------------------------------------------------
# What ``status`` answers (built by daemon/view.py, printed by mailingestctl). ``mailingestctl
# status --json`` prints it as it came: a public output, so these fields, their nesting and their
# values are that JSON's shape. A server's capacity fields are there only for servers the
# scheduler reports capacity for (UNSET: left out of the JSON).
class SupervisorStatus(msgspec.Struct):
    pid: int
    version: str
    state: str
    uptime: float
    node_id: str
    store: str
    memory_bytes: int
    memory_budget: int


class ChildStatus(msgspec.Struct):
    role: str
    slot: int
    pid: int | None
    cpu: int | None
    state: str
    rss_bytes: int
    restarts: int
    heartbeat_age: float | None
    last_exit: str | None


class AccountsStatus(msgspec.Struct):
    total: int
    by_state: dict[str, float]
    by_priority: dict[str, float]


class ServerStatus(msgspec.Struct):
    connections: float
    limit: float | None
    waiting: float
    # ServerCapacity's fields, for servers the scheduler reports capacity for.
    holding: int | UnsetType = UNSET
    rotating: int | UnsetType = UNSET
    logins_last_minute: int | UnsetType = UNSET
    logins_allowed: int | UnsetType = UNSET
    polls_needed: float | UnsetType = UNSET
    polls_possible: float | UnsetType = UNSET
    late: dict[str, int] | UnsetType = UNSET
    deficit: str | None | UnsetType = UNSET


class TrafficStatus(msgspec.Struct):
    polls_total: float
    messages_total: float
    polls_last_minute: float
    messages_last_minute: float
    idle_connections: int
    lag_p50: float | None
    lag_p99: float | None


class OutboxStatus(msgspec.Struct):
    enabled: bool
    depth: int
    parked: int
    published_total: float
    oldest_age: float
    publish_rate: float
    node_id: str
    publish_errors_total: float
    publisher_state: str | None


class DrainStatus(msgspec.Struct):
    in_flight_accounts: int
    in_flight_messages: int


class StatusReply(msgspec.Struct):
    supervisor: SupervisorStatus
    children: list[ChildStatus]
    accounts: AccountsStatus
    servers: dict[str, ServerStatus]
    traffic: TrafficStatus
    outbox: OutboxStatus
    drain: DrainStatus
    cluster: dict[str, Any]  # store.leases.cluster_status: the scheduler's lease view, as it sent it
    stuck_folders: list[str]
    errors: list[str]


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; not named by Python 3.11


class Peer(msgspec.Struct, frozen=True):
    """The process at the other end of a control connection, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:  # an old kernel, or more than 256 groups: the primary group only
        groups = ()
    return Peer(pid=pid, uid=uid, gid=gid, groups=tuple(groups))


def authorize(request: Request, peer: Peer, control_gid: int | None, daemon_uid: int | None = None) -> str | None:
    """None when ``peer`` may send ``request``, else the refusal sent back."""
    daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
    if peer.uid in (0, daemon_uid):
        return None
    name = type(request).__name__.lower()
    in_group = control_gid is not None and (peer.gid == control_gid or control_gid in peer.groups)
    if isinstance(request, READ_ONLY) and in_group:
        return None
    allowed = "root, the daemon's user or daemon.control_group" if isinstance(request, READ_ONLY) \
        else "root or the daemon's user"
    return f"permission denied: {name} is for {allowed} (uid {peer.uid} is neither)"


_request_decoder = msgspec.json.Decoder(AnyRequest)


def decode_request(line: bytes) -> AnyRequest | str:
    """The request, or a one-line error for garbage."""
    try:
        return _request_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return f"bad request: {exc}"


def _enc_hook(value: Any) -> Any:
    if isinstance(value, (int, float)):  # config.Duration and config.Size
        return float(value) if isinstance(value, float) else int(value)
    raise NotImplementedError(type(value))


def encode_reply(reply: Reply) -> bytes:
    return msgspec.json.encode(reply, enc_hook=_enc_hook) + b"\n"


class DaemonUnreachable(Exception):
    """No daemon answers on the control socket (exit 69)."""


def call(runtime_dir: str, request: Request, timeout: float = 5.0) -> Reply:
    """Send one request to the supervisor and wait for its reply."""
    path = Path(runtime_dir) / "control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(msgspec.json.encode(request) + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    except FileNotFoundError:
        raise DaemonUnreachable(f"mailingestd is not running (no control socket at {path})") from None
    except ConnectionRefusedError:
        raise DaemonUnreachable(f"mailingestd is not running (nothing listens on {path})") from None
    except PermissionError:
        raise DaemonUnreachable(f"permission denied on {path} (run as the mailingestd user or its group)") from None
    except socket.timeout:
        raise DaemonUnreachable(f"mailingestd did not answer on {path} within {timeout:g}s") from None
    finally:
        sock.close()
    try:
        return msgspec.json.decode(b"".join(chunks), type=Reply)
    except msgspec.DecodeError:
        raise DaemonUnreachable(f"mailingestd sent an unreadable reply on {path}") from None


def status_of(reply: Reply) -> StatusReply:
    """The typed status from a ``status`` reply."""
    return msgspec.convert(reply.data, StatusReply)


def pretty(data: dict[str, Any]) -> str:
    # ensure_ascii: control characters in server text (recent errors) come out as \u001b, inert.
    return json.dumps(data, indent=2, sort_keys=True)
