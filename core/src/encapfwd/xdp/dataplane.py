"""The XDP data plane: the compiled program, its maps filled from a forwarding plan, attach and detach.

    dp = DataPlane.load(plan)          # compile (cached) and load the program, write generation 0
    dp.install(new_plan)               # reload: write the idle generation, then flip in one word
    verdict, out = dp.test_run(frame)  # BPF_PROG_TEST_RUN: the program on one frame, no network
    dp.attach(ifindex, "native")       # run it on an interface
    dp.counters()                      # per-server packets/bytes, drops and slow-path frames
    dp.set_pressure(True)              # overload: the kernel places new flows of wrr/wlc ports itself
    dp.set_handup_limit(20000)         # ... and beyond 20,000 hand-ups of them per CPU and second (live only)
    dp.close()                         # detach and unload; nothing is pinned

Reloads never show a packet a half-written plan: every plan map holds two generations (keys carry the
generation, array indexes are offset by it); :meth:`install` writes the idle one completely, then flips
``control[0].gen``. Flows in the kernel's LRU flow table carry stable server ids, so they keep their server
across a reload while it stays up.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Dict, Optional

from encapfwd.xdp import maps as M
from encapfwd.xdp.build import build
from encapfwd.xdp.libbpf import BPFObject, possible_cpus, test_run, xdp_attach, xdp_detach

SOURCE = "encapfwd.bpf.c"
PROGRAM = "encapfwd_xdp"
PASS_SOURCE = "xdp_pass.bpf.c"
#: Selection-table slots a program holds per generation at least (grown at load for larger plans).
MIN_RING_PORTS = 8
#: Kernel flow table bound at most (entries are preallocated: about 100 bytes each).
MAX_KERNEL_FLOWS = 1 << 20
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)


def object_path():
    """The compiled program (built once per source and toolchain; see :mod:`encapfwd.xdp.build`)."""
    return build(SOURCE, {"MAX_SERVERS": M.MAX_SERVERS, "MAX_PORTS": M.MAX_PORTS, "NCPUS": possible_cpus()})


def attached_owner(ifindex: int):
    """Who runs the XDP program on *ifindex*: None (no program), ``("other", name)`` (not ours), or
    ``("encapfwd", pid)`` — the controller that installed its plan (its pid is in the control map)."""
    from encapfwd.xdp.libbpf import xdp_query

    current = xdp_query(ifindex)
    if not current:
        return None
    return program_owner(current, PROGRAM)


def program_owner(prog_id: int, program: str):
    """``("encapfwd", pid)`` when the loaded program *prog_id* is our *program* (the pid of the controller
    that installed its plan, from its control map; 0 before any), else ``("other", words)``."""
    from encapfwd.xdp.libbpf import prog_by_id

    name, maps = prog_by_id(prog_id)
    try:
        if name != program[:15]:  # the kernel keeps 15 characters of a program's name
            return ("other", f"{name or 'unnamed'} (id {prog_id})")
        for m in maps:
            if m.name == "control":
                raw = m.lookup(0)
                if raw is not None:
                    return ("encapfwd", M.CONTROL.unpack(raw)[1])
        return ("encapfwd", 0)
    finally:
        for m in maps:
            m.close()


def pass_object_path():
    """A pass-everything program, for the far end of a veth (XDP_TX reaches a veth peer only when the
    peer runs XDP): ``ip link set dev PEER xdpdrv obj PATH sec xdp``."""
    return build(PASS_SOURCE)


class DataPlane:
    """One loaded instance of the program and its maps."""

    #: the program's C function (a subclass runs another build of the same source: encapfwd.xdp.tc)
    PROGRAM = PROGRAM
    #: bytes of the ring of new flows (flow synchronisation): 131,072 records of 64 bytes
    NEW_FLOWS_BYTES = 1 << 23

    @staticmethod
    def object_path():
        return object_path()

    def __init__(self, obj: BPFObject, ring_cap: int, flows: int):
        self.obj = obj
        self.ring_cap = ring_cap
        self.flow_capacity = flows
        self.prog_fd = obj.program(self.PROGRAM)
        self.maps = {name: obj.map(name) for name in (
            "control", "host", "vips", "port_index", "ports", "servers", "ring", "flows", "stats", "drops",
            "passes", "last_reason", "overload", "flow_events", "newflow_rate", "handup_rate", "new_flows")}
        self.gen = 0
        self.plan = None
        self._pressure = False
        self._newflow_limit = 0
        self._handup_limit = 0
        self._publish = False
        self._overload_lock = threading.Lock()  # set_pressure (a controller thread) and install write one entry
        self._keys: Dict[int, Dict[str, set]] = {0: {}, 1: {}}
        self._attached: Optional[tuple] = None

    @classmethod
    def load(cls, plan, ring_ports: Optional[int] = None) -> "DataPlane":
        """Compile (cached) and load the program sized for *plan*, and install *plan*."""
        table_ports = len(M.table_ports(plan))
        ring_ports = max(ring_ports or 0, MIN_RING_PORTS, 2 * table_ports)
        ring_cap = ring_ports * 65537
        flows = max(1024, min(plan.config.executor.maxflows, MAX_KERNEL_FLOWS))
        obj = BPFObject.open(cls.object_path(), max_entries={"ring": 2 * ring_cap, "flows": flows,
                                                             "new_flows": cls.NEW_FLOWS_BYTES})
        try:
            dp = cls(obj, ring_cap, flows)
            dp.install(plan, first=True)
        except BaseException:
            obj.close()
            raise
        return dp

    # -- plans ------------------------------------------------------------------------------------------
    def install(self, plan, first: bool = False) -> None:
        """Make *plan* the one the program runs: write the idle generation, then flip to it."""
        gen = 0 if first else 1 - self.gen
        entries = M.plan_entries(plan, gen, self.ring_cap)  # ConfigError before anything is written
        stale = self._keys[gen]
        written: Dict[str, set] = {}
        for name in ("vips", "port_index"):
            keys = {k for k, _ in entries[name]}
            for key in stale.get(name, set()) - keys:
                self.maps[name].delete(key)
            written[name] = keys
        for name in ("host", "vips", "port_index", "ports", "servers"):
            rows = entries[name]
            if rows:
                self.maps[name].update_batch(b"".join(k for k, _ in rows), b"".join(v for _, v in rows),
                                             len(rows))
        ring = self.maps["ring"]
        for first_slot, values in entries["ring"]:
            count = len(values) // 4
            keys = struct.pack(f"<{count}I", *range(first_slot, first_slot + count))
            ring.update_batch(keys, values, count)
        self._keys[gen] = written
        self._write_overload(newflow_limit=plan.config.executor.newflowlimit)
        self.maps["control"].update(0, M.CONTROL.pack(gen, os.getpid()))
        self.gen = gen
        self.plan = plan

    # -- overload ---------------------------------------------------------------------------------------------
    def _write_overload(self, pressure: Optional[bool] = None, newflow_limit: Optional[int] = None,
                        publish: Optional[bool] = None, handup_limit: Optional[int] = None) -> None:
        with self._overload_lock:
            if pressure is not None:
                self._pressure = bool(pressure)
            if newflow_limit is not None:
                self._newflow_limit = int(newflow_limit)
            if publish is not None:
                self._publish = bool(publish)
            if handup_limit is not None:
                self._handup_limit = int(handup_limit)
            self.maps["overload"].update(0, M.overload_value(self._pressure, self._newflow_limit, self._publish,
                                                             self._handup_limit))

    def set_publish(self, on: bool) -> None:
        """Flow synchronisation on or off: on, the program writes every new flow entry to the ``new_flows``
        ring buffer too (:class:`encapfwd.xdp.ringbuf.RingBuffer` reads it). Kept across plan installs."""
        self._write_overload(publish=on)

    def set_pressure(self, on: bool) -> None:
        """Pressure on (the slow path cannot keep up) or off. On: the program places a new flow of a wrr or
        wlc port itself, by the port's pressure table (``PortPlan.fallback``: a weighted Maglev table of its
        eligible servers), and remembers it (unless it is a TCP segment that cannot open a connection, or
        beyond the new-flow limit), so the connection stays on that server after the pressure ends. Ports
        with stickytime or a plugin's selector keep going up. Kept across plan installs."""
        self._write_overload(pressure=on)

    @property
    def pressure(self) -> bool:
        return self._pressure

    def set_handup_limit(self, limit: int) -> None:
        """At most *limit* new flows of wrr/wlc ports handed up per CPU per second (``executor handuplimit``,
        counted in windows of a tenth of a second); beyond it the program places them itself as under pressure
        (counted as ``handup_placed``) until the window ends. 0 (the default here): every one goes up. Only
        the live runtime sets it: offline (replay, tests) the slow path is never behind. Kept across plan
        installs."""
        self._write_overload(handup_limit=limit)

    # -- flows (the slow path writes the flows it decided) ---------------------------------------------------
    def write_flow(self, key: bytes, sid: int) -> None:
        """Keep flow *key* (``maps.flow_key``) on server *sid* in the kernel (first packets the program
        handed up, e.g. for ports whose selection is not a table)."""
        self.maps["flows"].update(key, M.FLOW_VALUE.pack(sid, 0, time.monotonic_ns()))

    def flow(self, key: bytes) -> Optional[int]:
        raw = self.maps["flows"].lookup(key)
        return None if raw is None else M.FLOW_VALUE.unpack(raw)[0]

    # -- running --------------------------------------------------------------------------------------------
    def test_run(self, frame: bytes):
        """``(verdict, output bytes)`` of the program on *frame* (BPF_PROG_TEST_RUN)."""
        result = test_run(self.prog_fd, frame)
        return result.retval, result.data

    def last_reason(self, cpu: int) -> str:
        """Why the last frame that CPU *cpu* did not forward was dropped or passed up (a reason name of
        :data:`maps.DROPS` or :data:`maps.PASSES`)."""
        raw = self.maps["last_reason"].lookup_percpu(0)[cpu]
        code = M.U32.unpack(raw[:4])[0]
        return M.PASSES[code & 0xFF] if code & 0x100 else M.DROPS[code]

    def attach(self, ifindex: int, mode: str = "native", replace: bool = False) -> None:
        xdp_attach(ifindex, self.prog_fd, mode, replace)
        self._attached = (ifindex, mode)

    def detach(self) -> None:
        if self._attached is not None:
            ifindex, mode = self._attached
            self._attached = None
            xdp_detach(ifindex, mode)

    def forget(self) -> None:
        """In a forked process: keep using the maps, but never detach the program (the parent owns it)."""
        self._attached = None

    def close(self) -> None:
        try:
            self.detach()
        finally:
            self.obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- counters -------------------------------------------------------------------------------------------
    def _percpu_sum(self, name: str, index: int, fmt) -> tuple:
        values = self.maps[name].lookup_percpu(index) or []
        total = None
        for raw in values:
            row = fmt.unpack(raw[:fmt.size])
            total = row if total is None else tuple(a + b for a, b in zip(total, row))
        return total or (0,) * len(fmt.unpack(bytes(fmt.size)))

    def reason_counts(self, name: str) -> Dict[str, int]:
        names = M.DROPS if name == "drops" else M.PASSES
        out = {}
        for i, reason in enumerate(names):
            (count,) = self._percpu_sum(name, i, M.U64)
            if count:
                out[reason] = count
        return out

    def flow_events(self) -> Dict[str, int]:
        """``maps.FLOW_EVENTS`` -> count (summed over CPUs; every name present)."""
        return {name: self._percpu_sum("flow_events", i, M.U64)[0] for i, name in enumerate(M.FLOW_EVENTS)}

    def counters(self) -> dict:
        """Per server ``{name: {packets, bytes}}`` (the kernel's), ``drops`` and ``passed`` by reason, and the
        overload counters: ``flows_not_remembered`` (``{"not-syn": n, "rate-limit": m}``: new flows forwarded
        but not written into the flow table), ``pressure_placed`` (new flows of wrr/wlc ports the program
        placed under pressure), ``handup_placed`` (those it placed beyond the hand-up limit) and ``pressure``
        (whether it is on)."""
        servers = {}
        if self.plan is not None:
            for server in self.plan.servers:
                packets, nbytes = self._percpu_sum("stats", server.sid, M.COUNTER)
                servers[server.name] = {"packets": packets, "bytes": nbytes}
        events = self.flow_events()
        return {"servers": servers, "drops": self.reason_counts("drops"), "passed": self.reason_counts("passes"),
                "flows_not_remembered": {r: events[r] for r in M.NOT_REMEMBERED},
                "pressure_placed": events["pressure"], "handup_placed": events["handup-limit"],
                "pressure": self._pressure}


__all__ = ["DataPlane", "XDP_DROP", "XDP_PASS", "XDP_TX", "object_path", "pass_object_path"]
