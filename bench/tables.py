"""The report's figures as Markdown rows: each scenario's figures, CPU by process, run time, README rows.

bench/summarize.py picks the reports and writes the tables; nothing here reads a file. Reports
written before a figure existed (the CPU breakdown, mbsync's process count) render without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bench.cpu import GROUPS

Row = tuple[str, ...]
# The order python -m bench runs them in (a report's JSON keeps its keys sorted).
ORDER = ("hold", "latency", "latency_light", "latency-folders", "quiet", "status", "backlog", "publish", "polling",
         "contended", "scheduler")
CPU_HEADER = ("scenario", "window", *("PostgreSQL" if g == "postgresql" else "Dovecot" if g == "dovecot" else g
                                      for g in GROUPS), "other", "machine")


def in_order(scenarios: dict[str, Any]) -> dict[str, Any]:
    """The scenarios in ORDER (unknown names last, as they came)."""
    rank = {name: index for index, name in enumerate(ORDER)}
    return dict(sorted(scenarios.items(), key=lambda item: rank.get(item[0], len(ORDER))))


def _fs(mbsync: dict[str, Any]) -> str:
    return f", on {mbsync['maildir_filesystem']}" if mbsync.get("maildir_filesystem") else ""


def _durability(daemon: dict[str, Any]) -> str:
    pg = daemon.get("postgresql")
    return f" (fsync {pg['fsync']}, full_page_writes {pg['full_page_writes']})" if pg else ""


def _workers(daemon: dict[str, Any]) -> str:
    return f" ({daemon['workers']} workers)" if daemon.get("workers") else ""


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds} s"


def _queue(result: dict[str, Any]) -> str:
    return result.get("queue") or "not recorded"


def machine_busy(result: dict[str, Any]) -> Any:
    """Cores the whole machine was busy during a load window, in new reports and old ones."""
    window = result.get("cpu_by_process", {}).get("load")
    return window["cores"]["machine"] if window else result.get("cpu_during_load", {}).get("machine_cores")


def ok(result: Any) -> bool:
    return isinstance(result, dict) and "error" not in result


def _met(value: Any) -> str:
    return "met" if value else "**missed**"


def rows(scenarios: dict[str, Any], machine: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(scenario, figure, measured, target/verdict) rows for one mode's scenarios."""
    s = scenarios
    out: list[tuple[str, str, str, str]] = []
    if "hold" in s and "error" not in s["hold"]:
        h = s["hold"]
        out += [("hold", f"{h['accounts']} accounts idle after (imap.threads {h['imap_threads']})",
                 f"{h['seconds_until_all_idle']} s (Dovecot sessions {h['dovecot_sessions']})", f"<= {h['target_seconds']} s"),
                ("hold", "PSS summed over the daemon's processes", f"{h['pss_mib']} MiB ({h['processes']} processes)",
                 f"<= {h['target_pss_mib']} MiB"),
                ("hold", f"CPU while quiet over {h['quiet_cpu']['wall_seconds']:.0f} s",
                 (f"{h['quiet_cpu']['core_fraction'] * 100:.2f} % of a core"
                  + (f", {h['quiet_cpu']['idle_renewals_in_window']:,} IDLE renewals in the window"
                     if "idle_renewals_in_window" in h["quiet_cpu"] else "")),
                 f"<= {h['target_core_fraction'] * 100:g} %"),
                ("hold", "verdict", "", _met(h["meets_target"]))]
    for name in ("latency", "latency_light"):
        if name in s and "error" not in s[name]:
            lat = s[name]
            st, sq, fl = (lat["append_to_store_seconds"], lat["append_to_sqs_seconds"],
                          lat["floor_append_to_idle_exists_seconds"])
            out += [(name, f"appends ({lat['rate_target_per_second']:g}/s asked)",
                     (f"{lat['appended']} at {lat['append_rate_achieved']}/s, stored {lat['stored']}, "
                     f"on the queue ({lat.get('queue') or 'SQS'}) {lat['announced_on_sqs']}"), "all stored"),
                    (name, "append -> store p50 / p99 / max", f"{st['p50']} / {st['p99']} / {st['max']} s", ""),
                    (name, "append -> SQS p50 / p99 / max", f"{sq['p50']} / {sq['p99']} / {sq['max']} s", ""),
                    (name, f"bare IDLE floor p50 / p99 ({fl['count']} msgs)", f"{fl['p50']} / {fl['p99']} s", ""),
                    (name, "store p99 - floor p99", (f"{lat['p99_minus_floor_p99']} s "
                     f"(machine busy {machine_busy(lat)} of {machine['cpus_usable']} cores)"),
                     f"{lat['target']}: {_met(lat['meets_target'])}")]
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
                 f"< {q['target_core_fraction'] * 100:g} %: {_met(q['meets_target'])}")]
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
                 f"{b['accounts']} accounts: daemon{_workers(d)} into PostgreSQL{_durability(d)} + outbox, "
                 f"queue {_queue(b)}"),
                 f"{d['messages_per_second']} msg/s, {d['mb_per_second']} MB/s", ""),
                ("backlog", (f"mbsync, {m['processes']} processes (Maildir, "
                             f"FSync {'yes' if m.get('fsync') else 'no'}{_fs(m)})"),
                 f"{m['messages_per_second']} msg/s, {m['mb_per_second']} MB/s", ""),
                ("backlog", f"bare imapclient loop, {bare['processes']} processes (no store)",
                 f"{bare['messages_per_second']} msg/s, {bare['mb_per_second']} MB/s", ""),
                ("backlog", "ratios", f"{b['ratio_to_mbsync']}x mbsync, {b['ratio_to_bare_loop']}x bare",
                 f"{b['target'].split(' (')[0]}: {_met(b['meets_target'])}")]
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
                 f"(Dovecot {p['dovecot_cpu_core_fraction'] * 100:.1f} %)"),
                 (f"<= {p['target_daemon_cores'] * 100:g} % of a core: " if "target_daemon_cores" in p else "")
                 + _met(p["meets_target"]))]
    if "scheduler" in s and "error" not in s["scheduler"]:
        sc = s["scheduler"]
        out.append(("scheduler", f"{sc['accounts']:,} accounts, 1 simulated hour: planner / bare loop",
                    (f"{sc['planner']['decisions_per_cpu_second']:,.0f} / {sc['bare_loop']['decisions_per_cpu_second']:,.0f}"
                    f" decisions per CPU second"), f">= 0.5x: {sc['planner_to_bare_ratio']} {_met(sc['meets_target'])}"))
    if "contended" in s and "error" not in s["contended"]:
        out += contended_rows(s["contended"])
    return out


def contended_rows(c: dict[str, Any]) -> list[Row]:
    cap, late = c["max_connections_per_server"], c["capacity"].get("late") or {}
    out: list[Row] = [
        ("contended", (f"{c['accounts']} accounts on one server, at most {cap} connections and "
                       f"{c['connects_per_minute']} connects/min: the status line"), c["status_line"] or "(none)", ""),
        ("contended", "holding / rotating; polls/min needed / possible; logins last minute / allowed",
         (f"{c['capacity']['holding']} / {c['capacity']['rotating']}; {c['capacity']['polls_needed']:,.0f} / "
          f"{c['capacity']['polls_possible']:,.0f}; {c['capacity']['logins_last_minute']} / "
          f"{c['capacity']['logins_allowed']}"), ""),
    ]
    for tier, t in sorted(c["append_to_store"].items(), key=lambda item: item[1]["interval_seconds"]):
        count = c["tiers"].get(tier, 0)
        carried = (t["p95_seconds"] is not None and t["p95_seconds"] <= t["bound_seconds"]
                   and t["stored_in_window"] == t["appended"])
        verdict = (f"late by the limits ({late[tier]:,} of {count:,} accounts)" if late.get(tier)
                   else f"p95 <= {t['bound_seconds']:g} s, all stored: {_met(carried)}")
        out.append(("contended", f"{tier} tier (every {t['interval_seconds']:g} s): append -> store p50 / p95, stored",
                    f"{_s(t['p50_seconds'])} / {_s(t['p95_seconds'])}, {t['stored_in_window']} of {t['appended']}", verdict))
    out += [("contended", "peak Dovecot sessions (doveadm who)", f"{c['peak_sessions']}",
             f"<= {cap} (+1): {_met(c['peak_sessions'] <= cap + 1)}"),
            ("contended", "verdict", "", _met(c["meets_target"]))]
    return out


def windows(value: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, breakdown) of every ``cpu_by_process`` window in a scenario's result, in report order."""
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if key == "cpu_by_process" and isinstance(item, dict):
            for window, breakdown in item.items():
                yield (f"{where}: {window}" if where else window), breakdown
        elif isinstance(item, dict):
            yield from windows(item, f"{where}.{key}" if where else key)


def cpu_rows(scenarios: dict[str, Any]) -> list[Row]:
    """One row per measured window: cores of each process group (1.0 = one core busy the whole window)."""
    out: list[Row] = []
    for name, result in scenarios.items():
        if not ok(result):
            continue
        for label, b in windows(result):
            cores = b["cores"]
            queue = f", queue {b['queue']}" if b.get("queue") else ""
            out.append((name, f"{label} ({b['window_seconds']:.0f} s{queue})",
                        *(_cores(cores.get(g)) for g in (*GROUPS, "other", "machine"))))
    return out


def _cores(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def runtime(scenarios: dict[str, Any]) -> str:
    """Minutes per scenario from ``scenario_seconds`` (hold, latency and latency_light share one step)."""
    parts = []
    for name, result in scenarios.items():
        if name in ("latency", "latency_light") or "scenario_seconds" not in result:
            continue
        part = f"{'hold + latency' if name == 'hold' else name} {result['scenario_seconds'] / 60:.1f}"
        if name == "backlog" and ok(result):
            d = result["daemon"]
            phases = [("appending the mail", result["mail"]["seconds"]), ("bare loop", result["bare_loop"]["seconds"]),
                      ("mbsync", result["mbsync"]["seconds"]),
                      ("daemon until the last commit", d.get("seconds_from_spawn_to_last_commit"))]
            part += " (" + ", ".join(f"{what} {seconds / 60:.1f}" for what, seconds in phases if seconds) + ")"
        parts.append(part)
    return ", ".join(parts)


def _hold_row(h: dict[str, Any]) -> tuple[str, str, str]:
    return (f"hold: {h['accounts']:,} accounts in IDLE",
            (f"all idling {h['seconds_until_all_idle']} s after start; PSS {h['pss_mib']} MiB over "
             f"{h['processes']} processes; {h['quiet_cpu']['core_fraction'] * 100:.1f} % of a core while quiet"),
            (f"<= {h['target_seconds']} s, <= {h['target_pss_mib']} MiB, <= {h['target_core_fraction'] * 100:g} %: "
             f"{_met(h['meets_target'])}"))


def _latency_row(lat: dict[str, Any]) -> tuple[str, str, str]:
    st, fl = lat["append_to_store_seconds"], lat["floor_append_to_idle_exists_seconds"]
    return (f"latency: {lat['rate_target_per_second']:g} appends/s over those accounts",
            (f"append -> store p50 {st['p50']} s, p99 {st['p99']} s; bare IDLE client (Dovecot's floor) "
             f"p99 {fl['p99']} s; {lat['stored']:,} of {lat['appended']:,} stored"),
            f"{lat['target']}: {_met(lat['meets_target'])} ({lat['p99_minus_floor_p99']:+} s)")


def _quiet_row(q: dict[str, Any]) -> tuple[str, str, str]:
    return (f"quiet: {q['accounts']:,} accounts, imap.threads {q['imap_threads']}",
            f"{q['quiet_cpu']['core_fraction'] * 100:.2f} % of a core while quiet",
            f"< {q['target_core_fraction'] * 100:g} %: {_met(q['meets_target'])}")


def _status_row(st: dict[str, Any]) -> tuple[str, str, str]:
    medians = [st[f"accounts_in_{w}"]["status_time"]["median_seconds"] for w in ("config_file", "store")]
    return (f"status: `mailingestctl status` with {st['accounts_configured']:,} accounts",
            f"median {min(medians)}-{max(medians)} s", f"< 1 s: {_met(st['meets_target'])}")


def _backlog_row(b: dict[str, Any]) -> tuple[str, str, str]:
    d, m, bare = b["daemon"], b["mbsync"], b["bare_loop"]
    return ((f"backlog: {b['accounts']} accounts, {b['mail']['messages']:,} messages, "
                        f"{b['mail']['bytes'] / 1e9:.1f} GB"),
            (f"daemon{_workers(d)} into PostgreSQL{_durability(d)} + outbox {d['messages_per_second']:,.0f} msg/s; "
             f"mbsync (FSync {'yes' if m.get('fsync') else 'no'}, {m['processes']} processes) "
             f"{m['messages_per_second']:,.0f} msg/s; bare fetch loop {bare['messages_per_second']:,.0f} msg/s; "
             f"queue {_queue(b)}"),
            (f"{b['target'].split(' (')[0]}: {_met(b['meets_target'])} ({b['ratio_to_mbsync']}x mbsync, "
             f"{b['ratio_to_bare_loop']}x bare)"))


def _publish_row(pub: dict[str, Any]) -> tuple[str, str, str]:
    return (f"publish: {pub['messages']:,} envelopes from the outbox into bench/sqs_sink.py",
            "; ".join(f"{kind} {pub[kind]['publisher']['messages_per_second']:,.0f} msg/s "
                      f"({pub[kind]['ratio_to_bare_loop']}x the bare boto3 loop)" for kind in ("standard", "fifo")),
            f">= 2,000 msg/s, >= 0.8x: {_met(pub['meets_target'])}")


def _polling_row(p: dict[str, Any]) -> tuple[str, str, str]:
    return (f"polling: {p['accounts']:,} accounts without IDLE",
            (f"{p['daemon_polls_per_minute']:,} polls/min (Dovecot counted {p['server_noop_status_per_minute']:,}), "
             f"lateness p99 <= {p['lag_p99_bucket_seconds']} s, daemon {p['daemon_cpu_core_fraction']:.2f} cores"),
            (f">= {p['target_polls_per_minute']:,}/min, p99 < {p['lag_target_seconds']:g} s"
             + (f", <= {p['target_daemon_cores']:g} cores" if "target_daemon_cores" in p else "")
             + f": {_met(p['meets_target'])}"))


def _contended_row(c: dict[str, Any]) -> tuple[str, str, str]:
    tiers = ", ".join(f"{tier} p95 {_s(t['p95_seconds'])} ({t['stored_in_window']}/{t['appended']} stored)"
                      for tier, t in sorted(c["append_to_store"].items(),
                                            key=lambda item: item[1]["interval_seconds"]))
    return ((f"contended: {c['accounts']:,} accounts on one server, {c['max_connections_per_server']} "
                          f"connections, {c['connects_per_minute']:,} connects/min"),
            f"{c['status_line']}; peak {c['peak_sessions']} sessions; {tiers}",
            f"cap held, the tiers the limits carry on time: {_met(c['meets_target'])}")


def _latency_folders_row(lf: dict[str, Any]) -> tuple[str, str, str]:
    return ((f"latency-folders: {lf['accounts']:,} accounts x {lf['folders_per_account']} "
                                f"folders, {lf['appended']:,} appends at {lf['rate_target_per_second']:g}/s"),
            (f"append -> store p99: INBOX {lf['append_to_store_inbox_seconds']['p99']} s, other folders "
             f"{lf['append_to_store_other_folders_seconds']['p99']} s; {lf['stored']:,} of {lf['appended']:,} stored"),
            f"other folders within 0.5 s of INBOX: {_met(lf['meets_target'])} ({lf['other_minus_inbox_p99']:+} s)")


def _scheduler_row(sc: dict[str, Any]) -> tuple[str, str, str]:
    return (f"scheduler: {sc['accounts']:,} accounts, 1 simulated hour, no network",
            (f"planner {sc['planner']['decisions_per_cpu_second']:,.0f} decisions per CPU-second, bare wheel loop "
             f"{sc['bare_loop']['decisions_per_cpu_second']:,.0f}"),
            f">= 0.5x: {_met(sc['meets_target'])} ({sc['planner_to_bare_ratio']}x)")


# What README.md's table shows of each scenario: (what, measured, target and verdict).
README_ROWS = {"hold": _hold_row, "latency": _latency_row, "quiet": _quiet_row, "status": _status_row, "backlog": _backlog_row, "publish": _publish_row, "polling": _polling_row, "contended": _contended_row, "latency-folders": _latency_folders_row, "scheduler": _scheduler_row}


def readme_rows(scenarios: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(scenario key, what, measured, target and verdict) for the README's table, in README_ROWS' order."""
    return [(name, *row(scenarios[name])) for name, row in README_ROWS.items() if ok(scenarios.get(name))]
