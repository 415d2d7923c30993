"""The XDP data plane's foundation: build BPF C sources and drive them from Python.

- :mod:`encapfwd.xdp.build` compiles a BPF C source (shipped in this package, or any absolute path) with
  clang into a cached object file.
- :mod:`encapfwd.xdp.libbpf` is a small ``ctypes`` binding to the distribution's ``libbpf.so.1``: load an
  object, read and write its maps, run a program on a frame (``BPF_PROG_TEST_RUN``), attach it to an
  interface.

Requirements: Debian packages ``clang libbpf-dev bpftool`` (``./dev setup`` installs them) and root
(CAP_BPF + CAP_NET_ADMIN) to load programs; :func:`encapfwd.xdp.libbpf.available` says whether this machine
can. Neither module is imported by the rest of encapfwd unless the XDP data plane is used.
"""

from __future__ import annotations

from encapfwd.errors import EncapfwdError


class BPFError(EncapfwdError):
    """A BPF build, load, map or attach operation failed; the message is one line naming the operation.

    ``errno`` is the error number when the kernel or libbpf gave one; ``log`` holds the verifier's or
    libbpf's full output when there is one (the message carries only its most telling line).
    """

    def __init__(self, message: str, *, errno: int = 0, log: str = ""):
        super().__init__(message)
        self.errno = errno
        self.log = log


__all__ = ["BPFError"]
