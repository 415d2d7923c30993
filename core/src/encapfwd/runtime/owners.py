"""Which running ``encapfwd run`` owns a kernel program on an interface (two dispatchers on one interface
would both forward: the second refuses; a program left by one that is gone is taken over)."""

from __future__ import annotations

from typing import Optional

from encapfwd.errors import InterfaceBusy


def alive(pid: int) -> bool:
    """True when *pid* is a running encapfwd process (a recycled pid of another program does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"encapfwd" in handle.read()
    except OSError:
        return False


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
        if pid and alive(pid):
            return pid
    return None


def refuse_beside_xdp(iface) -> None:
    """InterfaceBusy when a running ``encapfwd run`` has its XDP program on *iface* (two dispatchers on one
    interface would both forward)."""
    from encapfwd.errors import EncapfwdError
    from encapfwd.xdp.dataplane import attached_owner

    try:
        owner = attached_owner(iface.index)
    except EncapfwdError:
        return
    if owner is not None and owner[0] == "encapfwd" and owner[1] and alive(owner[1]):
        raise InterfaceBusy(f"{iface.name} already has an XDP program: encapfwd run (pid {owner[1]}) is forwarding "
                        "on it; stop that one first")


__all__ = ["alive", "refuse_beside_xdp", "running_tc_owner"]
