"""The core's selection algorithms, registered like any plugin: ``maglev`` (the default), ``wrr`` and
``wlc``, and the flow hash every executor uses.

Selectors come from the ``encapfwd_build_selector`` hook, once per port and configuration change:
``select(flow_hash) -> index into servers | -1``. This module implements the hook with ``trylast=True``,
so a third-party plugin's implementation is asked first and can replace any of them or add its own names
(``docs/selection.md``). The :class:`~encapfwd.selection.scheduler.Scheduler` wraps the selectors with the
flow table and affinity.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from math import gcd
from operator import add, mul
from typing import Dict, List, Sequence

from encapfwd.errors import ConfigError
from encapfwd.hookspecs import hookimpl
from encapfwd.selection import maglev as _maglev

ALGORITHMS = ("maglev", "wrr", "wlc")
DEFAULT_ALGORITHM = "maglev"

#: Maglev table size when the port does not say otherwise (a prime; NSDI 2016's small table).
MAGLEV_SIZE = _maglev.DEFAULT_SIZE

def flow_hash(key: bytes) -> int:
    """Deterministic 32-bit hash of a flow key: CRC-32 (IEEE 802.3, as ``zlib.crc32``) of the bytes.

    The same on every host and process and for every ``PYTHONHASHSEED`` (dispatchers behind one ECMP
    router agree); computed in C, so the per-packet path calls ``zlib.crc32`` directly.
    """
    return zlib.crc32(key)


@hookimpl(trylast=True)
def encapfwd_selection_algorithms():
    return list(ALGORITHMS)


@hookimpl(trylast=True)
def encapfwd_build_selector(algorithm, port, servers, connections):
    if algorithm == "maglev":
        return maglev_selector(servers, MAGLEV_SIZE)
    if algorithm == "wrr":
        return wrr_selector(servers)
    if algorithm == "wlc":
        return wlc_selector(servers, connections)
    return None


def no_server(h: int) -> int:
    """The selector of a port without a server: every flow is dropped (``no-server``)."""
    return -1


_table_cache: Dict[tuple, List[int]] = {}
_TABLE_CACHE_MAX = 16


def maglev_table(servers: Sequence, size: int = MAGLEV_SIZE) -> List[int]:
    """The Maglev lookup table of *servers* (``Server`` objects): indices into *servers*.

    Tables are cached by (addresses, weights, size): a configuration change rebuilds only the ports
    whose servers or weights changed.
    """
    cache_key = (tuple((s.address.packed, s.weight) for s in servers), size)
    table = _table_cache.get(cache_key)
    if table is None:
        try:
            table = _maglev.build_table([a for a, _ in cache_key[0]], [w for _, w in cache_key[0]], size)
        except ValueError as exc:
            raise ConfigError(f"maglev: {exc}") from None
        if len(_table_cache) >= _TABLE_CACHE_MAX:
            _table_cache.pop(next(iter(_table_cache)))
        _table_cache[cache_key] = table
    return table


def maglev_digest(servers: Sequence, table: Sequence[int]) -> str:
    """SHA-256 of a Maglev table as the servers' packed addresses slot by slot: equal on two dispatchers
    exactly when they send every flow hash to the same server (configuration order does not matter)."""
    names = [s.address.packed for s in servers]
    return hashlib.sha256(b"".join([names[i] for i in table])).hexdigest()


def maglev_selector(servers: Sequence, size: int = MAGLEV_SIZE):
    """``select(h) = table[h % size]``: the same server for every packet of a flow, without state."""
    table = maglev_table(servers, size)
    if not table:
        return no_server

    def select(h: int, _table=table, _size=size) -> int:
        return _table[h % _size]

    select.table = table  # for tests and tools
    select.builtin = True
    select.digest = lambda: maglev_digest(servers, table)
    return select


def wrr_sequence(servers: Sequence) -> List[int]:
    """One cycle of smooth weighted round robin: server i appears weight_i/g times (g: the weights'
    greatest common divisor), spread evenly (stride scheduling: occurrence k of server i is placed at
    ``(k + ½) / weight_i``; ties in configuration order)."""
    weights = [s.weight for s in servers]
    g = 0
    for w in weights:
        g = gcd(g, w)
    if not g:
        return []
    slots = []
    for i, w in enumerate(weights):
        w //= g
        slots.extend(((k + 0.5) / w, i) for k in range(w))
    slots.sort()
    return [i for _, i in slots]


def wrr_selector(servers: Sequence):
    """Weighted round robin over new flows (the flow table keeps each flow on its server)."""
    sequence = wrr_sequence(servers)
    if not sequence:
        return no_server
    following = itertools.cycle(sequence).__next__

    def select(h: int) -> int:
        return following()

    select.sequence = sequence
    select.builtin = True
    return select


def wlc_selector(servers: Sequence, connections: list):
    """Weighted least connections: the server with the smallest (active flows + 1) / weight; ties are
    broken by the flow hash (the first minimum at or after ``h % n``), so equal servers share evenly.

    *connections* is the Scheduler's live list of counted flows per server (kept from the flow table).
    """
    n = len(servers)
    if not n:
        return no_server
    inverse = [1.0 / s.weight if s.weight > 0 else float("inf") for s in servers]

    def select(h: int) -> int:
        scores = list(map(add, map(mul, connections, inverse), inverse))
        best = min(scores)
        try:
            return scores.index(best, h % n)
        except ValueError:
            return scores.index(best)

    select.builtin = True
    return select


__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "MAGLEV_SIZE",
    "encapfwd_build_selector",
    "encapfwd_selection_algorithms",
    "flow_hash",
    "maglev_digest",
    "maglev_selector",
    "maglev_table",
    "no_server",
    "wlc_selector",
    "wrr_selector",
    "wrr_sequence",
]
