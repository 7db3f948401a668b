"""``mailingestctl`` as operators use it: the daemon's environment file, --config anywhere,
--version, --json everywhere a script needs it, drain --wait progress and exit 75, account add
refusing to replace by surprise, config show with secrets masked, failing states in colour."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner
from harness import BIN, Daemon, account_toml, wait_until
from hostile_imap import HostileServer

from mailingestd import __version__
from mailingestd.ctl import cli


def write_config(root: Path) -> Path:
    path = root / "mailingestd.toml"
    path.write_text(f'[daemon]\nstate_dir = "{root / "state"}"\nruntime_dir = "{root / "run"}"\n'
                    '[secrets]\nallowed_env = ["IMAP_PASSWORD"]\n')
    return path


def ctl(*args: str, env_file: Path | str = "", **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": "/usr/bin:/bin", "MAILINGESTCTL_ENV_FILE": str(env_file), **env}
    return subprocess.run([str(BIN / "mailingestctl"), *args], env=full_env, capture_output=True, text=True,
                          timeout=60, check=False)


def add_account(config: Path, account_id: str, *extra: str, env_file: Path | str = "") -> subprocess.CompletedProcess[str]:
    return ctl("account", "add", account_id, "--host", "127.0.0.1", "--port", "1143", "--tls", "none",
               "--username", "bob", "--password-env", "IMAP_PASSWORD", *extra, "--config", str(config),
               env_file=env_file)


def test_the_daemons_environment_file_applies(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    other = tmp_path / "elsewhere" / "store.sqlite3"
    env_file = tmp_path / "mailingestd.env"
    env_file.write_text(f'# as in /etc/mailingestd/mailingestd.env\n\nMAILINGESTD_STORE_URL="sqlite:///{other}"\n'
                        "IMAP_PASSWORD=not-a-config-key\n")
    result = add_account(config, "acme", env_file=env_file)
    assert result.returncode == 0, result.stderr
    assert other.exists(), "the account went to a store the daemon does not use"
    assert not (tmp_path / "state").exists()
    shown = ctl("config", "show", "--changed", "--config", str(config), env_file=env_file)
    assert f'store.url = "sqlite:///{other}"  # MAILINGESTD_STORE_URL' in shown.stdout.splitlines()
    assert ctl("config", "show", "--config", str(config), env_file=tmp_path / "missing.env").returncode == 78


def test_config_after_the_subcommand_and_version(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert add_account(config, "acme").returncode == 0
    listed = ctl("account", "list", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert [a["id"] for a in json.loads(listed.stdout)] == ["acme"]
    assert ctl("--version").stdout.strip() == f"mailingestctl, version {__version__}"


def test_account_add_refuses_an_existing_id_without_replace(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert add_account(config, "acme").returncode == 0
    again = add_account(config, "acme", "--priority", "high")
    assert again.returncode == 1 and "exists already (--replace replaces it)" in again.stderr
    shown = json.loads(ctl("account", "show", "acme", "--json", "--config", str(config)).stdout)
    assert shown["priority"] == "auto"
    assert add_account(config, "acme", "--priority", "high", "--replace").returncode == 0
    text = ctl("account", "show", "acme", "--config", str(config)).stdout
    assert text.startswith("account acme  state ") and "  priority    high" in text


def test_config_show_masks_passwords(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = ctl("config", "show", "--config", str(config),
                 MAILINGESTD_STORE_URL="postgresql://ingest:s3cret-pw@127.0.0.1:1/mail")
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    assert 'store.url = "postgresql://ingest:***@127.0.0.1:1/mail"  # MAILINGESTD_STORE_URL' in result.stdout
    assert 'daemon.shutdown_timeout = 30.0' in result.stdout  # every key, defaults included


def account_in_state(tmp_path: Path, state: str) -> Path:
    """A config with one account "acme" whose stored state is ``state``."""
    config = write_config(tmp_path)
    assert add_account(config, "acme").returncode == 0
    with sqlite3.connect(tmp_path / "state" / "mailingestd.sqlite3") as conn:
        conn.execute("UPDATE accounts SET state = ? WHERE id = 'acme'", (state,))
    conn.close()
    return config


def test_failing_states_stand_out_unless_no_color(tmp_path: Path) -> None:
    config = account_in_state(tmp_path, "auth_failed")
    args = ["--env-file", "", "account", "show", "acme", "--config", str(config)]
    coloured = CliRunner().invoke(cli, args, color=True, env={"NO_COLOR": None})
    assert coloured.exit_code == 0, coloured.output
    assert "\x1b[31m\x1b[1mauth_failed" in coloured.output
    plain = CliRunner().invoke(cli, args, color=True, env={"NO_COLOR": "1"})
    assert "auth_failed" in plain.output and "\x1b[" not in plain.output


def test_drain_resume_reload_speak_json_and_a_drain_timeout_exits_75(tmp_path: Path) -> None:
    # The account's server stops in the middle of a FETCH: the account stays in flight and the
    # drain cannot finish before imap.timeout.
    with HostileServer("stall_mid_fetch") as server:
        daemon = Daemon(tmp_path / "d", accounts=account_toml("stuck", server.host, server.port),
                        sections='[imap]\ntimeout = "20s"\n')
        with daemon:
            wait_until(lambda: server.connections >= 1, 20, what="the daemon to connect")
            time.sleep(1.0)  # LOGIN, EXAMINE, UID FETCH
            timed_out = daemon.ctl("drain", "--wait", "--timeout", "1.5", check=False)
            assert timed_out.returncode == 75, timed_out.stderr
            assert "s draining: " in timed_out.stderr.splitlines()[0]  # progress before the end
            assert "not drained after 1.5s" in timed_out.stderr
            assert json.loads(daemon.ctl("resume", "--json").stdout) == {"state": "running"}
            assert json.loads(daemon.ctl("reload", "--json").stdout)["reloaded"] is True
            assert json.loads(daemon.ctl("drain", "--json").stdout) == {"state": "draining"}
            server.stop()  # the stalled connection closes: the drain completes
            drained = json.loads(daemon.ctl("drain", "--wait", "--timeout", "30", "--json").stdout)
            assert drained["state"] == "drained" and drained["seconds"] >= 0


def test_account_test_speaks_json(tmp_path: Path, dovecot, mailbox: str) -> None:
    config = write_config(tmp_path)
    result = ctl("account", "add", "real", "--host", dovecot.host, "--port", str(dovecot.port), "--tls", "none",
                 "--username", mailbox, "--password-env", "IMAP_PASSWORD", "--config", str(config))
    assert result.returncode == 0, result.stderr
    tested = ctl("account", "test", "real", "--json", "--config", str(config), IMAP_PASSWORD=dovecot.password)
    assert tested.returncode == 0, tested.stderr
    report = json.loads(tested.stdout)
    assert report["ok"] is True and "IMAP4REV1" in report["capabilities"]
    assert set(report["folders"]["INBOX"]) >= {"uidvalidity", "uidnext", "messages"}
    assert dovecot.password not in tested.stdout
    assert add_account(config, "nowhere").returncode == 0  # 127.0.0.1:1143: nothing listens there
    failed = ctl("account", "test", "nowhere", "--json", "--config", str(config), IMAP_PASSWORD="x")
    assert failed.returncode == 1
    assert json.loads(failed.stdout) == {"account": "nowhere", "ok": False, "server": "127.0.0.1:1143",
                                         "error_kind": "network", "error": json.loads(failed.stdout)["error"]}


def test_account_list_colours_the_failing_state(tmp_path: Path) -> None:
    config = account_in_state(tmp_path, "backoff")
    args = ["--env-file", "", "account", "list", "--config", str(config)]
    coloured = CliRunner().invoke(cli, args, color=True, env={"NO_COLOR": None})
    assert "\x1b[33m\x1b[1mbackoff" in coloured.output
    assert "\x1b[" not in CliRunner().invoke(cli, args, color=True, env={"NO_COLOR": "1"}).output
    assert "\x1b[" not in ctl(*args[2:]).stdout  # not a terminal
