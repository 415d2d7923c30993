"""Configuration preparation for the live engine: load the file (any failure → one line), fill in what
live mode takes from the kernel, check what would make forwarding wrong."""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Dict, List, Mapping, Optional, Tuple

import attrs

from encapfwd.errors import EncapfwdError
from encapfwd.model import Config, server_key
from encapfwd.runtime.common import LiveError, log, one_line, summarize
from encapfwd.runtime.netlink import (
    Interface,
    has_unicast_route,
    interface_info,
    local_addresses,
    neighbour_table,
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
    from encapfwd.config import load

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


@attrs.define
class Staged:
    """A configuration prepared for live mode except for the MACs the neighbour table gives (see
    :func:`stage`, then :func:`complete` with those MACs)."""

    #: the executor filled in (interface, MAC, networks, nfa, MTU, gateway); servers as in the file
    config: Config
    iface: Interface
    #: every address whose MAC comes from the neighbour table: servers on an attached network that are not
    #: down and have no pinned MAC, and the gateway when off-link servers need it and gatewaymac is unset
    needed: Tuple[str, ...]
    #: the gateway whose MAC is needed (None: pinned or not needed)
    gateway: Optional[str]
    #: the neighbour table's valid entries for *needed* when staged (one dump)
    known: Dict[str, str]


def stage(config: Config, registry, interface: Optional[str] = None, *, warn=log) -> Staged:
    """Everything :func:`prepare` does except waiting for neighbour resolution: netlink questions only
    (the interface, local addresses, a route, one dump of the neighbour table), nothing that waits for the
    network. Raises :class:`LiveError` (one line) for what would make forwarding wrong:

    - the interface (``--interface`` or ``executor interface``) must exist; its MAC is the source of every
      frame sent; its networks are the attached networks when ``executor networks`` is empty; its first
      IPv4 address is the ``nfa`` when none is set; the MTU is capped at the interface's;
    - a cluster address configured locally is an error (the kernel would answer it instead of a server);
    - every server's forwarding method must have an installed plugin (``config.check``);
    - the gateway, when not configured and some server is off-link, is the kernel's next hop towards the
      first off-link server.
    """
    from encapfwd.config import check

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

        needed: Dict[str, None] = {}
        offlink = []
        for cluster in config.clusters:
            for port in cluster.ports:
                for server in port.servers:
                    if not ex.attached(server.address):
                        offlink.append(server.address)
                    elif server.mac is None and not server.down:
                        needed[str(server.address)] = None
        gateway = None
        if offlink:
            if ex.gateway is None:
                found = route_gateway(ipr, offlink[0])
                if found is None:
                    raise LiveError(
                        f"server {offlink[0]} is not on an attached network and there is no gateway: "
                        f"'executor set gateway ADDR' (or a route to it)"
                    )
                ex = attrs.evolve(ex, gateway=ipaddress.ip_address(found))
            if ex.gatewaymac is None:
                gateway = str(ex.gateway)
                needed[gateway] = None
        table = neighbour_table(ipr, iface.index) if needed else {}
    known = {a: table[a] for a in needed if a in table}
    return Staged(attrs.evolve(config, executor=ex), iface, tuple(needed), gateway, known)


def complete(staged: Staged, macs: Mapping[str, Optional[str]], *, warn=log) -> Tuple[Config, Dict[str, str]]:
    """*staged*'s configuration with the MACs of *macs* (``{address: MAC or None}``): ``(config,
    {server name: reason})``. A server whose MAC is unknown is marked down in the returned configuration
    (never sent to a wrong address) and named with its reason; one warning line lists them. An unknown
    gateway MAC raises :class:`LiveError`."""
    ex = staged.config.executor
    if staged.gateway is not None:
        mac = macs.get(staged.gateway)
        if mac is None:
            raise LiveError(f"gateway {staged.gateway} does not answer ARP on {staged.iface.name}")
        ex = attrs.evolve(ex, gatewaymac=mac)
    reasons: Dict[str, str] = {}
    unresolved = []
    clusters = []
    for cluster in staged.config.clusters:
        ports = []
        for port in cluster.ports:
            servers = []
            for server in port.servers:
                if ex.attached(server.address) and server.mac is None and not server.down:
                    mac = macs.get(str(server.address))
                    if mac is None:
                        name = server_key(cluster.address, port.number, server.address)
                        reasons[name] = f"no answer to ARP/ND on {staged.iface.name}"
                        unresolved.append(str(server.address))
                        server = attrs.evolve(server, down=True)
                    else:
                        server = attrs.evolve(server, mac=mac)
                servers.append(server)
            ports.append(attrs.evolve(port, servers=tuple(servers)))
        clusters.append(attrs.evolve(cluster, ports=tuple(ports)))
    if unresolved:
        unique = list(dict.fromkeys(unresolved))
        warn(f"{len(unique)} server address(es) do not answer ARP/ND on {staged.iface.name}: {summarize(unique)}; "
             "left out of the plan until they answer (asked again in the background)")
    return attrs.evolve(staged.config, executor=ex, clusters=tuple(clusters)), reasons


def prepare(
    config: Config,
    registry,
    interface: Optional[str] = None,
    *,
    resolve_timeout: float = 2.0,
    warn=log,
    resolved: Optional[dict] = None,
) -> Tuple[Config, Interface]:
    """:func:`stage`, every missing MAC asked at once and waited for with one total bound
    (*resolve_timeout*), then :func:`complete`. *resolved*, when given, receives ``{address: mac or None}``
    for every MAC taken from the neighbour table (not the pinned ones)."""
    staged = stage(config, registry, interface, warn=warn)
    macs: Dict[str, Optional[str]] = dict(staged.known)
    missing = [a for a in staged.needed if a not in macs]
    if missing:
        from encapfwd.runtime.neighbours import NeighbourResolver

        resolver = NeighbourResolver(staged.iface.index, refresh=0)
        try:
            macs.update(resolver.resolve(missing, resolve_timeout))
        finally:
            resolver.stop()
    if resolved is not None:
        resolved.update({a: macs.get(a) for a in staged.needed})
    config, _reasons = complete(staged, macs, warn=warn)
    return config, staged.iface


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
