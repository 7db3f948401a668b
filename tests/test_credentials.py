"""OAuth2 against a real Dovecot (oauth2 passdb -> our token/introspection server), secrets at rest,
key rotation, and live account changes through the store."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness import Daemon, established_connections, wait_until
from mailingestd.fetch import imap
from mailingestd.config import AccountConfig, OAuth2Config
from devtools.devservers import Dovecot
from mailingestd.auth.secrets import generate_key_line
from oauth2_server import OAuth2Server


@pytest.fixture(scope="module")
def oauth(tmp_path_factory):
    server = OAuth2Server(expires_in=3600)
    root = tmp_path_factory.mktemp("oauth2-dovecot")
    root.chmod(0o755)
    dovecot = Dovecot(root / "both", users=0, extra_conf=server.dovecot_conf(root / "conf-both"))
    dovecot_x = Dovecot(root / "x", users=0, extra_conf=server.dovecot_conf(root / "conf-x", "xoauth2"))
    dovecot.start()
    dovecot_x.start()
    yield server, dovecot, dovecot_x
    dovecot.stop()
    dovecot_x.stop()
    server.close()


def oauth_account(server, dovecot, user, **extra) -> AccountConfig:
    return AccountConfig(id=user, host=dovecot.host, port=dovecot.port, tls="none", username=user, auth="oauth2",
                         oauth2=OAuth2Config(provider="custom", token_url=f"{server.url}/token",
                                             client_id=server.client_id), **extra)


def keyed_daemon(tmp_path, **kw) -> Daemon:
    key = tmp_path / "secrets.key"
    tmp_path.mkdir(parents=True, exist_ok=True)
    key.write_text(generate_key_line() + "\n")
    key.chmod(0o600)
    sections = kw.pop("sections", "") + f'\n[secrets]\nkey_file = "{key}"\n'
    return Daemon(tmp_path / "d", sections=sections, **kw)


def add_oauth(daemon, server, dovecot, user, refresh_token, *more) -> None:
    result = subprocess.run(
        [*daemon_ctl(daemon), "account", "add", user, "--host", dovecot.host, "--port", str(dovecot.port),
         "--tls", "none", "--username", user, "--oauth2-provider", "custom",
         "--oauth2-token-url", f"{server.url}/token", "--oauth2-client-id", server.client_id,
         "--oauth2-secrets-stdin", *more],
        input=f"{server.client_secret}\n{refresh_token}\n", capture_output=True, text=True, env=daemon.env)
    assert result.returncode == 0, result.stderr


def daemon_ctl(daemon) -> list[str]:
    return [str(Path(__import__("sys").executable).parent / "mailingestctl"), "--config", str(daemon.config_path)]


def test_xoauth2_and_oauthbearer_logins_checked_by_the_real_server(oauth):
    server, dovecot, dovecot_x = oauth
    for instance, mechanism in ((dovecot, "OAUTHBEARER"), (dovecot_x, "XOAUTH2")):
        account = oauth_account(server, instance, "alice")
        client = imap.connect(account, server.issue_access_token("alice"), timeout=10)
        assert client.login_mechanism == mechanism
        imap.logout(client)
        with pytest.raises(imap.ImapError) as err:
            imap.connect(account, "at-forged", timeout=10)
        assert err.value.kind is imap.FailureKind.AUTH and "at-forged" not in err.value.detail
    assert server.introspections >= 4, "Dovecot asked our introspection endpoint"


def test_account_test_shows_mechanism_and_expiry(oauth, tmp_path):
    server, dovecot, _ = oauth
    daemon = keyed_daemon(tmp_path)
    add_oauth(daemon, server, dovecot, "carol", server.new_refresh_token("carol"))
    out = daemon.ctl("account", "test", "carol").stdout
    assert "mechanism OAUTHBEARER" in out and "access token expires at" in out


def test_expiring_token_is_refreshed_while_idling_and_ingest_continues(oauth, tmp_path):
    server, dovecot, _ = oauth
    server.expires_in = 4
    try:
        daemon = keyed_daemon(tmp_path, workers=1, sections='[imap]\nidle_renew = "2s"\n')
        refresh = server.new_refresh_token("dave")
        add_oauth(daemon, server, dovecot, "dave", refresh)
        with daemon:
            wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 1, 20, what="idling")
            first = server.token_requests[refresh]
            time.sleep(6)  # longer than a token's life: renewals must have refreshed it
            assert server.token_requests[refresh] > first
            dovecot.append("dave", b"Message-ID: <after-expiry@t>\r\n\r\nstill here\r\n")
            daemon.wait_stored(1, timeout=10)
            dovecot.restart()  # a new login now needs a valid token
            dovecot.append("dave", b"Message-ID: <after-restart@t>\r\n\r\nagain\r\n")
            daemon.wait_stored(2, timeout=30)
            assert daemon.status()["children"][1]["restarts"] == 0
    finally:
        server.expires_in = 3600


def test_revoked_refresh_token_parks_account_in_reauth_required_without_storm(oauth, tmp_path):
    server, dovecot, _ = oauth
    daemon = keyed_daemon(tmp_path, workers=1)
    refresh = server.new_refresh_token("erin")
    server.revoke(refresh)
    add_oauth(daemon, server, dovecot, "erin", refresh)
    with daemon:
        status = wait_until(lambda: (s := daemon.status())["accounts"]["by_state"].get("reauth_required") and s, 20,
                            what="reauth_required")
        assert any("state=reauth_required" in e and "invalid_grant" in e for e in status["errors"])
        time.sleep(6)
        assert server.token_requests[refresh] == 1, f"no retry storm against the token endpoint\n{daemon.log_tail()}"
        listed = json.loads(daemon.ctl("account", "list", "--json").stdout)
        assert listed[0]["state"] == "reauth_required"
        # New credentials lift it.
        fresh = server.new_refresh_token("erin")
        add_oauth(daemon, server, dovecot, "erin", fresh, "--replace")
        wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 1, 20, what="erin idling again")
        assert not daemon.status()["accounts"]["by_state"].get("reauth_required")


def test_ten_accounts_on_one_worker_refresh_independently(oauth, tmp_path):
    server, dovecot, _ = oauth
    server.rotate = True
    try:
        daemon = keyed_daemon(tmp_path, workers=1)
        users = [f"team{n}" for n in range(10)]
        originals = {u: server.new_refresh_token(u) for u in users}
        for user in users:
            add_oauth(daemon, server, dovecot, user, originals[user])
            dovecot.append(user, f"Message-ID: <{user}@t>\r\n\r\nhello\r\n".encode())
        with daemon:
            daemon.wait_stored(10, timeout=40)
            assert all(server.token_requests[originals[u]] == 1 for u in users), "one refresh each"
            rotated = daemon.query("SELECT account_id, refresh_token FROM oauth_tokens")
            assert sorted(r[0] for r in rotated) == users, "every rotated refresh token was stored"
            assert not any(r[1].startswith("rt-") for r in rotated), "stored encrypted"
    finally:
        server.rotate = False


def test_store_holds_no_plaintext_secret_sqlite_and_postgres(oauth, tmp_path, pg_url):
    server, dovecot, _ = oauth
    password = "pw-" + "x9" * 8
    refresh = server.new_refresh_token("frank")
    for name, url in (("sqlite", ""), ("pg", pg_url)):
        daemon = keyed_daemon(tmp_path / name, store_url=url)
        result = subprocess.run([*daemon_ctl(daemon), "account", "add", "pw", "--host", dovecot.host, "--port",
                                 str(dovecot.port), "--tls", "none", "--username", "frank", "--password-stdin"],
                                input=password + "\n", capture_output=True, text=True, env=daemon.env)
        assert result.returncode == 0, result.stderr
        add_oauth(daemon, server, dovecot, "frank", refresh)
        if name == "sqlite":
            blob = b"".join(p.read_bytes() for p in (tmp_path / name / "d" / "state").iterdir())
        else:
            pg_dump = shutil.which("pg_dump") or "/usr/lib/postgresql/15/bin/pg_dump"
            blob = subprocess.run([pg_dump, url], capture_output=True, check=True).stdout
        for secret in (password, refresh, server.client_secret):
            assert secret.encode() not in blob, f"{name}: a secret is stored in plain text"
        shown = daemon.ctl("account", "show", "pw").stdout + daemon.ctl("account", "list", "--json").stdout
        assert password not in shown


def test_wrong_key_fails_clearly_and_rotation_keeps_accounts_working(oauth, tmp_path):
    server, dovecot, _ = oauth
    daemon = keyed_daemon(tmp_path)
    key_file = tmp_path / "secrets.key"
    add_oauth(daemon, server, dovecot, "gina", server.new_refresh_token("gina"))
    assert "logged in" in daemon.ctl("account", "test", "gina").stdout
    old_line = key_file.read_text()
    key_file.write_text(generate_key_line() + "\n")  # a store copied without its key
    result = daemon.ctl("account", "test", "gina", check=False)
    assert result.returncode == 78 and "not in" in result.stderr and "Traceback" not in result.stderr
    new_line = generate_key_line()
    key_file.write_text(new_line + "\n" + old_line)
    out = daemon.ctl("secrets", "rotate").stdout
    assert "re-encrypted the secrets of 1 accounts" in out
    key_file.write_text(new_line + "\n")  # the old key is gone
    assert "logged in" in daemon.ctl("account", "test", "gina").stdout
    (stored,) = daemon.query("SELECT secrets FROM accounts WHERE id = 'gina'")[0]
    assert all(v.split(":")[1] == new_line.split(":")[0] for v in json.loads(stored).values())


def test_plain_sql_row_takes_effect_live_and_deleting_it_disconnects(dovecot, mailbox, tmp_path, pg_url):
    import psycopg

    daemon = Daemon(tmp_path, store_url=pg_url, password=dovecot.password)
    with daemon:
        dovecot.append(mailbox, b"Message-ID: <sql@t>\r\n\r\nfrom a row\r\n")
        inserted = time.monotonic()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO accounts (id, host, port, tls, username, secret_ref) VALUES (%s, %s, %s, 'none', %s, "
                         "'env:TEST_IMAP_PASSWORD')", ("sqlrow", dovecot.host, dovecot.port, mailbox))
        daemon.wait_stored(1, timeout=10)
        assert time.monotonic() - inserted < 10
        wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == 1, 10, what="idling")
        before = established_connections(dovecot.port)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DELETE FROM accounts WHERE id = 'sqlrow'")
        wait_until(lambda: daemon.status()["accounts"]["total"] == 0, 10, what="the account gone")
        wait_until(lambda: established_connections(dovecot.port) == before - 1, 10, what="its connection closed")
