"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI 2016, section 3.4), with weights, in pure Python.

Every server gets a permutation of the ``size`` table slots, ``offset, offset + skip, offset + 2·skip, …``
(mod ``size``), where ``offset`` and ``skip`` come from a keyed BLAKE2b hash of the server's *address*
(its packed bytes). Servers take turns claiming their next preferred free slot until the table is full;
a server of weight *w* takes *w* turns per round (weights are divided by their greatest common divisor
first, so ``1,2`` and ``2,4`` build the same table). The turn order is the servers sorted by address, not
configuration order, so the table depends only on the *set* of (address, weight) pairs and the size:

- identical on every host and process (no ``hash()``, no randomisation) — dispatchers behind one ECMP
  router agree on every flow without sharing state;
- removing one of N servers re-maps about 1/N of the slots (its own, plus a little churn), adding one
  takes about 1/(N+1).

``size`` must be a prime larger than the number of servers (the default, 65,537, is the paper's
"small" table: every server's share is within a slot or two of its weight share, i.e. a relative error
of about N/65,537 for N servers — 0.15 % with 100 servers, 1.5 % with 1,000).
"""

from __future__ import annotations

import hashlib
import ipaddress
from array import array
from math import gcd
from typing import List, Optional, Sequence, Tuple

DEFAULT_SIZE = 65537

_PERSON_OFFSET = b"encapfwd-mgl-off"  # BLAKE2b personalisation: at most 16 bytes
_PERSON_SKIP = b"encapfwd-mgl-skp"


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def address_bytes(address) -> bytes:
    """The packed bytes of an address (``ipaddress`` object, text, or bytes already packed)."""
    if isinstance(address, (bytes, bytearray)):
        return bytes(address)
    if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = ipaddress.ip_address(str(address))
    return address.packed


def permutation(name: bytes, size: int = DEFAULT_SIZE) -> Tuple[int, int]:
    """``(offset, skip)`` of the permutation of server *name*: slot j of its preference list is
    ``(offset + j * skip) % size``. Deterministic: BLAKE2b with fixed personalisation strings."""
    h1 = int.from_bytes(hashlib.blake2b(name, digest_size=8, person=_PERSON_OFFSET).digest(), "big")
    h2 = int.from_bytes(hashlib.blake2b(name, digest_size=8, person=_PERSON_SKIP).digest(), "big")
    return h1 % size, h2 % (size - 1) + 1


def build_table(addresses: Sequence, weights: Optional[Sequence[int]] = None,
                size: int = DEFAULT_SIZE) -> List[int]:
    """Build the Maglev lookup table: a list of *size* indices into *addresses*.

    :param addresses: server addresses (``ipaddress`` objects, text or packed bytes), any order.
    :param weights: positive integer weights, parallel to *addresses* (default: all 1). A server of
        weight 0 is left out (returns no slots).
    :param size: a prime, larger than the number of servers with weight > 0.
    :returns: ``table`` with ``table[flow_hash % size]`` the index of the chosen server in *addresses*;
        an empty list when no server has a weight.
    """
    n = len(addresses)
    if weights is None:
        weights = [1] * n
    if len(weights) != n:
        raise ValueError("addresses and weights differ in length")
    if not is_prime(size):
        raise ValueError(f"Maglev table size must be a prime, got {size}")
    names = [address_bytes(a) for a in addresses]
    live = [i for i in range(n) if weights[i] > 0]
    if not live:
        return []
    if len(live) >= size:
        raise ValueError(f"Maglev table size {size} must exceed the number of servers ({len(live)})")
    # turn order: by address (then configuration index, for duplicate addresses), independent of the
    # configuration's order
    live.sort(key=lambda i: (names[i], i))
    g = 0
    for i in live:
        g = gcd(g, weights[i])
    w = {i: weights[i] // g for i in live}
    maxw = max(w.values())
    # one round: interleaved, every server with weight > k takes a turn in pass k
    turns = [i for k in range(maxw) for i in live if w[i] > k]

    offsets = [0] * n
    skips = [0] * n
    for i in live:
        offsets[i], skips[i] = permutation(names[i], size)
    nxt = offsets  # next candidate slot of each server (mutated in place)
    entry = [-1] * size
    remaining = size
    while True:
        for i in turns:
            c = nxt[i]
            s = skips[i]
            while entry[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            entry[c] = i
            c += s
            if c >= size:
                c -= size
            nxt[i] = c
            remaining -= 1
            if not remaining:
                return entry


def table_bytes(table: Sequence[int]) -> bytes:
    """A canonical byte form of a table (unsigned 32-bit little-endian indices), for comparisons."""
    arr = array("I", table)
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte "I"
        arr = array("L", table)
    import sys

    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()
