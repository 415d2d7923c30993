"""``encapfwd executor|cluster|port …``: the configuration's tree, edited in IBM dscontrol's grammar."""

from __future__ import annotations

import json

import click

from encapfwd import config as cfg
from encapfwd.cli.common import edit_config


@click.group()
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


@click.group()
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


@click.group()
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
