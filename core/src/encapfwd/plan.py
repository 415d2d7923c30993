"""The forwarding plan: one immutable, comparable description of what the dispatcher does, compiled by the
controller once per load or reload and handed to every executor (the Python dispatcher and the XDP maps).

A plan is data:

- **servers**: one :class:`ServerPlan` per cluster@port@server with a stable server id (``sid``), the
  forwarding method, whether it is up, its weight, and its egress: next-hop MACs, MTU and the encapsulation
  as a :class:`~encapfwd.records.Template` (bytes + per-packet fields; empty header for MAC forwarding).
  A third party's method that gives only a Python transform has ``template=None``: the Python engine runs
  it, the XDP program hands its packets up.
- **ports**: one :class:`PortPlan` per cluster@port: protocols, selection algorithm, timeouts, and for the
  core's ``maglev`` the lookup table as server ids slot by slot (``table[crc32(flow key) % len(table)]``;
  -1 where no server can take new flows). Other algorithms (``wrr``, ``wlc``, a plugin's) and ports with
  ``stickytime`` have ``table=None``: their first packets are decided by the Python selector. The core's
  ``wrr`` and ``wlc`` without stickytime also have a **pressure table** (``fallback``: the weighted Maglev
  table of their eligible servers, as server ids): while the slow path is under pressure, both executors
  place their new flows by it (``docs/live.md``, "Overload").
- **digest**: SHA-256 of the plan's canonical bytes (server ids excluded: they depend on the dispatcher's
  history, not on its configuration), equal on two dispatchers exactly when they forward alike.

Server ids come from a :class:`SidMap` the controller keeps for its lifetime: the same cluster@port@server
keeps its id across reloads, so flows held by any executor keep their server.

Python transforms are derived from templates (``encap.template_transform``) and are not part of the data:
they are dropped when a plan is pickled (to a worker) and re-derived by :meth:`Plan.bind`; only methods
without a template call their plugin again there.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Dict, Optional, Tuple

import attrs
from attrs import field, frozen

from encapfwd.errors import ConfigError
from encapfwd.model import Config, forwarding_method, server_key
from encapfwd.records import Egress, Template

#: A Maglev slot no server can take (the port has no eligible server).
NO_SERVER = -1
#: The next hop of a server that is down and whose MAC is unknown (live mode resolves only servers that
#: are up): it takes no packet, so its MAC is never used.
UNRESOLVED_MAC = "00:00:00:00:00:00"


class SidMap:
    """Stable server ids: one per (cluster, port, server address), allocated on first use, never reused."""

    def __init__(self, limit: int = 1 << 16):
        self.limit = limit
        self._ids: Dict[tuple, int] = {}

    def __call__(self, cluster, port: int, address) -> int:
        key = (str(cluster), int(port), str(address))
        sid = self._ids.get(key)
        if sid is None:
            sid = len(self._ids)
            if sid >= self.limit:
                raise ConfigError(
                    f"more than {self.limit} distinct servers over this dispatcher's lifetime: restart it"
                )
            self._ids[key] = sid
        return sid


@frozen
class ServerPlan:
    """One cluster@port@server: where and how its packets leave."""

    sid: int
    name: str
    cluster: str
    port: int
    address: str
    method: str
    up: bool
    weight: int
    src_mac: str
    dst_mac: str
    mtu: int
    template: Optional[Template]
    egress: Egress = field(eq=False, repr=False)
    #: the Python executor of this egress (derived from the template; not part of the data)
    transform: object = field(default=None, eq=False, repr=False)


@frozen
class PortPlan:
    """One cluster@port: how new flows are placed."""

    cluster: str
    number: int
    protos: Tuple[int, ...]
    algorithm: str
    stickytime: int
    staletimeout: int
    #: sids of the port's servers in configuration order
    servers: Tuple[int, ...]
    #: Maglev slots as sids (NO_SERVER where none), or None when the port's selection is not a table
    table: Optional[Tuple[int, ...]] = field(default=None, repr=False)
    #: the pressure table (wrr, wlc without stickytime and with an eligible server): a weighted Maglev table of
    #: the eligible servers as sids, placing new flows while the slow path is under pressure; else None
    fallback: Optional[Tuple[int, ...]] = field(default=None, repr=False)


@frozen
class Plan:
    config: Config = field(eq=False, repr=False)
    servers: Tuple[ServerPlan, ...]
    ports: Tuple[PortPlan, ...]
    digest: str = field(eq=False)
    #: the selection's digest (host bytes left out): must be equal on every dispatcher of a scale-out group;
    #: for table-driven ports (maglev without stickytime) equal selections send every flow to the same server
    selection: str = field(default="", eq=False)

    @property
    def bound(self) -> bool:
        return all(s.transform is not None for s in self.servers)

    def bind(self, registry=None) -> "Plan":
        """The same plan with every server's Python transform in place (after unpickling)."""
        if self.bound:
            return self
        from encapfwd.datapath.templates import IDENT_MASK, resolve, template_transform

        start = secrets.randbelow(IDENT_MASK + 1)  # each process that binds a plan numbers from elsewhere
        servers = []
        for s in self.servers:
            if s.transform is None:
                if s.template is not None:
                    transform = template_transform(s.template, s.egress, start)
                else:
                    if registry is None:
                        raise ConfigError(f"server {s.name}: method {s.method!r} needs its plugin to run")
                    _, transform = resolve(registry, s.method, _server_of(self.config, s), s.egress, name=s.name)
                s = attrs.evolve(s, transform=transform)
            servers.append(s)
        return attrs.evolve(self, servers=tuple(servers))

    def __getstate__(self):
        state = {a.name: getattr(self, a.name) for a in attrs.fields(type(self))}
        state["servers"] = tuple(attrs.evolve(s, transform=None) for s in self.servers)
        return state

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)


def _server_of(config: Config, s: ServerPlan):
    cluster = config.cluster(s.cluster)
    return cluster.port(s.port).server(s.address)


# ----------------------------------------------------------------------------------------- compiling


def egress_of(config: Config, cluster, port, server, forwarder) -> Egress:
    """Resolve where *server*'s packets go (MACs, outer addresses, TTL, MTU); one-line ConfigError else."""
    ex = config.executor
    name = server_key(cluster.address, port.number, server.address)
    if ex.mac is None:
        raise ConfigError("executor mac is not set: the dispatcher needs its own MAC to send frames")
    if cluster.address.version == 6 and forwarder.ipv4_only:
        raise ConfigError(
            f"server {name}: forwarding method {forwarder.name!r} carries IPv4 only, "
            f"but cluster {cluster.address} is IPv6; use MAC forwarding"
        )
    attached = ex.attached(server.address)
    outer_src = None
    if not forwarder.encapsulates:
        if not attached:
            raise ConfigError(
                f"server {name}: MAC forwarding needs the server on a network the executor is attached "
                f"to (executor networks: {', '.join(map(str, ex.networks)) or 'none'}); use encapforward yes"
            )
        if server.mac is None and not server.down:
            raise ConfigError(f"server {name}: MAC forwarding needs the server's mac")
        dst_mac = server.mac or UNRESOLVED_MAC
    else:
        if attached:
            if server.mac is None and not server.down:
                raise ConfigError(f"server {name} is on an attached network: set its mac (the tunnel's next hop)")
            dst_mac = server.mac or UNRESOLVED_MAC
        else:
            if ex.gatewaymac is None:
                raise ConfigError(
                    f"server {name} is not on an attached network: set executor gatewaymac "
                    "(the next hop for encapsulated packets)"
                )
            dst_mac = ex.gatewaymac
        outer_src = server.encapsource or ex.nfa
        if outer_src is None:
            raise ConfigError(
                f"server {name}: encapsulation needs an outer source: set executor nfa or the server's encapsource"
            )
    return Egress(src_mac=ex.mac, dst_mac=dst_mac, outer_src=outer_src, outer_dst=server.address,
                  ttl=ex.encapttl, cluster=cluster.address, mtu=ex.mtu)


def _protos(porttype: str) -> Tuple[int, ...]:
    return {"tcp": (6,), "udp": (17,)}.get(porttype, (6, 17))


def compile_plan(config: Config, registry, sids: Optional[SidMap] = None) -> Plan:
    """Compile *config* into a bound :class:`Plan`: every plugin call happens here, once per change.

    Raises :class:`ConfigError` / :class:`PluginError` (one line) for anything that would not forward.
    """
    from encapfwd.datapath.templates import resolve
    from encapfwd.selection.algorithms import MAGLEV_SIZE

    sids = sids or SidMap()
    servers = []
    ports = []
    cache: Dict[tuple, tuple] = {}
    for cluster in config.clusters:
        for port in cluster.ports:
            port_sids = []
            for server in port.servers:
                method = forwarding_method(config.executor, server)
                forwarder = registry.forwarder(method)  # PluginError naming the distribution to install
                egress = egress_of(config, cluster, port, server, forwarder)
                ckey = (method, server, egress)
                name = server_key(cluster.address, port.number, server.address)
                if ckey not in cache:
                    cache[ckey] = resolve(registry, method, server, egress, name=name)
                template, transform = cache[ckey]
                sid = sids(cluster.address, port.number, server.address)
                port_sids.append(sid)
                servers.append(ServerPlan(
                    sid=sid, name=name,
                    cluster=str(cluster.address), port=port.number, address=str(server.address),
                    method=method, up=not server.down, weight=server.weight, src_mac=egress.src_mac,
                    dst_mac=egress.dst_mac, mtu=egress.mtu, template=template, egress=egress,
                    transform=transform,
                ))
            table = fallback = None
            if not port.stickytime:
                eligible = [i for i, s in enumerate(port.servers) if not s.down and s.weight > 0]
                esids = [port_sids[i] for i in eligible]
                slots = _table_of(registry, cluster, port, [port.servers[i] for i in eligible])
                if slots is not None:
                    table = tuple(esids[j] for j in slots) if slots else (NO_SERVER,) * MAGLEV_SIZE
                else:
                    slots = _fallback_of(registry, port, [port.servers[i] for i in eligible])
                    if slots:
                        fallback = tuple(esids[j] for j in slots)
            ports.append(PortPlan(
                cluster=str(cluster.address), number=port.number, protos=_protos(port.porttype),
                algorithm=port.selectionalgorithm, stickytime=port.stickytime,
                staletimeout=port.staletimeout, servers=tuple(port_sids), table=table, fallback=fallback,
            ))
    servers_t = tuple(servers)
    ports_t = tuple(ports)
    return Plan(config=config, servers=servers_t, ports=ports_t, digest=_digest(config, servers_t, ports_t),
                selection=_digest(config, servers_t, ports_t, host=False))


def _table_of(registry, cluster, port, servers):
    """The port's selection as a lookup table (indices into *servers*), when the selector the hook builds
    is the core's table-driven maglev; None when it is anything else (WRR, WLC, a plugin's)."""
    if port.selectionalgorithm != "maglev":
        return None
    if not servers:
        return []
    select = _selector(registry, port, servers)
    if not getattr(select, "builtin", False) or getattr(select, "table", None) is None:
        return None
    return select.table


def _selector(registry, port, servers):
    """The selector the hook builds for *port* over *servers*; None when a plugin's hook fails (the
    Scheduler reports that failure with its own line)."""
    try:
        return registry.hook.encapfwd_build_selector(
            algorithm=port.selectionalgorithm, port=port, servers=servers, connections=[0] * len(servers))
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - reported by the Scheduler
        return None


def _fallback_of(registry, port, servers):
    """The port's pressure table (indices into *servers*, its eligible servers) when its selector is the
    core's wrr or wlc (``selection.scheduler.pressure_table``); None otherwise."""
    from encapfwd.selection.scheduler import PRESSURE_ALGORITHMS, pressure_table

    if port.selectionalgorithm not in PRESSURE_ALGORITHMS or not servers:
        return None
    select = _selector(registry, port, servers)
    return None if select is None else pressure_table(port, servers, select)


def _digest(config: Config, servers, ports, host: bool = True) -> str:
    """SHA-256 over what the plan forwards where: server ids are replaced by server names, and what does
    not change forwarding does not count (the order of servers in the file, for table-driven ports).

    With *host* False only the selection counts (which server each flow gets: servers, methods, health,
    weights, tables), not this dispatcher's own bytes (its MAC, the outer source in the templates): the
    digest that must be equal on every dispatcher of a scale-out group (docs/scale-out.md).

    A port's pressure table (``PortPlan.fallback``) is not hashed: it follows from what is (the algorithm,
    stickytime, the servers in configuration order with their health and weights). ``executor
    newflowlimit`` and ``handuplimit`` are this host's (the kernel's flow-table and hand-up policy), so only the
    plan digest has them."""
    h = hashlib.sha256(b"encapfwd-plan-1\0" if host else b"encapfwd-selection-1\0")
    names = {s.sid: s.name for s in servers}
    ex = config.executor
    if host:
        h.update(f"{ex.mac}|{ex.mtu}|{ex.encapttl}|{ex.maxflows}|{ex.newflowlimit}|{ex.handuplimit}\0".encode())
    for s in sorted(servers, key=lambda s: s.name):
        h.update(f"S|{s.name}|{s.method}|{s.up}|{s.weight}|".encode())
        if host:
            t = s.template
            h.update(f"{s.src_mac}|{s.dst_mac}|{s.mtu}|".encode())
            h.update(b"-" if t is None else t.header + b"|" + ",".join(sorted(t.fields)).encode())
        h.update(b"\0")
    for p in sorted(ports, key=lambda p: (p.cluster, p.number)):
        h.update(f"P|{p.cluster}|{p.number}|{p.protos}|{p.algorithm}|{p.stickytime}|{p.staletimeout}|".encode())
        if p.table is None:  # the selector may depend on configuration order (WRR ties)
            h.update("|".join(names[sid] for sid in p.servers).encode())
        else:
            order = sorted(names[sid] for sid in p.servers)
            h.update("|".join(order).encode())
            index = {sid: order.index(names[sid]) for sid in p.servers}
            h.update(struct.pack(f"<{len(p.table)}i", *(index.get(sid, -1) for sid in p.table)))
        h.update(b"\0")
    return h.hexdigest()


__all__ = ["NO_SERVER", "Plan", "PortPlan", "ServerPlan", "SidMap", "compile_plan", "egress_of"]
