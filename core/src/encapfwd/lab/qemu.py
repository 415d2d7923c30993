"""A real Linux kernel as a back-end server: a distribution kernel under QEMU, on a TAP device in a namespace.

Where user-mode-linux cannot boot (its 6.1 kernel panics on a host CPU with AMX), Debian's
``linux-image-amd64`` runs under ``qemu-system-x86_64``, with KVM where KVM works and TCG (software
emulation) otherwise. The guest is built like the user-mode-linux one (:mod:`.guest`):

- the kernel is ``/boot/vmlinuz-VERSION``, its modules ``/lib/modules/VERSION`` (installed on the host by
  the package; the host's own kernel is another version and never uses them);
- a small initramfs, written for each guest: Debian's static busybox (``busybox-static``) and the modules
  that reach the root filesystem (virtio, 9p, overlay), with an ``/init`` that mounts the host's ``/`` over
  virtio-9p read-only under a tmpfs overlay, the work folder read-write at ``/lab``, and hands over to the
  shared runner;
- ``eth0`` is a virtio NIC on the TAP device, with checksum offloads off (complete checksums on the wire, as
  a packet socket expects);
- the ``pc`` machine: ``microvm`` boots as fast on an idle host, but its only reference for calibrating the
  TSC is the PIT, which fails under TCG on a busy host (the guest then hangs without a clock); ``pc`` has
  HPET and the ACPI PM timer. About 6 s under TCG on an idle host.

No download at run time, nothing written outside the guest's work folder.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
from typing import Dict, Iterable, List, Optional

from encapfwd.lab.guest import Guest
from encapfwd.lab.netns import Namespace, lab_unavailable_reason

QEMU_BINARY = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
#: what the initramfs loads, in this order (dependencies first are added from modules.dep)
BOOT_MODULES = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay")
ACCELS = ("kvm", "tcg")


def kernels(boot: str = "/boot") -> List[str]:
    """Versions with a kernel image in *boot* and its modules in /lib/modules, newest last."""
    found = []
    for image in glob.glob(os.path.join(boot, "vmlinuz-*")):
        version = os.path.basename(image)[len("vmlinuz-"):]
        if os.path.isfile(f"/lib/modules/{version}/modules.dep"):
            found.append(version)
    return sorted(found, key=_version_key)


def _version_key(version: str):
    parts = []
    for chunk in version.replace("-", ".").split("."):
        parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
    return parts


def _is_static(path: str) -> bool:
    """True for a 64-bit ELF executable without a program interpreter (PT_INTERP): statically linked."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if head[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        offset = phoff + i * phentsize
        if offset + 4 > len(head):
            return False
        if struct.unpack_from("<I", head, offset)[0] == 3:  # PT_INTERP
            return False
    return True


def unavailable_reason(accel: str = "tcg") -> Optional[str]:
    """Why a QEMU guest cannot be started here (a missing file or package), or None. Whether it boots is
    answered by a boot (:func:`encapfwd.lab.kernels.select`)."""
    reason = lab_unavailable_reason(("ip",))
    if reason:
        return reason
    if shutil.which(QEMU_BINARY) is None:
        return f"{QEMU_BINARY} is missing: install the Debian package qemu-system-x86"
    if not kernels():
        return "no kernel image in /boot with modules in /lib/modules: install the Debian package linux-image-amd64"
    if not _is_static(BUSYBOX):
        return f"{BUSYBOX} is missing or not static: install the Debian package busybox-static"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (TUN/TAP support is needed for the guest's network)"
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    return None


def _module_closure(version: str, names: Iterable[str]) -> List[str]:
    """Paths (relative to /lib/modules/VERSION) of *names* and what they need, dependencies first. A module
    built into this kernel (``modules.builtin``) is left out."""
    base = f"/lib/modules/{version}"
    deps: Dict[str, List[str]] = {}
    by_name: Dict[str, str] = {}
    with open(os.path.join(base, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
            stem = os.path.basename(path).split(".ko")[0]
            by_name[stem] = path
            by_name[stem.replace("-", "_")] = path
    order: List[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            add(dep)
        order.append(path)

    for name in names:
        path = by_name.get(name)
        if path is not None:  # not a module: built in (or absent, which the boot reports)
            add(path)
    return order


_INIT = r"""#!/bin/busybox sh
# encapfwd lab: QEMU guest init, stage 1 (in the initramfs)
B=/bin/busybox
fail() {{ echo "encapfwd-lab: $*"; $B sleep 1; echo b > /proc/sysrq-trigger; $B sleep 30; }}
$B mkdir -p /proc /sys /dev /host /mnt
$B mount -t proc proc /proc
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "encapfwd-lab: init"
for m in {modules}; do $B insmod /modules/$m || fail "insmod $m"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro root /host || fail "9p root"
$B mount -t tmpfs -o mode=0755 tmpfs /mnt || fail "tmpfs on /mnt"
$B mkdir -p /mnt/upper /mnt/work /mnt/root
$B mount -t overlay overlay -o lowerdir=/host,upperdir=/mnt/upper,workdir=/mnt/work /mnt/root || fail "overlay"
$B mkdir -p /mnt/root/lab
$B mount -t proc proc /mnt/root/proc
$B mount -t sysfs sysfs /mnt/root/sys
$B mount -t devtmpfs devtmpfs /mnt/root/dev
$B mount -t tmpfs -o mode=0755 tmpfs /mnt/root/run
$B mount -t tmpfs -o mode=1777 tmpfs /mnt/root/tmp
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 lab /mnt/root/lab || fail "9p lab"
echo "encapfwd-lab: root mounted"
exec $B chroot /mnt/root /bin/sh /lab/runner.sh
"""


def _cpio(entries) -> bytes:
    """A ``newc`` cpio archive (what the kernel unpacks as an initramfs) of ``(name, mode, data)``."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(list(entries) + [("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % field for field in fields) + encoded
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


class QEMU(Guest):
    """One QEMU guest (see :class:`encapfwd.lab.guest.Guest` for the parameters).

    :param accel: ``kvm`` or ``tcg``.
    :param version: the kernel version (default: the newest in /boot with modules).
    """

    halt_sysrq = "b"  # a reboot, which -no-reboot turns into QEMU's exit (no ACPI needed)
    poll = 0.05  # each look at /lab costs a 9p round trip; under TCG that is emulated work

    def __init__(self, ns: Optional[Namespace], tap: Optional[str], *, accel: str = "tcg",
                 version: Optional[str] = None, mem: str = "384M", boot_timeout: float = 120.0, **kwargs):
        super().__init__(ns, tap, mem=mem, boot_timeout=boot_timeout, **kwargs)
        if accel not in ACCELS:
            raise ValueError(f"accel must be one of {', '.join(ACCELS)}")
        self.accel = accel
        self.version = version

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"QEMU+{self.accel.upper()}"

    @property
    def label(self) -> str:
        return f"{self.kind} {self.version or (kernels() or ['?'])[-1]}"

    def unavailable_reason(self) -> Optional[str]:
        return unavailable_reason(self.accel)

    def prepare(self) -> None:
        if self.version is None:
            self.version = kernels()[-1]
        modules = _module_closure(self.version, BOOT_MODULES)
        entries = [("bin", stat.S_IFDIR | 0o755, b""), ("modules", stat.S_IFDIR | 0o755, b"")]
        with open(BUSYBOX, "rb") as f:
            entries.append(("bin/busybox", stat.S_IFREG | 0o755, f.read()))
        names = []
        for path in modules:
            with open(f"/lib/modules/{self.version}/{path}", "rb") as f:
                name = os.path.basename(path)
                entries.append((f"modules/{name}", stat.S_IFREG | 0o644, f.read()))
                names.append(name)
        entries.append(("init", stat.S_IFREG | 0o755, _INIT.format(modules=" ".join(names)).encode()))
        with open(os.path.join(self.workdir, "initramfs.cpio"), "wb") as f:
            f.write(_cpio(entries))

    def boot_argv(self) -> List[str]:
        accel = "kvm" if self.accel == "kvm" else "tcg"
        argv = [
            QEMU_BINARY, "-machine", f"pc,accel={accel}", "-cpu", "max" if accel == "tcg" else "qemu64",
            "-m", self.mem, "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio", "-kernel", f"/boot/vmlinuz-{self.version}",
            "-initrd", os.path.join(self.workdir, "initramfs.cpio"),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
            "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=root,mount_tag=root",
            "-fsdev", f"local,id=lab,path={self.workdir},security_model=none",
            "-device", "virtio-9p-pci,fsdev=lab,mount_tag=lab",
        ]
        if self.tap:
            argv += [
                "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net0,mac={self.mac},csum=off,guest_csum=off",
            ]
        return argv


__all__ = ["QEMU", "kernels", "unavailable_reason"]
