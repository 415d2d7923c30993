"""The TC program as one executor of the live controller (``--engine tc``): the same C program and maps as
the XDP engine (:mod:`encapfwd.xdp.tc`), at tc ingress, for interfaces whose frames arrive as socket buffers
(veth, containers), where native XDP first copies every frame into an XDP buffer and generic XDP does more
work than the kernel's own forwarding.

Frames it forwards leave by the interface's egress (``bpf_redirect``); frames it hands up (``TC_ACT_OK``)
reach the AF_PACKET workers, its slow path, which write the flows they place into the kernel's flow table —
exactly as with the XDP engine, whose executor (:class:`.xdp.XDPProgram`) this one extends: plan
installs, counters and reports are the same (the report's ``xdp_*`` counters are the kernel program's).

Attach: tcx (Linux 6.6+; a link owned by this process: if encapfwd dies, the kernel detaches the program),
else a clsact qdisc with a cls_bpf filter. A second ``encapfwd run`` on the interface refuses while the first
runs; a program left by one that is gone (a link still held, a cls_bpf filter) is replaced.
"""

from __future__ import annotations

import os
from typing import Optional

from encapfwd.errors import InterfaceBusy
from encapfwd.runtime.common import LiveError, log
from encapfwd.runtime.engine import ENV_TC_ATTACH, TC_ATTACH, attach_method
from encapfwd.runtime.owners import alive, refuse_beside_xdp
from encapfwd.runtime.xdp import KernelFlows, XDPProgram, apply_host_limits


class TCProgram(XDPProgram):
    """The TC program as a :class:`~encapfwd.executor.LiveExecutor`."""

    kind = "tc"

    def __init__(self, iface, flows: Optional[KernelFlows] = None, choice=None, attach: Optional[str] = None):
        super().__init__(iface, "native", flows, choice)
        self.mode = None
        self.attach_how = attach or os.environ.get(ENV_TC_ATTACH, "auto")
        if self.attach_how not in TC_ATTACH:
            raise LiveError(f"{ENV_TC_ATTACH} must be one of {', '.join(TC_ATTACH)}")

    def load(self, plan) -> None:
        """Load the program with *plan* and attach it at tc ingress; one clear line when that fails."""
        from encapfwd.errors import EncapfwdError
        from encapfwd.xdp import tc

        index = self.iface.index
        how = attach_method(index) if self.attach_how == "auto" else self.attach_how
        try:
            left = tc.attached_owners(index) if how == "tcx" else tc.clsact_owners(index)
        except EncapfwdError:
            left = []
        for _kind, pid, prog, link in left:
            if pid and alive(pid):
                raise InterfaceBusy(
                    f"{self.iface.name} already has encapfwd's TC program: encapfwd run (pid {pid}) is "
                    "forwarding on it; stop that one first"
                )
        refuse_beside_xdp(self.iface)
        try:
            dataplane = tc.TCDataPlane.load(plan)
            apply_host_limits(dataplane, plan)
        except EncapfwdError as exc:
            raise LiveError(f"loading the TC program: {exc}") from None
        try:
            # a clsact filter left behind is replaced in one step (same handle); a tcx link is detached below
            dataplane.attach(index, how, replace=bool(left))
        except EncapfwdError as exc:
            dataplane.close()
            raise LiveError(str(exc)) from None
        # a program left by a run that is gone: detached once ours runs (no frame goes unhandled meanwhile)
        for _kind, pid, prog, link in left:
            try:
                if link and how == "tcx":
                    tc.tcx_detach_link(link)
                log(f"{self.iface.name}: took over from the TC program left by encapfwd run (pid {pid}), which "
                    "is no longer running")
            except EncapfwdError as exc:
                log(f"{self.iface.name}: the TC program left by encapfwd run (pid {pid}) could not be "
                    f"detached: {exc}")
        self.mode = dataplane.attach_method
        self.dataplane, self.plan = dataplane, plan
        self.flows.dataplane = dataplane
        # the workers (forked after this) take cluster frames only with the program's slow-path mark
        from encapfwd.runtime.afpacket import worker

        worker.SLOW_PATH_MARK = tc.SLOW_MARK

    def close(self):
        from encapfwd.runtime.afpacket import worker

        try:
            return super().close()
        finally:
            worker.SLOW_PATH_MARK = None

    def watch(self, now=None) -> None:
        """Nothing to watch: frames the program redirects go through the interface's ordinary transmit path
        (its ``tx_dropped`` counts what it could not send)."""



__all__ = ["TCProgram"]
