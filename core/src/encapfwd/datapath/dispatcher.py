"""The dispatcher: the Python executor of a forwarding plan (a :class:`~encapfwd.executor.FrameExecutor`),
``process(frame, now) -> [frames]`` with counters.

Configuration time (``Dispatcher(config or plan, registry)`` and ``reload``): the controller's
:class:`~encapfwd.plan.Plan` (compiled here from a Config when given one) holds every server's forwarding
method, egress and transform (derived from the method's template, the same data the XDP program runs), and
every port's servers; the :class:`~encapfwd.selection.Scheduler` gives each port a picker. Misconfiguration
is a one-line :class:`ConfigError` or :class:`PluginError` when the plan is compiled, never a surprise per
packet.

Per packet (``process``): only ``bytes`` slicing, ``struct``-free integer arithmetic, dict lookups and the
compiled callables. ``process`` never raises: every frame that is not forwarded is counted under exactly one
drop reason in :attr:`Dispatcher.drops` (``docs/datapath.md`` lists them), and may produce an ICMP error
back to the sender (time exceeded, fragmentation needed / packet too big).
"""

from __future__ import annotations

import struct
from ipaddress import ip_address
from typing import Dict, List, Optional

from encapfwd.datapath import packet as pk
from encapfwd.model import server_key as server_name
from encapfwd.plan import Plan, SidMap, compile_plan
from encapfwd.selection.scheduler import Scheduler

#: How long the fragment table remembers which server a fragmented datagram went to (Linux ipfrag_time).
FRAG_TIMEOUT = 30.0
#: Bound of the fragment table (datagrams whose first fragment was seen).
FRAG_TABLE_MAX = 65536
#: Bound of the fragments held while waiting for their datagram's first fragment.
FRAG_HELD_DATAGRAMS = 1024
FRAG_HELD_PER_DATAGRAM = 64
FRAG_HELD_MAX = 4096  # fragments in all (about 6 MB of 1500-byte frames)

DROP_REASONS = (
    "not-for-us",
    "truncated",
    "not-ip",
    "vlan-tagged",
    "bad-version",
    "bad-ihl",
    "bad-total-length",
    "bad-checksum",
    "bad-ext-header",
    "not-cluster",
    "not-port",
    "not-tcp-udp",
    "icmp-unmatched",
    "ttl-exceeded",
    "no-server",
    "frag-needed",
    "frag-unforwardable",
    "frag-timeout",
    "frag-overflow",
    "internal-error",
)

_ET4 = b"\x08\x00"
_ET6 = b"\x86\xdd"
_VLAN = (b"\x81\x00", b"\x88\xa8", b"\x91\x00")
_TTL_PROTO_CK = struct.Struct("!BBH").pack
#: P' from the first 8 bytes of the IPv4 header, the new TTL, the protocol and the new header checksum.
_P4_HEAD = struct.Struct("!8sBBH").pack
_PORTS = struct.Struct("!HH").unpack_from
#: From the start of a frame: destination MAC, then (from offset 12) ethertype (an int), version/IHL, total
#: length, flags/offset (two bytes), TTL, protocol, header checksum, source, destination.
_HDR = struct.Struct("!6s6xHBxHxxBBBBH4s4s").unpack_from
_BYTE = tuple(bytes((i,)) for i in range(256))
#: ICMP informational types (echo, timestamp, information, address mask): errors about them are allowed.
_ICMP4_INFO = frozenset((0, 8, 13, 14, 15, 16, 17, 18))


class _ServerSlot:
    """What the dispatcher keeps about one cluster@port@server (compiled; plain attributes)."""

    __slots__ = ("cluster", "counter", "limit", "method", "mtu", "name", "port", "server", "sid", "transform")

    def __init__(self, name, cluster, port, server, method, transform, mtu, counter, sid=-1):
        self.name = name
        self.cluster = cluster
        self.port = port
        self.server = server
        self.method = method
        self.transform = transform
        self.mtu = mtu
        self.limit = mtu + pk.ETH_HLEN
        self.counter = counter  # [packets, bytes]
        self.sid = sid  # the plan's stable server id


def _quoted_flow_slot(frame, ports, proto: int, ql4: int, client: bytes, vip: bytes, now):
    """The slot of the client flow an ICMP error quotes (a packet VIP:port → client at *ql4*), or a reason."""
    sport = _PORTS(frame, ql4)[0]
    pe = ports.get((proto << 16) | sport) or ports.get(proto << 16)
    if pe is None:
        return "icmp-unmatched"
    key = client + vip + _BYTE[proto] + frame[ql4 + 2:ql4 + 4] + frame[ql4:ql4 + 2]
    idx = pe[0](key, client, 0, now)
    if idx < 0:
        return "no-server"
    return pe[1][idx]


def _reporting(pick, slots, sink):
    """*pick*, telling *sink* the server it chose for each flow."""

    def reporting_pick(key, client, tcp_flags, now):
        i = pick(key, client, tcp_flags, now)
        if i >= 0:
            sink(key, slots[i].sid)
        return i

    return reporting_pick


def _adopting(pick, index, max_age_ns, sink, entries):
    """*pick*, but a frame that is not a SYN without ACK (a new connection: *pick* decides), of a flow the
    flow table (*entries*) does not hold, follows the flow's entry in the kernel (``sink.lookup``: seen within
    *max_age_ns*) when its server is up here (*index*: sid -> slot): the hand-up gap, docs/live.md,
    "Overload". Counted in ``sink.adopted``; the Python table does not take the flow."""
    lookup = sink.lookup

    def adopting_pick(key, client, tcp_flags, now):
        if tcp_flags & 0x12 != 0x02 and key not in entries:
            i = index.get(lookup(key, max_age_ns))
            if i is not None:
                sink.adopted += 1
                return i
        return pick(key, client, tcp_flags, now)

    return adopting_pick


class Dispatcher:
    """See ``docs/architecture.md`` ("Dispatcher contract") and ``docs/datapath.md``."""

    def __init__(self, config, registry=None, scheduler: Optional[Scheduler] = None,
                 sids: Optional[SidMap] = None, flow_sink=None):
        self.registry = registry
        self.drops: Dict[str, int] = {}
        self._counters: Dict[str, list] = {}
        self._frags: Dict[bytes, tuple] = {}
        self._held: Dict[bytes, list] = {}
        self._held_count = 0
        self._ident = 0
        self._sids = sids or SidMap()
        #: ``sink(flow key, sid)``, told the server of every flow placed by a port whose selection is not a
        #: table (WRR, WLC, affinity, a plugin's): the XDP engine keeps those flows in the kernel from then on
        self.flow_sink = flow_sink
        #: ICMP errors sent back to clients (time exceeded, fragmentation needed, packet too big)
        self.replies = 0
        plan = self._plan_of(config)
        # syn_only: the kernel program's rule for its flow table, so that both executors remember alike
        self.scheduler = scheduler or Scheduler(registry, plan.config.executor.maxflows, syn_only=True)
        self._compile(plan)

    # ------------------------------------------------------------------------------ configuration time

    def _plan_of(self, config_or_plan) -> Plan:
        if isinstance(config_or_plan, Plan):
            return config_or_plan.bind(self.registry)
        return compile_plan(config_or_plan, self.registry, self._sids)

    def install(self, plan: Plan) -> None:
        """Run *plan* from now on; counters of servers that stay are kept, flows keep their server."""
        self._compile(self._plan_of(plan))

    def reload(self, config) -> None:
        """:meth:`install` of a new configuration (compiled here) or :class:`~encapfwd.plan.Plan`."""
        self._compile(self._plan_of(config))

    def set_pressure(self, on: bool) -> None:
        """Overload (``docs/live.md``, "Overload"): while on, a new flow of a wrr or wlc port is placed by the
        port's pressure table (the plan's ``PortPlan.fallback``), exactly as the kernel program places it under
        pressure (``DataPlane.set_pressure``); kept across installs. See :meth:`Scheduler.set_pressure`."""
        self.scheduler.set_pressure(on)

    @property
    def pressure(self) -> bool:
        return self.scheduler.pressure

    def _compile(self, plan: Plan) -> None:
        config = plan.config
        ex = config.executor
        v4: Dict[bytes, dict] = {}
        v6: Dict[bytes, dict] = {}
        counters: Dict[str, list] = {}
        slots_by_name: Dict[str, _ServerSlot] = {}
        by_sid = {}
        for sp in plan.servers:
            counter = counters.get(sp.name) or self._counters.get(sp.name) or [0, 0]
            counters[sp.name] = counter
            slot = _ServerSlot(sp.name, sp.cluster, sp.port, sp.address, sp.method, sp.transform, sp.mtu,
                               counter, sp.sid)
            slots_by_name[sp.name] = slot
            by_sid[sp.sid] = slot
        self.scheduler.configure(config, plan)
        # a sink that can look flows up is the kernel program's table: its flows win on a miss (_adopting)
        adopt = hasattr(self.flow_sink, "lookup")
        up = {sp.sid for sp in plan.servers if sp.up}
        for pp in plan.ports:
            address = ip_address(pp.cluster)
            table = (v4 if address.version == 4 else v6).setdefault(address.packed, {})
            slots = tuple(by_sid[sid] for sid in pp.servers)
            pick = self.scheduler.picker(address, pp.number)
            if self.flow_sink is not None and pp.table is None:
                pick = _reporting(pick, slots, self.flow_sink)
            if adopt:
                index = {sid: i for i, sid in enumerate(pp.servers) if sid in up}
                pick = _adopting(pick, index, pp.staletimeout * 1_000_000_000, self.flow_sink,
                                 self.scheduler.table.entries)
            entry = (pick, slots)
            for proto in pp.protos:
                table[(proto << 16) | pp.number] = entry
        self.plan = plan
        self._v4 = v4
        self._v6 = v6
        self._counters = counters
        self._slots = slots_by_name
        self._src_mac = pk.mac_bytes(ex.mac)
        #: frames are forwarded only when sent to this MAC (the executor's; the interface's in live mode)
        self._own_mac = self._src_mac if ex.mac else None
        self._mtu = ex.mtu
        # fragment table entries refer to slots of the old configuration: forget them
        self._frags = {}

    # ------------------------------------------------------------------------------------- per packet

    def _drop(self, reason: str) -> list:
        drops = self.drops
        drops[reason] = drops.get(reason, 0) + 1
        return []

    def process(self, frame: bytes, now: float = 0.0) -> List[bytes]:
        """Forward one Ethernet frame: the frames to send ([] = dropped, counted in :attr:`drops`)."""
        try:
            if frame.__class__ is not bytes:
                frame = bytes(frame)
            n = len(frame)
            if n < 34:
                if n >= 14 and not frame[0] & 1 and self._own_mac not in (None, frame[:6]):
                    return self._drop("not-for-us")
                if n >= 14 and frame[12:14] not in (_ET4, _ET6):
                    return self._drop_ethertype(frame)
                return self._drop("truncated")
            dmac, et, vihl, tot, ffh, ffl, ttl, proto, ck, src, dst = _HDR(frame, 0)
            # the destination MAC first, as the kernel does: another host's unicast address is not for us
            # (a bridge flooding unknown unicast); a broadcast/multicast one is never forwarded (below)
            group = False
            if dmac != self._own_mac:
                if dmac[0] & 1:
                    group = True
                elif self._own_mac is not None:
                    return self._drop("not-for-us")
            if et != 0x0800:
                if et == 0x86DD:
                    return self._process6(frame, now, group)
                return self._drop_ethertype(frame)
            # ---- IPv4 fast path
            if vihl == 0x45:
                ihl = 20
            elif vihl >> 4 != 4:
                return self._drop("bad-version")
            else:
                ihl = (vihl & 0x0F) << 2
                if ihl < 20:
                    return self._drop("bad-ihl")
            end = 14 + tot
            if tot < ihl:
                return self._drop("bad-total-length")
            if end > n:
                return self._drop("truncated")
            ports = self._v4.get(dst)
            if ports is None:
                return self._drop("not-cluster")
            if group:  # a unicast packet received as a link-layer broadcast/multicast (RFC 1812 5.3.4)
                return self._drop("not-for-us")
            if int.from_bytes(frame[14:14 + ihl], "big") % 0xFFFF:
                return self._drop("bad-checksum")
            if ffh & 0x3F or ffl:  # MF or fragment offset: a fragment
                return self._fragment4(frame, now, ihl, end, ports)
            l4 = 14 + ihl
            if proto == 6:
                if end < l4 + 14:
                    return self._drop("truncated")
                flags = frame[l4 + 13]
            elif proto == 17:
                if end < l4 + 8:
                    return self._drop("truncated")
                flags = 0
            elif proto == 1:
                return self._icmp4(frame, now, ihl, end, ports)
            else:
                return self._drop("not-tcp-udp")
            pe = ports.get((proto << 16) | (frame[l4 + 2] << 8) | frame[l4 + 3]) or ports.get(proto << 16)
            if pe is None:
                return self._drop("not-port")
            if ttl <= 1:
                return self._ttl_exceeded4(frame, end)
            idx = pe[0](b"".join((src, dst, _BYTE[proto], frame[l4:l4 + 4])), src, flags, now)
            if idx < 0:
                return self._drop("no-server")
            slot = pe[1][idx]
            # P': TTL - 1 and the checksum updated by RFC 1624 eqn. 3, ~(~HC + ~m + m') = (HC - 0xFEFF) mod 0xFFFF
            p = _P4_HEAD(frame[14:22], ttl - 1, proto, (ck - 0xFEFF) % 0xFFFF) + frame[26:end]
            out = slot.transform(p)
            if len(out) > slot.limit:
                return self._too_big4(frame, end, p, out, slot)
            c = slot.counter
            c[0] += 1
            c[1] += tot
            return [out]
        except Exception:  # noqa: BLE001 - the data path never raises
            return self._drop("internal-error")

    # ---- IPv4 slow paths

    def _drop_ethertype(self, frame) -> list:
        if frame[12:14] in _VLAN:
            return self._drop("vlan-tagged")
        return self._drop("not-ip")

    def _forward4(self, frame, end: int, slot, now) -> list:
        """TTL check, P', transform, MTU for an IPv4 frame already matched to *slot*."""
        ttl = frame[22]
        if ttl <= 1:
            return self._ttl_exceeded4(frame, end)
        ck = (((frame[24] << 8) | frame[25]) - 0xFEFF) % 0xFFFF  # RFC 1624 eqn. 3 (see process)
        p = frame[14:22] + _TTL_PROTO_CK(ttl - 1, frame[23], ck) + frame[26:end]
        out = slot.transform(p)
        if len(out) > slot.limit:
            return self._too_big4(frame, end, p, out, slot)
        c = slot.counter
        c[0] += 1
        c[1] += end - 14
        return [out]

    def _classify4(self, frame, ihl: int, end: int, ports, now):
        """Match a (non-fragmented or first-fragment) IPv4 frame to a server slot; slot or drop reason."""
        proto = frame[23]
        l4 = 14 + ihl
        if proto == 6:
            if end < l4 + 14:
                return "truncated"
            flags = frame[l4 + 13]
        elif proto == 17:
            if end < l4 + 8:
                return "truncated"
            flags = 0
        elif proto == 1:
            return self._icmp4_slot(frame, ihl, end, ports, now)
        else:
            return "not-tcp-udp"
        pe = ports.get((proto << 16) | (frame[l4 + 2] << 8) | frame[l4 + 3]) or ports.get(proto << 16)
        if pe is None:
            return "not-port"
        idx = pe[0](frame[26:34] + frame[23:24] + frame[l4:l4 + 4], frame[26:30], flags, now)
        if idx < 0:
            return "no-server"
        return pe[1][idx]

    def _icmp4_slot(self, frame, ihl: int, end: int, ports, now):
        """An ICMP error to the VIP quoting a packet of a client flow (VIP:port → client) → that flow's slot."""
        l4 = 14 + ihl
        if end < l4 + 8 or frame[l4] not in pk.ICMP4_ERRORS:
            return "icmp-unmatched"
        q = l4 + 8  # quoted IP header
        if end < q + 20 or frame[q] >> 4 != 4:
            return "icmp-unmatched"
        qihl = (frame[q] & 0x0F) << 2
        qproto = frame[q + 9]
        if qihl < 20 or end < q + qihl + 4 or qproto not in (6, 17) or frame[q + 12:q + 16] != frame[30:34]:
            return "icmp-unmatched"
        if ((frame[q + 6] & 0x1F) << 8 | frame[q + 7]) != 0:
            return "icmp-unmatched"  # quotes a non-first fragment: no ports
        return _quoted_flow_slot(frame, ports, qproto, q + qihl, frame[q + 16:q + 20], frame[q + 12:q + 16], now)

    def _icmp4(self, frame, now, ihl: int, end: int, ports) -> list:
        slot = self._icmp4_slot(frame, ihl, end, ports, now)
        if isinstance(slot, str):
            return self._drop(slot)
        return self._forward4(frame, end, slot, now)

    def _reply(self, frame, ethertype: bytes, ip_packet: bytes) -> bytes:
        self.replies += 1
        return frame[6:12] + self._src_mac + ethertype + ip_packet

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    @staticmethod
    def _may_answer4(frame, end: int) -> bool:
        """RFC 1812 4.3.2.7: no ICMP error about an ICMP error, a non-first fragment or a bogus source."""
        if (frame[20] & 0x1F) or frame[21] or frame[26] >= 224 or frame[26] == 0:
            return False
        if frame[23] == pk.PROTO_ICMP:
            l4 = 14 + ((frame[14] & 0x0F) << 2)
            return l4 < end and frame[l4] in _ICMP4_INFO
        return True

    @staticmethod
    def _may_answer6(frame, end: int) -> bool:
        """RFC 4443 2.4(e): no ICMPv6 error about an ICMPv6 error or from a multicast/unspecified source."""
        if frame[22] == 0xFF or frame[22:38] == bytes(16):
            return False
        nxt, off, frag = pk.ipv6_upper_layer(frame[14:end])
        if frag is not None and frag[0]:
            return False
        if nxt == pk.PROTO_ICMPV6:
            return 14 + off < end and frame[14 + off] >= 128
        return True

    def _ttl_exceeded4(self, frame, end: int) -> list:
        self._drop("ttl-exceeded")
        original = frame[14:end]
        if not self._may_answer4(frame, end):
            return []
        icmp = pk.icmp4_error(original, frame[30:34], pk.ICMP_TIME_EXCEEDED, pk.ICMP_TTL_EXCEEDED,
                              ident=self._next_ident())
        return [self._reply(frame, _ET4, icmp)]

    def _too_big4(self, frame, end: int, p: bytes, out: bytes, slot) -> list:
        overhead = len(out) - pk.ETH_HLEN - len(p)
        if p[6] & 0x40:  # DF: tell the client, as IPVS does
            self._drop("frag-needed")
            if not self._may_answer4(frame, end):
                return []
            mtu = max(slot.mtu - overhead, 68)
            icmp = pk.icmp4_error(frame[14:end], frame[30:34], pk.ICMP_DEST_UNREACH, pk.ICMP_FRAG_NEEDED,
                                  mtu, ident=self._next_ident())
            return [self._reply(frame, _ET4, icmp)]
        if out[12:14] != _ET4:
            return self._drop("frag-unforwardable")
        pieces = pk.fragment4(out[14:], slot.mtu)
        if not pieces:
            return self._drop("frag-unforwardable")
        eth = out[:14]
        c = slot.counter
        c[0] += 1
        c[1] += end - 14
        return [eth + piece for piece in pieces]

    # ---- fragments (IPv4 and IPv6 share the table and the policy)

    def _expire(self, now: float) -> None:
        frags = self._frags
        while frags:
            key = next(iter(frags))
            if frags[key][1] > now and len(frags) <= FRAG_TABLE_MAX:
                break
            del frags[key]
        held = self._held
        while held:
            key = next(iter(held))
            entry = held[key]
            if entry[0] > now and len(held) <= FRAG_HELD_DATAGRAMS:
                break
            del held[key]
            self._held_count -= len(entry[1])
            self.drops["frag-timeout"] = self.drops.get("frag-timeout", 0) + len(entry[1])

    def expire(self, now: float) -> None:
        """Forget fragment-table entries and held fragments older than ``FRAG_TIMEOUT`` (live engines may call
        this now and then; it also runs whenever a fragment arrives)."""
        self._expire(now)

    def close(self) -> None:
        """Nothing to release (the executor interface: :class:`~encapfwd.executor.FrameExecutor`)."""

    def flush(self) -> None:
        """Give up on every fragment still waiting for its first fragment (counted as ``frag-timeout``)."""
        self._expire(float("inf"))

    def _fragment_common(self, key: bytes, is_first: bool, classify, forward, now) -> list:
        self._expire(now)
        if is_first:
            slot = classify()
            self._frags[key] = (slot, now + FRAG_TIMEOUT)
            held = self._held.pop(key, None)
            if held:
                self._held_count -= len(held[1])
            if isinstance(slot, str):
                self._drop(slot)
                if held:
                    self.drops[slot] += len(held[1])
                return []
            out = forward(slot)
            if held:
                for fn in held[1]:
                    out = out + fn(slot)
            return out
        known = self._frags.get(key)
        if known is not None:
            slot = known[0]
            if isinstance(slot, str):
                return self._drop(slot)
            return forward(slot)
        entry = self._held.get(key)
        if entry is None:
            if len(self._held) >= FRAG_HELD_DATAGRAMS:
                return self._drop("frag-overflow")
            entry = self._held[key] = (now + FRAG_TIMEOUT, [])
        if len(entry[1]) >= FRAG_HELD_PER_DATAGRAM or self._held_count >= FRAG_HELD_MAX:
            return self._drop("frag-overflow")
        entry[1].append(forward)
        self._held_count += 1
        return []

    def _fragment4(self, frame, now, ihl: int, end: int, ports) -> list:
        key = frame[26:34] + frame[23:24] + frame[18:20]
        is_first = not ((frame[20] & 0x1F) or frame[21])
        frame = bytes(frame)
        return self._fragment_common(
            key, is_first,
            lambda: self._classify4(frame, ihl, end, ports, now),
            lambda slot: self._forward4(frame, end, slot, now),
            now,
        )

    # ---- IPv6 (MAC forwarding only; hop limit decremented, no header checksum)

    def _process6(self, frame, now, group: bool = False) -> list:
        n = len(frame)
        if n < 54:
            return self._drop("truncated")
        if frame[14] >> 4 != 6:
            return self._drop("bad-version")
        plen = (frame[18] << 8) | frame[19]
        end = 54 + plen
        if plen == 0:
            return self._drop("bad-total-length")  # jumbograms are not forwarded
        if end > n:
            return self._drop("truncated")
        ports = self._v6.get(frame[38:54])
        if ports is None:
            return self._drop("not-cluster")
        if group:
            return self._drop("not-for-us")
        nxt = frame[20]
        if nxt == 6 or nxt == 17:
            off, frag = 40, None
        else:
            nxt, off, frag = pk.ipv6_upper_layer(frame[14:end])
            if nxt < 0:
                return self._drop("bad-ext-header")
        if frag is not None and (frag[0] or frag[1]):
            frame = bytes(frame)
            key = frame[22:54] + frag[2]
            return self._fragment_common(
                key, frag[0] == 0,
                lambda: self._classify6(frame, nxt, 14 + off, end, ports, now),
                lambda slot: self._forward6(frame, end, slot),
                now,
            )
        slot = self._classify6(frame, nxt, 14 + off, end, ports, now)
        if isinstance(slot, str):
            return self._drop(slot)
        return self._forward6(frame, end, slot)

    def _classify6(self, frame, nxt: int, l4: int, end: int, ports, now):
        if nxt == 6:
            if end < l4 + 14:
                return "truncated"
            flags = frame[l4 + 13]
        elif nxt == 17:
            if end < l4 + 8:
                return "truncated"
            flags = 0
        elif nxt == pk.PROTO_ICMPV6:
            return self._icmp6_slot(frame, l4, end, ports, now)
        else:
            return "not-tcp-udp"
        pe = ports.get((nxt << 16) | (frame[l4 + 2] << 8) | frame[l4 + 3]) or ports.get(nxt << 16)
        if pe is None:
            return "not-port"
        idx = pe[0](frame[22:54] + bytes((nxt,)) + frame[l4:l4 + 4], frame[22:38], flags, now)
        if idx < 0:
            return "no-server"
        return pe[1][idx]

    def _icmp6_slot(self, frame, l4: int, end: int, ports, now):
        if end < l4 + 8 or frame[l4] not in pk.ICMP6_ERRORS:
            return "icmp-unmatched"
        q = l4 + 8
        if end < q + 40 or frame[q] >> 4 != 6 or frame[q + 8:q + 24] != frame[38:54]:
            return "icmp-unmatched"
        qnxt, qoff, qfrag = pk.ipv6_upper_layer(frame[q:end])
        if qnxt not in (6, 17) or (qfrag is not None and qfrag[0]):
            return "icmp-unmatched"
        ql4 = q + qoff
        if end < ql4 + 4:
            return "icmp-unmatched"
        return _quoted_flow_slot(frame, ports, qnxt, ql4, frame[q + 24:q + 40], frame[q + 8:q + 24], now)

    def _forward6(self, frame, end: int, slot) -> list:
        hl = frame[21]
        if hl <= 1:
            self._drop("ttl-exceeded")
            if not self._may_answer6(frame, end):
                return []
            icmp = pk.icmp6_error(frame[14:end], frame[38:54], pk.ICMP6_TIME_EXCEEDED, 0)
            return [self._reply(frame, _ET6, icmp)]
        p = frame[14:21] + bytes((hl - 1,)) + frame[22:end]
        out = slot.transform(p)
        if len(out) > slot.limit:
            # IPv6 routers never fragment: ICMPv6 packet too big (RFC 8200 5, RFC 4443 3.2)
            self._drop("frag-needed")
            if not self._may_answer6(frame, end):
                return []
            overhead = len(out) - pk.ETH_HLEN - len(p)
            mtu = max(slot.mtu - overhead, 1280)
            icmp = pk.icmp6_error(frame[14:end], frame[38:54], pk.ICMP6_PACKET_TOO_BIG, 0, mtu)
            return [self._reply(frame, _ET6, icmp)]
        c = slot.counter
        c[0] += 1
        c[1] += end - 14
        return [out]

    # -------------------------------------------------------------------------------------- reporting

    def report(self) -> dict:
        """Per server packets/bytes, drops per reason, flow and fragment table stats (JSON-able)."""
        servers = {}
        for name, slot in self._slots.items():
            servers[name] = {
                "cluster": slot.cluster,
                "port": slot.port,
                "server": slot.server,
                "method": slot.method,
                "packets": slot.counter[0],
                "bytes": slot.counter[1],
            }
        try:
            flows = dict(self.scheduler.stats())
        except Exception:  # noqa: BLE001
            flows = {}
        return {
            "servers": servers,
            "forwarded": sum(s["packets"] for s in servers.values()),
            "drops": dict(sorted(self.drops.items())),
            "dropped": sum(self.drops.values()),
            "icmp_sent": self.replies,
            "flows": flows,
            "fragments": {
                "tracked": len(self._frags),
                "held": self._held_count,
            },
        }


__all__ = ["DROP_REASONS", "FRAG_TIMEOUT", "Dispatcher", "server_name"]
