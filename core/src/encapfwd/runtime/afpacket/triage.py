"""Overload triage in an AF_PACKET worker: when the worker cannot keep up, new connections of the port(s)
flooded hardest are dropped before the dispatcher's work, so that other ports and established flows still
get through (docs/live.md, "Overload").

The worker judges its own pressure once per :data:`WINDOW` (:meth:`Triage.tick`): its RX ring dropped
frames since the previous window (``PACKET_STATISTICS`` ``tp_drops``), or a well-filled block reached it
more than :data:`BACKLOG_WAIT` seconds after the kernel opened it (a backlog: frames wait in the ring).
Pressure turns triage on; :data:`HOLD` seconds without pressure and without a connection shed turn it off
(while it sheds, the flood goes on: only the triage keeps the ring from filling). Every change is told to
the controller (an unsolicited ``("pressure", {...})`` message on the worker's channel), which logs it,
reports it, and with a kernel program turns the program's pressure mode on (:mod:`encapfwd.runtime.overload`).

While triage is on, every frame is first looked at by one ``struct`` unpack from the ring (no copy): an IPv4
TCP SYN without ACK, or an IPv4 UDP datagram whose flow is not in the flow table, is a *new connection* of
its (cluster address, port); new connections are counted per port. The ports whose new connections in the
last window were at least :data:`SHED_SHARE` of the busiest port's and at least :data:`SHED_MIN_RATE` per
second are *shed*: their new connections are dropped (counted per port as ``overload_dropped``), except
about :attr:`Triage.admit` per second, one in every :attr:`Triage.stride` (spread evenly, so that no client
falls in a dropped part of every window) (halved in each window that still had pressure, raised by a
quarter in each that had none, within [:data:`ADMIT_MIN`, :data:`ADMIT_MAX`]) so that a shed port is
throttled, not closed. A TCP segment with ACK and without SYN of no flow in the table (an *orphan*: what a
flood of random ACKs sends) is counted per port the same way, and the ports with the most orphans have them
dropped (``overload_orphans_dropped``), but one in :attr:`Triage.orphan_stride` and those of known clients. Everything else — established flows of every port (the shed ones too), new
connections of the other ports, ARP, IPv6, fragments — goes to the dispatcher as always.

Known clients (:mod:`.admission`): a SYN of a shed port from a source that completed a connection through
this worker is never shed (``overload_known_admitted``). While ports are shed the worker's socket filter
drops most unknown SYNs to them in the kernel, before the ring, and lets through a share :attr:`Triage.want_sample`
(the admit rate over the estimated rate of new connections); the triage scales the sample it receives back
by the inverse of the share the filter had (:attr:`Triage.sample`), so the shed ports stay shed and the
episode goes on while the filter is what holds the flood off; what the filter dropped is estimated
(``overload_filter_dropped``: the kernel does not count a socket filter's drops).

UDP: a datagram is a new connection only when its flow is not in the flow table and the worker keeps one
(``maxflows`` 0: no UDP flow would ever be established). A port whose new connections are mostly UDP is
shed only when at least :data:`UDP_PROTECT_SHARE` of the window's frames were something else (established
flows, other ports): with nothing to protect, shedding a stream of new UDP flows (a worker started under
load) would only cut it to the admit rate, while what the worker forwards becomes established.
"""

from __future__ import annotations

import math
import struct
from ipaddress import ip_address
from typing import Dict, List, Optional, Tuple

#: seconds per window: ring drops read, backlog judged, new connections per port counted, shed ports chosen
WINDOW = 0.1
#: a backlog: the block in hand holds at least :data:`BACKLOG_FRAMES` frames and was opened by the kernel
#: more than :data:`BACKLOG_WAIT` seconds ago (its first frame waited that long): frames queue up, not one
#: slow wake-up over a block the kernel retired half empty
BACKLOG_FRAMES = 128
BACKLOG_WAIT = 0.05
#: seconds without pressure (no drop, no backlog) after which a worker stops triaging
HOLD = 1.0
#: a port is shed when its new connections in a window are at least this share of the busiest port's …
SHED_SHARE = 0.5
#: … and at least this many per second
SHED_MIN_RATE = 2000.0
#: new connections per second of the shed ports still let through (start, floor, ceiling)
ADMIT_START = 4000.0
ADMIT_MIN = 500.0
ADMIT_MAX = 200000.0
#: a port whose new connections are mostly UDP datagrams is shed only when at least this share of the window's
#: frames were not new connections (established flows, other traffic): something to protect
UDP_PROTECT_SHARE = 0.01
#: the least share of unknown SYNs the kernel's admission filter samples (the rate estimate scales by its
#: inverse)
SAMPLE_MIN = 1e-4

#: from the frame's first byte: ethertype, version/IHL, protocol, destination address, destination port,
#: TCP flags (48 bytes: an IPv4 header without options and the first 14 bytes of TCP or 8 of UDP + 6)
FRAME = struct.Struct("!12xHB8xB6x4s2xH9xB")
FRAME_SIZE = FRAME.size


def port_name(dst: bytes, dport: int) -> str:
    return f"{ip_address(dst)}@{dport}"


class Triage:
    """One worker's overload state (see the module's docstring); *stats* is the worker's counters."""

    def __init__(self, stats: dict):
        self.stats = stats
        stats.setdefault("overload_triage", False)
        stats.setdefault("overload_episodes", 0)
        stats.setdefault("overload_dropped", {})
        stats.setdefault("overload_admitted", 0)
        stats.setdefault("overload_admit_rate", 0)
        stats.setdefault("overload_capacity", 0)
        stats.setdefault("overload_known_admitted", 0)
        stats.setdefault("overload_filter_dropped", {})
        stats.setdefault("overload_orphans_dropped", {})
        self.active = False
        #: (destination address bytes, port) -> "cluster@port" of the ports whose new connections are shed
        self.shed: Dict[Tuple[bytes, int], str] = {}
        #: new connections per (destination address bytes, port) in this window (counted while active)
        self.counts: Dict[Tuple[bytes, int], int] = {}
        #: of those, UDP datagrams (a port of only new UDP flows with nothing else to protect is not shed)
        self.udp: Dict[Tuple[bytes, int], int] = {}
        #: TCP segments with ACK, without SYN, of no flow in the flow table ("orphans": what a flood of random
        #: ACKs sends) per (destination address bytes, port) in this window, and the ports whose orphans are shed
        #: (but one in *orphan_stride*, and those of known clients)
        self.orphans: Dict[Tuple[bytes, int], int] = {}
        self.orphan_shed: Dict[Tuple[bytes, int], str] = {}
        self.orphan_stride = 1
        self.orphan_skip = 0
        #: the kernel's admission filter (admission.py): the shed keys it samples, the share of unknown SYNs it
        #: lets through, and the unknown SYNs of those keys received in this window (its sample)
        self.filtered: frozenset = frozenset()
        self.sample = 1.0
        self.sample_before = 1.0  # the share it had in the window before (frames wait in the ring)
        self.sampled: Dict[Tuple[bytes, int], int] = {}
        #: the share the filter should sample in the next window (admit rate / estimated rate of new connections)
        self.want_sample = 1.0
        self.admit = ADMIT_START
        #: one in *stride* new connections of the shed ports is admitted (spread over the window, not its first
        #: ones: a client that asks in step with the windows must not always fall in the dropped part)
        self.stride = 1
        self.skip = 0
        self.backlog = False
        self.waited = 0.0  # the longest wait of a block's first frame in this window (seconds)
        self.drops = 0  # ring drops not yet judged (read by the report too: the kernel resets them on read)
        self.shed_before = 0  # new connections shed before this window
        self.frames = 0  # frames handled in this window
        #: frames per second the dispatcher handled (shed ones not counted) in the last window with a backlog
        self.capacity = 0.0
        self.last_pressure = -math.inf
        self.window_start = 0.0
        self.window_end = 0.0
        self.why = ""

    def tick(self, now: float, new_drops: int) -> Optional[dict]:
        """End of a window: judge the pressure; the message to send the controller when something changed
        (``{"on": bool, "why": str, "shed": [...], "capacity": frames/s, "admit": n}``), else None."""
        drops = self.drops + new_drops
        self.drops = 0
        backlog = self.backlog
        elapsed = max(1e-3, now - self.window_start)
        # still shedding: the flood goes on, only the triage holds it off (the hold starts when it stops)
        shed_total = sum(self.stats["overload_dropped"].values()) + sum(
            self.stats["overload_orphans_dropped"].values())
        shed_now, self.shed_before = shed_total - self.shed_before, shed_total
        seen = dict(self.counts)  # new connections that reached the worker in this window
        seen_new = sum(seen.values())
        # the kernel's filter dropped about (1/sample - 1) unknown SYNs for each one of its sample
        filter_dropped = 0.0
        # (the frames of this window may have waited in the ring since the window before: the larger share)
        sample = max(self.sample, self.sample_before)
        if self.sampled and sample < 1:
            extra = 1.0 / max(SAMPLE_MIN, sample) - 1.0
            estimate = self.stats["overload_filter_dropped"]
            for key, n in self.sampled.items():
                more = n * extra
                self.counts[key] = self.counts.get(key, 0) + more
                filter_dropped += more
                name = self.shed.get(key) or port_name(*key)
                estimate[name] = estimate.get(name, 0) + round(more)
        self.sampled = {}
        shedding = shed_now > 0 or filter_dropped > 0
        if backlog:
            self.capacity = max(0, self.frames - shed_now) / elapsed
        pressed = backlog or drops > 0
        message = None
        if pressed:
            self.last_pressure = now
            words = []
            if drops:
                words.append(f"its RX ring dropped {drops} frames")
            if backlog:
                words.append(f"frames waited up to {self.waited * 1000:.0f} ms in its RX ring")
            self.why = " and ".join(words) + f" in {elapsed * 1000:.0f} ms"
        if not self.active:
            if pressed:
                self.active = True
                self.stats["overload_triage"] = True
                self.stats["overload_episodes"] += 1
                self.admit = ADMIT_START
                self.shed = {}
                self.orphan_shed = {}
                message = self._message(True)
        else:
            shed = self._choose(elapsed, self.frames - seen_new)
            orphan_shed = self._choose_orphans(elapsed)
            if pressed:
                self.admit = max(ADMIT_MIN, self.admit / 2)
            else:
                self.admit = min(ADMIT_MAX, self.admit * 1.25)
            if shedding:
                self.last_pressure = now
            if now - self.last_pressure >= HOLD:
                self.why = f"no ring drop, backlog nor connection shed for {HOLD:g} s"
                self.active = False
                self.stats["overload_triage"] = False
                self.shed = {}
                self.orphan_shed = {}
                message = self._message(False)
            elif shed != self.shed or orphan_shed != self.orphan_shed:
                self.shed, self.orphan_shed = shed, orphan_shed
                message = self._message(True)
        # the kernel samples the shed ports' unknown SYNs down to about the admit rate; the stride (the second
        # line, in Python) thins what still comes up beyond it
        flooded_seen = sum(n for key, n in seen.items() if key in self.shed) if self.shed else 0
        self.stride = max(1, math.ceil(flooded_seen / max(1.0, self.admit * elapsed)))
        estimated = sum(n for key, n in self.counts.items() if key in self.shed) if self.shed else 0
        if self.active and self.shed and estimated > 0:
            self.want_sample = max(SAMPLE_MIN, min(1.0, self.admit * elapsed / estimated))
        else:
            self.want_sample = 1.0
        orphans_seen = sum(n for key, n in self.orphans.items() if key in self.orphan_shed) if self.orphan_shed else 0
        self.orphan_stride = max(1, math.ceil(orphans_seen / max(1.0, self.admit * elapsed)))
        self.counts = {}
        self.udp = {}
        self.orphans = {}
        self.backlog = False
        self.waited = 0.0
        self.frames = 0
        self.stats["overload_admit_rate"] = round(self.admit) if self.active else 0
        self.stats["overload_capacity"] = round(self.capacity)
        self.window_start = now
        self.window_end = now + WINDOW
        return message

    def _choose(self, elapsed: float, others: float = math.inf) -> Dict[Tuple[bytes, int], str]:
        """The ports to shed; *others*: the window's frames that were not new connections. A port whose new
        connections are mostly UDP is left alone while *others* are under :data:`UDP_PROTECT_SHARE` of the
        window's frames: shedding it would protect nothing (a worker started under a stream of new UDP flows
        forwards what it can, and the flows it forwarded are established from then on)."""
        counts = self.counts
        if not counts:
            return dict(self.shed)  # nothing new counted (e.g. no frame this window): keep the list
        top = max(counts.values())
        floor = max(top * SHED_SHARE, SHED_MIN_RATE * elapsed)
        protect = others >= UDP_PROTECT_SHARE * max(1, self.frames)
        udp = self.udp
        return {key: self.shed.get(key) or port_name(*key) for key, n in counts.items()
                if n >= floor and (protect or 2 * udp.get(key, 0) <= n)}

    def _choose_orphans(self, elapsed: float) -> Dict[Tuple[bytes, int], str]:
        """The ports whose orphan segments to shed: as :meth:`_choose` for new connections (at least
        :data:`SHED_SHARE` of the busiest port's and :data:`SHED_MIN_RATE` per second)."""
        counts = self.orphans
        if not counts:
            return dict(self.orphan_shed)
        floor = max(max(counts.values()) * SHED_SHARE, SHED_MIN_RATE * elapsed)
        return {key: self.orphan_shed.get(key) or port_name(*key) for key, n in counts.items() if n >= floor}

    def _message(self, on: bool) -> dict:
        return {"on": on, "why": self.why, "shed": self.shed_ports(), "capacity": round(self.capacity),
                "admit": round(self.admit), "dropped": dict(self.stats["overload_dropped"]),
                "filter_dropped": dict(self.stats["overload_filter_dropped"])}

    def shed_ports(self) -> List[str]:
        """The shed ports, those shed for segments of no connection marked so."""
        return sorted(list(self.shed.values()) + [f"{name} (ACKs of no connection)"
                                                  for name in self.orphan_shed.values()])


__all__ = ["ADMIT_MAX", "ADMIT_MIN", "ADMIT_START", "BACKLOG_FRAMES", "BACKLOG_WAIT",
           "FRAME", "HOLD", "SAMPLE_MIN", "SHED_MIN_RATE", "SHED_SHARE", "Triage", "UDP_PROTECT_SHARE", "WINDOW",
           "port_name"]
