"""``python -m bench.summarize [report.json] [mode]``: the report's figures as a Markdown table.

Used to write bench/RESULTS.md from a run's report, so no figure is typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR


def _met(value: Any) -> str:
    return "met" if value else "**missed**"


def rows(run: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(scenario, figure, measured, target/verdict) rows for one mode's run."""
    s = run["scenarios"]
    out: list[tuple[str, str, str, str]] = []
    if "hold" in s and "error" not in s["hold"]:
        h = s["hold"]
        out += [("hold", f"{h['accounts']} accounts idle after (imap.threads {h['imap_threads']})",
                 f"{h['seconds_until_all_idle']} s (Dovecot sessions {h['dovecot_sessions']})", "< 60 s"),
                ("hold", "PSS summed over the daemon's processes", f"{h['pss_mib']} MiB ({h['processes']} processes)",
                 "< 512 MiB"),
                ("hold", f"CPU while quiet over {h['quiet_cpu']['wall_seconds']:.0f} s",
                 f"{h['quiet_cpu']['core_fraction'] * 100:.2f} % of a core", "< 5 %"),
                ("hold", "verdict", "", _met(h["meets_target"]))]
    for name in ("latency", "latency_light"):
        if name in s and "error" not in s[name]:
            lat = s[name]
            st, sq, fl = (lat["append_to_store_seconds"], lat["append_to_sqs_seconds"],
                          lat["floor_append_to_idle_exists_seconds"])
            out += [(name, f"appends ({lat['rate_target_per_second']:g}/s asked)",
                     (f"{lat['appended']} at {lat['append_rate_achieved']}/s, stored {lat['stored']}, "
                     f"on SQS {lat['announced_on_sqs']}"), "all stored"),
                    (name, "append -> store p50 / p99 / max", f"{st['p50']} / {st['p99']} / {st['max']} s", ""),
                    (name, "append -> SQS p50 / p99 / max", f"{sq['p50']} / {sq['p99']} / {sq['max']} s", ""),
                    (name, f"bare IDLE floor p50 / p99 ({fl['count']} msgs)", f"{fl['p50']} / {fl['p99']} s", ""),
                    (name, "store p99 - floor p99", (f"{lat['p99_minus_floor_p99']} s "
                     f"(machine busy {lat['cpu_during_load']['machine_cores']} of "
                     f"{lat['cpu_during_load']['machine_cpus']} cores)"), f"<= 0.5 s: {_met(lat['meets_target'])}")]
    if "latency-folders" in s and "error" not in s["latency-folders"]:
        lf = s["latency-folders"]
        inbox, other = lf["append_to_store_inbox_seconds"], lf["append_to_store_other_folders_seconds"]
        out += [("latency-folders", (f"{lf['appended']} appends at {lf['rate_target_per_second']:g}/s to "
                 f"{lf['accounts']} accounts x {lf['folders_per_account']} folders"),
                 f"stored {lf['stored']}", "all stored"),
                ("latency-folders", "append -> store p50 / p99, INBOX", f"{inbox['p50']} / {inbox['p99']} s", ""),
                ("latency-folders", "append -> store p50 / p99, other folders", f"{other['p50']} / {other['p99']} s",
                 ""),
                ("latency-folders", "other folders' p99 - INBOX p99", f"{lf['other_minus_inbox_p99']} s",
                 f"<= 0.5 s: {_met(lf['meets_target'])}")]
    if "quiet" in s and "error" not in s["quiet"]:
        q = s["quiet"]
        out += [("quiet", f"{q['accounts']} accounts idle after (imap.threads {q['imap_threads']})",
                 f"{q['seconds_until_all_idle']} s", ""),
                ("quiet", "CPU while quiet", f"{q['quiet_cpu']['core_fraction'] * 100:.2f} % of a core",
                 f"< 2 %: {_met(q['meets_target'])}")]
    if "status" in s and "error" not in s["status"]:
        for where in ("config_file", "store"):
            t = s["status"][f"accounts_in_{where}"]["status_time"]
            out.append(("status", f"mailingestctl status, 10,000 accounts in the {where.replace('_', ' ')}",
                        (f"median {t['median_seconds']} s, max {t['max_seconds']} s (daemon's reply alone "
                        f"{t.get('daemon_reply_median_seconds')} s)"), f"< 1 s: {_met(t['meets_target'])}"))
    if "backlog" in s and "error" not in s["backlog"]:
        b = s["backlog"]
        d, m, bare = b["daemon"], b["mbsync"], b["bare_loop"]
        out += [("backlog", (f"{b['mail']['messages']} messages, {b['mail']['bytes'] / 1e6:.0f} MB, "
                 f"{b['accounts']} accounts: daemon into PostgreSQL + outbox"),
                 f"{d['messages_per_second']} msg/s, {d['mb_per_second']} MB/s", ""),
                ("backlog", "mbsync (Maildir, FSync no)", f"{m['messages_per_second']} msg/s, {m['mb_per_second']} MB/s",
                 ""),
                ("backlog", "bare imapclient loop (no store)",
                 f"{bare['messages_per_second']} msg/s, {bare['mb_per_second']} MB/s", ""),
                ("backlog", "ratios", f"{b['ratio_to_mbsync']}x mbsync, {b['ratio_to_bare_loop']}x bare",
                 f">= 1.5x / >= 0.6x: {_met(b['meets_target'])}")]
        if "outbox_met" in b:
            out.append(("backlog", "outbox empty after the last commit (into bench/sqs_sink.py)",
                        f"{d['outbox_empty_seconds_after_last_commit']} s, {d['envelopes_received_by_sink']} envelopes",
                        f"<= 10 s: {_met(b['outbox_met'])}"))
    if "publish" in s and "error" not in s["publish"]:
        pub = s["publish"]
        for kind in ("standard", "fifo"):
            p, bare = pub[kind]["publisher"], pub[kind]["bare_loop"]
            out += [("publish", (f"{pub['messages']:,} envelopes, {kind} queue: publisher"),
                     (f"{p['messages_per_second']} msg/s, {p['cpu_seconds_per_1000']} CPU-s per 1,000 "
                      f"(PostgreSQL {p.get('postgresql_cpu_seconds_per_1000')}), {p['entries_per_request']} per request"),
                     ">= 2,000 msg/s"),
                    ("publish", f"{kind} queue: bare boto3 loop, same sink",
                     f"{bare['messages_per_second']} msg/s, {bare['cpu_seconds_per_1000']} CPU-s per 1,000",
                     f">= 0.8x: {pub[kind]['ratio_to_bare_loop']} {_met(pub[kind]['met'])}")]
    if "polling" in s and "error" not in s["polling"]:
        p = s["polling"]
        out += [("polling", f"{p['accounts']} accounts without IDLE, polls per minute",
                 (f"daemon {p['daemon_polls_per_minute']}, Dovecot NOOP+STATUS {p['server_noop_status_per_minute']} "
                 f"(expected {p['expected_polls_per_minute']}), logins in window {p['logins_in_window']}; "
                 f"all connected {p.get('seconds_until_all_connected')} s after start"),
                 f">= {p['target_polls_per_minute']}"),
                ("polling", "lateness p99 (histogram bucket bound)", f"<= {p['lag_p99_bucket_seconds']} s",
                 f"< {p['lag_target_seconds']:g} s"),
                ("polling", "daemon CPU", (f"{p['daemon_cpu_core_fraction'] * 100:.1f} % of a core "
                 f"(Dovecot {p['dovecot_cpu_core_fraction'] * 100:.1f} %)"), _met(p["meets_target"]))]
    if "scheduler" in s and "error" not in s["scheduler"]:
        sc = s["scheduler"]
        out.append(("scheduler", f"{sc['accounts']:,} accounts, 1 simulated hour: planner / bare loop",
                    (f"{sc['planner']['decisions_per_cpu_second']:,.0f} / {sc['bare_loop']['decisions_per_cpu_second']:,.0f}"
                    f" decisions per CPU second"), f">= 0.5x: {sc['planner_to_bare_ratio']} {_met(sc['meets_target'])}"))
    return out


def markdown(report: dict[str, Any], mode: str) -> str:
    run = report[mode]
    machine = run["machine"]
    lines = [f"### {mode} run, {run['started_at']} (commit {machine['commit']})", "",
             (f"Machine: {machine['cpus_usable']} usable CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
             f"kernel {machine['kernel']}, Python {machine['python']}, Dovecot {machine['dovecot']}. "
             f"Whole run: {run.get('total_seconds', 0) / 60:.1f} minutes."), "",
             "| scenario | figure | measured | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(run)]
    errors = [f"- {name}: {result['error']}" for name, result in run["scenarios"].items() if "error" in result]
    if errors:
        lines += ["", "Scenarios that failed:", *errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else max((BENCH_DIR / "results").glob("*/report.json"))
    report = json.loads(path.read_text())
    modes = [argv[1]] if len(argv) > 1 else sorted(report)
    for mode in modes:
        print(markdown(report, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
