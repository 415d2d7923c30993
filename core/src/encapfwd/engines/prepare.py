"""Configuration preparation for the live engine: load the file (any failure → one line), fill in what
live mode takes from the kernel, check what would make forwarding wrong."""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Dict, List, Optional, Tuple

import attrs

from ..errors import EncapfwdError
from ..model import Config
from .common import LiveError, log, one_line
from .netlink import (
    Interface,
    has_unicast_route,
    interface_info,
    local_addresses,
    neighbour_mac,
    open_ipr,
    route_gateway,
)


def describe_failure(exc: BaseException, path=None) -> str:
    """One line saying why loading or compiling a configuration failed, whatever was raised."""
    where = f"{path}: " if path is not None else ""
    if isinstance(exc, EncapfwdError):
        return one_line(str(exc))
    if isinstance(exc, UnicodeDecodeError):
        return one_line(f"{where}not valid UTF-8 (byte {exc.start}: {exc.reason})")
    if isinstance(exc, RecursionError):
        return one_line(f"{where}nested too deeply to parse")
    if isinstance(exc, MemoryError):
        return one_line(f"{where}out of memory while loading it")
    return one_line(f"{where}{type(exc).__name__}: {exc}")


def load_config(path) -> Config:
    """``config.load(path)``, with every failure (bad UTF-8, deep nesting, …) turned into a one-line
    :class:`LiveError`."""
    from ..config import load

    try:
        return load(path)
    except Exception as exc:  # noqa: BLE001 - any failure to read or parse is one line, never a crash
        raise LiveError(describe_failure(exc, path)) from None


def check_platform() -> None:
    if not sys.platform.startswith("linux"):
        raise LiveError("encapfwd run needs Linux (AF_PACKET); use 'encapfwd replay' elsewhere")
    if os.geteuid() != 0:
        raise LiveError(
            "encapfwd run needs root (raw AF_PACKET sockets: CAP_NET_RAW, CAP_NET_ADMIN); run it with sudo"
        )


def prepare(
    config: Config,
    registry,
    interface: Optional[str] = None,
    *,
    resolve_timeout: float = 3.0,
    warn=log,
    resolved: Optional[dict] = None,
) -> Tuple[Config, Interface]:
    """Fill in what live mode takes from the kernel and check what would make forwarding wrong.

    - the interface (``--interface`` or ``executor interface``) must exist; its MAC is the source of every
      frame sent; its networks are the attached networks when ``executor networks`` is empty; its first
      IPv4 address is the ``nfa`` when none is set; the MTU is capped at the interface's;
    - a cluster address configured locally is an error (the kernel would answer it instead of a server);
    - every server's forwarding method must have an installed plugin;
    - the MAC of every server on an attached network (unless pinned with ``mac``) and of the gateway
      (unless pinned with ``gatewaymac``) comes from the neighbour table, resolved when missing. The gateway,
      when not configured, is the kernel's next hop towards the first off-link server. A server whose MAC
      cannot be resolved is marked down (with a warning) rather than sent to a wrong address.

    *resolved*, when given, receives ``{address: mac or None}`` for every MAC taken from the neighbour table
    (not the pinned ones), so that the controller can notice when one changes.
    """
    from ..config import check

    ex = config.executor
    name = interface or ex.interface
    if not name:
        raise LiveError("no interface: pass --interface IF or set 'executor set interface IF'")
    if not config.clusters:
        raise LiveError("no cluster configured: add one with 'encapfwd cluster add ADDRESS'")
    check(config, registry)  # every rule of the file, installed forwarders included, one line each
    with open_ipr() as ipr:
        iface = interface_info(ipr, name)
        local = local_addresses(ipr)
        for cluster in config.clusters:
            if cluster.address in local:
                raise LiveError(
                    f"cluster address {cluster.address} is configured as a local address (on "
                    f"{local[cluster.address]}): this host's kernel would answer it; remove it here (only "
                    "the "
                    f"servers hold it, on loopback) and route or ARP it to the dispatcher instead"
                )
        changes = {"mac": iface.mac, "interface": iface.name}
        if ex.mac and ex.mac != iface.mac:
            warn(f"executor mac {ex.mac} differs from {iface.name}'s {iface.mac}: using {iface.mac}")
        if not ex.networks:
            changes["networks"] = tuple(i.network for i in iface.networks if not i.ip.is_link_local)
        if ex.nfa is None:
            v4 = [i.ip for i in iface.networks if i.version == 4]
            if v4:
                changes["nfa"] = v4[0]
        if ex.mtu > iface.mtu:
            changes["mtu"] = iface.mtu
        ex = attrs.evolve(ex, **changes)

        macs: Dict = {}
        offlink = []
        clusters = []
        for cluster in config.clusters:
            ports = []
            for port in cluster.ports:
                servers = []
                for server in port.servers:
                    if not ex.attached(server.address):
                        offlink.append(server.address)
                    elif server.mac is None and not server.down:
                        if server.address not in macs:
                            macs[server.address] = neighbour_mac(
                                ipr, server.address, iface.index, resolve_timeout
                            )
                        mac = macs[server.address]
                        if resolved is not None:
                            resolved[server.address] = mac
                        if mac is None:
                            warn(
                                f"server {cluster.address}@{port.number}@{server.address}: "
                                "no answer to ARP/ND "
                                f"on {iface.name}; marked down until the next reload (SIGHUP)"
                            )
                            server = attrs.evolve(server, down=True)
                        else:
                            server = attrs.evolve(server, mac=mac)
                    servers.append(server)
                ports.append(attrs.evolve(port, servers=tuple(servers)))
            clusters.append(attrs.evolve(cluster, ports=tuple(ports)))

        if offlink:
            gateway = ex.gateway
            if gateway is None:
                found = route_gateway(ipr, offlink[0])
                if found is None:
                    raise LiveError(
                        f"server {offlink[0]} is not on an attached network and there is no gateway: "
                        f"'executor set gateway ADDR' (or a route to it)"
                    )
                gateway = ipaddress.ip_address(found)
                ex = attrs.evolve(ex, gateway=gateway)
            if ex.gatewaymac is None:
                mac = neighbour_mac(ipr, gateway, iface.index, resolve_timeout)
                if mac is None:
                    raise LiveError(f"gateway {gateway} does not answer ARP on {iface.name}")
                ex = attrs.evolve(ex, gatewaymac=mac)
                if resolved is not None:
                    resolved[gateway] = mac
    return attrs.evolve(config, executor=ex, clusters=tuple(clusters)), iface


def cluster_addresses(config: Config) -> List:
    return [cluster.address for cluster in config.clusters]


def kernel_warnings(config: Config, warn=log) -> None:
    """Warn when this host's kernel would also forward cluster traffic (a second copy to the servers)."""
    try:
        _kernel_warnings(config, warn)
    except Exception:  # noqa: BLE001 - only advice; never stops the start
        pass


def _kernel_warnings(config: Config, warn) -> None:
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as handle:
            forwarding = handle.read().strip() == "1"
    except OSError:
        return
    if not forwarding:
        return
    with open_ipr() as ipr:
        for cluster in config.clusters:
            if cluster.address.version != 4:
                continue
            if has_unicast_route(ipr, cluster.address):  # the kernel would route it too
                warn(
                    f"IP forwarding is on and {cluster.address} has a unicast route: the kernel forwards "
                    f"it as well; add 'ip route add blackhole {cluster.address}/32' "
                    "(or turn ip_forward off)"
                )
