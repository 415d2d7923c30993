"""Server selection: the core's own algorithms, registered like any plugin, and the Scheduler.

PLACEHOLDER with the final API (see docs/architecture.md); the selection work replaces the internals.
"""

from __future__ import annotations

import zlib

from .hookspecs import hookimpl

ALGORITHMS = ("maglev", "wrr", "wlc")


def flow_hash(key: bytes) -> int:
    """Deterministic 32-bit hash of a flow key (same on every host and process)."""
    return zlib.crc32(key)


@hookimpl(trylast=True)
def encapfwd_selection_algorithms():
    return list(ALGORITHMS)


@hookimpl(trylast=True)
def encapfwd_build_selector(algorithm, port, servers, connections):
    if algorithm not in ALGORITHMS:
        return None
    n = len(servers)

    def select(h: int) -> int:
        return h % n if n else -1

    return select


class Scheduler:
    """Owns per-port selectors, the flow table and affinity. One per dispatcher."""

    def __init__(self, registry, maxflows: int = 1_000_000):
        self.registry = registry
        self.maxflows = maxflows
        self._pickers = {}

    def configure(self, config) -> None:
        pickers = {}
        for cluster in config.clusters:
            for port in config_ports(cluster):
                eligible = [i for i, s in enumerate(port.servers) if not s.down and s.weight > 0]
                servers = [port.servers[i] for i in eligible]
                select = self.registry.hook.encapfwd_build_selector(
                    algorithm=port.selectionalgorithm, port=port, servers=servers,
                    connections=[0] * len(servers))

                def pick(key, client, tcp_flags, now, _select=select, _eligible=eligible):
                    if not _eligible:
                        return -1
                    i = _select(zlib.crc32(key))
                    return _eligible[i] if i >= 0 else -1

                pickers[(cluster.address, port.number)] = pick
        self._pickers = pickers

    def picker(self, cluster_address, port_number):
        return self._pickers[(cluster_address, port_number)]

    def stats(self) -> dict:
        return {"flows": 0, "maxflows": self.maxflows, "evictions": 0}


def config_ports(cluster):
    return cluster.ports
