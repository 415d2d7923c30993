"""Which engine runs the plan (``encapfwd run --engine auto|xdp|tc|afpacket``), and why.

The *engine* is the executor that forwards in the fast path: the XDP program (:mod:`.xdp`), the TC program
(:mod:`.tc`) or the AF_PACKET workers alone (:mod:`.afpacket`). ``auto`` picks native XDP where the driver
runs it and the frames it sends arrive (a NIC), TC where frames arrive as socket buffers (veth — even one
whose peer runs XDP —, bridges, other virtual interfaces), AF_PACKET where BPF is not available.
:meth:`Choice.line` is the run's first log line.
"""

from __future__ import annotations

import os
from typing import Optional

from encapfwd.errors import NoSuchInterface
from encapfwd.runtime.common import LiveError
from encapfwd.runtime.link import VETH

ENGINES = ("auto", "xdp", "afpacket")
XDP_MODES = ("native", "generic")
#: how the TC program is attached: tcx where the kernel has it, else clsact
TC_ATTACH = ("auto", "tcx", "clsact")
ENV_TC_ATTACH = "ENCAPFWD_TC_ATTACH"


class Choice:
    """Which engine and XDP mode ``encapfwd run`` uses, and why (the first line of its log)."""

    def __init__(self, engine: str, reason: str, mode: Optional[str] = None, warning: Optional[str] = None,
                 link=None, may_fall_back: bool = False):
        self.engine = engine
        self.reason = reason
        self.mode = mode
        #: one line to log after the first (a mode asked for that will lose frames)
        self.warning = warning
        #: what :func:`encapfwd.runtime.link.inspect` found out about the interface (None: nothing)
        self.link = link
        #: the mode was chosen (not asked for): generic when the driver refuses native XDP
        self.may_fall_back = may_fall_back

    def line(self) -> str:
        return f"engine: {self.engine}{f' ({self.mode})' if self.mode else ''} — {self.reason}"


def _inspect(ifname: Optional[str]):
    """The interface's :class:`~encapfwd.runtime.link.Link`; None when it cannot be inspected (the
    start then says why); NoSuchInterface when it does not exist."""
    if not ifname:
        return None
    from encapfwd.runtime.link import inspect
    from encapfwd.runtime.netlink import open_ipr

    try:
        with open_ipr() as ipr:
            return inspect(ipr, ifname)
    except NoSuchInterface:
        raise
    except LiveError:
        return None
    except Exception:  # noqa: BLE001 - unknown: the safe choices below
        return None


def choose(engine: str, ifname: Optional[str], mode: str = "auto") -> Choice:
    """The engine and XDP mode: *engine* as asked, or for ``auto`` xdp when BPF is available here, else
    afpacket. The XDP mode (``auto`` unless asked for): native only where the frames the program sends with
    XDP_TX arrive — a veth whose peer runs a native XDP program, a driver that runs XDP itself; generic
    elsewhere (:func:`encapfwd.runtime.link.choose_mode`). A mode asked for is kept, with a warning
    when it will lose frames."""
    if engine == "afpacket":
        return Choice("afpacket", "asked for with --engine afpacket")
    if mode not in XDP_MODES + ("auto",):
        raise LiveError(f"--xdp-mode must be one of auto, {', '.join(XDP_MODES)}")
    from encapfwd.runtime.link import choose_mode
    from encapfwd.xdp import libbpf

    ok, why = libbpf.available()
    if engine == "xdp" and not ok:
        raise LiveError(f"--engine xdp: {why}")
    if not ok:
        return Choice("afpacket", f"auto: XDP is not available here ({why})")
    link = _inspect(ifname)
    chosen, words, warning = choose_mode(link, mode)
    head = "auto" if engine == "auto" else "asked for with --engine xdp"
    if mode in XDP_MODES:
        reason = f"{head}{': BPF is available' if engine == 'auto' else ''}; --xdp-mode {mode} asked for"
    else:
        reason = f"{head}: {words}"
    unknown = link is None or (link.kind != "veth" and link.xdp_features is None)
    return Choice("xdp", reason, chosen, warning, link, may_fall_back=mode == "auto" and unknown)


def inspect_quietly(ifname: str):
    try:
        return _inspect(ifname)
    except Exception:  # noqa: BLE001 - advice only
        return None


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


#: why native XDP on a veth loses frames of local senders (docs/live.md, "Engines")
UNFINISHED = ("TCP/UDP checksums left to offload (CHECKSUM_PARTIAL, a veth's default: XDP never sees that the "
              "checksum is unfinished)")


def choose_engine(engine: str, ifname: Optional[str], mode: str = "auto"):
    """:func:`choose` with the TC engine: ``--engine tc`` as asked; ``auto`` (with
    ``--xdp-mode auto``) picks native XDP where the driver runs it and the frames it sends arrive (a NIC), TC
    where frames arrive as socket buffers (a veth — whether its peer runs XDP or not: native XDP there would
    forward local senders' unfinished checksums —, bridges, macvlan, other virtual interfaces), AF_PACKET
    last. ``--engine xdp`` in native mode on a veth is kept, with a warning saying why it loses such frames."""
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
    veth = choice.link is not None and choice.link.kind == VETH
    if engine == "auto" and mode == "auto" and choice.engine == "xdp" and veth:
        # even where its peer runs XDP: native XDP there would forward local senders' frames corrupt
        return Choice("tc", f"auto: {choice.link.name} is a veth: frames arrive there as socket buffers, and those "
                            f"of senders on this host carry {UNFINISHED}, which native XDP would forward unfinished: "
                            "the TC program runs at tc ingress", attach_method(), link=choice.link)
    if choice.engine == "xdp" and choice.mode == "native" and veth and choice.warning is None:
        choice.warning = (f"native XDP on a veth ({choice.link.name}): frames of senders on this host carry "
                          f"{UNFINISHED}; native XDP forwards them unfinished and their receivers drop them. Turn "
                          "TX checksum offload off where they are sent (ethtool -K DEV tx off), or run --engine tc")
    return choice


__all__ = ["ENGINES", "ENV_TC_ATTACH", "TC_ATTACH", "XDP_MODES", "Choice", "attach_method", "choose",
           "choose_engine"]
