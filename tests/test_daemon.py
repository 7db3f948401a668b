"""The multiprocess daemon against real servers: processes, restarts, drain, reload, sd_notify, metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
import urllib.request

import pytest

from harness import Daemon, account_toml, established_connections, wait_until
from mailingestd import frames


def accounts_for(dovecot, users, **extra) -> str:
    return "".join(account_toml(u, dovecot.host, dovecot.port, **extra) for u in users)


@pytest.fixture
def users(dovecot):
    return [dovecot.new_user() for _ in range(4)]


def append_numbered(dovecot, users, start, count, tag):
    for n in range(start, start + count):
        dovecot.append(users[n % len(users)], f"Message-ID: <{tag}-{n}@t>\r\nSubject: {n}\r\n\r\nbody\r\n".encode())


def message_ids(daemon):
    rows = daemon.query("SELECT message_id FROM messages")
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a message was stored twice"
    return set(ids)


def test_children_pinned_and_status_reports_everything(dovecot, users, tmp_path):
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password) as daemon:
        append_numbered(dovecot, users, 0, 4, "st")
        daemon.wait_stored(4)
        status = wait_until(lambda: (s := daemon.status())["traffic"]["idle_connections"] == 4 and s, 20,
                            what="4 idling connections")
        workers = [c for c in status["children"] if c["role"] == "worker"]
        assert len(workers) == 2 and [c["role"] for c in status["children"]].count("scheduler") == 1
        usable = sorted(os.sched_getaffinity(0))
        for child in workers:
            assert os.sched_getaffinity(child["pid"]) == {child["cpu"]}
            assert child["cpu"] in usable and child["heartbeat_age"] < 3 and child["rss_bytes"] > 0
        assert {c["cpu"] for c in workers} == set(usable[:2])
        assert status["accounts"]["total"] == 4
        wait_until(lambda: daemon.status()["accounts"]["by_state"].get("idling") == 4, 10,
                   what="the scheduler to see all 4 idling")
        server = status["servers"][dovecot.host]
        assert server["connections"] == 4 and server["limit"] == 100
        assert status["traffic"]["messages_total"] == 4
        assert status["supervisor"]["state"] == "running" and status["supervisor"]["pid"] == daemon.proc.pid
        text = daemon.ctl("status").stdout
        assert "PROCESSES" in text and "worker" in text and dovecot.host in text


def process_started_at(pid: int) -> float:
    """When the process started, on the CLOCK_BOOTTIME scale (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("role", ["worker", "scheduler", "publisher"])
def test_sigkill_of_a_child_restarts_it_and_loses_nothing(dovecot, users, tmp_path, role, request):
    sections = ""
    if role == "publisher":
        moto = request.getfixturevalue("moto")
        queue = request.getfixturevalue("sqs_fifo_queue")
        sections = f'[queue]\nkind = "sqs"\nurl = "{queue}"\nendpoint_url = "{moto.endpoint_url}"\n'
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password,
                sections=sections) as daemon:
        append_numbered(dovecot, users, 0, 8, role)
        daemon.wait_stored(8)
        victim = daemon.children(role)[0]
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.clock_gettime(time.CLOCK_BOOTTIME)
        append_numbered(dovecot, users, 8, 8, role)
        replaced = wait_until(lambda: [c for c in daemon.children(role) if c["slot"] == victim["slot"]
                                       and c["pid"] not in (None, victim["pid"])], 5, 0.05, f"a new {role}")
        # Measured on the kernel's clock: when the new process started, not when status was read.
        assert process_started_at(replaced[0]["pid"]) - killed_at < 2.0, "restart within 2 s"
        assert replaced[0]["restarts"] == 1
        daemon.wait_stored(16, timeout=40)
        assert message_ids(daemon) == {f"<{role}-{n}@t>" for n in range(16)}
        if role == "publisher":
            wait_until(lambda: daemon.status()["outbox"]["depth"] == 0, 30, 0.5, "the outbox to drain")


def test_stuck_child_is_detected_and_replaced(dovecot, users, tmp_path):
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password,
                heartbeat_timeout="3s") as daemon:
        victim = daemon.children("worker")[0]
        os.kill(victim["pid"], signal.SIGSTOP)
        wait_until(lambda: [c for c in daemon.children("worker") if c["slot"] == victim["slot"]
                            and c["pid"] not in (None, victim["pid"])], 15, 0.2, "the stuck worker replaced")
        append_numbered(dovecot, users, 0, 4, "stuck")
        daemon.wait_stored(4, timeout=40)


def test_drain_closes_every_connection_and_resume_brings_ingest_back(dovecot, users, tmp_path):
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password) as daemon:
        append_numbered(dovecot, users, 0, 4, "dr")
        daemon.wait_stored(4)
        wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 4, 20, what="idling")
        assert established_connections(dovecot.port) >= 4
        out = daemon.ctl("drain", "--wait", "--timeout", "30").stdout
        assert "drained" in out and "accounts were in flight" in out
        assert daemon.status()["supervisor"]["state"] == "drained"
        wait_until(lambda: established_connections(dovecot.port) == 0, 5, what="no IMAP connection left")
        append_numbered(dovecot, users, 4, 4, "dr")
        time.sleep(2)
        assert len(daemon.stored_keys()) == 4, "nothing is ingested while drained"
        checkpoints = dict(daemon.query("SELECT account_id, last_uid FROM mailboxes"))
        assert checkpoints == {u: 1 for u in users}, "every checkpoint committed"
        daemon.ctl("resume")
        daemon.wait_stored(8, timeout=30)
        assert message_ids(daemon) == {f"<dr-{n}@t>" for n in range(8)}


def test_sigterm_drains_then_exits_zero(dovecot, users, tmp_path):
    daemon = Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password).start()
    try:
        wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 4, 20, what="idling")
        assert daemon.stop(signal.SIGTERM) == 0
        assert established_connections(dovecot.port) == 0
        assert "event=stopped exit=0" in daemon.log_tail()
    finally:
        daemon.kill()


def test_sighup_reload_picks_up_a_new_account_without_restart(dovecot, users, tmp_path):
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users[:2]), password=dovecot.password) as daemon:
        pids = sorted(c["pid"] for c in daemon.status()["children"])
        text = daemon.config_path.read_text() + accounts_for(dovecot, users[2:3])
        daemon.config_path.write_text(text)
        dovecot.append(users[2], b"Message-ID: <hup@t>\r\n\r\nnew account\r\n")
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_until(lambda: "<hup@t>" in message_ids(daemon), 20, what="the new account's mail")
        assert sorted(c["pid"] for c in daemon.status()["children"]) == pids, "no process was restarted"
        good = daemon.config_path.read_text()
        daemon.config_path.write_text(good.replace("workers = 2", 'workers = "many"'))
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_until(lambda: "event=reload_failed" in daemon.log_tail(), 10, what="the reload refused")
        assert "daemon.workers" in daemon.log_tail() and daemon.proc.poll() is None
        daemon.config_path.write_text(good)
        assert daemon.status()["supervisor"]["state"] == "running", "a bad file keeps the running configuration"
        assert sorted(c["pid"] for c in daemon.status()["children"]) == pids


def test_second_daemon_on_same_runtime_dir_refuses(tmp_path):
    with Daemon(tmp_path) as first:
        second = Daemon(tmp_path / "second", runtime_dir=first.runtime_dir)
        second.start(wait=False)
        assert second.proc.wait(20) == 78
        assert "another mailingestd" in second.log_tail()
        assert first.status()["supervisor"]["state"] == "running"


def test_malformed_frames_and_control_garbage_are_dropped(tmp_path):
    import zmq

    with Daemon(tmp_path) as daemon:
        ctx = zmq.Context()
        for name in ("scheduler.sock", "worker-0.sock", "supervisor.sock"):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(f"ipc://{daemon.runtime_dir / name}")
            push.send(b"\xc1not msgpack")
            push.send(frames.encode(frames.Heartbeat(role="worker", slot=99, pid=1, state="x")))
            push.close()
        ctx.term()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(daemon.runtime_dir / "control.sock"))
            sock.sendall(b"\x00garbage{{{\n")
            reply = sock.recv(4096)
        assert b'"ok":false' in reply
        time.sleep(2)
        status = daemon.status()
        assert all(c["restarts"] == 0 for c in status["children"]), "a bad frame never costs a process"
        prom = (daemon.metrics_dir / "mailingestd.prom").read_text()
        dropped = {line.split("}")[0].split('"')[1]: float(line.split()[-1]) for line in prom.splitlines()
                   if line.startswith("mailingestd_frames_dropped_total{")}
        assert dropped.get("scheduler", 0) >= 1 and dropped.get("worker", 0) >= 1, dropped


def test_runtime_dir_and_sockets_are_private(tmp_path):
    with Daemon(tmp_path) as daemon:
        assert daemon.runtime_dir.stat().st_mode & 0o777 == 0o700
        for path in daemon.runtime_dir.iterdir():
            if path.is_socket():
                assert path.stat().st_mode & 0o077 == 0, f"{path.name} is reachable by others"


def test_sd_notify_ready_status_watchdog_and_stopping(dovecot, users, tmp_path):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    daemon = Daemon(tmp_path / "d", accounts=accounts_for(dovecot, users[:1]), password=dovecot.password,
                    env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"})
    received: list[str] = []

    def drain_socket(seconds: float) -> list[str]:
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            try:
                got += sock.recv(4096).decode().split("\n")
            except socket.timeout:
                pass
        received.extend(got)
        return got

    try:
        daemon.start(wait=False)
        wait_until(lambda: "READY=1" in (drain_socket(0.5) and received), 30, what="READY=1")
        assert any(m.startswith("STATUS=") for m in received)
        assert drain_socket(2.5).count("WATCHDOG=1") >= 3
        scheduler = daemon.children("scheduler")[0]["pid"]
        os.kill(scheduler, signal.SIGSTOP)
        try:
            drain_socket(2.5)  # health is judged on heartbeats: give the old ones time to age
            assert "WATCHDOG=1" not in drain_socket(2.0), "no keep-alive while the scheduler is frozen"
        finally:
            with contextlib.suppress(ProcessLookupError):  # the supervisor may have replaced it by now
                os.kill(scheduler, signal.SIGCONT)
        assert "WATCHDOG=1" in drain_socket(6.0), "keep-alives resume"
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "STOPPING=1" in (drain_socket(0.5) and received), 20, what="STOPPING=1")
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.kill()
        sock.close()


def test_metrics_scraped_by_node_exporter(dovecot, users, tmp_path, node_exporter):
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users[:2]), password=dovecot.password) as daemon:
        append_numbered(dovecot, users[:2], 0, 2, "prom")
        daemon.wait_stored(2)
        exporter = node_exporter(daemon.metrics_dir)
        def scraped():
            text = exporter.scrape()
            return re.search(r"^mailingestd_messages_ingested_total(\{[^}]*\})? 2(\.0)?$", text, re.M) and text
        text = wait_until(scraped, 15, 0.5, "the daemon's series through node_exporter")
        assert re.search(r'^mailingestd_children\{role="worker"\} 2(\.0)?$', text, re.M)
        for name in ("mailingestd_polls_total",
                     "mailingestd_accounts{", "mailingestd_memory_bytes", "mailingestd_build_info"):
            assert name in text, name
        assert 'server="127.0.0.1"' in text
        assert dovecot.password not in text


def test_http_health_and_metrics(tmp_path):
    port = _free_port()
    daemon = Daemon(tmp_path / "h")
    text = daemon.config_path.read_text().replace('interval = "1s"', f'interval = "1s"\nhttp_listen = "127.0.0.1:{port}"')
    daemon.config_path.write_text(text)
    with daemon:
        health = wait_until(lambda: _get(f"http://127.0.0.1:{port}/health"), 10, what="/health")
        assert health == (200, b"ok\n")
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"mailingestd_build_info" in body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except OSError:
        return None
