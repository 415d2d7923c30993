"""Network namespaces, veth pairs, TAP devices and AF_PACKET sockets, with guaranteed clean-up.

Example::

    with Namespace("disp") as d, Namespace("srv") as s:
        veth_pair(d, "efwd0", s, "efws0")
        d.ip("addr", "add", "192.0.2.1/24", "dev", "efwd0")
        d.ip("link", "set", "efwd0", "up")
        s.run(["sh", "-c", "echo hello"])
        sock = packet_socket(d, "efwd0")       # AF_PACKET, ETH_P_ALL, bound to efwd0 inside d

Names: a namespace is called ``efw<pid>-<label>-<n>``; deleting a namespace removes every interface in it,
so clean-up is ``ip netns del`` (plus killing processes a caller started inside, which is the caller's job).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import socket
import subprocess
from typing import Iterable, List, Optional, Sequence

from encapfwd.errors import LabUnavailable  # defined with the other exceptions; importable from here too

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
NETNS_DIR = "/run/netns"
PREFIX = "efw"

_counter = itertools.count(1)
_libc = None


def lab_unavailable_reason(tools: Iterable[str] = ("ip",)) -> Optional[str]:
    """Why a namespace lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "network labs need root (network namespaces, TAP devices, AF_PACKET sockets)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = {"ip": "iproute2", "ethtool": "ethtool", "modprobe": "kmod", "tcpdump": "tcpdump"}
        names = ", ".join(f"{tool} (Debian package {packages.get(tool, tool)})" for tool in missing)
        return f"network labs need {names}"
    return None


def require_lab(tools: Iterable[str] = ("ip",)) -> None:
    reason = lab_unavailable_reason(tools)
    if reason:
        raise LabUnavailable(reason)


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(argv: Sequence[str], *, check: bool = True, input: Optional[str] = None, timeout: float = 30,
         env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise LabUnavailable(
            f"command failed ({proc.returncode}): {' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


class Namespace:
    """A network namespace that exists between ``create()`` (or ``with``) and ``delete()``."""

    def __init__(self, label: str = "ns"):
        if not label.replace("_", "").isalnum():
            raise ValueError(f"namespace label must be alphanumeric: {label!r}")
        self.name = f"{PREFIX}{os.getpid()}-{label}-{next(_counter)}"
        self.created = False

    # -- life cycle -------------------------------------------------------------------------------------
    def create(self) -> "Namespace":
        require_lab()
        _run(["ip", "netns", "add", self.name])
        self.created = True
        self.ip("link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        if self.created:
            _run(["ip", "netns", "del", self.name], check=False)
            self.created = False

    def __enter__(self) -> "Namespace":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()

    # -- commands ---------------------------------------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> List[str]:
        """The command line that runs *argv* inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, input: Optional[str] = None,
            timeout: float = 30, env=None) -> subprocess.CompletedProcess:
        """Run *argv* inside the namespace and wait; text output in ``.stdout`` / ``.stderr``."""
        return _run(self.argv(argv), check=check, input=input, timeout=timeout, env=env)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start *argv* inside the namespace (the caller stops it). ``ip netns exec`` execs, so the PID is
        the command's own."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value) -> None:
        """Set a sysctl of this namespace (``net.ipv4.conf.all.rp_filter`` form or a /proc/sys path)."""
        path = key if key.startswith("/proc/sys/") else "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", 'echo "$1" > "$2"', "sh", str(value), path])

    def ethtool_offload(self, dev: str, **features: bool) -> None:
        """``ethtool -K dev tx off ...``: e.g. ``tx=False`` so AF_PACKET sees complete checksums."""
        args = []
        for name, on in features.items():
            args += [name.replace("_", "-"), "on" if on else "off"]
        self.run(["ethtool", "-K", dev, *args])

    def tap(self, name: str, *, up: bool = True) -> str:
        """Create a persistent TAP device *name* in this namespace (a user-mode-linux guest attaches to it)."""
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        if up:
            self.ip("link", "set", name, "up")
        return name

    def mac(self, dev: str) -> str:
        return self.run(["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()

    # -- sockets ----------------------------------------------------------------------------------------
    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket created inside this namespace (it stays there after the calling thread switches back)."""
        return self.call(socket.socket, family, type, proto)

    def call(self, fn, *args):
        """``fn(*args)`` run by the calling thread inside this namespace (interface names, indexes and BPF
        queries by interface are this namespace's), then back in its own."""
        own = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(os.path.join(NETNS_DIR, self.name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                return fn(*args)
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)


def veth_pair(ns_a: Namespace, name_a: str, ns_b: Namespace, name_b: str, *, up: bool = True) -> None:
    """A veth pair with end *name_a* in *ns_a* and *name_b* in *ns_b*, both up."""
    _run(["ip", "-n", ns_a.name, "link", "add", name_a, "type", "veth", "peer", "name", name_b,
          "netns", ns_b.name])
    if up:
        ns_a.ip("link", "set", name_a, "up")
        ns_b.ip("link", "set", name_b, "up")


def packet_socket(ns: Namespace, ifname: str, *, timeout: float = 0.2) -> socket.socket:
    """An AF_PACKET raw socket bound to *ifname* inside *ns*: ``send(frame)`` and ``recv(65535)``."""
    sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    # bind() resolves the interface name in the socket's own namespace
    sock.bind((ifname, 0))
    sock.settimeout(timeout)
    return sock


def cleanup_stale() -> List[str]:
    """Delete lab namespaces left by processes that no longer exist (``efw<pid>-...``); return their names."""
    removed = []
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or os.path.exists(f"/proc/{pid_text}"):
            continue
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


__all__ = [
    "LabUnavailable",
    "Namespace",
    "cleanup_stale",
    "lab_unavailable_reason",
    "packet_socket",
    "require_lab",
    "veth_pair",
]
