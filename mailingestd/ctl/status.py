"""mailingestctl status, drain, resume and reload: requests to the running daemon over control.sock.
``status --json`` prints the supervisor's reply as it came (a public output); the text form,
``format_status``, reads it as the typed ``control.StatusReply``."""

from __future__ import annotations

import time
from typing import Any

import click
from msgspec import UNSET

from .. import control
from ..logs import printable
from ..sysexits import EX_TEMPFAIL, EX_UNAVAILABLE
from .common import _mib, ask, cli, coloured_state, emit, fail, load_config


def format_cluster(cluster: dict[str, Any] | None) -> list[str]:
    """The CLUSTER block: the mode and, with PostgreSQL leases, every node as this node sees it."""
    if not cluster:
        return ["CLUSTER  -"]
    if not cluster.get("nodes") and "held" not in cluster:
        return [f"CLUSTER  {cluster['mode']}"]
    age = cluster.get("last_renewal_age")
    lines = [f"CLUSTER  {cluster['mode']}  node {cluster['node_id']}  holds {cluster.get('held', 0)} of "
             f"{cluster.get('accounts', 0)} accounts (fair share {cluster.get('target', 0)})  lease "
             f"{cluster.get('lease_time', 0):g}s  renewed {'-' if age is None else f'{age:.1f}s ago'}  "
             f"renewal failures {cluster.get('renewal_failures', 0)}",
             f"  {'node':<24} {'state':<10} {'capacity':>8} {'leases':>7} {'heartbeat':>10} {'publish/s':>10}"]
    for n in cluster.get("nodes", []):
        state = n["state"] if n["live"] else "lost"
        lines.append(f"  {n['node_id']:<24} {state:<10} {n['capacity']:>8g} {n['leases']:>7} "
                     f"{n['heartbeat_age']:>9.1f}s {n.get('publish_rate', 0):>10g}")
    return lines


def format_status(data: control.StatusReply) -> str:
    sup = data.supervisor
    lines = [f"mailingestd {sup.version}  pid {sup.pid}  {sup.state}  up {sup.uptime:.0f}s  "
             f"node {sup.node_id}  store {sup.store}  memory {_mib(sup.memory_bytes)} of "
             f"{_mib(sup.memory_budget)}", "", "PROCESSES"]
    lines.append(f"  {'role':<10} {'slot':>4} {'pid':>8} {'cpu':>4} {'state':<10} {'rss':>9} {'restarts':>8} "
                 f"{'heartbeat':>9}")
    for c in data.children:
        age = "-" if c.heartbeat_age is None else f"{c.heartbeat_age:.1f}s"
        lines.append(f"  {c.role:<10} {c.slot:>4} {c.pid or '-':>8} {'-' if c.cpu is None else c.cpu:>4} "
                     f"{c.state:<10} {_mib(c.rss_bytes):>9} {c.restarts:>8} {age:>9}")
    acc = data.accounts
    lines += ["", f"ACCOUNTS  {acc.total}"]
    lines.append("  by state:    " + ("  ".join(f"{coloured_state(k)} {int(v)}"
                                                for k, v in sorted(acc.by_state.items()) if v) or "-"))
    lines.append("  by priority: " + ("  ".join(f"{k} {int(v)}" for k, v in sorted(acc.by_priority.items()) if v)
                                      or "-"))
    lines += ["", "SERVERS", (f"  {'server':<32} {'connections':>11} {'limit':>6} {'waiting':>8} "
                              f"{'rotating':>8} {'logins/min':>13} {'polls/min':>15}")]
    for server, s in data.servers.items():
        # logins/min: used of allowed; polls/min: what the limits allow of what the tiers need.
        capacity = (f"{s.rotating:>8} {s.logins_last_minute:>6}/{s.logins_allowed:<6} "
                    f"{s.polls_possible:>7.0f}/{s.polls_needed:<7.0f}" if s.polls_needed is not UNSET else "")
        lines.append(f"  {server:<32} {int(s.connections):>11} {'-' if s.limit is None else int(s.limit):>6} "
                     f"{int(s.waiting):>8} {capacity}".rstrip())
    lines += [f"  {s.deficit}" for s in data.servers.values() if s.deficit]
    lines += ["", *format_cluster(data.cluster)]
    t = data.traffic
    lag = ("-" if t.lag_p99 is None else f"p50 <= {t.lag_p50:g}s, p99 <= {t.lag_p99:g}s")
    lines += ["", "TRAFFIC",
              f"  polls     last minute {int(t.polls_last_minute)}   total {int(t.polls_total)}",
              f"  messages  last minute {int(t.messages_last_minute)}   total {int(t.messages_total)}",
              f"  idling connections {int(t.idle_connections)}   scheduler lag {lag}"]
    out = data.outbox
    if out.enabled:
        lines.append(f"  outbox depth {int(out.depth)}   oldest {out.oldest_age:g}s   "
                     f"published {int(out.published_total)} ({out.publish_rate:g}/s on this node)   "
                     f"publish errors {int(out.publish_errors_total)}   parked {int(out.parked)}")
    else:
        lines.append("  queue: none (queue.kind = \"none\")")
    if data.stuck_folders:
        lines += ["", "STUCK FOLDERS (a message over imap.max_message_size; see imap.oversize)"]
        lines += [f"  {printable(line)}" for line in data.stuck_folders]
    lines += ["", "RECENT ERRORS"] + ([f"  {printable(e)}" for e in data.errors] or ["  none"])
    return "\n".join(lines)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the supervisor, every child, accounts, servers, traffic, outbox and recent errors."""
    reply = ask(ctx, control.Status())
    click.echo(control.pretty(reply.data) if as_json else format_status(control.status_of(reply)))


@cli.command()
@click.option("--wait", is_flag=True, help="Block until drained, showing progress on stderr, then print a summary.")
@click.option("--timeout", type=float, default=None, metavar="S",
              help="With --wait: give up after S seconds (exit 75, EX_TEMPFAIL: try again later).")
@click.option("--exit", "exit_after", is_flag=True, help="Exit the daemon (status 0) once drained.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def drain(ctx: click.Context, wait: bool, timeout: float | None, exit_after: bool, as_json: bool) -> None:
    """Stop starting new work, finish what is in flight, commit, LOGOUT every IMAP connection."""
    cfg = load_config(ctx)
    started = time.monotonic()
    reply = ask(ctx, control.Drain(exit=exit_after))
    if not wait:
        state = reply.data.get("state")
        emit(as_json, {"state": state}, f"draining (state {state})")
        return
    deadline = None if timeout is None else started + timeout
    last: control.StatusReply | None = None
    shown = None
    while True:
        try:
            last = control.status_of(control.call(cfg.daemon.runtime_dir, control.Status(), 5.0))
        except control.DaemonUnreachable:
            if exit_after:
                took = time.monotonic() - started
                emit(as_json, {"state": "exited", "seconds": round(took, 3)}, f"drained and exited after {took:.1f}s")
                return
            fail(EX_UNAVAILABLE, "the daemon went away while draining")
        state = last.supervisor.state
        if state in ("drained", "stopping"):
            break
        progress = (state, last.drain.in_flight_accounts, int(last.outbox.depth))
        if progress != shown:  # one line per change, on stderr: stdout keeps the result alone
            click.echo(f"{time.monotonic() - started:5.1f}s {state}: {progress[1]} accounts in flight, "
                       f"outbox depth {progress[2]}", err=True)
            shown = progress
        if deadline is not None and time.monotonic() > deadline:
            fail(EX_TEMPFAIL, f"not drained after {timeout:g}s (state {state}, {progress[1]} accounts in flight); "
                              "the drain goes on: run drain --wait again, or resume")
        time.sleep(0.2)
    took = time.monotonic() - started
    in_flight, messages, depth = last.drain.in_flight_accounts, int(last.traffic.messages_total), int(last.outbox.depth)
    emit(as_json, {"state": state, "seconds": round(took, 3), "in_flight_accounts": in_flight,
                   "messages_total": messages, "outbox_depth": depth},
         f"drained in {took:.1f}s: {in_flight} accounts were in flight; {messages} messages stored in total; "
         f"outbox depth {depth}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def resume(ctx: click.Context, as_json: bool) -> None:
    """Undo a drain: accounts are scheduled and connected again."""
    state = ask(ctx, control.Resume()).data.get("state")
    emit(as_json, {"state": state}, f"resumed (state {state})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def reload(ctx: click.Context, as_json: bool) -> None:
    """Re-read the configuration file, like SIGHUP; a bad file is refused and the old one kept."""
    reply = ask(ctx, control.Reload(), timeout=30.0)
    emit(as_json, {"reloaded": True, **reply.data}, "reloaded")

