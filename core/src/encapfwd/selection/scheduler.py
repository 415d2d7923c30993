"""The Scheduler: server selection as the dispatcher sees it (``docs/selection.md`` is the user's guide).

- **Selectors** come from the ``encapfwd_build_selector`` hook (:mod:`encapfwd.selection.algorithms` is
  the core's implementation: ``maglev``, ``wrr``, ``wlc``), once per port and configuration change.
- The **Scheduler** wraps every port's selector with the flow table (``flowtable.py``: established
  flows keep their server across configuration changes while it is up; bounded, LRU, idle timeouts)
  and client affinity (``stickytime``), and hands the dispatcher one plain ``pick`` callable per port.

The per-packet path (``pick``) runs no pluggy, builds no attrs object and, for a packet of an
established flow, costs one dictionary lookup and a few integer operations.

Overload (``docs/live.md``, "Overload"), the kernel program's rules for its own flow table, followed here for
the Python one so that both executors forward alike (``tests/test_xdp_differential.py``):

- with ``syn_only`` (every :class:`~encapfwd.datapath.dispatcher.Dispatcher` sets it), a TCP segment of a
  table port (core maglev, no stickytime) that misses the flow table and cannot open a connection (not SYN
  without ACK) is placed by the table but not remembered (counted: ``not_remembered``); a flow the table
  still holds (expired, or its server down or gone) is placed again and kept whatever its flags, as the
  kernel writes such a flow again in the entry it has;
- :meth:`Scheduler.set_pressure`: a new flow of a wrr or wlc port (the core's, no stickytime) is placed by the
  port's pressure table (:func:`pressure_table`, compiled once into the plan as ``PortPlan.fallback``, the
  very table the kernel program holds; :meth:`Scheduler.configure` takes it from the plan) instead of its
  selector, and remembered under the same rule (counted: ``pressure_placed``).

The kernel's third rule, at most ``executor newflowlimit`` new entries per CPU per second, has no Python
counterpart: a dispatcher's flow table is bounded by ``maxflows`` with exact LRU, and the Python executor
is the slow path whose rate the pressure mode relieves (the differential runs with the limit off).
"""

from __future__ import annotations

import ipaddress
import zlib
from typing import Callable, Dict, List, Optional, Tuple

from encapfwd.errors import ConfigError, EncapfwdError, PluginError
from encapfwd.selection.algorithms import maglev_table, no_server
from encapfwd.selection.flowtable import (
    AFFINITY,
    CLOSED,
    CLOSING,
    COUNTED,
    EXPIRED,
    FIN_TIMEOUT,
    MOVED,
    RST_TIMEOUT,
    SHIFT,
    SID_MASK,
    FlowTable,
)

# TCP flag bits
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_TCP = 6

#: The selection algorithms whose new flows the kernel program places itself under pressure (the core's).
PRESSURE_ALGORITHMS = ("wrr", "wlc")


def pressure_table(port, servers, select) -> Optional[List[int]]:
    """The pressure table of *port* (indices into *servers*, its eligible servers: up, weight > 0): the
    weighted Maglev table of those servers (wrr weights kept, wlc degraded to its weights), by which both
    executors place new flows under pressure; None when the port keeps sending new flows up even then.

    Only the core's ``wrr`` and ``wlc`` (*select*, the port's selector, is ``builtin``) without stickytime
    have one: client affinity lives in the slow path's flow table (the kernel cannot keep it), and a
    plugin's selector runs in Python only. A port without an eligible server has none (its new flows find no
    server either way).
    """
    if (port.stickytime or port.selectionalgorithm not in PRESSURE_ALGORITHMS or not servers
            or not getattr(select, "builtin", False)):
        return None
    return maglev_table(servers)


def _fallback_indices(port_plan, eligible) -> Optional[List[int]]:
    """A plan port's pressure table (plan sids) as indices into its eligible servers (*eligible*: their
    indices in configuration order, as ``PortPlan.servers`` lists the sids); None if it has none."""
    if port_plan is None or not eligible:
        return None
    position = {port_plan.servers[i]: j for j, i in enumerate(eligible) if i < len(port_plan.servers)}
    try:
        return list(map(position.__getitem__, port_plan.fallback))
    except KeyError:  # not this configuration's plan: no pressure table rather than a wrong one
        return None


def _stateless_pick(select, eligible):
    """The pick of a port without a flow table (``maxflows`` 0): each packet hashed afresh."""
    n = len(eligible)
    emap = list(eligible) + [-1]  # emap[-1] == -1: a selector's "none" maps to "none"
    crc32 = zlib.crc32
    builtin = getattr(select, "builtin", False)
    if builtin and getattr(select, "table", None) is not None:
        size = len(select.table)
        direct = [emap[j] for j in select.table]

        def pick(key, client, tcp_flags, now):
            return direct[crc32(key) % size]

    elif builtin:

        def pick(key, client, tcp_flags, now):
            return emap[select(crc32(key))]

    else:

        def pick(key, client, tcp_flags, now):
            j = select(crc32(key))
            return emap[j] if 0 <= j < n else -1

    return pick


# ---------------------------------------------------------------------------------------------------
# The Scheduler
# ---------------------------------------------------------------------------------------------------


def _address(value):
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return ipaddress.ip_address(bytes(value))
    return ipaddress.ip_address(str(value).strip())


class Scheduler:
    """Owns per-port selectors, the flow table and affinity. One per dispatcher.

    :param registry: the plugin registry (``encapfwd.plugins.Registry``) or a pluggy ``PluginManager``.
    :param maxflows: bound of the flow table (flows + affinity records). ``0`` runs without a table:
        each packet is hashed afresh (only meaningful for ``maglev``; no affinity, no least connections,
        and flows move when the server set changes) — for benchmarks and stateless deployments.
        While the configurations' ``executor.maxflows`` does not change, this value is kept; when a new
        configuration changes it, the table adopts it (evicting the least recently used beyond it).
    """

    def __init__(self, registry, maxflows: int = 1_000_000, syn_only: bool = False):
        self.registry = registry
        self.table = FlowTable(maxflows)
        #: the kernel program's rule for table ports: only a TCP SYN (or any UDP datagram) makes a flow entry
        self.syn_only = syn_only
        #: pressure on: new flows of wrr/wlc ports are placed by their pressure table (read by every pick)
        self._pressure = [False]
        #: [new flows not remembered (not-syn), new flows placed under pressure]
        self._overload = [0, 0]
        self._stateless = maxflows == 0
        self._config_maxflows: Optional[int] = None
        self._pickers: Dict[tuple, Callable] = {}
        self._selectors: Dict[tuple, Callable] = {}
        self._digests: Dict[int, str] = {}

    @property
    def maxflows(self) -> int:
        return self.table.maxflows

    def set_pressure(self, on: bool) -> None:
        """Pressure on or off (the kernel program's ``DataPlane.set_pressure``, for the Python flow table):
        on, a new flow of a wrr or wlc port is placed by the port's pressure table instead of its selector.
        Kept across :meth:`configure`; a stateless scheduler (``maxflows`` 0) ignores it."""
        self._pressure[0] = bool(on)

    @property
    def pressure(self) -> bool:
        return self._pressure[0]

    @property
    def stateless(self) -> bool:
        """True when running without a flow table (``maxflows`` 0: each packet hashed afresh)."""
        return self._stateless

    # -- configuration --------------------------------------------------------------------------
    def configure(self, config, plan=None) -> None:
        """Compile a pick callable for every port of *config*; the flow table carries over. With *plan* (the
        :class:`~encapfwd.plan.Plan` of *config*), ports with a pressure table (``PortPlan.fallback``) place
        new flows by it while :attr:`pressure` is on; without, pressure changes nothing."""
        fallbacks = {}
        if plan is not None:
            for pp in plan.ports:
                if pp.fallback is not None:
                    fallbacks[(pp.cluster, pp.number)] = pp
        table = self.table
        hook = self.registry.hook.encapfwd_build_selector
        pickers: Dict[tuple, Callable] = {}
        selectors: Dict[tuple, Callable] = {}
        slots: Dict[int, Tuple[list, int]] = {}
        for cluster in config.clusters:
            for port in cluster.ports:
                servers_all = port.servers
                sids = [table.sid(cluster.address, port.number, s.address) for s in servers_all]
                eligible = [i for i, s in enumerate(servers_all) if not s.down and s.weight > 0]
                servers = [servers_all[i] for i in eligible]
                esids = [sids[i] for i in eligible]
                connections = [table.counts[sid] for sid in esids]
                for j, sid in enumerate(esids):
                    slots[sid] = (connections, j)
                try:
                    select = hook(
                        algorithm=port.selectionalgorithm, port=port, servers=servers,
                        connections=connections,
                    )
                except EncapfwdError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a plugin's bug becomes one clear line
                    raise PluginError(
                        f"port {cluster.address}@{port.number}: building the "
                        f"{port.selectionalgorithm!r} selector failed: {type(exc).__name__}: {exc}"
                    ) from exc
                if select is None:
                    known = ", ".join(self.registry_algorithms()) or "none"
                    raise ConfigError(
                        f"port {cluster.address}@{port.number}: unknown selectionalgorithm "
                        f"{port.selectionalgorithm!r} (available: {known})"
                    )
                fallback = _fallback_indices(fallbacks.get((str(cluster.address), port.number)), eligible)
                if not servers:
                    select = no_server
                # up servers (weight 0 included: their flows continue) by sid -> index in port.servers
                up = {sids[i]: i for i, s in enumerate(servers_all) if not s.down}
                key = (cluster.address, port.number)
                selectors[key] = select
                pickers[key] = self._compile(cluster, port, select, eligible, esids, up, fallback)
        # nothing failed: switch over (slots first, so that evictions by a smaller maxflows update the
        # new connections lists)
        table.slots = slots
        configured = config.executor.maxflows
        if (
            not self._stateless
            and self._config_maxflows is not None
            and configured != self._config_maxflows
        ):
            table.resize(configured)
        self._config_maxflows = configured
        self._pickers = pickers
        self._selectors = selectors
        self._digests = {}

    def registry_algorithms(self) -> List[str]:
        try:
            return list(self.registry.selection_algorithms())
        except AttributeError:
            names: List[str] = []
            for result in self.registry.hook.encapfwd_selection_algorithms():
                names.extend(n for n in result or () if n not in names)
            return names

    def picker(self, cluster_address, port_number):
        """The ``pick(key, client, tcp_flags, now) -> index | -1`` callable of a configured port."""
        try:
            return self._pickers[(cluster_address, port_number)]
        except KeyError:
            return self._pickers[(_address(cluster_address), int(port_number))]

    # -- maintenance and reporting --------------------------------------------------------------
    def expire(self, now: float, full: bool = False) -> int:
        """Drop stale flow-table entries (see :meth:`FlowTable.expire`); returns how many."""
        return self.table.expire(now, full)

    def stats(self) -> dict:
        """JSON-able: flows, affinity, entries, maxflows, created, evictions, expired, moved, closed,
        connections (active flows per ``cluster@port@server``)."""
        out = self.table.stats()
        out["stateless"] = self._stateless
        out["not_remembered"] = {"not-syn": self._overload[0]}
        out["pressure_placed"] = self._overload[1]
        out["pressure"] = self._pressure[0]
        out["connections"] = self.table.connections()
        out["maglev"] = self.maglev_digests()
        return out

    def maglev_digests(self) -> Dict[str, str]:
        """``cluster@port`` -> SHA-256 of its Maglev table (see :func:`~encapfwd.selection.algorithms.maglev_digest`), for the ports
        using the core's maglev: dispatchers behind one ECMP router must show the same values."""
        digests = self._digests
        out = {}
        for (cluster, number), select in self._selectors.items():
            digest = getattr(select, "digest", None)
            if digest is None:
                continue
            value = digests.get(id(select))
            if value is None:
                value = digests[id(select)] = digest()
            out[f"{cluster}@{number}"] = value
        return out

    # -- compilation of the per-packet callables ---------------------------------------------------
    def _compile(self, cluster, port, select, eligible, esids, up, fallback=None):
        n = len(eligible)
        builtin = getattr(select, "builtin", False)
        crc32 = zlib.crc32
        if self._stateless:
            return _stateless_pick(select, eligible)

        table = self.table
        entries = table.entries
        get = entries.get
        move = entries.move_to_end
        insert = table.insert
        replace = table.replace
        remove = table.remove
        ctr = table.ctr
        up_get = up.get
        timeout = port.staletimeout
        fin_timeout = min(FIN_TIMEOUT, timeout)
        rst_timeout = min(RST_TIMEOUT, timeout)
        sticky = port.stickytime
        position = {sid: j for j, sid in enumerate(esids)}.get  # sid -> index in the eligible list
        keep = COUNTED | CLOSING | SID_MASK
        # the kernel's rule (see the module's docstring): a table port, or a placement under pressure
        syn_only = self.syn_only
        guarded = syn_only and builtin and getattr(select, "table", None) is not None and not sticky
        pressure = self._pressure
        overload = self._overload
        fsize = len(fallback) if fallback else 0
        aprefix = b"\xff" + cluster.address.packed + port.number.to_bytes(2, "big")

        def touch(akey, sid, now):
            """Point the client's affinity record at *sid* (or just refresh it), unless it is valid
            and points at another server that can still take new flows (up, weight > 0)."""
            deadline = int(now) + sticky + 1
            av = get(akey)
            if av is None:
                insert(akey, (deadline << SHIFT) | AFFINITY | sid, now)
                return
            asid = av & SID_MASK
            if asid == sid:
                if deadline > av >> SHIFT:
                    replace(akey, av, (deadline << SHIFT) | AFFINITY | sid)
                else:
                    move(akey)
            elif (av >> SHIFT) <= now or position(asid, -1) < 0:
                replace(akey, av, (deadline << SHIFT) | AFFINITY | sid)

        def slow(key, client, tcp_flags, now, v):
            if v is not None:
                sid = v & SID_MASK
                i = up_get(sid)
                deadline = v >> SHIFT
                if now >= deadline:
                    remove(key, v, EXPIRED)
                elif i is None:
                    remove(key, v, MOVED)  # its server is down or gone: choose again
                elif v & CLOSING and tcp_flags & (_SYN | _ACK) == _SYN:
                    remove(key, v, None)  # a new connection reusing a closed flow's 5-tuple
                else:
                    if tcp_flags & (_FIN | _RST):
                        if not v & CLOSING:
                            ctr[CLOSED] += 1
                        wait = rst_timeout if tcp_flags & _RST else fin_timeout
                        replace(key, v, ((int(now) + wait + 1) << SHIFT) | CLOSING | sid)
                    else:
                        new_deadline = int(now) + (fin_timeout if v & CLOSING else timeout) + 1
                        if new_deadline > deadline:
                            replace(key, v, (new_deadline << SHIFT) | (v & keep))
                        else:
                            move(key)
                    if sticky:
                        touch(aprefix + client, sid, now)
                    return i
            # a new flow
            j = -1
            if sticky:
                akey = aprefix + client
                av = get(akey)
                if av is not None and (av >> SHIFT) > now:
                    j = position(av & SID_MASK, -1)
            kernel = guarded and v is None  # a flow the table held is placed again and kept
            if j < 0:
                if fsize and pressure[0]:
                    j = fallback[crc32(key) % fsize]
                    overload[1] += 1
                    kernel = syn_only and v is None
                else:
                    j = select(crc32(key))
                    if not 0 <= j < n:
                        return -1
            sid = esids[j]
            if kernel and key[-5] == _TCP and tcp_flags & (_SYN | _ACK) != _SYN:
                overload[0] += 1  # a TCP segment that cannot open a connection: placed, not remembered
                return eligible[j]
            if tcp_flags & (_FIN | _RST):
                wait = rst_timeout if tcp_flags & _RST else fin_timeout
                insert(key, ((int(now) + wait + 1) << SHIFT) | CLOSING | sid, now)
            else:
                insert(key, ((int(now) + timeout + 1) << SHIFT) | COUNTED | sid, now)
            if sticky:
                touch(aprefix + client, sid, now)
            return eligible[j]

        if sticky:

            def pick(key, client, tcp_flags, now):
                v = get(key)
                if v is not None and not tcp_flags & 7 and now < (v >> SHIFT) - timeout:
                    i = up_get(v & SID_MASK)
                    if i is not None:
                        akey = aprefix + client
                        av = get(akey)
                        if av is not None and not (av ^ v) & SID_MASK and now < (av >> SHIFT) - sticky:
                            move(key)
                            move(akey)
                            return i
                return slow(key, client, tcp_flags, now, v)

        else:

            def pick(key, client, tcp_flags, now):
                v = get(key)
                if v is not None and not tcp_flags & 7 and now < (v >> SHIFT) - timeout:
                    i = up_get(v & SID_MASK)
                    if i is not None:
                        move(key)
                        return i
                return slow(key, client, tcp_flags, now, v)

        return pick


__all__ = ["PRESSURE_ALGORITHMS", "Scheduler", "pressure_table"]
