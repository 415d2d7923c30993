"""The TC data plane: the same C program as the XDP one (``encapfwd.bpf.c`` built with ``-DENCAPFWD_TC``,
see ``encapfwd_ctx.h``) for socket buffers at tc ingress, with the same maps, filled by the same plan
install (:class:`encapfwd.xdp.dataplane.DataPlane`).

    dp = TCDataPlane.load(plan)         # compile (cached) and load, write generation 0
    verdict, out = dp.test_run(frame)   # BPF_PROG_TEST_RUN on a socket buffer: TC_ACT_REDIRECT = forwarded
    dp.attach(ifindex)                  # tcx ingress (Linux 6.6+), else a clsact qdisc + cls_bpf filter
    dp.close()                          # detach and unload; nothing is pinned

Attach: a tcx link (``BPF_LINK_CREATE`` with ``BPF_TCX_INGRESS``, raw ``bpf()``: Debian's libbpf 1.1 has no
``bpf_program__attach_tcx``). The link belongs to the process: when encapfwd dies the kernel detaches the
program itself. Where the kernel has no tcx (before 6.6), a ``clsact`` qdisc and a direct-action
``cls_bpf`` filter by the program's fd (pyroute2); detached on stop, taken over after a crash.

Verdicts: ``TC_ACT_REDIRECT`` (``bpf_redirect`` to the interface's own egress: the frame leaves encapsulated),
``TC_ACT_SHOT`` (drop), ``TC_ACT_OK`` (up the stack: the AF_PACKET workers, the slow path).
"""

from __future__ import annotations

import ctypes
import errno as errnos
import os
from typing import List, Optional, Tuple

from encapfwd.xdp import BPFError
from encapfwd.xdp import maps as M
from encapfwd.xdp.build import build
from encapfwd.xdp.dataplane import DataPlane
from encapfwd.xdp.libbpf import possible_cpus

SOURCE = "encapfwd_tc.bpf.c"
PROGRAM = "encapfwd_tc"
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
#: the mark of a frame the program hands up to the slow path (encapfwd_ctx.h SLOW_MARK): it redirects such
#: a frame to the interface's own ingress, and the workers' socket filter takes cluster frames only with it
SLOW_MARK = 0xEF510000
#: sizeof(struct __sk_buff) (Linux 5.16+); its mark is at offset 8
SKB_CTX_SIZE = 192

# linux/bpf.h (6.6+: the Debian headers predate tcx)
BPF_PROG_QUERY, BPF_LINK_CREATE, BPF_LINK_GET_FD_BY_ID, BPF_LINK_DETACH = 16, 28, 30, 34
BPF_TCX_INGRESS = 46
_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
#: the cls_bpf filter's priority and handle when tcx is missing (clsact ingress)
CLS_PRIO, CLS_HANDLE = 0xEF00, 0xEF


def object_path():
    """The TC build of the program (cached like the XDP one)."""
    return build(SOURCE, {"MAX_SERVERS": M.MAX_SERVERS, "MAX_PORTS": M.MAX_PORTS, "NCPUS": possible_cpus()})


def _bpf(cmd: int, attr: bytes) -> Tuple[int, int, bytes]:
    """The raw ``bpf()`` syscall: (return value, errno, the attribute buffer after the call)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    nr = _NR_BPF.get(os.uname().machine, 321)
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    return ret, (ctypes.get_errno() if ret < 0 else 0), buf.raw


def _fail(op: str, err: int) -> BPFError:
    reason = "Operation not supported by the kernel" if err in (524, errnos.EOPNOTSUPP) else os.strerror(err)
    return BPFError(f"{op}: {reason}", errno=err)


def skb_test_run(prog_fd: int, frame: bytes) -> Tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN of a socket-buffer program on *frame*: ``(retval, output frame, skb mark)``."""
    from encapfwd.xdp.libbpf import _buffer, _check, _lib, _opts, _TestRunOpts

    size_out = len(frame) + 4096
    data_in, data_out = _buffer(frame), ctypes.create_string_buffer(size_out)
    ctx_out = ctypes.create_string_buffer(SKB_CTX_SIZE)
    opts = _opts(_TestRunOpts)
    opts.data_in, opts.data_size_in = ctypes.cast(data_in, ctypes.c_void_p), len(frame)
    opts.data_out, opts.data_size_out = ctypes.cast(data_out, ctypes.c_void_p), size_out
    opts.ctx_out, opts.ctx_size_out = ctypes.cast(ctx_out, ctypes.c_void_p), SKB_CTX_SIZE
    opts.repeat = 1
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run of the TC program")
    mark = int.from_bytes(ctx_out.raw[8:12], "little")
    return opts.retval, data_out.raw[:opts.data_size_out], mark


skb_test_run.__test__ = False  # not a pytest test


def tcx_query(ifindex: int) -> List[Tuple[int, int]]:
    """``[(program id, link id)]`` at tcx ingress of *ifindex* (link id 0: attached without a link); raises
    BPFError (EINVAL on kernels without tcx)."""
    count = 64
    progs, links = (ctypes.c_uint32 * count)(), (ctypes.c_uint32 * count)()
    attr = bytearray(64)
    attr[0:4] = ifindex.to_bytes(4, "little")
    attr[4:8] = BPF_TCX_INGRESS.to_bytes(4, "little")
    attr[16:24] = ctypes.addressof(progs).to_bytes(8, "little")
    attr[24:28] = count.to_bytes(4, "little")
    attr[40:48] = ctypes.addressof(links).to_bytes(8, "little")
    ret, err, out = _bpf(BPF_PROG_QUERY, bytes(attr))
    if ret < 0:
        raise _fail(f"querying tcx ingress of ifindex {ifindex}", err)
    found = int.from_bytes(out[24:28], "little")
    return [(progs[i], links[i]) for i in range(min(found, count))]


def tcx_available(ifindex: int = 1) -> bool:
    """True when the kernel has tcx (Linux 6.6+)."""
    try:
        tcx_query(ifindex)
        return True
    except BPFError:
        return False


def tcx_attach(ifindex: int, prog_fd: int) -> int:
    """Attach *prog_fd* at tcx ingress of *ifindex*; returns the link's fd (closing it detaches)."""
    attr = bytearray(64)
    attr[0:4] = prog_fd.to_bytes(4, "little")
    attr[4:8] = ifindex.to_bytes(4, "little")
    attr[8:12] = BPF_TCX_INGRESS.to_bytes(4, "little")
    ret, err, _ = _bpf(BPF_LINK_CREATE, bytes(attr))
    if ret < 0:
        raise _fail(f"attaching the TC program at tcx ingress of {_ifname(ifindex)}", err)
    return ret


def tcx_detach_link(link_id: int) -> None:
    """Detach the tcx link *link_id* (one left by a process that is gone)."""
    ret, err, _ = _bpf(BPF_LINK_GET_FD_BY_ID, link_id.to_bytes(4, "little") + bytes(12))
    if ret < 0:
        raise _fail(f"opening tcx link {link_id}", err)
    fd = ret
    try:
        ret, err, _ = _bpf(BPF_LINK_DETACH, fd.to_bytes(4, "little") + bytes(12))
        if ret < 0:
            raise _fail(f"detaching tcx link {link_id}", err)
    finally:
        os.close(fd)


def _ifname(ifindex: int) -> str:
    try:
        import socket

        return f"{socket.if_indextoname(ifindex)} (ifindex {ifindex})"
    except OSError:
        return f"ifindex {ifindex}"


def _owner_of(prog_id_: int):
    """``("encapfwd", pid)`` for our TC program (pid from its control map), else ``("other", words)``."""
    from encapfwd.xdp.dataplane import program_owner

    return program_owner(prog_id_, PROGRAM)


def attached_owners(ifindex: int) -> List[Tuple[str, object, int, int]]:
    """encapfwd's TC programs at tcx ingress of *ifindex*: ``[("encapfwd", pid, prog id, link id)]``
    (other programs are left alone: tcx runs several)."""
    out = []
    for prog, link in tcx_query(ifindex):
        kind, who = _owner_of(prog)
        if kind == "encapfwd":
            out.append((kind, who, prog, link))
    return out


class TCDataPlane(DataPlane):
    """The TC build of the program; maps and plan installs are :class:`DataPlane`'s."""

    PROGRAM = PROGRAM

    @staticmethod
    def object_path():
        return object_path()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._link_fd: Optional[int] = None
        #: "tcx" or "clsact" once attached
        self.attach_method: Optional[str] = None

    def test_run(self, frame: bytes):
        """``(verdict, output bytes)``: the program on *frame* as a socket buffer (BPF_PROG_TEST_RUN):
        TC_ACT_REDIRECT with the frame as it would leave; TC_ACT_OK for a frame handed up, untouched or to
        the slow path (which the program marks and redirects to the interface's ingress); TC_ACT_SHOT."""
        retval, out, mark = skb_test_run(self.prog_fd, frame)
        if retval == TC_ACT_REDIRECT and mark == SLOW_MARK:
            return TC_ACT_OK, out
        return retval, out

    def attach(self, ifindex: int, mode: str = "tcx", replace: bool = False) -> None:
        """tcx ingress where the kernel has it (*mode* ``tcx`` or ``auto``), else (or *mode* ``clsact``) a
        clsact qdisc with a direct-action cls_bpf filter."""
        if mode in ("tcx", "auto") and tcx_available(ifindex):
            self._link_fd = tcx_attach(ifindex, self.prog_fd)
            self.attach_method = "tcx"
        else:
            _clsact_attach(ifindex, self.prog_fd, replace)
            self.attach_method = "clsact"
        self._attached = (ifindex, self.attach_method)

    def detach(self) -> None:
        if self._attached is None:
            return
        ifindex, method = self._attached
        self._attached = None
        if method == "tcx":
            fd, self._link_fd = self._link_fd, None
            if fd is not None:
                os.close(fd)
        else:
            _clsact_detach(ifindex)

    def forget(self) -> None:
        """In a forked process: the parent owns the attachment (a tcx link fd a child inherits is closed
        here, so the program goes when the parent goes)."""
        if self._link_fd is not None:
            try:
                os.close(self._link_fd)
            except OSError:
                pass
            self._link_fd = None
        self._attached = None


# -- clsact + cls_bpf (kernels without tcx) -----------------------------------------------------------------
def _clsact_attach(ifindex: int, prog_fd: int, replace: bool = False) -> None:
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise BPFError("attaching the TC program: this kernel has no tcx and pyroute2 is not installed "
                       "(pip install pyroute2)") from None
    try:
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception as exc:  # noqa: BLE001 - EEXIST: the qdisc is there already
                if getattr(exc, "code", 0) != errnos.EEXIST:
                    raise
            ipr.tc("replace-filter" if replace else "add-filter", "bpf", ifindex, CLS_HANDLE,
                   fd=prog_fd, name=PROGRAM, parent="ffff:fff2", prio=CLS_PRIO, protocol=0x0003,
                   direct_action=True)
    except BPFError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line
        raise BPFError(f"attaching the TC program (clsact ingress of {_ifname(ifindex)}): {exc}") from None


def _clsact_filters(ifindex: int) -> List[Tuple[str, int]]:
    """``[(name, program id)]`` of the cls_bpf filters at the clsact ingress of *ifindex* (``tc -j``:
    pyroute2 does not decode the program id)."""
    import json
    import socket
    import subprocess

    try:
        name = socket.if_indextoname(ifindex)
        proc = subprocess.run(["tc", "-j", "filter", "show", "dev", name, "ingress"], capture_output=True,
                              text=True, timeout=10, check=False)
        rows = json.loads(proc.stdout or "[]") if proc.returncode == 0 else []
    except (OSError, ValueError, subprocess.SubprocessError):
        return []
    out = []
    for row in rows:
        prog = (row.get("options") or {}).get("prog") or {}
        if row.get("kind") == "bpf" and prog.get("id"):
            out.append((prog.get("name") or "", int(prog["id"])))
    return out


def clsact_programs(ifindex: int) -> List[str]:
    """The names of the cls_bpf programs at the clsact ingress of *ifindex* (empty without the qdisc)."""
    return [name for name, _ in _clsact_filters(ifindex)]


def clsact_owners(ifindex: int) -> List[Tuple[str, object, int, int]]:
    """encapfwd's TC program at the clsact ingress of *ifindex*: ``[("encapfwd", pid, prog id, 0)]``."""
    out = []
    for name, prog in _clsact_filters(ifindex):
        if name == PROGRAM:
            kind, who = _owner_of(prog)
            if kind == "encapfwd":
                out.append((kind, who, prog, 0))
    return out


def _clsact_detach(ifindex: int) -> None:
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.tc("del-filter", "bpf", ifindex, CLS_HANDLE, parent="ffff:fff2", prio=CLS_PRIO, protocol=0x0003)
    except Exception as exc:  # noqa: BLE001 - one line
        raise BPFError(f"detaching the TC program from {_ifname(ifindex)}: {exc}") from None


# -- offline: encapfwd replay --engine tc ------------------------------------------------------------------
def test_run_refuses(frame: bytes) -> bool:
    """True for a frame BPF_PROG_TEST_RUN refuses as a socket buffer (EINVAL): an IPv4 frame shorter than
    Ethernet + 20 bytes, an IPv6 one shorter than Ethernet + 40 (the kernel reads the addresses of the fixed
    header before the program runs). On an interface such frames reach the program, which hands them up
    (``malformed``), the same code as the XDP program's."""
    if len(frame) < 14:
        return True
    ethertype = frame[12:14]
    return (ethertype == b"\x08\x00" and len(frame) < 34) or (ethertype == b"\x86\xdd" and len(frame) < 54)


test_run_refuses.__test__ = False  # not a pytest test


def _executor_base():
    from encapfwd.xdp.offline import XDPExecutor

    return XDPExecutor


class TCExecutor(_executor_base()):
    """``encapfwd replay --engine tc``: the TC program on each frame (BPF_PROG_TEST_RUN on a socket buffer),
    the Python dispatcher for what it hands up (TC_ACT_OK)."""

    KIND = "tc"
    DATAPLANE = TCDataPlane
    FORWARD, DROP, PASS = TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_OK

    def _run(self, frame: bytes):
        if test_run_refuses(frame):  # what the program does with it on an interface: hand it up
            return TC_ACT_OK, frame
        return self.dataplane.test_run(frame)


__all__ = [
    "PROGRAM",
    "TC_ACT_OK",
    "TC_ACT_REDIRECT",
    "TC_ACT_SHOT",
    "TCDataPlane",
    "TCExecutor",
    "attached_owners",
    "object_path",
    "tcx_attach",
    "tcx_available",
    "tcx_detach_link",
    "tcx_query",
    "test_run_refuses",
]
