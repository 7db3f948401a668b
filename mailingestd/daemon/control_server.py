"""The supervisor's side of control.sock: accept, read one request line, check who asks, answer.

The protocol (requests, replies, who may ask what) is ``mailingestd/control.py``; what a request
does is the supervisor's (``handle(request)``). Everything here runs on the supervisor's loop and
never blocks it: a connection waits in ``clients`` until its whole request line has arrived, read
without blocking each turn, so a client that connects and says nothing (or dribbles) costs a
slot for CLIENT_TIMEOUT, never a stall. At most MAX_CLIENTS wait at once.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from .. import control
from ..config import Config

log = logging.getLogger(__name__)

MAX_CLIENTS = 32
CLIENT_TIMEOUT = 5.0
SOCKET_NAME = "control.sock"


class ControlServer:
    def __init__(self, config: Config, handle: Callable[[control.AnyRequest], control.Reply]) -> None:
        self.config = config  # the supervisor replaces it on reload (daemon.control_group)
        self.handle = handle
        self.sock: socket.socket | None = None
        self.clients: dict[socket.socket, tuple[float, bytes]] = {}  # connection -> (deadline, bytes so far)

    @property
    def path(self) -> Path:
        return Path(self.config.daemon.runtime_dir) / SOCKET_NAME

    def open(self) -> socket.socket:
        """Bind control.sock: 0600, or 0660 to daemon.control_group."""
        path = self.path
        if path.exists():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if self.config.daemon.control_group:
            try:
                os.chown(path, -1, grp.getgrnam(self.config.daemon.control_group).gr_gid)
                os.chmod(path, 0o660)
            except (KeyError, OSError) as exc:
                log.error("event=control_group_failed group=%s error=%s", self.config.daemon.control_group, exc)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
        self.sock = sock
        return sock

    def close_in_child(self) -> None:
        """A forked child keeps no descriptor of the listening socket."""
        if self.sock is not None:
            self.sock.close()

    def remove(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass

    def serve(self) -> None:
        """Answer mailingestctl requests; each gets one reply, garbage gets an error."""
        assert self.sock is not None
        now = time.monotonic()
        while len(self.clients) < MAX_CLIENTS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            conn.setblocking(False)
            self.clients[conn] = (now + CLIENT_TIMEOUT, b"")
        for conn, (deadline, buf) in list(self.clients.items()):
            try:
                while b"\n" not in buf and len(buf) <= control.MAX_REQUEST_BYTES:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
            except BlockingIOError:
                if now < deadline:
                    self.clients[conn] = (deadline, buf)
                    continue
            except OSError:
                pass
            del self.clients[conn]
            with conn:
                self.answer(conn, buf)

    def answer(self, conn: socket.socket, buf: bytes) -> None:
        line = buf.split(b"\n", 1)[0] if len(buf) <= control.MAX_REQUEST_BYTES else None
        request = control.decode_request(line) if line is not None else "request too long"
        refused = request if isinstance(request, str) else self.refusal(conn, request)
        reply = control.Reply(ok=False, error=refused) if refused else self.dispatch(request)
        try:
            conn.settimeout(2.0)
            conn.sendall(control.encode_reply(reply))
        except OSError as exc:
            log.warning("event=control_client_error error=%s", exc)

    def refusal(self, conn: socket.socket, request: control.AnyRequest) -> str | None:
        """The socket's mode lets daemon.control_group connect; what each peer may ask is decided
        on its kernel credentials (control.authorize)."""
        try:
            peer = control.peer_of(conn)
        except OSError:
            return "permission denied: no peer credentials"
        group = self.config.daemon.control_group
        try:
            gid = grp.getgrnam(group).gr_gid if group else None
        except KeyError:
            gid = None
        refused = control.authorize(request, peer, gid)
        if refused:
            log.warning("event=control_refused command=%s uid=%d pid=%d", type(request).__name__.lower(), peer.uid,
                        peer.pid)
        return refused

    def dispatch(self, request: control.AnyRequest) -> control.Reply:
        try:
            return self.handle(request)
        except Exception as exc:  # a control request must never take the supervisor down
            log.exception("event=control_failed command=%s", type(request).__name__.lower())
            return control.Reply(ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
