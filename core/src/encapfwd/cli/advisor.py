"""``encapfwd advisor …``: the health checks of a port (start, set, stop) and their report."""

from __future__ import annotations

import json
import shlex

import click

from encapfwd import config as cfg
from encapfwd.cli.common import echo_table, edit_config


@click.group()
def advisor():
    """Health checks (IBM advisors): NAME PORT probes that port's servers on every cluster."""


@advisor.command("start", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("port")
@click.argument("words", nargs=-1)
@click.pass_context
def advisor_start(ctx, name, port, words):
    """Start NAME PORT [interval S] [timeout S] [rise N] [fall N] [via address|forwarding] [hold S] [KEY VALUE …].

    \b
    connect                      TCP handshake
    http   path P status 200-299 host H
    udp    send hex:…|TEXT expect hex:…|TEXT
    Defaults: interval 5, timeout 3, rise 2, fall 3, via address, hold 2.
    """
    edit_config(ctx, lambda c, r: cfg.advisor_start(c, name, port, words, r), f"advisor {name} {port} started")


@advisor.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("port")
@click.argument("words", nargs=-1, required=True)
@click.pass_context
def advisor_set(ctx, name, port, words):
    """Change NAME PORT KEY VALUE [KEY VALUE …] (KEY none clears one of the advisor's own keys)."""
    edit_config(ctx, lambda c, r: cfg.advisor_set(c, name, port, words, r), f"advisor {name} {port} updated")


@advisor.command("stop")
@click.argument("name")
@click.argument("port")
@click.pass_context
def advisor_stop(ctx, name, port):
    """Stop NAME PORT."""
    edit_config(ctx, lambda c, r: cfg.advisor_stop(c, name, port, r), f"advisor {name} {port} stopped")


@advisor.command("report")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--control", metavar="PATH", default=None,
              help="Control socket of a running 'encapfwd run' (default: its standard path).")
@click.pass_context
def advisor_report(ctx, as_json, control):
    """The configured advisors and, while 'encapfwd run' runs, each server's health."""
    from encapfwd.cli.server_rows import live_counters

    config = cfg.load(ctx.obj["config_path"])
    live = live_counters(control) if config.advisors else None
    health = (live or {}).get("health")
    rows = advisor_rows(config, health if isinstance(health, dict) else None)
    if as_json:
        click.echo(json.dumps({"advisors": rows, "live": live is not None,
                               "health": health if isinstance(health, dict) else None}, indent=2))
        return
    if not rows:
        click.echo("No advisors configured.")
        return
    header = ("ADVISOR", "PORT", "INTERVAL", "TIMEOUT", "RISE", "FALL", "VIA", "OPTIONS")
    table = [header] + [
        (r["name"], str(r["port"]), f"{r['interval']:g}", f"{r['timeout']:g}", str(r["rise"]), str(r["fall"]),
         r["via"], " ".join(f"{k} {shlex.quote(v)}" for k, v in r["options"].items()) or "-")
        for r in rows
    ]
    echo_table(table)
    servers = [("ADVISOR", "SERVER", "STATE", "LAST", "LATENCY", "CHANGES")]
    for r in rows:
        for s in r["servers"]:
            last = s["last"] or {}
            if last:
                outcome = ("ok" if last.get("ok") else "failed") + (f": {last['detail']}" if last.get("detail") else "")
            else:
                outcome = "-"
            latency = last.get("latency")
            servers.append((f"{r['name']} {r['port']}", s["server"], s["state"], outcome,
                            "-" if not isinstance(latency, (int, float)) else f"{latency * 1000:.1f} ms",
                            "-" if s["changes"] is None else str(s["changes"])))
    click.echo("")
    echo_table(servers)
    if live is None:
        click.echo("(no running dispatcher answered: health is shown while 'encapfwd run' runs)")


def advisor_rows(config, health) -> list:
    """One row per configured advisor with its settings and, per server it probes, the health a running
    dispatcher reports (*health*: the report's ``"health"``, or None)."""
    from encapfwd.records import detail_line as one_line

    rows = []
    for adv in config.advisors:
        servers = []
        for key in cfg.advisor_servers(config, adv):
            entry = (health or {}).get(key)
            entry = entry if isinstance(entry, dict) else {}
            mine = (entry.get("advisors") or {}).get(adv.label) if isinstance(entry.get("advisors"), dict) else None
            if not isinstance(mine, dict):
                mine = entry if entry.get("advisor") in (None, adv.name) else {}
            last = mine.get("last") if isinstance(mine.get("last"), dict) else None
            if last is not None:
                last = {"ok": bool(last.get("ok")), "detail": one_line(last.get("detail", "")),
                        "latency": last.get("latency") if isinstance(last.get("latency"), (int, float)) else None}
            state = mine.get("state")
            servers.append({
                "server": key,
                "state": one_line(state) if state is not None else ("unknown" if health is not None else "-"),
                "last": last,
                "changes": mine.get("changes") if isinstance(mine.get("changes"), int) else None,
                "since": mine.get("since") if isinstance(mine.get("since"), (int, float)) else None,
            })
        rows.append({"name": adv.name, "port": adv.port, "interval": adv.interval, "timeout": adv.timeout,
                     "rise": adv.rise, "fall": adv.fall, "via": adv.via, "hold": adv.hold,
                     "options": dict(adv.options), "servers": servers})
    return rows
