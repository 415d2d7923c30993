"""The XDP program as one executor (:class:`~encapfwd.executor.LiveExecutor`) of the live controller (beside the AF_PACKET worker pool, its slow path).

The controller compiles the plan; this executor loads the program once, attaches it to the interface and
installs every new plan into its maps (:class:`encapfwd.xdp.dataplane.DataPlane`). Frames the program hands
up (XDP_PASS) reach the AF_PACKET workers, which run the Python dispatcher on the same plan and write the
flows they place into the kernel's flow table (:class:`KernelFlows`), so the next packets of those flows
stay in the kernel. On close the program is detached and unloaded; nothing is pinned.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from encapfwd.errors import InterfaceBusy
from encapfwd.runtime.common import LiveError, log
from encapfwd.runtime.engine import XDP_MODES, Choice, inspect_quietly
from encapfwd.runtime.owners import alive
from encapfwd.xdp.maps import FLOW_VALUE, kernel_flow_key

#: seconds between two readings of the driver's counters of lost frames
LOSS_INTERVAL = 1.0


def pressure_count(counters: dict, name: str = "pressure_placed") -> Optional[int]:
    """The new flows the kernel program placed itself under pressure (cumulative; *name* ``handup_placed``:
    beyond its hand-up limit), from ``DataPlane.counters()``; None when the program does not count them."""
    value = counters.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def apply_host_limits(dataplane, plan) -> None:
    """What the live runtime alone gives the program: ``executor handuplimit`` (offline, the slow path is never
    behind, so replay and the tests' executors keep 0)."""
    dataplane.set_handup_limit(plan.config.executor.handuplimit)


class KernelFlows:
    """The slow path's flow sink: writes a flow the Python dispatcher placed into the kernel's flow table.
    Forked workers inherit it (and the map's descriptor); it never raises into the data path."""

    def __init__(self):
        self.dataplane = None
        self.errors = 0
        #: frames handed up that followed the kernel's flow (:meth:`lookup`, the dispatcher's adoption), and
        #: the lookups that failed
        self.adopted = 0
        self.lookup_errors = 0

    def __call__(self, key: bytes, sid: int) -> None:
        dataplane = self.dataplane
        if dataplane is None:
            return
        try:
            dataplane.write_flow(kernel_flow_key(key), sid)
        except Exception:  # noqa: BLE001 - the data path never raises
            self.errors += 1

    def lookup(self, key: bytes, max_age_ns: int) -> Optional[int]:
        """The server id of flow *key* in the kernel's flow table when its last packet is at most *max_age_ns*
        old, else None (the hand-up gap: docs/live.md, "Overload"). Never raises."""
        dataplane = self.dataplane
        if dataplane is None:
            return None
        try:
            raw = dataplane.maps["flows"].lookup(kernel_flow_key(key))
            if raw is None:
                return None
            sid, _pad, seen = FLOW_VALUE.unpack(raw[:FLOW_VALUE.size])
        except Exception:  # noqa: BLE001 - the data path never raises
            self.lookup_errors += 1
            return None
        # the program's clock is CLOCK_MONOTONIC_COARSE (up to a tick behind this one: an age a tick longer)
        return sid if time.monotonic_ns() - seen <= max_age_ns else None


class XDPProgram:
    """The XDP program as a :class:`~encapfwd.executor.LiveExecutor`."""

    kind = "xdp"
    restarts = 0

    def __init__(self, iface, mode: str = "native", flows: Optional[KernelFlows] = None,
                 choice: Optional[Choice] = None):
        if mode not in XDP_MODES:
            raise LiveError(f"--xdp-mode must be one of {', '.join(XDP_MODES)}")
        self.iface = iface
        self.mode = mode
        self.flows = flows or KernelFlows()
        self.choice = choice
        self.dataplane = None
        self.plan = None
        #: the driver's counters of frames it could not send, from just before the attach
        self.loss = None
        self._next_loss = 0.0
        self._loss_said = False
        #: the program's pressure mode (runtime/overload.py): on while the slow path cannot keep up
        self.pressure = False

    def __len__(self) -> int:
        return 1 if self.dataplane is not None else 0

    def load(self, plan) -> None:
        """Load the program with *plan* and attach it; one clear line when the interface refuses."""
        from encapfwd.errors import EncapfwdError
        from encapfwd.runtime.owners import running_tc_owner
        from encapfwd.xdp.dataplane import DataPlane, attached_owner

        tc_owner = running_tc_owner(self.iface)
        if tc_owner:
            raise InterfaceBusy(f"{self.iface.name} already has encapfwd's TC program: encapfwd run (pid {tc_owner}) "
                            "is forwarding on it; stop that one first")
        replace = False
        owner = attached_owner(self.iface.index)
        if owner is not None:
            kind, who = owner
            if kind != "encapfwd":
                raise InterfaceBusy(
                    f"{self.iface.name} already has an XDP program, {who}, that is not encapfwd's: detach it "
                    f"first ('ip link set dev {self.iface.name} xdp off')"
                )
            if who and alive(who):
                raise InterfaceBusy(
                    f"{self.iface.name} already has an XDP program: encapfwd run (pid {who}) is forwarding "
                    "on it; stop that one first"
                )
            log(f"{self.iface.name}: taking over the XDP program left by encapfwd run (pid {who}), which "
                "is no longer running (it kept forwarding meanwhile)")
            replace = True
        try:
            dataplane = DataPlane.load(plan)
            apply_host_limits(dataplane, plan)
        except EncapfwdError as exc:
            raise LiveError(f"loading the XDP program: {exc}") from None
        from encapfwd.runtime.link import TxLossWatch

        link = self.choice.link if self.choice is not None else None
        if replace and link is not None and link.attached in XDP_MODES and link.attached != self.mode:
            log(f"{self.iface.name}: the program left there runs in {link.attached} mode: replacing it in "
                f"{link.attached} mode (native and generic XDP cannot run at once)")
            self.mode = link.attached
        self.loss = TxLossWatch(self.iface.name)
        self.loss.start()
        try:
            try:
                dataplane.attach(self.iface.index, self.mode, replace=replace)
            except EncapfwdError as exc:
                if self.mode != "native" or self.choice is None or not self.choice.may_fall_back:
                    raise
                log(f"{self.iface.name} refused native XDP ({exc}): using generic XDP")
                self.mode = "generic"
                dataplane.attach(self.iface.index, self.mode, replace=replace)
        except EncapfwdError as exc:
            dataplane.close()
            raise LiveError(str(exc)) from None
        self.dataplane, self.plan = dataplane, plan
        self.flows.dataplane = dataplane
        self._next_loss = time.monotonic() + LOSS_INTERVAL

    def watch(self, now: Optional[float] = None) -> None:
        """Read the driver's counters of lost frames (at most once per :data:`LOSS_INTERVAL`); the first
        time frames are lost, one warning line saying how many, which counters and what to do."""
        if self.loss is None or self.dataplane is None:
            return
        now = time.monotonic() if now is None else now
        if now < self._next_loss:
            return
        self._next_loss = now + LOSS_INTERVAL
        lost = self.loss.update()
        if lost and not self._loss_said:
            self._loss_said = True
            log(f"warning: {self.iface.name}: the driver lost {lost} frames since the XDP program started "
                f"({self.loss.words()}): frames the program sent (XDP_TX) do not arrive{self._loss_hint()}; "
                "counted as xdp_tx_lost, not as forwarded")

    def _loss_hint(self) -> str:
        from encapfwd.runtime.link import VETH

        link = inspect_quietly(self.iface.name)
        if link is not None and link.kind == VETH and self.mode == "native" and not link.peer_native:
            return f" ({link.peer_words()}: use --xdp-mode generic, or attach an XDP program to the peer)"
        return f" (see 'ethtool -S {self.iface.name}' and 'ip -s link show {self.iface.name}')"

    # -- overload (runtime/overload.py)

    def set_pressure(self, on: bool) -> Optional[str]:
        """Turn the program's pressure mode on or off (it then places new flows of wrr/wlc ports itself by
        its weighted table); why not (one line), or None when done."""
        dataplane = self.dataplane
        if dataplane is None:
            return "no program loaded"
        setter = getattr(dataplane, "set_pressure", None)
        if setter is None:
            return "this kernel program has no pressure mode (DataPlane.set_pressure)"
        try:
            setter(bool(on))
        except Exception as exc:  # noqa: BLE001 - said by the caller in its log line
            return f"{type(exc).__name__}: {exc}"
        self.pressure = bool(on)
        return None

    def pressure_placed(self) -> Optional[int]:
        """How many new flows the program placed itself under pressure (cumulative), None when it does not
        count them."""
        if self.dataplane is None:
            return None
        return pressure_count(self.dataplane.counters())

    def handup_placed(self) -> Optional[int]:
        """How many new flows of wrr/wlc ports the program placed itself beyond ``executor handuplimit``
        (cumulative), None when no program is loaded."""
        if self.dataplane is None:
            return None
        return self.dataplane.flow_events()["handup-limit"]  # four per-CPU words, not every counter

    def start(self, plan) -> None:
        if self.dataplane is None:
            self.load(plan)

    def fds(self) -> List[int]:
        return []

    def owns(self, fd: int) -> bool:
        return False

    def on_readable(self, fd: int) -> bool:
        return True

    def install(self, plan) -> Dict[str, Optional[str]]:
        try:
            self.dataplane.install(plan)
            apply_host_limits(self.dataplane, plan)
        except Exception as exc:  # noqa: BLE001 - reported like a worker's failure; the old plan stays
            return {"xdp": f"{type(exc).__name__}: {exc}"}
        self.plan = plan
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
        sent = sum(s["packets"] for s in servers.values())  # XDP_TX: handed to the driver
        lost = self.loss.update() if self.loss is not None else 0
        # a frame the driver lost is never called forwarded (per server the kernel counts what it sent: the
        # driver's counters are per interface)
        forwarded = max(0, sent - lost)
        passed = kernel["passed"]
        dispatcher = {
            "servers": servers,
            "forwarded": forwarded,
            "drops": kernel["drops"],
            "dropped": sum(kernel["drops"].values()),
        }
        engine = {
            "xdp_forwarded": forwarded,
            "xdp_tx": sent,
            "xdp_tx_lost": lost,
            "xdp_tx_lost_counters": dict(self.loss.counters) if self.loss is not None else {},
            "xdp_dropped": dispatcher["dropped"],
            "xdp_passed": sum(passed.get(r, 0) for r in passed if r not in ("not-ours", "not-for-us")),
            "xdp_not_ours": passed.get("not-ours", 0),
            "xdp_not_for_us": passed.get("not-for-us", 0),
            "xdp_passed_by_reason": passed,
            "xdp_flow_writes_failed": self.flows.errors,
            "xdp_pressure": self.pressure,
        }
        placed = pressure_count(kernel)
        if placed is not None:
            engine["xdp_pressure_placed"] = placed
        beyond = pressure_count(kernel, "handup_placed")
        if beyond is not None:
            engine["xdp_handup_placed"] = beyond
        if isinstance(kernel.get("flows_not_remembered"), dict):  # new flows forwarded, not written (by reason)
            engine["xdp_flows_not_remembered"] = dict(kernel["flows_not_remembered"])
        return [{"dispatcher": dispatcher, "engine": engine}]

    def close(self) -> List[dict]:
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


__all__ = ["KernelFlows", "XDPProgram", "apply_host_limits", "pressure_count"]
