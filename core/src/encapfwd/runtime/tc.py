"""The TC program as one executor of the live controller (``--engine tc``): the same C program and maps as
the XDP engine (:mod:`encapfwd.xdp.tc`), at tc ingress, for interfaces whose frames arrive as socket buffers
(veth, containers), where native XDP first copies every frame into an XDP buffer and generic XDP does more
work than the kernel's own forwarding.

Frames it forwards leave by the interface's egress (``bpf_redirect``); frames it hands up (``TC_ACT_OK``)
reach the AF_PACKET workers, its slow path, which write the flows they place into the kernel's flow table —
exactly as with the XDP engine, whose executor (:class:`.xdp_executor.XDPProgram`) this one extends: plan
installs, counters and reports are the same (the report's ``xdp_*`` counters are the kernel program's).

Attach: tcx (Linux 6.6+; a link owned by this process: if encapfwd dies, the kernel detaches the program),
else a clsact qdisc with a cls_bpf filter. A second ``encapfwd run`` on the interface refuses while the first
runs; a program left by one that is gone (a link still held, a cls_bpf filter) is replaced.
"""

from __future__ import annotations

import os
from typing import Optional

from encapfwd.runtime.common import LiveError, log
from encapfwd.runtime.xdp import KernelFlows, XDPProgram, _alive

#: how the TC program is attached: tcx where the kernel has it, else clsact
TC_ATTACH = ("auto", "tcx", "clsact")
ENV_TC_ATTACH = "ENCAPFWD_TC_ATTACH"


class TCProgram(XDPProgram):
    """The executor interface of :mod:`.supervisor` for the TC program."""

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
            if pid and _alive(pid):
                raise LiveError(
                    f"{self.iface.name} already has encapfwd's TC program: encapfwd run (pid {pid}) is "
                    "forwarding on it; stop that one first"
                )
        refuse_beside_xdp(self.iface)
        try:
            dataplane = tc.TCDataPlane.load(plan)
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

    def stop(self):
        from encapfwd.runtime.afpacket import worker

        try:
            return super().stop()
        finally:
            worker.SLOW_PATH_MARK = None

    def watch(self, now=None) -> None:
        """Nothing to watch: frames the program redirects go through the interface's ordinary transmit path
        (its ``tx_dropped`` counts what it could not send)."""



def running_tc_owner(iface) -> Optional[int]:
    """The pid of a running ``encapfwd run`` whose TC program is on *iface* (None: none)."""
    from encapfwd.errors import EncapfwdError
    from encapfwd.xdp import tc

    try:
        owners = tc.attached_owners(iface.index) if tc.tcx_available(iface.index) else []
        owners += tc.clsact_owners(iface.index)
    except EncapfwdError:
        return None
    for _kind, pid, _prog, _link in owners:
        if pid and _alive(pid):
            return pid
    return None


def refuse_beside_xdp(iface) -> None:
    """LiveError when a running ``encapfwd run`` has its XDP program on *iface* (two dispatchers on one
    interface would both forward)."""
    from encapfwd.errors import EncapfwdError
    from encapfwd.xdp.dataplane import attached_owner

    try:
        owner = attached_owner(iface.index)
    except EncapfwdError:
        return
    if owner is not None and owner[0] == "encapfwd" and owner[1] and _alive(owner[1]):
        raise LiveError(f"{iface.name} already has an XDP program: encapfwd run (pid {owner[1]}) is forwarding "
                        "on it; stop that one first")


def attach_method(ifindex: int = 1) -> str:
    """How the TC program will be attached here: ``tcx`` (Linux 6.6+) or ``clsact``; the environment
    variable ENCAPFWD_TC_ATTACH (``tcx``/``clsact``) forces one (tests of the older kernels' way)."""
    from encapfwd.xdp import tc

    forced = os.environ.get(ENV_TC_ATTACH, "auto")
    if forced == "clsact":
        return "clsact"
    if forced == "tcx" or tc.tcx_available(ifindex):
        return "tcx"
    return "clsact"


def choose_engine(engine: str, ifname: Optional[str], mode: str = "auto"):
    """:func:`.xdp_executor.choose` with the TC engine: ``--engine tc`` as asked; ``auto`` (with
    ``--xdp-mode auto``) picks native XDP where the driver runs it and the frames it sends arrive (a NIC, a
    veth whose peer runs an XDP program), TC where XDP would run generic (a veth whose peer runs none,
    bridges, macvlan, other virtual interfaces: frames arrive there as socket buffers), AF_PACKET last."""
    from encapfwd.runtime.xdp import Choice, choose

    if engine == "tc":
        from encapfwd.xdp import libbpf

        ok, why = libbpf.available()
        if not ok:
            raise LiveError(f"--engine tc: {why}")
        return Choice("tc", "asked for with --engine tc", attach_method())
    choice = choose(engine, ifname, mode)
    if engine == "auto" and mode == "auto" and choice.engine == "xdp" and choice.mode == "generic":
        words = choice.reason.removeprefix("auto: ")
        return Choice("tc", f"auto: {words}; frames arrive there as socket buffers: the TC program runs at tc "
                            "ingress (generic XDP would cost more)", attach_method(), link=choice.link)
    return choice


__all__ = ["ENV_TC_ATTACH", "TC_ATTACH", "TCProgram", "attach_method", "choose_engine", "refuse_beside_xdp",
           "running_tc_owner"]
