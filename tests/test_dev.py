"""``./dev``: what it installs and what it leaves behind, run with a fake apt-get on PATH.

The script is sourced (it only defines its functions then) and its functions are called with the
policy-rc.d path pointed into a temporary directory; dpkg-query, apt-get and the Python
interpreters are small scripts that log what they were asked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

DEV = Path(__file__).resolve().parent.parent / "dev"
ORIGINAL_POLICY = "#!/bin/sh\n# from the base image\nexit 101\n"


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A bin directory with dpkg-query (nothing installed), apt-get (logs its arguments and whether
    the policy file exists while it runs; exits $FAKE_APT_STATUS) and id (root)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake(bin_dir, "dpkg-query", "exit 1")
    fake(bin_dir, "id", "echo 0")
    fake(bin_dir, "apt-get", f'''
if [ -e "{tmp_path}/policy-rc.d" ]; then p=present; else p=absent; fi
echo "$* policy=$p" >> "{tmp_path}/apt.log"
exit "${{FAKE_APT_STATUS:-0}}"''')
    return tmp_path


def run_dev(sandbox: Path, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Source ./dev with the sandbox first on PATH and the policy file inside it, then run ``script``."""
    full_env = dict(os.environ, PATH=f"{sandbox / 'bin'}:{os.environ['PATH']}", **env)
    return subprocess.run(["bash", "-c", f'source "{DEV}"; POLICY_RC="{sandbox}/policy-rc.d"; {script}'],
                          env=full_env, capture_output=True, text=True, timeout=30, check=False)


def apt_log(sandbox: Path) -> list[str]:
    log = sandbox / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_policy_rc_d_holds_only_during_the_install(sandbox: Path) -> None:
    result = run_dev(sandbox, "apt_setup dovecot-imapd; echo after-install")
    assert result.returncode == 0, result.stderr
    assert "after-install" in result.stdout
    assert [line.split()[-1] for line in apt_log(sandbox)] == ["policy=present", "policy=present"]
    assert not (sandbox / "policy-rc.d").exists(), "./dev left policy-rc.d behind"


def test_policy_rc_d_is_removed_when_apt_fails(sandbox: Path) -> None:
    result = run_dev(sandbox, "apt_setup dovecot-imapd", FAKE_APT_STATUS="100")
    assert result.returncode == 100
    assert "apt-get failed" in result.stderr
    assert apt_log(sandbox), "apt-get was not run"
    assert not (sandbox / "policy-rc.d").exists(), "./dev left policy-rc.d behind after a failed install"


def test_a_policy_rc_d_that_was_there_before_stays(sandbox: Path) -> None:
    (sandbox / "policy-rc.d").write_text(ORIGINAL_POLICY)
    result = run_dev(sandbox, "apt_setup dovecot-imapd")
    assert result.returncode == 0, result.stderr
    assert (sandbox / "policy-rc.d").read_text() == ORIGINAL_POLICY


def test_nothing_missing_runs_no_apt(sandbox: Path) -> None:
    fake(sandbox / "bin", "dpkg-query", "echo 'install ok installed'")
    result = run_dev(sandbox, "apt_setup dovecot-imapd")
    assert result.returncode == 0, result.stderr
    assert apt_log(sandbox) == []


def test_demo_installs_only_what_the_demo_needs(sandbox: Path) -> None:
    # venv_setup is replaced: this test is about the Debian packages and the pip extras asked for.
    result = run_dev(sandbox, 'venv_setup() { echo "extras=[$1]"; }; demo_setup')
    assert result.returncode == 0, result.stderr
    install = next(line for line in apt_log(sandbox) if line.startswith("install"))
    packages = set(install.split()) - {"install", "-y", "-qq", "--no-install-recommends", "policy=present"}
    assert {"dovecot-imapd", "gcc", "libsystemd-dev"} <= packages
    for toolchain in ("postgresql", "prometheus", "prometheus-node-exporter", "isync"):
        assert toolchain not in packages
    assert "extras=[]" in result.stdout  # no moto, pytest or matplotlib


def test_python3_older_than_3_11_falls_back_to_python3_11(sandbox: Path) -> None:
    bin_dir = sandbox / "bin"
    # The fake python3 is 3.10: its version check fails, it prints 3.10 when asked.
    fake(bin_dir, "python3", 'case "$2" in *print*) echo 3.10 ;; *) exit 1 ;; esac')
    fake(bin_dir, "python3.11", "exit 0")
    result = run_dev(sandbox, 'pick_python; echo "picked=$PYTHON packages=$(python_packages)"')
    assert result.returncode == 0, result.stderr
    assert "picked=python3.11 packages=python3.11-venv python3.11-dev" in result.stdout
    assert result.stderr.strip() == "dev: python3 is 3.10, using python3.11"


def test_no_suitable_python_says_what_to_install_in_one_line(sandbox: Path) -> None:
    bin_dir = sandbox / "bin"
    for name in ("python3", "python3.11", "python3.12", "python3.13"):
        fake(bin_dir, name, "exit 1")
    result = run_dev(sandbox, "pick_python; echo unreachable")
    assert result.returncode == 1
    assert "unreachable" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install python3.11 python3.11-venv" in lines[0]
