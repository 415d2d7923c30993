"""The rules across objects, checked in one place: :func:`check`."""

from __future__ import annotations

from typing import List, Tuple

from encapfwd.config.keywords import ADVISOR_KEYWORDS
from encapfwd.errors import ConfigError, PluginError
from encapfwd.model import Cluster, Config, Port, _shown, forwarding_method, server_key


def check(config: Config, registry=None) -> None:
    """Every rule across objects, checked in one place with one message each (the attrs converters check
    single fields). Raises :class:`ConfigError` for the first rule broken.

    Without *registry*: no object defined twice; ``encapforward yes`` only with an IPv4 cluster and an IPv4
    server; ``grekey`` only with ``encaptype gre``; every advisor's timeout at most its interval, its port
    with servers on some cluster, ``via forwarding`` only for IPv4 clusters and servers with an ``nfa``. With the plugin *registry* as well: every port's
    ``selectionalgorithm`` is provided; every ``encapforward yes`` server's ``encaptype`` is an installed
    encapsulation; the forwarding method each server gets (``model.forwarding_method``, ``mac`` included) is
    installed and can carry the cluster's address family; every advisor is installed, and its keys are its
    own and pass its ``check``.
    """
    servers = []
    seen_clusters = set()
    for cluster in config.clusters:
        if cluster.address in seen_clusters:
            raise ConfigError(f"cluster {cluster.address} is defined twice")
        seen_clusters.add(cluster.address)
        seen_ports = set()
        for port in cluster.ports:
            if port.number in seen_ports:
                raise ConfigError(f"port {cluster.address}@{port.number} is defined twice")
            seen_ports.add(port.number)
            seen_servers = set()
            for server in port.servers:
                name = server_key(cluster.address, port.number, server.address)
                if server.address in seen_servers:
                    raise ConfigError(f"server {name} is defined twice")
                seen_servers.add(server.address)
                servers.append((name, cluster, server))
    for name, cluster, server in servers:
        if server.encapforward and (cluster.address.version != 4 or server.address.version != 4):
            raise ConfigError(f"server {name}: encapsulation forwarding is only valid for IPv4")
        if server.grekey is not None and server.encaptype != "gre":
            raise ConfigError(f"server {name}: grekey is only valid with encaptype gre")
    _check_advisors(config)
    _check_bgp(config.executor, config.clusters)
    _check_sync(config.executor)
    if registry is None:
        return
    algorithms = None
    for cluster in config.clusters:
        for port in cluster.ports:
            if algorithms is None:
                algorithms = registry.selection_algorithms()
            if port.selectionalgorithm not in algorithms:
                raise ConfigError(
                    f"port {cluster.address}@{port.number}: unknown selectionalgorithm "
                    f"{port.selectionalgorithm!r} (available: {', '.join(algorithms)})"
                )
    for name, _, server in servers:
        if server.encapforward:
            try:
                forwarder = registry.forwarder(server.encaptype)
            except PluginError as exc:  # names the distribution to install
                raise ConfigError(f"server {name}: encaptype {server.encaptype}: {exc}") from None
            if not forwarder.encapsulates:
                raise ConfigError(f"server {name}: encaptype {server.encaptype!r} is not an encapsulation")
    for name, cluster, server in servers:
        method = forwarding_method(config.executor, server)
        try:
            forwarder = registry.forwarder(method)
        except PluginError as exc:
            raise ConfigError(f"server {name}: forwarding method {method}: {exc}") from None
        if forwarder.ipv4_only and 6 in (cluster.address.version, server.address.version):
            raise ConfigError(
                f"server {name}: forwarding method {method!r} carries IPv4 only; use MAC forwarding for IPv6"
            )
    _check_advisor_types(config, registry)


#: the advisors that ``via forwarding`` runs (as a TCP handshake through the method: engines/through.py)
FORWARDING_ADVISORS = ("connect",)


def _probed_ports(config: Config, number: int) -> List[Tuple[Cluster, Port]]:
    """The (cluster, port) pairs an advisor on port *number* probes: that port of every cluster, when it has
    servers (IBM: an advisor on a port probes the servers of that port number on every cluster)."""
    return [(c, p) for c in config.clusters for p in c.ports if p.number == number and p.servers]


def _check_advisors(config: Config) -> None:
    """The advisors' rules that need no plugin."""
    seen = set()
    for advisor in config.advisors:
        label = f"advisor {advisor.label}"
        if (advisor.name, advisor.port) in seen:
            raise ConfigError(f"{label} is defined twice")
        seen.add((advisor.name, advisor.port))
        if advisor.timeout > advisor.interval:
            raise ConfigError(
                f"{label}: timeout {advisor.timeout:g} s is longer than the interval {advisor.interval:g} s "
                "(a probe must end before the next one starts)"
            )
        probed = _probed_ports(config, advisor.port)
        if not probed:
            raise ConfigError(
                f"{label}: no cluster has port {advisor.port} with servers, so it has nothing to probe: stop "
                f"it first ('encapfwd advisor stop {advisor.label}') or keep a server on port {advisor.port}"
            )
        if advisor.via == "forwarding":
            if advisor.name not in FORWARDING_ADVISORS:
                raise ConfigError(
                    f"{label}: via forwarding is a TCP handshake with the cluster address through each "
                    f"server's method, which only the connect advisor does; add 'advisor start connect "
                    f"{advisor.port} via forwarding' beside this one (via address)"
                )
            for cluster, port in probed:
                for address in [cluster.address] + [server.address for server in port.servers]:
                    if address.version != 4:
                        raise ConfigError(
                            f"{label}: via forwarding is only valid for IPv4 ({address} on "
                            f"{cluster.address}@{port.number}); use via address"
                        )
            if config.executor.nfa is None:
                raise ConfigError(
                    f"{label}: via forwarding needs the executor's nfa, the address the probes are sent from "
                    "('encapfwd executor set nfa ADDRESS')"
                )


def _check_sync(ex) -> None:
    """Flow synchronisation needs its key file (docs/scale-out.md)."""
    if ex.syncpeers and ex.synckey is None:
        raise ConfigError("syncpeers needs synckey, the file of the group's key ('encapfwd executor set synckey "
                          "/etc/encapfwd/sync.key'; mode 0600)")


def _check_bgp(ex, clusters=()) -> None:
    """Announcing over BGP needs both AS numbers, a router ID and a next hop (the nfa by default)."""
    if ex.bgppeer is None:
        return
    if ex.bgppeer.version != 4:
        raise ConfigError(f"bgppeer {ex.bgppeer}: the BGP session runs over IPv4 in this version")
    missing = [k for k in ("bgpasn", "bgppeerasn") if getattr(ex, k) is None]
    if missing:
        raise ConfigError(f"bgppeer {ex.bgppeer} needs {' and '.join(missing)} ('encapfwd executor set "
                          f"{' '.join(k + ' ASN' for k in missing)}')")
    for key in ("bgprouterid", "bgpnexthop"):
        if getattr(ex, key) is None and ex.nfa is None:
            raise ConfigError(f"bgppeer {ex.bgppeer} needs {key} or the executor's nfa ('encapfwd executor "
                              f"set nfa ADDRESS')")
    if ex.bgpnexthop6 is None:
        for cluster in clusters:
            if cluster.address.version == 6:
                raise ConfigError(
                    f"bgppeer {ex.bgppeer}: cluster {cluster.address} is IPv6 and is announced with an IPv6 next "
                    "hop: set executor bgpnexthop6 (this dispatcher's IPv6 address on the router's network)"
                )


def _check_advisor_types(config: Config, registry) -> None:
    """The advisors' rules that need the plugins: the advisor is installed, knows its keys and accepts
    their values."""
    if not config.advisors or not hasattr(registry, "advisors"):
        return
    from encapfwd.hookspecs import one_line

    types = registry.advisors()
    for advisor in config.advisors:
        label = f"advisor {advisor.label}"
        kind = types.get(advisor.name)
        if kind is None:
            raise ConfigError(f"{label}: {_unknown_advisor(advisor.name, types)}")
        options = dict(advisor.options)
        unknown = sorted(set(options) - set(kind.keys))
        if unknown:
            raise ConfigError(f"{label}: {_unknown_key(unknown[0], advisor.name, kind)}")
        if kind.check is None:
            continue
        try:
            kind.check(options)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a plugin's bug is one line too
            raise ConfigError(
                f"{label}: the advisor's check failed: {one_line(f'{type(exc).__name__}: {exc}')}"
            ) from None


def _unknown_advisor(name: str, types) -> str:
    available = ", ".join(sorted(types)) or "none"
    return f"unknown advisor {name!r}: no installed plugin provides it (available: {available})"


def _unknown_key(key: str, name: str, kind) -> str:
    known = sorted(set(ADVISOR_KEYWORDS) | set(kind.keys)) if kind is not None else sorted(ADVISOR_KEYWORDS)
    return f"unknown advisor {name} keyword {_shown(key)} (known: {', '.join(known)})"
