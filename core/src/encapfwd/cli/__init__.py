"""The ``encapfwd`` command line.

Start-up stays light: sub-commands in other modules are imported only when run, and nothing here
imports scapy (a test checks ``--help`` and ``forwarders``).
"""

from __future__ import annotations

import importlib
import json
import shlex
import sys

import click

from encapfwd import config as cfg
from encapfwd.errors import EncapfwdError

# name -> (module:attribute, one-line help); imported only when the command runs
LAZY_COMMANDS = {
    "replay": ("encapfwd.cli.replay:replay_command", "Forward every frame of a pcap through the dispatcher."),
    "explain": ("encapfwd.cli.replay:explain_command", "Show one packet before and after forwarding."),
    "backend-setup": ("encapfwd.cli.setup:backend_setup_command", "Print the commands a back-end server needs."),
    "run": ("encapfwd.cli.run:run_command", "Forward live traffic (Linux, root)."),
    "lab": ("encapfwd.cli.run:lab_command", "Build a namespace lab, send requests, tear it down (root)."),
    "top": ("encapfwd.cli.top:top_command", "A live view of the running dispatcher (like ipvsadm -Ln --rate)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None or name not in LAZY_COMMANDS:
            return command
        target, _ = LAZY_COMMANDS[name]
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise EncapfwdError(f"the {name!r} command is not available: {exc}") from None
        return getattr(module, attribute)

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                command = super().get_command(ctx, name)
                rows.append((name, command.get_short_help_str(limit=formatter.width - 20)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar=cfg.ENV_CONFIG,
    default=cfg.DEFAULT_PATH,
    show_default=True,
    help=f"Configuration file (TOML); also ${cfg.ENV_CONFIG}.",
)
@click.version_option(package_name="encapfwd", message="encapfwd %(version)s")
@click.pass_context
def cli(ctx, config_path):
    """encapfwd: a Layer-4 load-balancer dispatcher with MAC, IPIP and GRE forwarding plugins.

    The configuration is edited with IBM dscontrol's grammar, e.g.

      encapfwd server set 10.0.9.9@80@10.0.2.10 encapforward yes encaptype ipip encapcond always
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


def registry():
    from encapfwd.plugins import get_plugin_manager

    return get_plugin_manager()


def edit_config(ctx, change, message: str) -> None:
    """The one load → *change(config, registry)* → save of every edit command, under the file's lock
    (parallel edits are serialised, none is lost); saved only on success; then say what was done."""
    path = ctx.obj["config_path"]
    reg = registry()  # plugins are loaded before the lock is taken: it is held only for the edit itself
    with cfg.edit(path) as session:
        session.config = change(session.config, reg)
    click.echo(message)


# ------------------------------------------------------------------------------------ forwarders


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def forwarders(as_json):
    """List the forwarding methods (and advisors) the installed plugins provide.

    ENGINES: where a method can run: xdp,python when its plugin describes it as a template (the XDP
    program and the Python dispatcher run the same bytes), python when it is Python code only.
    """
    from encapfwd.plugins import KNOWN_DISTRIBUTIONS

    reg = registry()
    rows = []
    for record in reg.records:
        if not record.ok:
            rows.append(
                {"name": None, "distribution": record.distribution, "version": record.version,
                 "overhead": None, "ipv4_only": None, "operating_systems": [], "engines": [],
                 "status": record.status, "description": "", "hooks": record.hooks}
            )
            continue
        for name in record.forwarders:
            fwd = reg.forwarders[name]
            rows.append(
                {"name": fwd.name, "distribution": record.distribution, "version": record.version,
                 "overhead": fwd.overhead, "ipv4_only": fwd.ipv4_only,
                 "operating_systems": list(fwd.operating_systems), "engines": list(reg.engines(name)),
                 "status": "ok",
                 "description": fwd.description, "hooks": record.hooks}
            )
    missing = [f"{dist} ({name})" for name, dist in KNOWN_DISTRIBUTIONS.items() if name not in reg.forwarders]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        if not reg.forwarders:
            click.echo("encapfwd: no forwarders installed; install " + ", ".join(missing), err=True)
        return
    if rows:
        header = ("FORWARDER", "DISTRIBUTION", "VERSION", "OVERHEAD", "IPV4-ONLY", "OS", "ENGINES", "STATUS")
        table = [header] + [
            (r["name"] or "-", r["distribution"], r["version"],
             "-" if r["overhead"] is None else str(r["overhead"]),
             "-" if r["ipv4_only"] is None else ("yes" if r["ipv4_only"] else "no"),
             ",".join(r["operating_systems"]) or "-", ",".join(r["engines"]) or "-", r["status"])
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not reg.forwarders:
        click.echo("No forwarders installed. Install the distributions you need: " + ", ".join(missing) + ".")
    advisors = reg.advisors()
    if advisors:  # the health checks 'encapfwd advisor start' can use (not in --json: that lists forwarders)
        click.echo("")
        _echo_table([("ADVISOR", "DISTRIBUTION", "KEYS", "DESCRIPTION")] + [
            (name, reg.advisor_owners.get(name, "?"), ",".join(kind.keys) or "-", kind.description)
            for name, kind in advisors.items()
        ])


# -------------------------------------------------------------------------------------- executor


@cli.group()
def executor():
    """The dispatcher itself: nfa, mac, interface, networks, gateway, mtu …"""


@executor.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, required=True)
@click.pass_context
def executor_set(ctx, words):
    """Set executor keywords: KEY VALUE [KEY VALUE …].

    \b
    nfa ADDR          the dispatcher's own IPv4 address; default outer source
    mac MAC           the dispatcher's MAC
    interface IF      interface for live mode
    networks N[,N]    networks the dispatcher is attached to (decides MAC vs encapsulation)
    gateway ADDR      next hop for servers on other networks
    gatewaymac MAC    the gateway's MAC (offline replay or pinned)
    mtu N             egress MTU (default 1500)
    encapttl N        outer TTL (default 64)
    maxflows N        flow table bound (default 1000000)
    """
    edit_config(ctx, lambda c, r: cfg.executor_set(c, words, r), "executor updated")


@executor.command("report")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def executor_report(ctx, as_json):
    """Show the executor's settings."""
    data = cfg.to_dict(cfg.load(ctx.obj["config_path"]))["executor"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            click.echo(f"{key:12} {', '.join(value) if isinstance(value, list) else value}")


# --------------------------------------------------------------------------------------- cluster


@cli.group()
def cluster():
    """Cluster addresses (VIPs)."""


@cluster.command("add")
@click.argument("addresses", nargs=-1, required=True)
@click.pass_context
def cluster_add(ctx, addresses):
    """Add cluster addresses."""
    edit_config(ctx, lambda c, r: cfg.cluster_add(c, addresses, r), f"cluster {' '.join(addresses)} added")


@cluster.command("remove")
@click.argument("addresses", nargs=-1, required=True)
@click.pass_context
def cluster_remove(ctx, addresses):
    """Remove cluster addresses with their ports and servers."""
    edit_config(ctx, lambda c, r: cfg.cluster_remove(c, addresses, r), f"cluster {' '.join(addresses)} removed")


# ------------------------------------------------------------------------------------------ port


@cli.group()
def port():
    """Ports of a cluster (CLUSTER@PORT; port 0 means every port)."""


@port.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("words", nargs=-1)
@click.pass_context
def port_add(ctx, target, words):
    """Add CLUSTER@PORT [KEY VALUE …] (porttype, selectionalgorithm, stickytime, staletimeout)."""
    edit_config(ctx, lambda c, r: cfg.port_add(c, target, words, r), f"port {target} added")


@port.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("words", nargs=-1, required=True)
@click.pass_context
def port_set(ctx, target, words):
    """Change CLUSTER@PORT KEY VALUE [KEY VALUE …]."""
    edit_config(ctx, lambda c, r: cfg.port_set(c, target, words, r), f"port {target} updated")


@port.command("remove")
@click.argument("target")
@click.pass_context
def port_remove(ctx, target):
    """Remove CLUSTER@PORT with its servers."""
    edit_config(ctx, lambda c, r: cfg.port_remove(c, target, r), f"port {target} removed")


# ---------------------------------------------------------------------------------------- server


@cli.group()
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
    from encapfwd.cli.server_report import server_rows, live_counters, saved_counters

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


# --------------------------------------------------------------------------------------- advisor


@cli.group()
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
    from encapfwd.cli.server_report import live_counters

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
    _echo_table(table)
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
    _echo_table(servers)
    if live is None:
        click.echo("(no running dispatcher answered: health is shown while 'encapfwd run' runs)")


def advisor_rows(config, health) -> list:
    """One row per configured advisor with its settings and, per server it probes, the health a running
    dispatcher reports (*health*: the report's ``"health"``, or None)."""
    from encapfwd.hookspecs import one_line

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


def _echo_table(table) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    """Entry point: one-line errors, never a traceback, for user mistakes."""
    try:
        rv = cli.main(args=argv, prog_name="encapfwd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("encapfwd: aborted", err=True)
        return 130
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None):
            click.echo(exc.ctx.get_help())  # bare "encapfwd" or "encapfwd server": help, as click does
            return 2
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "encapfwd"
        click.echo(f"encapfwd: error: {exc.format_message()} (see '{command} --help')", err=True)
        return exc.exit_code
    except EncapfwdError as exc:
        from encapfwd.runtime.sdnotify import journal_priorities  # systemd: stderr is the journal -> <3> (error)

        click.echo(f"{'<3>' if journal_priorities() else ''}encapfwd: error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("encapfwd: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
