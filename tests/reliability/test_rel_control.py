"""The daemon's own sockets under attack during ingest, and the control plane's privacy.

Malformed, truncated, mistyped and oversized frames on every ipc socket and garbage (or silence)
on the control socket cost nothing: no process, no message, no stall of the supervisor. The
runtime directory and every socket in it belong to the daemon's user alone (another local user,
``nobody`` here, cannot connect), and no password of the run appears in any output.
"""

from __future__ import annotations

import errno
import math
import os
import pwd
import random
import socket
import stat
import time
import uuid

import msgspec
import pytest
import zmq
from harness import Daemon, wait_until
from reliability_kit import (
    Ledger,
    accounts_for,
    assert_no_secrets,
    audit,
    pick,
    restarts,
)

from mailingestd import frames
from devtools.devservers import Dovecot

pytestmark = pytest.mark.reliability


def hostile_frames(rng: random.Random, account_id: str) -> list[bytes]:
    valid = frames.encode(frames.Poll(account_id="nobody-knows", order_id=-1, may_connect=True))
    out = [rng.randbytes(rng.randint(0, 300)) for _ in range(pick(100, 1000))]
    out += [valid[:n] for n in range(len(valid))]  # every truncation of a valid frame
    out += [msgspec.msgpack.encode({"type": "Heartbeat", "role": 7}),  # right tag, wrong types
            msgspec.msgpack.encode({"type": "NoSuchFrame"}),
            msgspec.msgpack.encode([1, 2, 3]),
            frames.encode(frames.Heartbeat(role="worker", slot=99, pid=1, state="x")),  # nobody's slot
            frames.encode(frames.Result(slot=0, account_id="ghost", order_id=10**12, ok=True, connected=True,
                                        idling=True))]
    # Well-formed results for a real account with numbers no worker sends: one must never take the
    # scheduler down (a restart would meet the same account again: a crash loop, exit 70).
    out += [frames.encode(frames.Result(slot=0, account_id=account_id, order_id=0, ok=ok, connected=False,
                                        idling=False, new_messages=2**64 - 1, retry_after=retry_after,
                                        failure_kind=None if ok else frames.FailureKind.THROTTLED))
            for ok in (True, False) for retry_after in (None, math.inf, math.nan, -1e300, 1e300)]
    return out


def test_malformed_frames_and_control_garbage_during_ingest(dovecot, users4, tmp_path):
    rng = random.Random()
    ledger = Ledger(dovecot, users4, "frames")
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users4), password=dovecot.password) as daemon:
        appender = ledger.background(rate=20)
        ctx = zmq.Context()
        sockets = sorted(p.name for p in daemon.runtime_dir.iterdir() if p.name.endswith(".sock")
                         and p.name != "control.sock")
        assert {"scheduler.sock", "supervisor.sock", "worker-0.sock"} <= set(sockets)
        for name in sockets:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 2000)
            push.connect(f"ipc://{daemon.runtime_dir / name}")
            for data in hostile_frames(rng, users4[0]):
                push.send(data)
            push.send(b"\0" * (frames.MAX_FRAME_BYTES + 1))  # over the receiver's MAXMSGSIZE
            push.close()
        ctx.term()
        control = str(daemon.runtime_dir / "control.sock")
        silent = []
        for _ in range(pick(8, 32)):  # clients that connect and never say a word
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(control)
            silent.append(sock)
        garbage = [b"\x00garbage{{{\n", b"{\"type\": \"NoSuchCommand\"}\n", b"[]\n", b"\xff\xfe\n",
                   b"x" * (1024 * 1024), b"{\"type\": \"Status\"" + b" " * 70000 + b"}\n"]
        for data in garbage:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(control)
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    reply = sock.recv(4096)
                except OSError:
                    reply = b'"ok":false'  # hung up on: just as good
            assert b'"ok":false' in reply or reply == b"", (data[:40], reply)
        answered = time.monotonic()
        status = daemon.status()  # the silent clients do not hold the supervisor up
        assert time.monotonic() - answered < 5, "status answers promptly beside silent clients"
        for sock in silent:
            sock.close()
        recovered_from = time.monotonic()
        time.sleep(2)
        appender.stop()
        audit(daemon, ledger, "malformed ipc frames, control garbage", len(sockets) + len(garbage) + len(silent),
              recovered_from=recovered_from)
        status = daemon.status()
        assert status["supervisor"]["state"] == "running"
        assert not any(restarts(daemon).values()), f"a bad frame cost a process: {restarts(daemon)}"
        assert daemon.stop() == 0


@pytest.fixture
def users4(dovecot):
    return [dovecot.new_user() for _ in range(4)]


def connect_as_nobody(paths: list[str]) -> dict[str, int]:
    """In a forked child running as ``nobody``: errno of connecting to each Unix socket (0 = connected)."""
    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        results = []
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            for path in paths:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(2)
                try:
                    sock.connect(path)
                    results.append(0)
                except OSError as exc:
                    results.append(exc.errno or -1)
                finally:
                    sock.close()
            os.write(write_fd, msgspec.json.encode(results))
        finally:
            os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    return dict(zip(paths, msgspec.json.decode(data)))


def test_control_plane_is_private_and_secrets_stay_secret(tmp_path):
    run = uuid.uuid4().hex
    password = f"imap-{run}"
    added_password = f"added-{run}"
    server = Dovecot(tmp_path / "dovecot", users=0, password=password)
    server.start()
    try:
        users = [server.new_user() for _ in range(2)]
        ledger = Ledger(server, users, "private")
        with Daemon(tmp_path / "d", accounts=accounts_for(server, users), password=password) as daemon:
            secret_file = daemon.root / "secrets" / "added.pw"  # where the configuration allows secrets
            secret_file.parent.mkdir(mode=0o700, exist_ok=True)
            secret_file.write_text(added_password + "\n")
            secret_file.chmod(0o600)
            daemon.ctl("account", "add", "added", "--host", server.host, "--port", str(server.port), "--tls", "none",
                       "--username", server.new_user(), "--password-file", str(secret_file))
            ledger.append(6)
            audit(daemon, ledger, "control plane: private, no secrets", 0)
            run_dir = daemon.runtime_dir
            st = run_dir.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o700), oct(st.st_mode)
            paths = sorted(run_dir.iterdir())
            for path in paths:
                mode = stat.S_IMODE(path.lstat().st_mode)
                assert path.lstat().st_uid == os.geteuid() and mode & 0o077 == 0, (path.name, oct(mode))
            sockets = [str(p) for p in paths if p.is_socket()]
            assert str(run_dir / "control.sock") in sockets and len(sockets) >= 4
            results = connect_as_nobody(sockets)
            assert all(code in (errno.EACCES, errno.EPERM) for code in results.values()), results
            # "added" logs in with a password Dovecot refuses: its failure is in the log and status.
            wait_until(lambda: any("account=added " in e for e in daemon.status()["errors"]), 60, 0.5,
                       "the refused login of 'added' reported")
            assert_no_secrets(daemon, [password, added_password])
            assert daemon.stop() == 0
            log = daemon.log_path.read_text(errors="replace")
            assert password not in log and added_password not in log
    finally:
        server.stop()
