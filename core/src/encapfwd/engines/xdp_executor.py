"""The XDP program as one executor of the live controller (beside the AF_PACKET worker pool, its slow path).

The controller compiles the plan; this executor loads the program once, attaches it to the interface and
installs every new plan into its maps (:class:`encapfwd.xdp.dataplane.DataPlane`). Frames the program hands
up (XDP_PASS) reach the AF_PACKET workers, which run the Python dispatcher on the same plan and write the
flows they place into the kernel's flow table (:class:`KernelFlows`), so the next packets of those flows
stay in the kernel. On stop the program is detached and unloaded; nothing is pinned.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..xdp.maps import kernel_flow_key
from .common import LiveError, log

ENGINES = ("auto", "xdp", "afpacket")
XDP_MODES = ("native", "generic")


class KernelFlows:
    """The slow path's flow sink: writes a flow the Python dispatcher placed into the kernel's flow table.
    Forked workers inherit it (and the map's descriptor); it never raises into the data path."""

    def __init__(self):
        self.dataplane = None
        self.errors = 0

    def __call__(self, key: bytes, sid: int) -> None:
        dataplane = self.dataplane
        if dataplane is None:
            return
        try:
            dataplane.write_flow(kernel_flow_key(key), sid)
        except Exception:  # noqa: BLE001 - the data path never raises
            self.errors += 1


def _alive(pid: int) -> bool:
    """True when *pid* is a running encapfwd process (a recycled pid of another program does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"encapfwd" in handle.read()
    except OSError:
        return False


def choose(engine: str, ifname: Optional[str], mode: str) -> tuple:
    """``(engine, reason)``: *engine* as asked, or for ``auto`` xdp when BPF is available here (the
    attach itself is tried at start; a driver without native XDP then falls back)."""
    if engine == "afpacket":
        return "afpacket", "asked for with --engine afpacket"
    from ..xdp import libbpf

    ok, why = libbpf.available()
    if engine == "xdp":
        if not ok:
            raise LiveError(f"--engine xdp: {why}")
        return "xdp", f"asked for with --engine xdp ({mode} XDP on {ifname})"
    if not ok:
        return "afpacket", f"auto: XDP is not available here ({why})"
    return "xdp", f"auto: BPF is available, {mode} XDP on {ifname}"


class XDPProgram:
    """The executor interface of :mod:`.supervisor` for the kernel program."""

    kind = "xdp"
    restarts = 0

    def __init__(self, iface, mode: str = "native", flows: Optional[KernelFlows] = None):
        if mode not in XDP_MODES:
            raise LiveError(f"--xdp-mode must be one of {', '.join(XDP_MODES)}")
        self.iface = iface
        self.mode = mode
        self.flows = flows or KernelFlows()
        self.dataplane = None
        self.plan = None

    def __len__(self) -> int:
        return 1 if self.dataplane is not None else 0

    def load(self, plan) -> None:
        """Load the program with *plan* and attach it; one clear line when the interface refuses."""
        from ..errors import EncapfwdError
        from ..xdp.dataplane import DataPlane, attached_owner

        replace = False
        owner = attached_owner(self.iface.index)
        if owner is not None:
            kind, who = owner
            if kind != "encapfwd":
                raise LiveError(
                    f"{self.iface.name} already has an XDP program, {who}, that is not encapfwd's: detach it "
                    f"first ('ip link set dev {self.iface.name} xdp off')"
                )
            if who and _alive(who):
                raise LiveError(
                    f"{self.iface.name} already has an XDP program: encapfwd run (pid {who}) is forwarding "
                    "on it; stop that one first"
                )
            log(f"{self.iface.name}: taking over the XDP program left by encapfwd run (pid {who}), which "
                "is no longer running (it kept forwarding meanwhile)")
            replace = True
        try:
            dataplane = DataPlane.load(plan)
        except EncapfwdError as exc:
            raise LiveError(f"loading the XDP program: {exc}") from None
        try:
            dataplane.attach(self.iface.index, self.mode, replace=replace)
        except EncapfwdError as exc:
            dataplane.close()
            raise LiveError(str(exc)) from None
        self.dataplane, self.plan = dataplane, plan
        self.flows.dataplane = dataplane

    def start(self, config, dispatcher) -> None:
        if self.dataplane is None:
            self.load(dispatcher.plan)

    def fds(self) -> List[int]:
        return []

    def owns(self, fd: int) -> bool:
        return False

    def on_readable(self, fd: int) -> bool:
        return True

    def reload(self, config, dispatcher) -> Dict[str, Optional[str]]:
        try:
            self.dataplane.install(dispatcher.plan)
        except Exception as exc:  # noqa: BLE001 - reported like a worker's failure; the old plan stays
            return {"xdp": f"{type(exc).__name__}: {exc}"}
        self.plan = dispatcher.plan
        return {"xdp": None}

    def report(self) -> List[dict]:
        """One report in the workers' shape, so that the controller sums kernel and slow-path counters."""
        if self.dataplane is None:
            return []
        kernel = self.dataplane.counters()
        servers = {}
        for server in self.plan.servers:
            counts = kernel["servers"].get(server.name, {"packets": 0, "bytes": 0})
            servers[server.name] = {
                "cluster": server.cluster, "port": server.port, "server": server.address,
                "method": server.method, "packets": counts["packets"], "bytes": counts["bytes"],
            }
        forwarded = sum(s["packets"] for s in servers.values())
        passed = kernel["passed"]
        dispatcher = {
            "servers": servers,
            "forwarded": forwarded,
            "drops": kernel["drops"],
            "dropped": sum(kernel["drops"].values()),
        }
        engine = {
            "xdp_forwarded": forwarded,
            "xdp_dropped": dispatcher["dropped"],
            "xdp_passed": sum(passed.get(r, 0) for r in passed if r != "not-ours"),
            "xdp_not_ours": passed.get("not-ours", 0),
            "xdp_passed_by_reason": passed,
            "xdp_flow_writes_failed": self.flows.errors,
        }
        return [{"dispatcher": dispatcher, "engine": engine}]

    def stop(self) -> List[dict]:
        finals = self.report()
        if self.dataplane is not None:
            try:
                self.dataplane.close()
            except Exception as exc:  # noqa: BLE001 - stopping goes on
                log(f"detaching the XDP program from {self.iface.name}: {exc}")
            self.dataplane = None
            self.flows.dataplane = None
        return finals

    def close_in_child(self) -> None:
        """A forked worker keeps the maps' descriptors (it writes flows) but must never detach or unload."""
        if self.dataplane is not None:
            self.dataplane.forget()


__all__ = ["ENGINES", "XDP_MODES", "KernelFlows", "XDPProgram", "choose"]
