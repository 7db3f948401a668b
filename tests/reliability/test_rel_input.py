"""Bad input into a running daemon: hostile mail, hostile servers, wrong credentials, bad certificates.

Every bad message is stored byte for byte (it is mail; consumers decide), every bad server or
credential costs a connection and one clear error line, never a process, and none of it holds up
the well-behaved accounts beside it. No password of the run shows up in any output.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import uuid
from pathlib import Path

import imapclient
import pytest
from harness import Daemon, wait_until
from hostile_imap import HostileServer
from reliability_kit import Ledger, assert_no_secrets, audit, message, pick, restarts

from devtools.devservers import Dovecot

pytestmark = pytest.mark.reliability

HOSTILE = ["endless_line", "huge_literal", "stall_mid_fetch", "drip_literal", "bye_mid_fetch"]


def toml_account(account_id: str, host: str, port: int, username: str, password_file: Path, **extra) -> str:
    lines = [f'id = "{account_id}"', f'host = "{host}"', f"port = {port}", f'username = "{username}"',
             f'password_file = "{password_file}"'] + [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n[[accounts]]\n" + "\n".join(lines) + "\n"


def append_unverified(server: Dovecot, user: str, raw: bytes) -> None:
    """APPEND over implicit TLS without checking the certificate (it is bad on purpose)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with imapclient.IMAPClient(server.host, port=server.port, ssl=True, ssl_context=context, timeout=30) as imap:
        imap.login(user, server.password)
        imap.append("INBOX", raw)


def secret_file(root: Path, name: str, secret: str) -> Path:
    path = root / f"{name}.pw"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def bad_messages(tag: str) -> list[bytes]:
    """Malformed MIME, NUL bytes, bare LF, 8-bit and invalid RFC 2047 headers, a 1 MB header."""
    head = "Message-ID: <{tag}-{n}@reliability>\r\n"
    bodies = [
        (b"Content-Type: multipart/mixed; boundary=\"never-closed\r\n\r\n--never-closed\r\n"
         b"Content-Type: text/plain; charset=\"no-such-charset\r\n\r\nhalf a part\r\n--wrong\r\n"),
        b"Content-Type: text/plain\r\n\r\nNUL \x00 bytes \x00\x00 in the body\r\n",
        b"Subject: bare LF\nFrom: lf@example.com\n\nline one\nline two\n",
        "Subject: 8-bit h\u00e9ader \u2603\r\nFrom: J\u00fcrgen <j@example.com>\r\n\r\nbody\r\n".encode(),
        b"Subject: latin-1 \xe9\xe8 raw\r\n\r\nbody\r\n",
        (b"Subject: =?utf-8?B?!!!not base64?= =?no-such-charset?Q?x=ZZ?= =?utf-8?Q?unterminated\r\n"
         b"From: =?utf-8?B?=?= <x@example.com>\r\n\r\nbody\r\n"),
        b"X-Huge: " + b"h" * (1024 * 1024) + b"\r\nSubject: 1 MB header\r\n\r\nbody\r\n",
        b"\r\n\r\nno headers at all, only a body\r\n",
    ]
    return [head.format(tag=tag, n=n).encode() + body for n, body in enumerate(bodies)]


def test_bad_input_costs_no_process_and_holds_nothing_up(dovecot, tmp_path):
    run = uuid.uuid4().hex[:12]
    secrets: dict[str, str] = {}  # unique strings only ("secret", the session Dovecot's, is a common word)
    tls_servers: dict[str, Dovecot] = {}
    hostile: dict[str, HostileServer] = {}
    accounts = ""
    try:
        for kind in ("valid", "self_signed", "expired", "wrong_host"):
            password = f"tls-{kind}-{run}"
            secrets[f"tls-{kind}"] = password
            server = Dovecot(tmp_path / f"dovecot-{kind}", users=0, tls=True, tls_cert=kind, password=password)
            server.start()
            tls_servers[kind] = server
        for name in HOSTILE:
            hostile[name] = HostileServer(name)
            hostile[name].start()
        good = dovecot.new_user()
        bad = dovecot.new_user()
        big = dovecot.new_user()
        many = dovecot.new_user()
        wrong = dovecot.new_user()
        secrets["wrong"] = f"wrong-password-{run}"
        pw = secret_file(tmp_path, "dovecot", dovecot.password)
        for user in (good, bad, big, many):
            accounts += toml_account(user, dovecot.host, dovecot.port, user, pw, tls="none")
        accounts += toml_account("wrong-password", dovecot.host, dovecot.port, wrong,
                                 secret_file(tmp_path, "wrong", secrets["wrong"]), tls="none")
        refused, accepted = [], []
        for kind, server in tls_servers.items():
            pw_tls = secret_file(tmp_path, kind, server.password)
            user = server.new_user()
            append_unverified(server, user, message(f"tls-{kind}", 0))
            accounts += toml_account(f"tls-{kind}-default", server.host, server.port, user, pw_tls)
            refused.append(f"tls-{kind}-default")  # even "valid": its CA is not a system CA
            if kind == "valid":
                accounts += toml_account("tls-valid-ca", server.host, server.port, user, pw_tls,
                                         tls_ca_file=str(server.ca_file))
                accepted.append("tls-valid-ca")
            else:
                accounts += toml_account(f"tls-{kind}-ca", server.host, server.port, user, pw_tls,
                                         tls_ca_file=str(server.ca_file))
                refused.append(f"tls-{kind}-ca")
                accounts += toml_account(f"tls-{kind}-noverify", server.host, server.port, user, pw_tls,
                                         tls_verify=False)
                accepted.append(f"tls-{kind}-noverify")
        for name, server in hostile.items():
            accounts += toml_account(f"hostile-{name}", server.host, server.port, "u", pw, tls="none")

        ledger = Ledger(dovecot, [good], "input-good")
        bad_raw = bad_messages("input-bad")
        tiny = pick(500, 10000)
        # The short run keeps the default suite fast; the long run carries the full 50 MB message.
        big_raw = message("input-big", 0, body_bytes=pick(8, 50) * 1024 * 1024)
        dovecot.append_many(bad, bad_raw)
        dovecot.append_many(big, [big_raw])
        dovecot.append_many(many, [message("input-many", n, body_bytes=16) for n in range(tiny)])
        expected_rows = len(bad_raw) + 1 + tiny + len(accepted)
        sections = '\n[imap]\ntimeout = "3s"\n'
        with Daemon(tmp_path / "d", accounts=accounts, password=dovecot.password, sections=sections) as daemon:
            started = time.monotonic()
            ledger.append(10)
            for _ in range(3):
                time.sleep(2)
                ledger.append(10)  # the good account keeps flowing beside all of the bad
            daemon.wait_stored(expected_rows + len(ledger.appended), timeout=180)
            audit(daemon, ledger, "bad input beside a good account", len(bad_raw) + 2 + len(hostile) + 7)
            # Every bad message is stored exactly as the server sends it (Dovecot itself rewrites
            # NUL bytes; bare LF comes back as CRLF), whatever the parser made of its headers.
            rows = dict(daemon.query("SELECT uid, sha256 FROM messages WHERE account_id = ?", (bad,)))
            assert len(rows) == len(bad_raw), rows.keys()
            with dovecot.client(bad) as imap:
                imap.select_folder("INBOX", readonly=True)
                served = imap.fetch(sorted(rows), ["BODY.PEEK[]"])
            for uid, data in served.items():
                assert rows[uid] == hashlib.sha256(data[b"BODY[]"]).hexdigest(), uid
            (size,) = daemon.query("SELECT size FROM messages WHERE account_id = ?", (big,))[0]
            assert size == len(big_raw)
            stored_accounts = {r[0] for r in daemon.query("SELECT DISTINCT account_id FROM messages")}
            assert set(accepted) <= stored_accounts, "tls_verify=false or the right CA is accepted"
            assert not set(refused) & stored_accounts, "a bad certificate is refused unless configured"

            def error_lines() -> dict[str, str]:
                """The last poll_failed line of each refused or hostile account, from the log."""
                lines = {}
                for line in daemon.log_path.read_text(errors="replace").splitlines():
                    for account in refused + [f"hostile-{h}" for h in HOSTILE]:
                        if f"event=poll_failed account={account} " in line:
                            lines[account] = line
                return lines

            wait_until(lambda: len(error_lines()) == len(refused) + len(HOSTILE), 60, 0.5,
                       "an error line for every refused or hostile account\n" + daemon.log_tail())
            lines = error_lines()
            for account in refused:
                assert "error_kind=tls" in lines[account], lines[account]
            for name in HOSTILE:
                assert "error_kind=" in lines[f"hostile-{name}"], lines[f"hostile-{name}"]
            status_errors = " ".join(daemon.status()["errors"])
            assert any(f"account={a} " in status_errors for a in lines), status_errors  # status keeps the last 10
            wait_until(lambda: daemon.status()["accounts"]["by_state"].get("auth_failed") == 1, 60, 0.5,
                       "the wrong password stops being tried (auth_failed)")
            elapsed = time.monotonic() - started
            for name, server in hostile.items():
                # Backoff from 1 s up to 5 s (harness): never a tight reconnect loop.
                assert 1 <= server.connections <= elapsed / 1.0 + 2, (name, server.connections, elapsed)
            assert not any(restarts(daemon).values()), f"bad input cost a process: {restarts(daemon)}"
            assert_no_secrets(daemon, secrets.values())
            assert daemon.stop() == 0
    finally:
        for server in hostile.values():
            server.stop()
        for server in tls_servers.values():
            server.stop()
