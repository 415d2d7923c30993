"""The Scheduler: server selection as the dispatcher sees it (``docs/selection.md`` is the user's guide).

- **Selectors** come from the ``encapfwd_build_selector`` hook (:mod:`encapfwd.selection.algorithms` is
  the core's implementation: ``maglev``, ``wrr``, ``wlc``), once per port and configuration change.
- The **Scheduler** wraps every port's selector with the flow table (``flowtable.py``: established
  flows keep their server across configuration changes while it is up; bounded, LRU, idle timeouts)
  and client affinity (``stickytime``), and hands the dispatcher one plain ``pick`` callable per port.

The per-packet path (``pick``) runs no pluggy, builds no attrs object and, for a packet of an
established flow, costs one dictionary lookup and a few integer operations.
"""

from __future__ import annotations

import ipaddress
import zlib
from typing import Callable, Dict, List, Optional, Tuple

from encapfwd.errors import ConfigError, EncapfwdError, PluginError
from encapfwd.selection.algorithms import no_server
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

    def __init__(self, registry, maxflows: int = 1_000_000):
        self.registry = registry
        self.table = FlowTable(maxflows)
        self._stateless = maxflows == 0
        self._config_maxflows: Optional[int] = None
        self._pickers: Dict[tuple, Callable] = {}
        self._selectors: Dict[tuple, Callable] = {}
        self._digests: Dict[int, str] = {}

    @property
    def maxflows(self) -> int:
        return self.table.maxflows

    @property
    def stateless(self) -> bool:
        """True when running without a flow table (``maxflows`` 0: each packet hashed afresh)."""
        return self._stateless

    # -- configuration --------------------------------------------------------------------------
    def configure(self, config) -> None:
        """Compile a pick callable for every port of *config*; the flow table carries over."""
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
                if not servers:
                    select = no_server
                # up servers (weight 0 included: their flows continue) by sid -> index in port.servers
                up = {sids[i]: i for i, s in enumerate(servers_all) if not s.down}
                key = (cluster.address, port.number)
                selectors[key] = select
                pickers[key] = self._compile(cluster, port, select, eligible, esids, up)
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
    def _compile(self, cluster, port, select, eligible, esids, up):
        n = len(eligible)
        emap = list(eligible) + [-1]  # emap[-1] == -1: a selector's "none" maps to "none"
        builtin = getattr(select, "builtin", False)
        crc32 = zlib.crc32

        if self._stateless:
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
            if j < 0:
                j = select(crc32(key))
                if not 0 <= j < n:
                    return -1
            sid = esids[j]
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


__all__ = ["Scheduler"]
