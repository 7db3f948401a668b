"""Alerting rules and the Grafana dashboard, checked with the real Prometheus tools.

- ``promtool check rules`` and ``promtool test rules tests/promtool/*.yml`` (every alert has a
  firing and a not-firing case there, and an idle install fires nothing);
- every PromQL expression of the dashboard and of the rules, evaluated by a real Prometheus that
  scrapes a real node_exporter reading a metrics textfile. The textfile's source is a parameter
  (:data:`TEXTFILE_SOURCES`): a writer of realistic values for every series the daemon exposes,
  and the real daemon itself against Dovecot and moto_server.

Processes are started here directly because ``devtools.devservers`` had not landed when this
was written and its Prometheus takes no rule files; the rules must be loaded so that alerts built
on recorded series can be evaluated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import yaml

from promql_exprs import dashboard_exprs, rule_exprs, with_bool_comparisons

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "etc/prometheus/mailingestd.rules.yml"
DASHBOARD = ROOT / "etc/grafana/mailingestd.json"
PROMTOOL_TESTS = sorted((ROOT / "tests/promtool").glob("*.yml"))
OPERATIONS_DOC = ROOT / "README.md"
TEXTFILE_NAME = "mailingestd.prom"


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install the Debian package `{package}` (apt-get install {package})")
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [_binary("promtool", "prometheus"), *args]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def _alerts() -> list[dict]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


# ---------------------------------------------------------------------------------------------
# promtool


def test_promtool_check_rules() -> None:
    _promtool("check", "rules", str(RULES))


def test_promtool_test_rules() -> None:
    _promtool("test", "rules", *map(str, PROMTOOL_TESTS))


def test_every_alert_has_firing_and_quiet_promtool_cases() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in PROMTOOL_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert not names - firing, f"alerts without a firing promtool case: {sorted(names - firing)}"
    assert not names - quiet, f"alerts without a not-firing promtool case: {sorted(names - quiet)}"


def test_every_alert_has_runbook_annotations_and_operations_notes() -> None:
    operations = OPERATIONS_DOC.read_text()
    for alert in _alerts():
        missing = {"summary", "description", "runbook"} - set(alert.get("annotations", {}))
        assert not missing, f"{alert['alert']} lacks annotations {sorted(missing)}"
        assert alert["labels"].get("severity") in {"warning", "critical"}, alert["alert"]
        assert alert["alert"] in operations, f"{alert['alert']} is not described in {OPERATIONS_DOC.name}"


# ---------------------------------------------------------------------------------------------
# a realistic metrics textfile: every series the daemon exposes, counters advancing with time

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LAG_BOUNDS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
ROLES = ("scheduler", "worker", "publisher")
SERVERS = {"imap.gmail.com": 100, "outlook.office365.com": 80, "imap.example.com": 20}
ACCOUNT_STATES = ("scheduled", "waiting", "polling", "idling", "backoff", "auth_failed", "reauth_required", "disabled")
POLLS_PER_SECOND = {"ok": 40.0, "network": 0.5, "timeout": 0.2, "tls": 0.01, "throttled": 0.1, "auth": 0.05, "protocol": 0.01}
MESSAGES_PER_SECOND = 12.0


def _histogram_lines(name: str, bounds: tuple[float, ...], mean: float, per_second: float, elapsed: float) -> list[str]:
    """Cumulative buckets of an exponential-ish distribution with the given mean."""
    count = 1000 + per_second * elapsed
    lines = [f"# TYPE {name} histogram"]
    for bound in bounds:
        share = 1 - math.exp(-bound / mean)
        lines.append(f'{name}_bucket{{le="{bound}"}} {math.floor(count * share)}')
    lines += [f'{name}_bucket{{le="+Inf"}} {math.floor(count)}', f"{name}_sum {count * mean:.3f}", f"{name}_count {math.floor(count)}"]
    return lines


def realistic_textfile(started_at: float, now: float) -> str:
    """The metrics file of a busy daemon ``now - started_at`` seconds after it started."""
    elapsed = now - started_at
    accounts_per_tier = {"high": 400, "medium": 2500, "low": 7100}
    state_share = {"scheduled": 0.3, "waiting": 0.01, "polling": 0.05, "idling": 0.6, "backoff": 0.02,
                   "auth_failed": 0.005, "reauth_required": 0.002, "disabled": 0.013}
    lines = [
        "# HELP mailingestd_build_info Version of the running daemon.",
        "# TYPE mailingestd_build_info gauge",
        'mailingestd_build_info{version="0.1.0"} 1',
        "# TYPE mailingestd_supervisor_state gauge",
        *(f'mailingestd_supervisor_state{{state="{state}"}} {int(state == "running")}'
          for state in ("starting", "running", "draining", "drained", "stopping")),
        "# TYPE mailingestd_start_time_seconds gauge",
        f"mailingestd_start_time_seconds {started_at - 3 * 86400:.3f}",
        "# TYPE mailingestd_children gauge",
        *(f'mailingestd_children{{role="{role}"}} {4 if role == "worker" else 1}' for role in ROLES),
        "# TYPE mailingestd_process_restarts_total counter",
        *(f'mailingestd_process_restarts_total{{role="{role}"}} {2 if role == "worker" else 0}' for role in ROLES),
        "# TYPE mailingestd_heartbeat_age_seconds gauge",
        *(f'mailingestd_heartbeat_age_seconds{{role="{role}"}} {0.4 + index * 0.2:.1f}' for index, role in enumerate(ROLES)),
        "# TYPE mailingestd_memory_bytes gauge",
        f"mailingestd_memory_bytes {310_000_000 + int(elapsed) * 1000}",
        "# TYPE mailingestd_memory_budget_bytes gauge",
        f"mailingestd_memory_budget_bytes {512 * 1024 ** 2}",
        "# TYPE mailingestd_accounts gauge",
        *(f'mailingestd_accounts{{state="{state}",priority="{tier}"}} {round(total * state_share[state])}'
          for tier, total in accounts_per_tier.items() for state in ACCOUNT_STATES),
        "# TYPE mailingestd_connections gauge",
        *(f'mailingestd_connections{{server="{server}"}} {limit * 3 // 4}' for server, limit in SERVERS.items()),
        "# TYPE mailingestd_connection_limit gauge",
        *(f'mailingestd_connection_limit{{server="{server}"}} {limit}' for server, limit in SERVERS.items()),
        "# TYPE mailingestd_accounts_waiting gauge",
        *(f'mailingestd_accounts_waiting{{server="{server}"}} {index * 7}' for index, server in enumerate(SERVERS)),
        "# TYPE mailingestd_accounts_late gauge",
        *(f'mailingestd_accounts_late{{server="{server}",priority="{tier}"}} {0 if tier != "low" else index * 40}'
          for index, server in enumerate(SERVERS) for tier in ("high", "medium", "low")),
        "# TYPE mailingestd_connects_total counter",
        *(f'mailingestd_connects_total{{server="{server}",result="{result}"}} {math.floor(base + rate * elapsed)}'
          for server in SERVERS for result, base, rate in (("ok", 9000, 0.5), ("refused", 40, 0.02), ("failed", 12, 0.01))),
        "# TYPE mailingestd_polls_total counter",
        *(f'mailingestd_polls_total{{result="{result}"}} {math.floor(1000 * rate + rate * elapsed)}'
          for result, rate in POLLS_PER_SECOND.items()),
        "# TYPE mailingestd_messages_ingested_total counter",
        f"mailingestd_messages_ingested_total {math.floor(250_000 + MESSAGES_PER_SECOND * elapsed)}",
        "# TYPE mailingestd_bytes_ingested_total counter",
        f"mailingestd_bytes_ingested_total {math.floor((250_000 + MESSAGES_PER_SECOND * elapsed) * 48_000)}",
        "# TYPE mailingestd_last_ingest_timestamp_seconds gauge",
        f"mailingestd_last_ingest_timestamp_seconds {now - 0.3:.3f}",
        *_histogram_lines("mailingestd_fetch_duration_seconds", LATENCY_BOUNDS, 0.4, 3.0, elapsed),
        *_histogram_lines("mailingestd_new_mail_latency_seconds", LATENCY_BOUNDS, 0.7, 8.0, elapsed),
        *_histogram_lines("mailingestd_scheduler_lag_seconds", LAG_BOUNDS, 0.8, 20.0, elapsed),
        "# TYPE mailingestd_idle_connections gauge",
        "mailingestd_idle_connections 6012",
        "# TYPE mailingestd_outbox_depth gauge",
        f"mailingestd_outbox_depth {17 + int(elapsed) % 5}",
        "# TYPE mailingestd_published_total counter",
        f"mailingestd_published_total {math.floor(249_980 + MESSAGES_PER_SECOND * elapsed)}",
        "# TYPE mailingestd_publish_errors_total counter",
        f"mailingestd_publish_errors_total {math.floor(3 + 0.05 * elapsed)}",
        "# TYPE mailingestd_uidvalidity_changes_total counter",
        "mailingestd_uidvalidity_changes_total 1",
        "# TYPE mailingestd_frames_dropped_total counter",
        *(f'mailingestd_frames_dropped_total{{role="{role}"}} 0' for role in ROLES),
        "# TYPE mailingestd_scheduler_high_interval_seconds gauge",
        "mailingestd_scheduler_high_interval_seconds 60",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def realistic_textfile_writer(textfile_dir: Path) -> Iterator[None]:
    """Keep ``textfile_dir/mailingestd.prom`` fresh, as the daemon does (atomic rename)."""
    started_at = time.time()
    stop = threading.Event()

    def write() -> None:
        temporary = textfile_dir / f".{TEXTFILE_NAME}.tmp"  # node_exporter reads *.prom only
        temporary.write_text(realistic_textfile(started_at, time.time()))
        os.replace(temporary, textfile_dir / TEXTFILE_NAME)

    def keep_writing() -> None:
        while not stop.wait(0.5):
            write()

    write()
    writer = threading.Thread(target=keep_writing, name="textfile-writer", daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()


@contextlib.contextmanager
def daemon_textfile(textfile_dir: Path) -> Iterator[None]:
    """The real daemon writes the textfile: a Dovecot with mail, an account with a wrong password
    (auth_failed), one on a closed port (backoff), and a FIFO queue on moto (the publisher)."""
    from harness import PASSWORD_ENV, Daemon, account_toml, wait_until
    from devtools.devservers import Dovecot, MotoServer, free_port

    root = textfile_dir.parent / "daemon-source"
    root.mkdir()
    root.chmod(0o755)
    with Dovecot(root / "dovecot", users=2) as dovecot, MotoServer(root / "moto") as moto:
        queue = moto.create_queue("alerts.fifo", fifo=True)
        accounts = "".join(account_toml(user, dovecot.host, dovecot.port) for user in dovecot.users)
        accounts += (f'\n[[accounts]]\nid = "wrongpw"\nhost = "{dovecot.host}"\nport = {dovecot.port}\ntls = "none"\n'
                     f'username = "nobody"\npassword_env = "WRONG_PASSWORD"\n'
                     f'\n[[accounts]]\nid = "closed"\nhost = "localhost"\nport = {free_port()}\ntls = "none"\n'
                     f'username = "nobody"\npassword_env = "{PASSWORD_ENV}"\n')
        sections = (f'[queue]\nkind = "sqs"\nurl = "{queue}"\nendpoint_url = "{moto.endpoint_url}"\n'
                    '[limits]\nconnects_per_minute = 600\n')
        daemon = Daemon(root / "daemon", accounts=accounts, password=dovecot.password, sections=sections,
                        env={**moto.env, "WRONG_PASSWORD": "not-the-password"})
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(text.replace(str(daemon.metrics_dir / TEXTFILE_NAME),
                                                   str(textfile_dir / TEXTFILE_NAME)))
        with daemon:
            appended_at = time.time()
            for n, user in enumerate(dovecot.users * 3):
                dovecot.append(user, f"Message-ID: <alert-{n}@t>\r\nSubject: {n}\r\n\r\nbody\r\n".encode())
            daemon.wait_stored(6, timeout=30)

            def last_ingest() -> float:
                path = textfile_dir / TEXTFILE_NAME
                text = path.read_text() if path.exists() else ""
                match = re.search(r"^mailingestd_last_ingest_timestamp_seconds (\S+)$", text, re.MULTILINE)
                return float(match.group(1)) if match else 0.0

            # The gauge MailingestdNoNewMail reads moves when mail is stored (it stayed 0 for ever).
            wait_until(lambda: appended_at <= last_ingest() <= time.time(), 10, 0.3,
                       f"mailingestd_last_ingest_timestamp_seconds after ingest (is {last_ingest()})")
            wait_until(lambda: daemon.status()["accounts"]["by_state"].get("auth_failed"), 30, 0.5, "auth_failed")
            yield


# A source keeps TEXTFILE_NAME in the directory it is given up to date while its context is open.
TEXTFILE_SOURCES: dict[str, Callable[[Path], AbstractContextManager[None]]] = {
    "realistic": realistic_textfile_writer,
    "daemon": daemon_textfile,
}


def test_every_metric_of_the_textfile_is_used() -> None:
    exprs = "\n".join(dashboard_exprs(DASHBOARD) + rule_exprs(RULES))
    families = set(re.findall(r"^# TYPE (\w+)", realistic_textfile(0.0, 60.0), re.MULTILINE))
    unused = {family for family in families if not re.search(rf"\b{family}(_bucket)?\b", exprs)}
    assert not unused, f"metrics neither on the dashboard nor in the rules: {sorted(unused)}"


# ---------------------------------------------------------------------------------------------
# a real node_exporter and Prometheus on loopback


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback only)
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # Prometheus answers bad queries with 400 and a JSON error
        return json.loads(error.read())


@contextlib.contextmanager
def _server(argv: list[str], log: Path, ready_url: str, timeout: float = 30.0) -> Iterator[None]:
    """Run ``argv`` until the context exits; wait until ``ready_url`` answers 200."""
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=1).close()  # noqa: S310 (loopback only)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{argv[0]} did not come up on {ready_url}:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def scraped_textfile(textfile_dir: Path, workdir: Path) -> Iterator[str]:
    """node_exporter reading ``textfile_dir`` and Prometheus (with our rules) scraping it every 1 s.

    Yields Prometheus's base URL once node_exporter has parsed the textfile and Prometheus holds
    three scrapes of it (enough for rate() and deriv()).
    """
    exporter_port, prometheus_port = _free_port(), _free_port()
    exporter = [
        _binary("prometheus-node-exporter", "prometheus-node-exporter"),
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={textfile_dir}",
        f"--web.listen-address=127.0.0.1:{exporter_port}",
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    prometheus = [
        _binary("prometheus", "prometheus"),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]
    url = f"http://127.0.0.1:{prometheus_port}"
    with (
        _server(exporter, workdir / "node_exporter.log", f"http://127.0.0.1:{exporter_port}/metrics"),
        _server(prometheus, workdir / "prometheus.log", f"{url}/-/ready"),
    ):
        deadline = time.monotonic() + 20
        while not _query(url, "count_over_time(mailingestd_build_info[1m]) >= 3")[1]:
            errors = _query(url, "node_textfile_scrape_error == 1")[1]
            if errors or time.monotonic() > deadline:
                log = (workdir / "node_exporter.log").read_text()[-3000:]
                pytest.fail(f"node_exporter did not serve {TEXTFILE_NAME} (scrape errors: {errors}):\n{log}")
            time.sleep(0.2)
        yield url


def _query(url: str, expr: str) -> tuple[str | None, list]:
    """(error or None, result series) of an instant query."""
    body = _http_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if body.get("status") != "success":
        return f"{body.get('errorType')}: {body.get('error')}", []
    return None, body["data"]["result"]


def unanswered_exprs(url: str, exprs: list[str], timeout: float = 15.0) -> dict[str, str]:
    """Exprs that Prometheus rejects, or that return no series within ``timeout``, with the reason.

    Comparisons are queried with ``bool`` so a threshold that is not crossed still answers.
    Empty answers are retried because recording rules need an evaluation or two after the
    first scrapes.
    """
    failures = {expr: "not queried" for expr in exprs}
    retry = set(exprs)
    deadline = time.monotonic() + timeout
    while retry:
        for expr in sorted(retry):
            error, result = _query(url, with_bool_comparisons(expr))
            if error:
                failures[expr] = error
                retry.discard(expr)
            elif result:
                del failures[expr]
                retry.discard(expr)
            else:
                failures[expr] = "no series"
        if not retry or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return failures


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("source", sorted(TEXTFILE_SOURCES))
def test_every_expression_answers(source: str, tmp_path: Path) -> None:
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    exprs = dashboard_exprs(DASHBOARD) + rule_exprs(RULES)
    with TEXTFILE_SOURCES[source](textfile_dir), scraped_textfile(textfile_dir, tmp_path) as url:
        failures = unanswered_exprs(url, exprs)
    assert not failures, "expressions that failed against Prometheus:\n" + "\n\n".join(
        f"{expr}\n  -> {reason}" for expr, reason in failures.items()
    )
