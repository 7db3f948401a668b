"""``mailingestctl account authorize``: the authorization-code flow with PKCE and a loopback redirect,
end to end against the suite's OAuth2 server and a real Dovecot whose oauth2 passdb asks it: the
refresh token it stores (encrypted) logs in."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BIN
from oauth2_server import OAuth2Server, provider_and_dovecot

from devtools.devservers import Dovecot
from mailingestd.auth.secrets import generate_key_line


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OAuth2Server, Dovecot]]:
    with provider_and_dovecot(tmp_path_factory.mktemp("authorize-dovecot"), expires_in=3600) as both:
        yield both


def setup_store(tmp_path: Path, server: OAuth2Server, dovecot: Dovecot, user: str) -> Path:
    key = tmp_path / "secrets.key"
    key.write_text(generate_key_line() + "\n")
    key.chmod(0o600)
    config = tmp_path / "mailingestd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[secrets]\nkey_file = "{key}"\n')
    added = ctl(config, "account", "add", user, "--host", dovecot.host, "--port", str(dovecot.port), "--tls", "none",
                "--username", user, "--oauth2-provider", "custom", "--oauth2-token-url", f"{server.url}/token",
                "--oauth2-client-id", server.client_id)
    assert added.returncode == 0, added.stderr
    assert f"no refresh token yet: mailingestctl account authorize {user}" in added.stdout
    return config


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mailingestctl"), *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "MAILINGESTCTL_ENV_FILE": ""})


def start_authorize(config: Path, server: OAuth2Server, user: str) -> tuple[subprocess.Popen[str], str]:
    """Run authorize with the client secret on stdin; return the process and the URL it printed."""
    secret = config.parent / "client-secret"
    secret.write_text(server.client_secret + "\n")
    with secret.open() as stdin:
        proc = subprocess.Popen([str(BIN / "mailingestctl"), "account", "authorize", user, "--auth-url",
                                 f"{server.url}/authorize", "--client-secret-stdin", "--timeout", "30",
                                 "--config", str(config)], stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={"PATH": "/usr/bin:/bin", "MAILINGESTCTL_ENV_FILE": ""})
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_authorize_stores_a_refresh_token_that_logs_in(provider, tmp_path: Path) -> None:
    server, dovecot = provider
    config = setup_store(tmp_path, server, dovecot, "carol")
    server.authorize_as = "carol"
    proc, url = start_authorize(config, server, "carol")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert url.startswith(f"{server.url}/authorize?")
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["redirect_uri"].startswith("http://127.0.0.1:") and query["state"]
    assert query["login_hint"] == "carol" and server.client_secret not in url
    # The browser: the provider redirects it to the loopback listener, which answers the person.
    with urllib.request.urlopen(url, timeout=10) as page:
        assert page.status == 200 and b"you can close this window" in page.read()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "refresh token stored encrypted" in out

    with sqlite3.connect(tmp_path / "state" / "mailingestd.sqlite3") as conn:
        (stored,) = conn.execute("SELECT secrets FROM accounts WHERE id = 'carol'").fetchone()
    conn.close()
    issued = [t for t, u in server.refresh_tokens.items() if u == "carol"]
    assert set(json.loads(stored)) == {"refresh_token", "client_secret"}
    assert issued and not any(t in stored for t in issued) and server.client_secret not in stored

    introspections = server.introspections
    tested = ctl(config, "account", "test", "carol", "--json")
    assert tested.returncode == 0, tested.stderr
    report = json.loads(tested.stdout)
    assert report["ok"] and report["mechanism"] in ("OAUTHBEARER", "XOAUTH2")
    assert server.introspections > introspections, "Dovecot checked the access token with the provider"


def test_a_forged_redirect_or_a_refusal_stores_nothing(provider, tmp_path: Path) -> None:
    server, dovecot = provider
    config = setup_store(tmp_path, server, dovecot, "dave")
    server.authorize_as = "dave"
    proc, url = start_authorize(config, server, "dave")
    redirect = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["redirect_uri"]
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{redirect}?code=ac-stolen&state=not-the-one", timeout=10)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "state does not match" in err

    server.authorize_as = None  # the person declines
    proc, url = start_authorize(config, server, "dave")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url, timeout=10)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "access_denied" in err
    with sqlite3.connect(tmp_path / "state" / "mailingestd.sqlite3") as conn:
        (stored,) = conn.execute("SELECT secrets FROM accounts WHERE id = 'dave'").fetchone()
    conn.close()
    assert "refresh_token" not in json.loads(stored or "{}")
