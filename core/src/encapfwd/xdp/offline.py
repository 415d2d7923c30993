"""The XDP program as an offline executor: each frame runs through the loaded program with
BPF_PROG_TEST_RUN; what the program hands up (XDP_PASS) goes through the Python dispatcher, exactly as on a
live interface where the AF_PACKET engine is the slow path.

:class:`XDPExecutor` is a :class:`~encapfwd.executor.FrameExecutor`, like the Python
:class:`~encapfwd.datapath.dispatcher.Dispatcher`: ``encapfwd replay --engine xdp`` uses one where it would
use the other.
"""

from __future__ import annotations

from typing import Dict, List

from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.plan import Plan, SidMap, compile_plan
from encapfwd.xdp.dataplane import XDP_DROP, XDP_PASS, XDP_TX, DataPlane
from encapfwd.xdp.maps import kernel_flow_key


class XDPExecutor:
    """The kernel program first, the Python dispatcher for what it passes up; counters of both."""

    #: which kernel program (a subclass runs the TC build: encapfwd.xdp.tc.TCExecutor) and its verdicts
    KIND = "xdp"
    DATAPLANE = DataPlane
    FORWARD, DROP, PASS = XDP_TX, XDP_DROP, XDP_PASS

    def __init__(self, plan, registry, sids=None):
        """*plan*: the :class:`~encapfwd.plan.Plan` to run (a :class:`~encapfwd.model.Config` is compiled)."""
        self.registry = registry
        self.sids = sids or SidMap()
        plan = self._plan_of(plan)
        self.dataplane = self.DATAPLANE.load(plan)
        try:
            self.slow = Dispatcher(plan, registry, sids=self.sids, flow_sink=self._write_flow)
        except BaseException:
            self.dataplane.close()
            raise
        #: frames decided by each engine
        self.engines: Dict[str, int] = {self.KIND: 0, "python": 0}
        self.aborted = 0

    def _write_flow(self, key: bytes, sid: int) -> None:
        self.dataplane.write_flow(kernel_flow_key(key), sid)

    @property
    def plan(self):
        return self.dataplane.plan

    @property
    def drops(self) -> Dict[str, int]:
        out = dict(self.slow.drops)
        for reason, count in self.dataplane.reason_counts("drops").items():
            out[reason] = out.get(reason, 0) + count
        return out

    def _plan_of(self, config_or_plan) -> Plan:
        if isinstance(config_or_plan, Plan):
            return config_or_plan
        return compile_plan(config_or_plan, self.registry, self.sids)

    def install(self, plan: Plan) -> None:
        """Run *plan* in the kernel program and its slow path (flows keep their server)."""
        self.dataplane.install(plan)
        self.slow.install(plan)

    def reload(self, config) -> None:
        """:meth:`install` of *config*'s plan (a Config is compiled first)."""
        self.install(self._plan_of(config))

    def set_pressure(self, on: bool) -> None:
        """Overload: the kernel program and the Python dispatcher place new flows of wrr/wlc ports by their
        pressure table (see :meth:`DataPlane.set_pressure` and :meth:`Dispatcher.set_pressure`)."""
        self.dataplane.set_pressure(on)
        self.slow.set_pressure(on)

    def process(self, frame: bytes, now: float = 0.0) -> List[bytes]:
        verdict, out = self._run(bytes(frame))
        if verdict == self.FORWARD:
            self.engines[self.KIND] += 1
            return [out]
        if verdict == self.DROP:
            self.engines[self.KIND] += 1
            return []
        if verdict != self.PASS:
            self.aborted += 1
            self.engines[self.KIND] += 1
            return []
        self.engines["python"] += 1
        return self.slow.process(frame, now)

    def _run(self, frame: bytes):
        return self.dataplane.test_run(frame)

    def flush(self) -> None:
        self.slow.flush()

    def report(self) -> dict:
        """The dispatcher's report with the kernel's counters added in, and frames per engine."""
        report = self.slow.report()
        kernel = self.dataplane.counters()
        for name, counts in kernel["servers"].items():
            row = report["servers"].get(name)
            if row is not None:
                row["packets"] += counts["packets"]
                row["bytes"] += counts["bytes"]
        report["forwarded"] = sum(s["packets"] for s in report["servers"].values())
        report["drops"] = dict(sorted(self.drops.items()))
        report["dropped"] = sum(report["drops"].values())
        report["engines"] = dict(self.engines)
        report[self.KIND] = {"passed": kernel["passed"], "aborted": self.aborted, "digest": self.plan.digest,
                             "flows_not_remembered": kernel["flows_not_remembered"],
                             "pressure_placed": kernel["pressure_placed"], "pressure": kernel["pressure"]}
        return report

    def close(self) -> None:
        self.dataplane.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["XDPExecutor"]
