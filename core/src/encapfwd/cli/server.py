"""``encapfwd server …``: servers added, changed, taken down and up, and the per-server report."""

from __future__ import annotations

import json

import click

from encapfwd import config as cfg
from encapfwd.cli.common import edit_config


@click.group()
def server():
    """Back-end servers (CLUSTER@PORT@SERVER; SERVER may be A+B+C)."""


@server.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("words", nargs=-1)
@click.pass_context
def server_add(ctx, target, words):
    """Add CLUSTER@PORT@SERVER [KEY VALUE …].

    Keywords: weight, mac, encapforward yes|no, encaptype ipip|gre, encapcond auto|always,
    encapsource, grekey.
    """
    edit_config(ctx, lambda c, r: cfg.server_add(c, target, words, r), f"server {target} added")


@server.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("words", nargs=-1, required=True)
@click.pass_context
def server_set(ctx, target, words):
    """Change CLUSTER@PORT@SERVER KEY VALUE [KEY VALUE …] (keywords as for add)."""
    edit_config(ctx, lambda c, r: cfg.server_set(c, target, words, r), f"server {target} updated")


@server.command("remove")
@click.argument("target")
@click.pass_context
def server_remove(ctx, target):
    """Remove CLUSTER@PORT@SERVER."""
    edit_config(ctx, lambda c, r: cfg.server_remove(c, target, r), f"server {target} removed")


@server.command("down")
@click.argument("target")
@click.pass_context
def server_down(ctx, target):
    """Mark a server down: it gets no traffic; its flows move to other servers."""
    edit_config(ctx, lambda c, r: cfg.server_status(c, target, True, r), f"server {target} down")


@server.command("up")
@click.argument("target")
@click.pass_context
def server_up(ctx, target):
    """Mark a server up again."""
    edit_config(ctx, lambda c, r: cfg.server_status(c, target, False, r), f"server {target} up")


@server.command("report")
@click.argument("target", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--control", metavar="PATH", default=None,
              help="Control socket of a running 'encapfwd run' (default: its standard path).")
@click.option("--counters", "counters_file", metavar="FILE", type=click.Path(dir_okay=False, exists=True),
              help="Take counters from a saved 'encapfwd replay --json' summary instead.")
@click.pass_context
def server_report(ctx, target, as_json, control, counters_file):
    """Servers with their forwarding method, weight and status, and their counters.

    Counters come from a running 'encapfwd run' (its control socket) or from a saved replay summary.
    """
    from encapfwd.cli.server_rows import live_counters, saved_counters, server_rows

    config = cfg.load(ctx.obj["config_path"])
    live = saved_counters(counters_file) if counters_file else live_counters(control)
    rows = server_rows(config, target, live)
    if as_json:
        click.echo(json.dumps({"servers": rows, "live": live}, indent=2))
        return
    if not rows:
        click.echo("No servers configured.")
        return
    header = ("SERVER", "METHOD", "WEIGHT", "STATUS", "PACKETS", "BYTES")
    table = [header] + [
        (r["server"], r["method"], str(r["weight"]), r["status"],
         "-" if r["packets"] is None else str(r["packets"]), "-" if r["bytes"] is None else str(r["bytes"]))
        for r in rows
    ]
    if live is not None and any(r["status"] == "down" and r["configured"] != "down" for r in rows):
        header += ("REASON",)  # why the running plan leaves a server out that the file has up
        table = [header] + [row + (r["reason"] if r["status"] == "down" and r["configured"] != "down" else "",)
                            for row, r in zip(table[1:], rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if live is None:
        click.echo("(no running dispatcher answered; 'encapfwd replay --json > FILE' then --counters FILE)")
        return
    flows = live.get("flows") or {}
    if flows:
        click.echo(f"flow table: {flows.get('flows', 0)} flows (bound {flows.get('maxflows', '-')}), "
                   f"{flows.get('evictions', 0)} evicted")
    for reason, count in sorted((live.get("drops") or {}).items()):
        click.echo(f"dropped {reason}: {count}")
    engine = live.get("engine") or {}
    if engine.get("engine") == "xdp":  # frames the driver lost are never counted as forwarded
        lost = engine.get("xdp_tx_lost") or 0
        grown = sorted((engine.get("xdp_tx_lost_counters") or {}).items())
        counters = ", ".join(f"{k} +{v}" for k, v in grown)
        click.echo(f"XDP ({engine.get('xdp_mode') or '?'}): {engine.get('xdp_forwarded', 0)} forwarded in "
                   f"the kernel, {lost} lost by the driver{f' ({counters})' if lost and counters else ''}, "
                   f"{engine.get('xdp_not_for_us', 0)} not for this dispatcher's MAC")
    elif engine.get("engine") == "tc":
        click.echo(f"TC ({engine.get('xdp_mode') or '?'}): {engine.get('xdp_forwarded', 0)} forwarded in the "
                   f"kernel, {engine.get('xdp_passed', 0)} handed up, "
                   f"{engine.get('xdp_not_for_us', 0)} not for this dispatcher's MAC")
    sync = live.get("sync")
    if isinstance(sync, dict):  # flow synchronisation (engines/flowsync.py)
        from encapfwd.flowsync.service import report_line

        click.echo(report_line(sync))
