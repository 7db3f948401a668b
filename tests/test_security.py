"""Security (docs/security.md): secrets bound to where they may go, no plaintext by accident, and
nothing for a local user or a hostile server to abuse. Real Dovecot, SQLite and the real daemon
where a server is involved; the scripted server only for what Dovecot will not do on loopback."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import sqlite3
import stat
import subprocess
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from harness import BIN, Daemon, account_toml, wait_until
from hostile_imap import HostileServer, Session

from mailingestd.auth import credentials as credentials_mod
from mailingestd.fetch import imap
from mailingestd import logs
from mailingestd.config import (
    AccountConfig,
    Config,
    ConfigError,
    OAuth2Config,
    SecretsConfig,
)
from mailingestd.auth.credentials import (
    CredentialRefused,
    Credentials,
    SecretPolicy,
    destination_of,
)
from mailingestd.fetch.imap import FailureKind, ImapError
from mailingestd.auth.secrets import Keyring, SecretBindingError, generate_key_line

ROOT = Path(__file__).resolve().parent.parent


def key_file(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines or (generate_key_line(),)) + "\n")
    path.chmod(0o600)
    return path


def keyed_daemon(root: Path, **kw: Any) -> Daemon:
    key = key_file(root / "secrets.key")
    return Daemon(root / "d", sections=kw.pop("sections", "") + f'\n[secrets]\nkey_file = "{key}"\n', **kw)


def ctl_with_input(daemon: Daemon, stdin: str, *args: str) -> None:
    """mailingestctl with ``stdin`` (secrets given on standard input); must succeed."""
    result = subprocess.run([str(BIN / "mailingestctl"), "--config", str(daemon.config_path), *args], input=stdin,
                            capture_output=True, text=True, env=daemon.env, check=False)
    assert result.returncode == 0, result.stderr


def add_password_account(daemon: Daemon, account_id: str, dovecot: Any, username: str, password: str) -> None:
    ctl_with_input(daemon, password + "\n", "account", "add", account_id, "--host", dovecot.host, "--port",
                   str(dovecot.port), "--tls", "none", "--username", username, "--password-stdin")


def v1_envelope(ring: Keyring, account_id: str, field: str, plaintext: str) -> str:
    """A secret as mailingestd stored it before binding: associated data id and field only."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    sealed = AESGCM(ring.keys[0][1]).encrypt(nonce, plaintext.encode(), f"{account_id}\0{field}".encode())
    return f"v1:{ring.current_id}:{base64.b64encode(nonce + sealed).decode()}"


class Listener:
    """A TCP listener on loopback that counts the connections it accepts (and says nothing)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()


# --- secrets bound to where they may go ------------------------------------------------------------


def test_update_of_port_in_the_store_sends_no_password_and_shows_a_binding_error(dovecot, mailbox, tmp_path):
    daemon = keyed_daemon(tmp_path, workers=1, env={"MAILINGESTD_SCHEDULER_AUTH_FAILURE_LIMIT": "1"})
    add_password_account(daemon, "acme", dovecot, mailbox, dovecot.password)
    listener = Listener()
    try:
        with daemon:
            dovecot.append(mailbox, b"Message-ID: <bound@t>\r\n\r\nbefore\r\n")
            daemon.wait_stored(1, timeout=20)
            # Someone with write access to the store (not mailingestctl) points the row elsewhere.
            with sqlite3.connect(daemon.store_url[len("sqlite://"):], timeout=30) as conn:
                conn.execute("UPDATE accounts SET port = ? WHERE id = 'acme'", (listener.port,))

            def account() -> dict[str, Any]:
                return json.loads(daemon.ctl("account", "list", "--json").stdout)[0]

            wait_until(lambda: listener.accepted or account()["state"] == "auth_failed", 30,
                       what="a connection to the new port or the account refused\n" + daemon.log_tail())
            assert listener.accepted == 0, "the daemon connected to the new port to send the password there"
            assert "not bound to" in account()["last_error"], account()
            wait_until(lambda: any("not bound to" in e for e in daemon.status()["errors"]), 10, what="status")
    finally:
        listener.close()


def test_a_configured_accounts_row_moved_in_the_store_is_refused(dovecot, mailbox, tmp_path):
    """A password from the environment is not sealed: the configuration file binds it instead."""
    daemon = Daemon(tmp_path, workers=1, password=dovecot.password,
                    accounts=account_toml(mailbox, dovecot.host, dovecot.port, id="cfg"),
                    env={"MAILINGESTD_SCHEDULER_AUTH_FAILURE_LIMIT": "1"})
    listener = Listener()
    try:
        with daemon:
            dovecot.append(mailbox, b"Message-ID: <configured@t>\r\n\r\nbefore\r\n")
            daemon.wait_stored(1, timeout=20)
            daemon.query("UPDATE accounts SET port = ? WHERE id = 'cfg'", (listener.port,))

            def account() -> dict[str, Any]:
                return json.loads(daemon.ctl("account", "list", "--json").stdout)[0]

            wait_until(lambda: listener.accepted or account()["state"] == "auth_failed", 30,
                       what="a connection to the new port or the account refused\n" + daemon.log_tail())
            assert listener.accepted == 0, "the daemon connected to the new port to send the password there"
            assert "the configuration file" in account()["last_error"], account()
    finally:
        listener.close()


def test_workers_follow_the_configuration_file_and_keep_what_they_started_with(tmp_path):
    from mailingestd import config as config_mod

    path = tmp_path / "mailingestd.toml"
    account = '[[accounts]]\nid = "a"\nhost = "h{n}"\nusername = "u"\npassword_env = "P{n}"\n'
    path.write_text(account.format(n=1))
    credentials_mod.install_policy(config_mod.load(str(path)))
    try:
        row = AccountConfig(id="a", host="h2", username="u", password_env="P2")
        assert credentials_mod.current_policy().row_problem(row)
        path.write_text('[secrets]\nallowed_env = ["EXTRA"]\n' + account.format(n=2))  # edited, not reloaded
        policy = credentials_mod.current_policy()
        assert policy.row_problem(row) is None  # the edited file's version
        assert policy.row_problem(AccountConfig(id="a", host="h1", username="u", password_env="P1")) is None
        assert {"P1", "P2", "EXTRA"} <= policy.env
        path.write_text("[daemon\n")  # broken: what the process started with still holds
        assert credentials_mod.current_policy().row_problem(row)
    finally:
        credentials_mod.install_policy(Config())


def test_binding_covers_every_destination_field_and_v1_secrets_are_refused(tmp_path):
    ring = Keyring.load(str(key_file(tmp_path / "k")))
    account = AccountConfig(id="a", host="imap.example.com", username="u", tls="implicit")
    sealed = ring.encrypt("pw", "a", "password", destination_of(account))
    assert ring.decrypt(sealed, "a", "password", destination_of(account)) == "pw"
    for change in ({"host": "evil.example"}, {"port": 994}, {"tls": "starttls"}, {"tls_verify": False},
                   {"username": "other"}):
        moved = AccountConfig(**{"id": "a", "host": "imap.example.com", "username": "u", **change})
        with pytest.raises(SecretBindingError, match="not bound to"):
            ring.decrypt(sealed, "a", "password", destination_of(moved))
    oauth = AccountConfig(id="o", host="h", username="u", auth="oauth2",
                          oauth2=OAuth2Config(token_url="https://idp.example/token"))
    token = ring.encrypt("rt", "o", "refresh_token", destination_of(oauth))
    elsewhere = AccountConfig(id="o", host="h", username="u", auth="oauth2",
                              oauth2=OAuth2Config(token_url="https://evil.example/token"))
    with pytest.raises(SecretBindingError):
        ring.decrypt(token, "o", "refresh_token", destination_of(elsewhere))
    # A secret sealed before binding (account id and field only) is never used as it stands.
    v1 = v1_envelope(ring, "a", "password", "old")
    with pytest.raises(SecretBindingError, match="secrets rotate"):
        ring.decrypt(v1, "a", "password", destination_of(account))
    assert ring.decrypt_unbound(v1, "a", "password") == "old"


def test_secrets_rotate_binds_v1_secrets_to_the_row_and_says_where(dovecot, mailbox, tmp_path):
    daemon = keyed_daemon(tmp_path)
    add_password_account(daemon, "old", dovecot, mailbox, dovecot.password)
    v1 = v1_envelope(Keyring.load(str(tmp_path / "secrets.key")), "old", "password", dovecot.password)
    daemon.query("UPDATE accounts SET secrets = ? WHERE id = 'old'", (json.dumps({"password": v1}),))
    refused = daemon.ctl("account", "test", "old", check=False)
    assert refused.returncode == 78 and "secrets rotate" in refused.stderr
    out = daemon.ctl("secrets", "rotate").stdout
    assert f"account old: password now bound to {mailbox}@{dovecot.host}:{dovecot.port} tls=none" in out
    assert "logged in" in daemon.ctl("account", "test", "old").stdout


def test_account_add_with_a_password_file_replaces_the_stored_password(dovecot, mailbox, tmp_path):
    daemon = keyed_daemon(tmp_path)
    add_password_account(daemon, "acme", dovecot, mailbox, "the-old-wrong-password")
    secret = daemon.root / "secrets" / "acme"
    secret.parent.mkdir(mode=0o700, exist_ok=True)
    secret.write_text(dovecot.password + "\n")
    daemon.ctl("account", "add", "acme", "--host", dovecot.host, "--port", str(dovecot.port), "--tls", "none",
               "--username", mailbox, "--password-file", str(secret), "--replace")
    assert daemon.query("SELECT secrets FROM accounts WHERE id = 'acme'") == [("{}",)]
    assert "logged in" in daemon.ctl("account", "test", "acme").stdout


# --- where file and environment secrets may come from --------------------------------------------------


def test_secret_ref_outside_the_allowed_places_is_refused(tmp_path, monkeypatch):
    key = key_file(tmp_path / "etc" / "secrets.key")
    allowed = tmp_path / "etc" / "secrets"
    allowed.mkdir()
    (allowed / "acme").write_text("pw-acme\n")
    (allowed / "sneaky").symlink_to(key)  # a link inside the directory to the key file
    named = tmp_path / "named-by-config"
    named.write_text("pw-named\n")
    config = Config(secrets=SecretsConfig(key_file=str(key), allowed_dirs=[str(allowed)], allowed_env=["OK_PW"]),
                    accounts=[AccountConfig(id="c", host="127.0.0.1", username="u", tls="none",
                                            password_file=str(named), password_env="CONFIG_PW")])
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    policy = SecretPolicy.from_config(config)
    environ = {"OK_PW": "ok", "CONFIG_PW": "cfg", "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    credentials = Credentials(str(key), environ=environ, policy=policy)

    def password(**source: str) -> str:
        return credentials.password(AccountConfig(id="a", host="127.0.0.1", username="u", tls="none", **source), {})

    assert password(password_file=str(allowed / "acme")) == "pw-acme"
    assert password(password_file=str(named)) == "pw-named"
    assert password(password_env="OK_PW") == "ok" and password(password_env="CONFIG_PW") == "cfg"
    for source in ({"password_file": str(key)}, {"password_file": str(allowed / "sneaky")},
                   {"password_file": f"{allowed}/../secrets.key"}, {"password_file": "/proc/self/environ"},
                   {"password_env": "AWS_SECRET_ACCESS_KEY"}):
        with pytest.raises(CredentialRefused, match="refusing to read"):
            password(**source)


def test_a_store_row_naming_the_key_file_is_refused_by_the_daemon(dovecot, mailbox, tmp_path):
    """secret_ref written with plain SQL: the worker refuses, the server never sees the key."""
    daemon = keyed_daemon(tmp_path, workers=1, env={"MAILINGESTD_SCHEDULER_AUTH_FAILURE_LIMIT": "1"})
    with daemon:
        daemon.query("INSERT INTO accounts (id, host, port, tls, username, secret_ref, created_at, updated_at) "
                     "VALUES ('k', ?, ?, 'none', ?, ?, 0, 0)",
                     (dovecot.host, dovecot.port, mailbox, f"file:{tmp_path / 'secrets.key'}"))
        row = wait_until(lambda: (r := json.loads(daemon.ctl("account", "list", "--json").stdout))
                         and r[0]["state"] == "auth_failed" and r[0], 30, what="refused\n" + daemon.log_tail())
        assert "outside the directories" in row["last_error"]
    assert "secrets.key" not in "".join(p.read_text(errors="replace") for p in dovecot.root.rglob("*.log"))


# --- no plaintext by accident ---------------------------------------------------------------------------


def test_plaintext_only_to_loopback_unless_the_file_allows_it(tmp_path, caplog):
    policy = SecretPolicy(env=frozenset({"PW"}), plaintext=frozenset({"lan"}))
    credentials = Credentials("", environ={"PW": "pw"}, policy=policy)
    far = AccountConfig(id="far", host="imap.example.com", username="u", tls="none", password_env="PW")
    with pytest.raises(CredentialRefused, match="allow_plaintext"):
        credentials.password(far, {})
    with caplog.at_level(logging.WARNING):
        assert credentials.password(AccountConfig(id="lan", host="10.0.0.5", username="u", tls="none",
                                                  password_env="PW"), {}) == "pw"
        assert credentials.password(AccountConfig(id="lo", host="127.0.0.1", username="u", tls="none",
                                                  password_env="PW"), {}) == "pw"
        assert credentials.password(AccountConfig(id="nv", host="imap.example.com", username="u",
                                                  tls_verify=False, password_env="PW"), {}) == "pw"
    warned = caplog.text
    assert "event=insecure_transport account=lan" in warned and "tls_verify=false" in warned
    # allow_plaintext comes from the configuration file's [[accounts]] only
    cfg = Config(accounts=[AccountConfig(id="lan", host="10.0.0.5", username="u", tls="none", password_env="PW",
                                         allow_plaintext=True)])
    assert SecretPolicy.from_config(cfg).plaintext == frozenset({"lan"})


def test_oauth2_token_url_must_be_https(tmp_path):
    credentials = Credentials("", environ={"RT": "rt"}, policy=SecretPolicy(env=frozenset({"RT"})))
    account = AccountConfig(id="o", host="imap.example.com", username="u", auth="oauth2",
                            oauth2=OAuth2Config(token_url="http://idp.example.com/token", refresh_token_env="RT"))
    with pytest.raises(CredentialRefused, match="not https"):
        credentials.access_token(account, {})
    assert credentials.refreshes == 0, "nothing was sent"


def test_logindisabled_never_leads_to_authenticate_plain_in_clear() -> None:
    commands: list[bytes] = []

    def logindisabled(session: Session) -> None:
        """What a server that wants TLS before credentials says on a plaintext connection."""
        capabilities = b"IMAP4rev1 LOGINDISABLED AUTH=PLAIN"
        session.send(b"* OK [CAPABILITY " + capabilities + b"] ready\r\n")
        while True:
            tag, name, rest = session.read_command()
            commands.append(name.upper())
            if name.upper() == b"CAPABILITY":
                session.send(b"* CAPABILITY " + capabilities + b"\r\n" + tag + b" OK done\r\n")
            else:
                session.answer(tag, name, rest)

    with HostileServer(logindisabled) as server:
        account = SimpleNamespace(id="a", host=server.host, port=server.port, tls="none", username="u",
                                  tls_ca_file=None, tls_verify=True)
        with pytest.raises(ImapError) as info:
            imap.connect(account, "secret-pw", timeout=2)
    assert info.value.kind is FailureKind.TLS and "plaintext" in info.value.detail
    assert b"AUTHENTICATE" not in commands and b"LOGIN" not in commands


def test_postgresql_url_without_verified_tls_is_warned() -> None:
    from mailingestd.hardening import postgres_transport_warning

    assert postgres_transport_warning("sqlite:////var/lib/mailingestd/x.sqlite3") is None
    assert postgres_transport_warning("postgresql://u@127.0.0.1:5432/db") is None
    assert postgres_transport_warning("postgresql://u@/db?host=/run/postgresql") is None
    assert postgres_transport_warning("postgresql://u@db.example.com/db?sslmode=verify-full") is None
    assert "sslmode=verify-full" in postgres_transport_warning("postgresql://u@db.example.com/db")
    assert "sslmode=verify-full" in postgres_transport_warning("postgresql://u@db.example.com/db?sslmode=prefer")


def test_imapclient_floor_is_the_version_whose_starttls_runs_the_injection_guard() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in deps if d.lower().startswith("imapclient"))
    assert floor.replace(" ", "").lower().startswith("imapclient>=4.1"), floor


def test_starttls_runs_the_guard_and_never_assigns_imap4_file(tls_dovecot_for_security, monkeypatch) -> None:
    """With Dovecot's STARTTLS: our _BoundedIMAP4.starttls (the injection guard) is what runs, and
    ``file`` is assigned once, by imaplib's open(), never after (read-only from Python 3.14)."""
    server = tls_dovecot_for_security
    calls = {"guard": 0, "file_sets": 0}
    original = imap._BoundedIMAP4.starttls

    def counting(self, *args, **kwargs):
        calls["guard"] += 1
        return original(self, *args, **kwargs)

    def set_file(self, value):
        calls["file_sets"] += 1
        self.__dict__["file"] = value

    monkeypatch.setattr(imap._BoundedIMAP4, "starttls", counting)
    monkeypatch.setattr(imap._BoundedIMAP4, "file", property(lambda self: self.__dict__["file"], set_file),
                        raising=False)
    account = SimpleNamespace(id="a", host=server.host, port=server.starttls_port, tls="starttls",
                              username=server.users[0], tls_ca_file=str(server.ca_file), tls_verify=True)
    client = imap.connect(account, server.password, timeout=5)
    try:
        assert imap.examine(client, "INBOX").uidvalidity > 0
    finally:
        imap.logout(client, 2)
    assert calls == {"guard": 1, "file_sets": 1}


def test_unverified_tls_is_logged_and_shown_in_status(tls_dovecot_for_security, tmp_path):
    server = tls_dovecot_for_security
    account = (f'\n[[accounts]]\nid = "lax"\nhost = "{server.host}"\nport = {server.port}\ntls = "implicit"\n'
               f'tls_verify = false\nusername = "{server.users[0]}"\npassword_env = "TEST_IMAP_PASSWORD"\n')
    daemon = Daemon(tmp_path, workers=1, password=server.password, accounts=account)
    with daemon:
        wait_until(lambda: any("event=insecure_transport tls_verify=false" in e and "account=lax" in e
                               for e in daemon.status()["errors"]), 20, what="the warning in status")
    assert "event=insecure_transport account=lax" in daemon.log_path.read_text()


@pytest.fixture(scope="module")
def tls_dovecot_for_security(tmp_path_factory):
    from devtools.devservers import Dovecot

    server = Dovecot(tmp_path_factory.mktemp("dovecot-tls-sec"), users=1, tls=True)
    server.start()
    yield server
    server.stop()


# --- local users, terminals and files ---------------------------------------------------------------------


def test_control_socket_checks_the_peer(tmp_path):
    """A member of daemon.control_group may ask for status, not drain (SO_PEERCRED)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    daemon = Daemon(tmp_path, workers=1)
    text = daemon.config_path.read_text().replace("[daemon]\n", '[daemon]\ncontrol_group = "nogroup"\n', 1)
    daemon.config_path.write_text(text)
    from mailingestd import control

    def as_nobody(request: control.Request) -> control.Reply:
        """Ask in a forked child that became nobody:nogroup (a member of control_group)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                reply = control.call(str(daemon.runtime_dir), request)
                os.write(write_end, f"{reply.ok}\t{reply.error}".encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        ok, error = os.read(read_end, 4096).decode().split("\t")
        os.close(read_end)
        return control.Reply(ok=ok == "True", error=error)

    with daemon:
        assert as_nobody(control.Status()).ok
        refused = as_nobody(control.Drain())
        assert not refused.ok and refused.error.startswith("permission denied"), refused
        assert daemon.status()["supervisor"]["state"] == "running"


def test_header_control_characters_print_escaped(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.ctl("account", "list")  # creates the store
    daemon.query('INSERT INTO messages (account_id, folder, uidvalidity, uid, "from", subject, size, raw, sha256, '
                 "ingested_at) VALUES ('a', 'INBOX', 1, 1, ?, ?, 3, ?, 'x', ?)",
                 ("evil\x07@example.com", "hello \x1b[2J\x9b6n world", b"raw", time.time()))
    out = daemon.ctl("messages").stdout
    assert "\\x1b[2J" in out and "\\x9b6n" in out and "\\x07" in out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out


def test_log_lines_escape_control_characters_and_journal_fields_come_from_arguments() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.configure("info", "worker-0")
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logger = logging.getLogger("test-security")
    logger.addHandler(handler)
    try:
        logger.error("event=poll_failed account=%s error=%s", "acme", "bad\x1b[2J\nforged account=evil")
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line and "\\x1b[2J\\nforged" in line

    sent: list[dict[str, Any]] = []
    journal = logs.JournalFieldsHandler.__new__(logs.JournalFieldsHandler)
    logging.Handler.__init__(journal)
    journal.journal = SimpleNamespace(send=lambda message, **fields: sent.append(fields))
    journal.role = "worker-0"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "event=poll_failed account=%s error=%s",
                               ("acme", "server says account=evil"), None)
    journal.emit(record)
    assert sent[0]["ACCOUNT"] == "acme" and sent[0]["EVENT"] == "poll_failed"


def test_messages_get_output_is_private_and_never_follows_a_symlink(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.ctl("account", "list")
    daemon.query('INSERT INTO messages (account_id, folder, uidvalidity, uid, size, raw, sha256, ingested_at) '
                 "VALUES ('a', 'INBOX', 1, 1, 5, ?, 'x', ?)", (b"hello", time.time()))
    target = tmp_path / "victim"
    target.write_text("precious")
    link = tmp_path / "out.eml"
    link.symlink_to(target)
    refused = daemon.ctl("messages", "get", "a/INBOX/1/1", "-o", str(link), check=False)
    assert refused.returncode == 1 and "symlink" in refused.stderr
    assert target.read_text() == "precious"
    forced = daemon.ctl("messages", "get", "a/INBOX/1/1", "-o", str(link), "--force", check=False)
    assert forced.returncode == 1 and target.read_text() == "precious", "not even with --force"
    fresh = tmp_path / "fresh.eml"
    daemon.ctl("messages", "get", "a/INBOX/1/1", "-o", str(fresh))
    assert fresh.read_bytes() == b"hello" and stat.S_IMODE(fresh.stat().st_mode) == 0o600
    again = daemon.ctl("messages", "get", "a/INBOX/1/1", "-o", str(fresh), check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    fresh.write_text("old")
    fresh.chmod(0o644)
    daemon.ctl("messages", "get", "a/INBOX/1/1", "-o", str(fresh), "--force")
    assert fresh.read_bytes() == b"hello" and stat.S_IMODE(fresh.stat().st_mode) == 0o600


def test_files_created_by_mailingestctl_are_private(tmp_path):
    daemon = Daemon(tmp_path)
    env = dict(daemon.env)
    result = subprocess.run(["sh", "-c", 'umask 022; exec "$0" --config "$1" account list',
                             str(BIN / "mailingestctl"), str(daemon.config_path)], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    database = tmp_path / "state" / "mailingestd.sqlite3"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600


def test_key_file_readable_by_others_is_refused(tmp_path):
    key = key_file(tmp_path / "secrets.key")
    key.chmod(0o640)
    with pytest.raises(ConfigError, match="group or others"):
        Keyring.load(str(key))
    key.chmod(0o600)
    assert Keyring.load(str(key)).current_id


def test_daemon_refuses_root_without_allow_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("runs as root only")
    daemon = Daemon(tmp_path)
    try:
        result = subprocess.run([str(BIN / "mailingestd"), "--config", str(daemon.config_path)], env=daemon.env,
                                capture_output=True, text=True, timeout=15, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("mailingestd ran as root without --allow-root")
    assert result.returncode == 64 and "--allow-root" in result.stderr


def test_unit_forbids_core_dumps() -> None:
    unit = (ROOT / "systemd" / "mailingestd.service").read_text()
    assert "\nLimitCORE=0\n" in unit


def test_children_are_not_dumpable(tmp_path):
    """Every child role starts through child.Child: after it, no core dump and no same-user ptrace."""
    from mailingestd import hardening
    from mailingestd.child import Child
    from mailingestd.config import DaemonConfig

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            before = hardening.dumpable()
            child = Child(Config(daemon=DaemonConfig(runtime_dir=str(tmp_path))), "worker", 0, os.getppid())
            os.write(write_end, f"{int(before)}{int(hardening.dumpable())}".encode())
            child.close()
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 2) == b"10", "dumpable before Child(), not after"
    os.close(read_end)


def test_workers_reload_the_keyring_after_rotation(tmp_path):
    """A long-lived Credentials (a worker's) encrypts under the key file's new first key."""
    old = generate_key_line()
    key = key_file(tmp_path / "secrets.key", old)
    credentials = Credentials(str(key))
    assert credentials.keyring.current_id == old.split(":")[0]
    new = generate_key_line()
    key_file(key, new, old)
    assert credentials.keyring.current_id == new.split(":")[0]


@pytest.fixture(scope="module")
def rotating_oauth(tmp_path_factory):
    from oauth2_server import provider_and_dovecot

    # Every refresh rotates (and kills) the token.
    with provider_and_dovecot(tmp_path_factory.mktemp("oauth2-rotating"), expires_in=3600, rotate=True) as both:
        yield both


def test_account_test_uses_the_refresh_token_the_provider_rotated(rotating_oauth, tmp_path):
    server, dovecot = rotating_oauth
    daemon = keyed_daemon(tmp_path, workers=1)
    original = server.new_refresh_token("rita")
    ctl_with_input(daemon, f"{server.client_secret}\n{original}\n", "account", "add", "rita", "--host", dovecot.host,
                   "--port", str(dovecot.port), "--tls", "none", "--username", "rita", "--oauth2-provider", "custom",
                   "--oauth2-token-url", f"{server.url}/token", "--oauth2-client-id", server.client_id,
                   "--oauth2-secrets-stdin")
    with daemon:
        wait_until(lambda: daemon.query("SELECT refresh_token FROM oauth_tokens"), 20, what="a rotated token")
    assert original in server.revoked, "the daemon's refresh rotated it away"
    (before,) = daemon.query("SELECT refresh_token FROM oauth_tokens")[0]
    out = daemon.ctl("account", "test", "rita", check=False)
    assert out.returncode == 0 and "logged in" in out.stdout, out.stderr
    (after,) = daemon.query("SELECT refresh_token FROM oauth_tokens")[0]
    assert after != before, "the token account test rotated is kept for the daemon"


def test_dependency_floors_and_constraints_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {d.split(">=")[0].split("[")[0].strip().lower(): d for d in project["dependencies"]}
    assert floors["cryptography"].replace(" ", "").endswith(">=44.0.1")
    constraints = (ROOT / "constraints.txt").read_text()
    pinned = {line.split("==")[0].lower() for line in constraints.splitlines() if "==" in line}
    assert {"cryptography", "imapclient", "psycopg", "psycopg-binary", "msgspec", "pyzmq"} <= pinned
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
