"""``encapfwd backend-setup``: print the commands a back-end server needs for its forwarding method.

The forwarding method comes from the configuration (``forwarding_method(executor, server)``); the plugin
that owns the method renders the script through the ``encapfwd_backend_setup`` hook; this module only
finds the servers, validates the options and prints. Nothing here imports scapy.

Nothing is printed until the whole output is built: every value that appears in it (the addresses, ports and
method names of the grouping comments included) goes through the validators of :mod:`encapfwd.backend_setup` first,
so a value that fails validation anywhere leaves stdout empty (one error line on stderr, exit 1) and a
half-printed script can never be piped into a shell.
"""

from __future__ import annotations

import click

from encapfwd import backend_setup as S
from encapfwd.errors import ConfigError, PluginError, SetupRefused, one_line
from encapfwd.records import OPERATING_SYSTEMS


def _render(registry, config, cluster, port, server, os_name, undo, options) -> str:
    from encapfwd.model import forwarding_method

    method = forwarding_method(config.executor, server)
    forwarder = registry.forwarder(method)  # PluginError naming the distribution to install
    if os_name not in forwarder.operating_systems:
        raise SetupRefused(f"the {method} forwarder has no back-end setup for {os_name} "
                           f"(it has: {', '.join(forwarder.operating_systems) or 'none'})")
    target = S.make_target(config, cluster, port, server, options)
    text = registry.hook.encapfwd_backend_setup(forwarder=method, os=os_name, target=target, undo=undo)
    if text is None:
        raise PluginError(f"no installed plugin renders the back-end setup for {method!r}")
    return text if text.endswith("\n") else text + "\n"


def _comment(mark: str, text) -> str:
    return f"{mark} {one_line(text, None, printable=True)}\n"


def _grouped(registry, config, os_name, undo, options):
    """The whole all-servers output as a list of strings, and the refusals; prints nothing."""
    groups = S.assignments(config)
    if not groups:
        raise ConfigError("the configuration has no servers")
    mark = "rem" if os_name == "windows" else "#"
    out = []
    refused = []
    for index, (_, items) in enumerate(groups):
        server_address = S.ip(items[0].server.address, "server address")
        if index:
            out.append("\n")
        out.append(_comment(mark, f"===== server {server_address} ====="))
        for item in items:
            cluster_address = S.ip(item.cluster.address, "cluster address")
            ports = ",".join(str(S.number(p, 0, 65535, "port")) for p in item.ports)
            method = S.forwarder_name(item.method, "forwarding method")
            out.append(_comment(mark, f"--- cluster {cluster_address} port(s) {ports}: {method} ---"))
            try:
                text = _render(registry, config, item.cluster, item.port, item.server, os_name, undo, options)
            except (SetupRefused, PluginError) as exc:
                reason = one_line(exc, None, printable=True)
                refused.append(f"{cluster_address}@{S.number(item.port.number, 0, 65535, 'port')}"
                               f"@{server_address}: {reason}")
                out.append(_comment(mark, f"refused: {reason}"))
                continue
            out.append(text)
    return out, refused


@click.command("backend-setup")
@click.argument("address", required=False, metavar="[CLUSTER@PORT@SERVER]")
@click.option("--os", "os_name", type=click.Choice(OPERATING_SYSTEMS), required=True,
              help="The back-end server's operating system.")
@click.option("--undo", is_flag=True, help="Print the commands that remove what the setup added.")
@click.option("--persistent", is_flag=True,
              help="Linux: also install boot files (sysctl.d, modules-load.d, a systemd unit).")
@click.option("--tunnel-address", metavar="IPV4", help=S.OPTION_HELP["tunnel_address"] + ".")
@click.option("--tunnel-peer", metavar="IPV4", help=S.OPTION_HELP["tunnel_peer"] + ".")
@click.option("--loopback-adapter", metavar="NAME", help=S.OPTION_HELP["loopback_adapter"] + " (default Loopback).")
@click.option("--nic", metavar="NAME", help=S.OPTION_HELP["nic"] + ".")
@click.pass_context
def backend_setup_command(ctx, address, os_name, undo, persistent, tunnel_address, tunnel_peer,
                          loopback_adapter, nic):
    """Print the commands a back-end server needs for the forwarding method its configuration gives it
    (MAC, IPIP, GRE or a plugin's), for --os linux, aix, solaris or windows.

    Without CLUSTER@PORT@SERVER: every server of the configuration, grouped by server. Linux scripts are
    idempotent and --undo removes exactly what they added; pipe them to the server, e.g.

    \b
      encapfwd backend-setup 10.0.9.9@80@10.0.2.10 --os linux | ssh root@10.0.2.10 sh
      encapfwd backend-setup 10.0.9.9@80@10.0.2.10 --os linux --undo | ssh root@10.0.2.10 sh

    AIX and Solaris tunnels need --tunnel-address (Solaris also --tunnel-peer); docs/backend-setup.md
    explains every recipe and where it differs from IBM's.
    """
    from encapfwd import config as cfg
    from encapfwd.plugins import get_plugin_manager

    options = S.check_options({"tunnel_address": tunnel_address, "tunnel_peer": tunnel_peer,
                               "loopback_adapter": loopback_adapter, "nic": nic,
                               "persistent": True if persistent else None})
    if persistent and os_name != "linux":
        raise SetupRefused(f"--persistent is only available for linux, not {os_name}")
    if address is not None:
        cfg.split_target(address, 3)  # a clear error before the configuration is even read
    config = cfg.load(ctx.obj["config_path"])
    registry = get_plugin_manager()

    if address is not None:
        cluster, port, servers = cfg.find_server(config, address)
        texts = [_render(registry, config, cluster, port, server, os_name, undo, options) for server in servers]
        click.echo("".join(texts), nl=False)
        return

    if tunnel_address or tunnel_peer:
        raise ConfigError("--tunnel-address and --tunnel-peer belong to one server: give CLUSTER@PORT@SERVER")
    out, refused = _grouped(registry, config, os_name, undo, options)
    click.echo("".join(out), nl=False)
    if refused:
        raise SetupRefused(f"{len(refused)} setup(s) refused; first: {refused[0]}")


__all__ = ["backend_setup_command"]
