"""A real Linux kernel as a back-end server: user-mode-linux booted on a TAP device in a namespace.

The machine's own kernel may lack modules a test needs (ipip, ip_gre); Debian's ``user-mode-linux`` package
is a Linux 6.1 kernel that runs as an ordinary process and ships them. :class:`UML` boots it with

- the host's ``/`` as its root filesystem (``rootfstype=hostfs``, read-only) under a tmpfs overlay, so the
  guest can write anywhere (``/etc``, ``/run``) and nothing reaches the host's files;
- ``/usr/lib/uml/modules`` bound on ``/lib/modules``, so a plain ``modprobe ipip`` works;
- ``eth0`` on a TAP device in a network namespace, through the classic ``tuntap`` transport (complete
  checksums; the vector transport leaves partial checksums);
- a host directory mounted at ``/lab`` in the guest: the host drops shell scripts there, a runner in the
  guest runs each one and writes back its output and exit code (``run()``).

Boot takes about 1.5-2.5 s where it boots at all: on a host whose CPU has AMX (a larger XSTATE than UML 6.1
passes to ptrace) it panics at once, so :mod:`.kernels` decides by a real boot, not by the binary's presence.
``stop()`` powers the guest off (sysrq ``o``) and then kills every host process of the guest by PID: a
user-mode-linux killed with SIGKILL leaves its helper processes running otherwise.

Requirements: root, ``/usr/bin/linux.uml`` and ``/usr/lib/uml/modules/<version>`` (Debian package
``user-mode-linux``), ``modprobe`` (``kmod``), ``ip`` (``iproute2``), ``/dev/net/tun``. :func:`unavailable_reason`
says what is missing; :class:`UML` raises :class:`~encapfwd.lab.netns.LabUnavailable` with that text.

Example::

    with Namespace("lab") as ns:
        ns.tap("efwtap0")
        ns.ip("addr", "add", "192.0.2.1/24", "dev", "efwtap0")
        with UML(ns, "efwtap0", address="192.0.2.10/24", gateway="192.0.2.1") as guest:
            result = guest.run("modprobe ipip && ip -o link show tunl0")
            assert result.returncode == 0, result.output
"""

from __future__ import annotations

import os
from typing import List, Optional

from encapfwd.lab.guest import Guest, GuestError, GuestResult, cleanup_stale, quote
from encapfwd.lab.netns import Namespace, lab_unavailable_reason

UML_BINARY = "/usr/bin/linux.uml"
UML_MODULES = "/usr/lib/uml/modules"

UMLError = GuestError
UMLResult = GuestResult


def _module_versions(modules_dir: str = UML_MODULES) -> List[str]:
    try:
        return sorted(d for d in os.listdir(modules_dir) if os.path.isfile(os.path.join(modules_dir, d, "modules.dep")))
    except OSError:
        return []


def unavailable_reason(binary: Optional[str] = None, modules_dir: Optional[str] = None) -> Optional[str]:
    """Why a user-mode-linux guest cannot be started here (a missing file), or None. Whether it *boots* is
    another question, which only a boot answers (:func:`encapfwd.lab.kernels.select`)."""
    binary = binary or UML_BINARY
    modules_dir = modules_dir or UML_MODULES
    reason = lab_unavailable_reason(("ip", "modprobe"))
    if reason:
        return reason
    if not os.access(binary, os.X_OK):
        return f"{binary} is missing: install the Debian package user-mode-linux"
    if not _module_versions(modules_dir):
        return f"no kernel modules in {modules_dir}: install the Debian package user-mode-linux"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (TUN/TAP support is needed for the guest's network)"
    return None


_INIT = r"""#!/bin/sh
# encapfwd lab: user-mode-linux init, stage 1 (runs on the read-only hostfs root)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
fail() {{ echo "encapfwd-lab: $*" >&2; echo o > /proc/sysrq-trigger 2>/dev/null; sleep 30; exit 1; }}
mount -t proc proc /proc 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /mnt || fail "tmpfs on /mnt"
K=$(uname -r)
grep -qw overlay /proc/filesystems || insmod {modules}/$K/kernel/fs/overlayfs/overlay.ko || fail "insmod overlay"
mkdir -p /mnt/upper /mnt/work /mnt/root
mount -t overlay overlay -o lowerdir=/,upperdir=/mnt/upper,workdir=/mnt/work /mnt/root || fail "overlay"
mkdir -p /mnt/root/lib/modules /mnt/root/lab
mount --bind {modules} /mnt/root/lib/modules || fail "bind modules"
mount -t proc proc /mnt/root/proc
mount -t sysfs sysfs /mnt/root/sys
mount -t tmpfs -o mode=0755 tmpfs /mnt/root/run
mount -t hostfs hostfs /mnt/root/lab -o {workdir} || fail "hostfs {workdir}"
exec chroot /mnt/root /bin/sh /lab/runner.sh
"""


class UML(Guest):
    """One user-mode-linux guest (see :class:`encapfwd.lab.guest.Guest` for the parameters)."""

    kind = "UML"

    def __init__(self, ns: Optional[Namespace], tap: Optional[str], *, binary: Optional[str] = None,
                 modules_dir: Optional[str] = None, **kwargs):
        super().__init__(ns, tap, **kwargs)
        self.binary = binary or UML_BINARY
        self.modules_dir = modules_dir or UML_MODULES

    @property
    def label(self) -> str:
        versions = _module_versions(self.modules_dir)
        return f"UML {versions[-1]}" if versions else "UML"

    def unavailable_reason(self) -> Optional[str]:
        return unavailable_reason(self.binary, self.modules_dir)

    def prepare(self) -> None:
        self._write("init.sh", _INIT.format(modules=quote(self.modules_dir), workdir=quote(self.workdir)), 0o755)

    def kernel_argv(self) -> List[str]:
        umid = os.path.basename(self.workdir)
        argv = [
            self.binary, f"mem={self.mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro",
            f"init={self.workdir}/init.sh", f"umid={umid}", f"uml_dir={self.workdir}",
            "con=null", "con0=null,fd:1", "ssl=null", "quiet",
        ]
        if self.tap:
            argv.append(f"eth0=tuntap,{self.tap},{self.mac}")
        return argv

    boot_argv = kernel_argv


__all__ = ["UML", "UMLError", "UMLResult", "cleanup_stale", "unavailable_reason"]
