"""Known-client admission in the kernel, before the RX ring (docs/live.md, "Overload").

A random-source SYN flood never completes a handshake; a genuine client does. A worker remembers the IPv4
source addresses that completed a connection through it (:class:`KnownClients`: a TCP segment without SYN,
with ACK, of a flow in its flow table — the client answered the server's SYN-ACK), the most recent
:data:`KNOWN_MAX`, each for :data:`KNOWN_TTL` seconds after its last such segment.

While its triage sheds ports (:mod:`.triage`), the worker attaches to its AF_PACKET socket a classic BPF
socket filter (``SO_ATTACH_FILTER``, which replaces the previous one atomically; no ``bpf()`` syscall)
built by :func:`admission_filter`: an IPv4 TCP SYN without ACK (IHL 5, not a fragment) to a shed (cluster
address, port) is accepted when its source is a known client; from another source only a random sample
(the ancillary load ``SKF_AD_RANDOM``: one in 1/*sample*) is, the rest is dropped in the kernel, before
it is copied into the ring. Every other frame (established flows, other ports, ARP, IPv6, fragments, UDP)
goes on to the socket's usual program (:func:`~.rings.cluster_filter`), unchanged, as does an admitted
SYN. :class:`Admission` keeps the attached program in step with the triage (at most once per triage
window) and puts the usual program back when the triage ends.

The kernel does not count what a socket filter drops (``PACKET_STATISTICS`` ``tp_drops`` counts ring
overflows only): the worker estimates it from the sampled SYNs it receives (``overload_filter_dropped``,
an estimate).
"""

from __future__ import annotations

import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: the most known clients a worker remembers (the most recent ones; the filter tests them by binary search)
KNOWN_MAX = 256
#: seconds a known client stays known after its last segment of a completed connection
KNOWN_TTL = 60.0
#: a known client's time is refreshed at most once per this many seconds (a dictionary write per segment
#: otherwise)
KNOWN_REFRESH = 1.0
#: known clients learned (added or refreshed) per triage window at most: beyond, a client that completed a
#: connection waits for a later segment (bounds the cost when far more than KNOWN_MAX clients are active)
LEARN_BUDGET = 32
#: the kernel's limit on a classic BPF program (BPF_MAXINSNS)
MAX_INSNS = 4096

# classic BPF opcodes (linux/filter.h)
LD_W_ABS = 0x20
LD_H_ABS = 0x28
LD_B_ABS = 0x30
ALU_AND_K = 0x54
JA = 0x05
JEQ_K = 0x15
JGT_K = 0x25
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06
SKF_AD_OFF = -0x1000
#: ``A = get_random_u32()`` (Documentation/networking/filter.rst, "ld rand")
SKF_AD_RANDOM = 56


class KnownClients:
    """The most recent :data:`KNOWN_MAX` IPv4 sources (4 bytes each) that completed a connection, with the
    time of their last segment; :attr:`changes` counts additions and removals (the filter follows it)."""

    def __init__(self, size: int = KNOWN_MAX, ttl: float = KNOWN_TTL):
        self.size = size
        self.ttl = ttl
        #: source -> when last seen, least recently refreshed first (the data path reads it directly)
        self.seen: Dict[bytes, float] = {}
        self.changes = 0
        self.learned = 0  # sources added, ever
        #: learns left in this window (the worker's data path spends it, its window tick restores it)
        self.budget = LEARN_BUDGET

    def learn(self, src: bytes, now: float) -> None:
        seen = self.seen
        if seen.pop(src, None) is None:
            self.changes += 1
            self.learned += 1
            while len(seen) >= self.size:
                del seen[next(iter(seen))]
        seen[src] = now

    def expire(self, now: float) -> None:
        seen = self.seen
        limit = now - self.ttl
        while seen:
            src = next(iter(seen))
            if seen[src] > limit:
                break
            del seen[src]
            self.changes += 1

    def addresses(self) -> List[bytes]:
        return list(self.seen)


def _u32(packed: bytes) -> int:
    return struct.unpack("!I", packed)[0]


def admission_filter(base: Sequence[Tuple[int, int, int, int]], shed: Iterable[Tuple[bytes, int]],
                     known: Iterable[bytes], sample: float) -> List[Tuple[int, int, int, int]]:
    """The classic BPF program: *base* (the socket's usual program) behind a test of the IPv4 TCP SYNs to
    the (4-byte address, port)s of *shed*: from a source in *known* (4-byte addresses) they go on to *base*,
    from another source a share *sample* (0 … 1) of them does, the rest is dropped. Everything else goes on
    to *base*. ValueError when the program would exceed the kernel's :data:`MAX_INSNS` instructions."""
    prog: list = []  # [code, jt, jf, k]; jt/jf/k of JA may be labels
    labels: Dict[str, int] = {}

    def emit(code, k=0, jt=0, jf=0):
        prog.append([code, jt, jf, k])

    def label(name):
        labels[name] = len(prog)

    # every conditional jump below is +0/+1/+3 (its far targets go through a "ja")
    emit(LD_H_ABS, 12)
    emit(JEQ_K, 0x0800, 1, 0)
    emit(JA, "base")
    emit(LD_B_ABS, 14)
    emit(JEQ_K, 0x45, 1, 0)  # IPv4 without options (others go up as always)
    emit(JA, "base")
    emit(LD_B_ABS, 23)
    emit(JEQ_K, 6, 1, 0)
    emit(JA, "base")
    emit(LD_H_ABS, 20)
    emit(JSET_K, 0x3FFF, 0, 1)  # a fragment
    emit(JA, "base")
    emit(LD_B_ABS, 47)
    emit(ALU_AND_K, 0x12)
    emit(JEQ_K, 0x02, 1, 0)  # SYN without ACK
    emit(JA, "base")
    for address, port in sorted(set(shed)):
        emit(LD_W_ABS, 30)
        emit(JEQ_K, _u32(address), 0, 3)
        emit(LD_H_ABS, 36)
        emit(JEQ_K, port, 0, 1)
        emit(JA, "shed")
    emit(JA, "base")
    label("shed")
    values = sorted({_u32(a) for a in known})
    if values:
        emit(LD_W_ABS, 26)
        counter = [0]

        def tree(vals):
            if len(vals) <= 4:
                for v in vals:
                    emit(JEQ_K, v, 0, 1)
                    emit(JA, "base")  # a known client
                emit(JA, "unknown")
                return
            mid = len(vals) // 2
            counter[0] += 1
            right = f"right{counter[0]}"
            emit(JGE_K, vals[mid], 0, 1)
            emit(JA, right)
            tree(vals[:mid])
            label(right)
            tree(vals[mid:])

        tree(values)
    label("unknown")
    if sample <= 0:
        emit(RET_K, 0)
    elif sample < 1:
        emit(LD_W_ABS, SKF_AD_OFF + SKF_AD_RANDOM)
        emit(JGE_K, min(0xFFFFFFFF, max(1, round(sample * 2.0 ** 32))), 0, 1)
        emit(RET_K, 0)
    label("base")
    out = []
    for pc, (code, jt, jf, k) in enumerate(prog):
        if code == JA and isinstance(k, str):
            k = labels[k] - pc - 1
        out.append((code, jt, jf, k & 0xFFFFFFFF))
    out.extend(tuple(insn) for insn in base)
    if len(out) > MAX_INSNS:
        raise ValueError(f"admission filter too long ({len(out)} instructions)")
    return out


class Admission:
    """A worker's admission filter: :meth:`update` attaches :func:`admission_filter` for the shed ports, the
    known clients and the sample while the triage sheds, the *base* program otherwise; *attach(program)*
    sets the socket's filter (``RxRing.set_filter``). A failure to attach is logged once (by *log*) and
    leaves the triage in Python alone; it never reaches the data path."""

    def __init__(self, base, attach, known: Optional[KnownClients] = None, log=lambda line: None):
        self.base = base
        self.attach = attach
        self.known = known or KnownClients()
        self.log = log
        #: what is attached: None (the base program) or (shed keys, known changes, sample)
        self.state: Optional[tuple] = None
        self.sample = 1.0  # the share of unknown SYNs of the shed ports the attached filter lets through
        self.filtered: frozenset = frozenset()  # the shed keys the attached filter samples
        self.attaches = 0
        self.error: Optional[str] = None

    def set_base(self, base) -> None:
        """A new usual program (a reload), which the caller has just attached: the admission filter is built
        on it again at the next :meth:`update`."""
        self.base = base
        self.state = None
        self.sample = 1.0
        self.filtered = frozenset()

    def update(self, shed: Iterable[Tuple[bytes, int]], sample: float, now: float) -> None:
        """Follow the triage: *shed* (address bytes, port) keys (empty: the base program), *sample* the share
        of unknown SYNs to let through. Attaches only on a change (a sample within a fifth of the attached
        one is no change)."""
        known = self.known
        known.expire(now)
        keys = frozenset(k for k in shed if len(k[0]) == 4)
        sample = min(1.0, max(0.0, sample))
        if not keys:
            if self.state is not None:
                if self._attach(self.base):
                    self.state = None
                    self.sample = 1.0
                    self.filtered = frozenset()
            return
        state = self.state
        if state is not None and state[0] == keys and state[1] == known.changes and (
                state[2] == sample or (state[2] > 0 and abs(sample - state[2]) <= 0.2 * state[2]
                                       and sample < 1)):
            return
        addresses = known.addresses()
        room = (MAX_INSNS - len(self.base) - 24 - 5 * len(keys)) // 3  # < 3 instructions per client
        if room < len(addresses):
            addresses = addresses[len(addresses) - max(0, room):]  # the most recent ones
        try:
            program = admission_filter(self.base, keys, addresses, sample)
        except ValueError as exc:  # too many shed ports for one program: the triage in Python alone
            program = None
            why = f"ValueError: {exc}"
            if self.error != why:
                self.log(f"admission filter not attached: {why}")
            self.error = why
        if program is not None and self._attach(program):
            self.state = (keys, known.changes, sample)
            self.sample = sample
            self.filtered = keys
            self.attaches += 1

    def _attach(self, program) -> bool:
        try:
            self.attach(program)
        except (OSError, ValueError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            if self.error != why:
                self.log(f"admission filter not attached: {why}")
            self.error = why
            return False
        self.error = None  # attached: a past failure is over
        return True


__all__ = ["Admission", "KNOWN_MAX", "LEARN_BUDGET", "KNOWN_REFRESH", "KNOWN_TTL", "KnownClients", "SKF_AD_RANDOM",
           "admission_filter"]
