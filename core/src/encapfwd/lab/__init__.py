"""Network labs on this machine: network namespaces, veth pairs, TAP devices, and user-mode-linux back-ends.

Used by the tests that prove forwarding and back-end setup on real kernels, and by ``encapfwd lab``.

Requirements (checked, with a clear :class:`LabUnavailable` naming what is missing):

- root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``): namespaces, TAP devices, AF_PACKET sockets;
- iproute2 (``ip``), and ``ethtool`` for offload switches;
- for :mod:`encapfwd.lab.uml`: Debian's ``user-mode-linux`` package (``/usr/bin/linux.uml`` and its modules
  in ``/usr/lib/uml/modules/<version>``), ``kmod`` (``modprobe`` inside the guest), ``/dev/net/tun``.

Every object is a context manager and removes what it created, also when a test fails; names carry the
creating process's id (``efw<pid>...``) so :func:`encapfwd.lab.netns.cleanup_stale` can remove leftovers of
processes that died, and nothing else.

Traffic in a lab only goes to addresses inside the namespaces and guests the lab created.
"""

from encapfwd.lab.netns import (
    LabUnavailable,
    Namespace,
    cleanup_stale,
    lab_unavailable_reason,
    packet_socket,
    require_lab,
    veth_pair,
)

__all__ = [
    "LabUnavailable",
    "Namespace",
    "cleanup_stale",
    "lab_unavailable_reason",
    "packet_socket",
    "require_lab",
    "veth_pair",
]
