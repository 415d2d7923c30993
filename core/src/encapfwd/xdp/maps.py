"""A forwarding plan as the XDP program's map entries: the byte layouts of ``encapfwd.bpf.c``, in one place.

Pure data (no BPF calls): :func:`plan_entries` turns a :class:`~encapfwd.plan.Plan` into the keys and
values of one generation; :mod:`encapfwd.xdp.dataplane` writes them. Every ``struct`` here mirrors a C
struct of the program (x86-64 and every other little-endian host; ports stay in network order as in the
packet).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Dict, List, Tuple

from encapfwd.datapath.packet import mac_bytes
from encapfwd.errors import ConfigError
from encapfwd.hookspecs import XDP_MAX_HEADER

#: Compile-time sizes of the program (``-D`` defines; see dataplane.build_object).
MAX_SERVERS = 16384
MAX_PORTS = 256
NO_SERVER = 0xFFFFFFFF

FIELD_BITS = {"ipv4": 0x01, "tos": 0x02, "df": 0x04, "ident": 0x08, "udp": 0x10, "entropy": 0x20}
#: drop reasons the program decides itself, in the order of its enum; names as the dispatcher's
DROPS = ("truncated", "bad-checksum", "not-port", "no-server")
#: why a frame went up to the slow path, in the order of the program's enum
PASSES = ("not-ours", "malformed", "ip-options", "fragment", "not-tcp-udp", "ttl", "new-flow", "too-big",
          "no-template", "ext-header", "error", "not-for-us")
#: new flows the program forwarded without remembering them (``not-syn``: a TCP segment that cannot open a
#: connection; ``rate-limit``: beyond ``executor newflowlimit`` on its CPU), those it placed under pressure
#: (``pressure``) and those of wrr/wlc ports it placed itself beyond ``executor handuplimit`` on its CPU
#: (``handup-limit``), in the order of its ``enum flow_event`` (the ``flow_events`` map)
FLOW_EVENTS = ("not-syn", "rate-limit", "pressure", "handup-limit")
#: the reasons of FLOW_EVENTS a new flow is not remembered for
NOT_REMEMBERED = ("not-syn", "rate-limit")

CONTROL = struct.Struct("<II")
#: ``struct host_entry``: this dispatcher's MAC and whether to check it (one per generation)
HOST_ENTRY = struct.Struct("<6sBx")
VIP_KEY = struct.Struct("<16sBB2x")
PORT_KEY = struct.Struct("<16s2sBB")
#: ``struct port_entry {ring_base, ring_size, timeout, fallback}``: a table port's slots, or (ring_size 0) a
#: wrr/wlc port's pressure table of ``fallback`` slots at ``ring_base``
PORT_ENTRY = struct.Struct("<IIII")
#: ``struct overload {pressure, newflow_limit, publish, handup_limit}`` (the ``overload`` map's one entry;
#: ``publish``: flow synchronisation runs, new flow entries go to the ``new_flows`` ring buffer too;
#: ``handup_limit``: new flows of wrr/wlc ports handed up per CPU per second at most, 0: no limit)
OVERLOAD = struct.Struct("<IIII")
#: ``struct newflow_window {start_ns, count}`` (per CPU; also the ``handup_rate`` map's)
NEWFLOW_WINDOW = struct.Struct("<QQ")
SERVER_ENTRY = struct.Struct(f"<6s6sHHHBB{XDP_MAX_HEADER}s")
#: where the template header starts in a server entry
HEADER_OFFSET = SERVER_ENTRY.size - XDP_MAX_HEADER
FLOW_KEY = struct.Struct("<16s16s2s2sB3x")
FLOW_VALUE = struct.Struct("<IIQ")
#: ``struct flow_record {struct flow_key key; struct flow_value value}``: a record of the ``new_flows`` ring
FLOW_RECORD = struct.Struct("<" + FLOW_KEY.format[1:] + FLOW_VALUE.format[1:])
COUNTER = struct.Struct("<QQ")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


def _addr16(text) -> Tuple[bytes, int]:
    address = ipaddress.ip_address(text)
    return address.packed.ljust(16, b"\0"), address.version


def server_value(server) -> bytes:
    """The ``struct server_entry`` of a :class:`~encapfwd.plan.ServerPlan`."""
    t = server.template
    xdp = t is not None and t.xdp_capable
    header = t.header if xdp else b""
    fields = 0
    if xdp:
        for name in t.fields:
            fields |= FIELD_BITS[name]
    return SERVER_ENTRY.pack(mac_bytes(server.dst_mac), mac_bytes(server.src_mac), len(header), fields,
                             server.mtu, 1 if server.up else 0, 1 if xdp else 0, header)


def host_value(plan) -> bytes:
    """The ``struct host_entry`` of *plan*: its executor ``mac`` (the interface's in live mode), checked
    against every frame's destination; no MAC in the plan: nothing to check."""
    mac = plan.config.executor.mac
    return HOST_ENTRY.pack(mac_bytes(mac), 1) if mac else HOST_ENTRY.pack(bytes(6), 0)


def table_ports(plan) -> List:
    """The plan's ports that take ring slots: those whose selection is a table, and those with a pressure
    table (``PortPlan.fallback``: wrr, wlc)."""
    return [p for p in plan.ports if p.table is not None or p.fallback is not None]


def _slots_of(port):
    """The port's ring run (its table, else its pressure table) and whether it is the pressure table."""
    if port.table is not None:
        return port.table, False
    return port.fallback, port.fallback is not None


def ring_slots(plan) -> int:
    return sum(len(_slots_of(p)[0]) for p in table_ports(plan))


def overload_value(pressure: bool, newflow_limit: int, publish: bool = False, handup_limit: int = 0) -> bytes:
    """The ``struct overload`` of the program: the pressure flag, the new-flow limit per CPU and second,
    whether new flow entries are published (flow synchronisation), and the hand-up limit per CPU and second."""
    return OVERLOAD.pack(1 if pressure else 0, newflow_limit, 1 if publish else 0, handup_limit)


def plan_entries(plan, gen: int, ring_cap: int) -> Dict[str, list]:
    """Every map entry of generation *gen* (0 or 1) for *plan*: ``{map name: [(key, value), ...]}``;
    ``ring`` is given as ``[(first slot, values bytes)]`` (one run per port).

    Raises ConfigError when the plan exceeds what the loaded program holds (then the controller keeps
    the running plan and says a restart is needed).
    """
    if len(plan.ports) > MAX_PORTS:
        raise ConfigError(f"the XDP engine holds at most {MAX_PORTS} ports, the plan has {len(plan.ports)}")
    need = ring_slots(plan)
    if need > ring_cap:
        raise ConfigError(
            f"the plan needs {need} selection-table slots, the loaded XDP program holds {ring_cap}: restart "
            "encapfwd run to grow it"
        )
    out: Dict[str, list] = {"vips": [], "port_index": [], "ports": [], "servers": [], "ring": [],
                            "host": [(U32.pack(gen), host_value(plan))]}
    seen_vips = set()
    base = gen * ring_cap
    for i, port in enumerate(plan.ports):
        addr, family = _addr16(port.cluster)
        if addr not in seen_vips:
            seen_vips.add(addr)
            out["vips"].append((VIP_KEY.pack(addr, family, gen), U32.pack(1)))
        index = gen * MAX_PORTS + i
        for proto in port.protos:
            out["port_index"].append((PORT_KEY.pack(addr, port.number.to_bytes(2, "big"), proto, gen),
                                      U32.pack(index)))
        slots, pressure_only = _slots_of(port)
        size = len(slots) if slots is not None else 0
        if pressure_only:  # ring_size 0 (new flows go up), unless under pressure: the fallback's slots
            out["ports"].append((U32.pack(index), PORT_ENTRY.pack(base, 0, port.staletimeout, size)))
        else:
            out["ports"].append((U32.pack(index), PORT_ENTRY.pack(base, size, port.staletimeout, 0)))
        if size:
            values = struct.pack(f"<{size}I", *(NO_SERVER if sid < 0 else sid for sid in slots))
            out["ring"].append((base, values))
            base += size
    for server in plan.servers:
        if server.sid >= MAX_SERVERS:
            raise ConfigError(f"server id {server.sid} beyond the XDP engine's {MAX_SERVERS}: restart it")
        out["servers"].append((U32.pack(gen * MAX_SERVERS + server.sid), server_value(server)))
    return out


def flow_key(src: bytes, dst: bytes, proto: int, ports4: bytes) -> bytes:
    """The ``struct flow_key`` of a flow (addresses packed, *ports4* = the L4 header's first 4 bytes)."""
    return FLOW_KEY.pack(src.ljust(16, b"\0"), dst.ljust(16, b"\0"), ports4[:2], ports4[2:4], proto)


def kernel_flow_key(key: bytes) -> bytes:
    """The dispatcher's flow key (src + dst + proto + 4 bytes of ports; 13 or 37 bytes) as a ``flow_key``."""
    n = (len(key) - 5) // 2
    return flow_key(key[:n], key[n:2 * n], key[2 * n], key[2 * n + 1:])


__all__ = ["DROPS", "FIELD_BITS", "FLOW_EVENTS", "MAX_PORTS", "MAX_SERVERS", "NOT_REMEMBERED", "PASSES",
           "flow_key", "host_value", "kernel_flow_key", "overload_value", "plan_entries", "server_value"]
