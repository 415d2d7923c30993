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

from encapfwd.errors import BPFError  # defined with the other exceptions; importable from here too

__all__ = ["BPFError"]
