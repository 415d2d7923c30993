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

Boot takes about 1.5-2.5 s. ``stop()`` powers the guest off (sysrq ``o``) and then kills every host process
of the guest by PID: a user-mode-linux killed with SIGKILL leaves its helper processes running otherwise.

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

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from typing import List, Optional

from attrs import frozen

from ..errors import EncapfwdError
from .netns import LabUnavailable, Namespace, lab_unavailable_reason

UML_BINARY = "/usr/bin/linux.uml"
UML_MODULES = "/usr/lib/uml/modules"

_live: "weakref.WeakSet[UML]" = weakref.WeakSet()


class UMLError(EncapfwdError):
    """The guest did not boot, did not answer in time, or died."""


@frozen
class UMLResult:
    returncode: int
    output: str  # stdout and stderr, interleaved

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _module_versions(modules_dir: str = UML_MODULES) -> List[str]:
    try:
        return sorted(d for d in os.listdir(modules_dir) if os.path.isfile(os.path.join(modules_dir, d, "modules.dep")))
    except OSError:
        return []


def unavailable_reason(binary: str = UML_BINARY, modules_dir: str = UML_MODULES) -> Optional[str]:
    """Why a user-mode-linux guest cannot run here, or None when it can."""
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


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


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

_RUNNER = r"""#!/bin/sh
# encapfwd lab: user-mode-linux runner, stage 2 (inside the overlay root)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C
cd /
hostname {hostname} 2>/dev/null
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
{network}
fi
: > /lab/ready.tmp && mv /lab/ready.tmp /lab/ready
while :; do
    for f in /lab/cmd-*.sh; do
        [ -e "$f" ] || continue
        n=${{f#/lab/cmd-}}; n=${{n%.sh}}
        /bin/sh "$f" > "/lab/out-$n" 2>&1 < /dev/null
        echo $? > "/lab/rc-$n.tmp"
        mv "/lab/rc-$n.tmp" "/lab/rc-$n"
        rm -f "$f"
    done
    if [ -e /lab/halt ]; then
        sync
        echo o > /proc/sysrq-trigger
        sleep 30
    fi
    sleep 0.02
done
"""


class UML:
    """One user-mode-linux guest; use as a context manager (boots on enter, always stops on exit).

    :param ns: the namespace holding *tap*; the guest's ``eth0`` is attached to it.
    :param tap: an existing TAP device in *ns* (see :meth:`Namespace.tap`), or None for no network.
    :param mac: the guest's ``eth0`` MAC.
    :param address: ``eth0``'s address with prefix, e.g. ``192.0.2.10/24`` (None: no address).
    :param gateway: the guest's default route (None: no default route).
    :param mem: guest memory (``256M`` is plenty for shell scripts and a Python listener).
    """

    def __init__(self, ns: Optional[Namespace], tap: Optional[str], *, mac: str = "02:00:00:00:00:0a",
                 address: Optional[str] = None, gateway: Optional[str] = None, mem: str = "256M",
                 binary: str = UML_BINARY, modules_dir: str = UML_MODULES, boot_timeout: float = 30.0,
                 hostname: str = "encapfwd-backend"):
        self.ns = ns
        self.tap = tap
        self.mac = mac
        self.address = address
        self.gateway = gateway
        self.mem = mem
        self.binary = binary
        self.modules_dir = modules_dir
        self.boot_timeout = boot_timeout
        self.hostname = hostname
        self.workdir: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.boot_seconds: Optional[float] = None
        self._seq = 0
        self._log = None

    # -- life cycle -------------------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

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

    def start(self) -> "UML":
        reason = unavailable_reason(self.binary, self.modules_dir)
        if reason:
            raise LabUnavailable(reason)
        # the creator's PID in the name lets cleanup_stale() find guests whose test process died
        self.workdir = tempfile.mkdtemp(prefix=f"efwuml{os.getpid()}-")
        os.chmod(self.workdir, 0o755)
        network = []
        if self.address:
            network.append(f"    ip addr add {_quote(self.address)} dev eth0")
        if self.gateway:
            network.append(f"    ip route add default via {_quote(self.gateway)}")
        with open(os.path.join(self.workdir, "init.sh"), "w") as f:
            f.write(_INIT.format(modules=_quote(self.modules_dir), workdir=_quote(self.workdir)))
        with open(os.path.join(self.workdir, "runner.sh"), "w") as f:
            f.write(_RUNNER.format(hostname=_quote(self.hostname), network="\n".join(network) or "    :"))
        os.chmod(os.path.join(self.workdir, "init.sh"), 0o755)
        self._log = open(os.path.join(self.workdir, "console.log"), "wb")
        argv = self.kernel_argv()
        if self.ns is not None:
            argv = self.ns.argv(argv)
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.workdir)
        _live.add(self)
        try:
            self._wait_for(os.path.join(self.workdir, "ready"), self.boot_timeout, "boot")
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def __enter__(self) -> "UML":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def console(self, tail: int = 3000) -> str:
        """The end of the guest's console (kernel messages, init errors)."""
        if not self.workdir:
            return ""
        try:
            with open(os.path.join(self.workdir, "console.log"), "rb") as f:
                return f.read()[-tail:].decode(errors="replace")
        except OSError:
            return ""

    def _wait_for(self, path: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc is None or self.proc.poll() is not None:
                raise UMLError(f"user-mode-linux exited during {what}; console:\n{self.console()}")
            if time.monotonic() > deadline:
                raise UMLError(f"user-mode-linux: no answer within {timeout:g} s ({what}); console:\n{self.console()}")
            time.sleep(0.01)

    def run(self, script: str, timeout: float = 60.0) -> UMLResult:
        """Run *script* with ``/bin/sh`` inside the guest, as root, and wait for it.

        Output is collected in a file, so a command started in the background must redirect its own output
        (or it keeps writing to the file after ``run`` returned, which is harmless).
        """
        if self.proc is None or self.proc.poll() is not None:
            raise UMLError("the user-mode-linux guest is not running")
        self._seq += 1
        n = f"{self._seq:05d}"
        tmp = os.path.join(self.workdir, f"cmd-{n}.tmp")
        with open(tmp, "w") as f:
            f.write(script)
        os.rename(tmp, os.path.join(self.workdir, f"cmd-{n}.sh"))
        rc_path = os.path.join(self.workdir, f"rc-{n}")
        self._wait_for(rc_path, timeout, f"command {n}")
        with open(rc_path) as f:
            rc = int(f.read().strip() or "255")
        with open(os.path.join(self.workdir, f"out-{n}"), errors="replace") as f:
            output = f.read()
        for name in (f"rc-{n}", f"out-{n}"):
            try:
                os.unlink(os.path.join(self.workdir, name))
            except OSError:
                pass
        return UMLResult(rc, output)

    def stop(self, timeout: float = 5.0) -> None:
        """Power the guest off, then make sure every host process of it is gone; remove the work folder."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None and self.workdir:
                try:
                    open(os.path.join(self.workdir, "halt"), "w").close()
                    proc.wait(timeout)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                # still running and not reaped: its PID (and process group) cannot have been reused
                _kill_tree(proc.pid)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            # helpers that outlived the main process, found by this guest's unique umid
            if self.workdir:
                _kill_umid(os.path.basename(self.workdir))
            self.proc = None
        _live.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _guests():
    """(pid, umid, uml_dir) of every user-mode-linux process started by this module."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        umid = next((a[len("umid="):] for a in argv if a.startswith("umid=efwuml")), None)
        if umid is not None:
            workdir = next((a[len("uml_dir="):] for a in argv if a.startswith("uml_dir=")), None)
            yield int(entry), umid, workdir


def _kill_umid(umid: str) -> None:
    for pid, other, _ in list(_guests()):
        if other == umid:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _children() -> dict:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    return parents


def _kill_tree(pid: int) -> None:
    """SIGKILL *pid*, its process group and all its descendants (user-mode-linux spawns helpers)."""
    tree = _children()
    victims, todo = [], [pid]
    while todo:
        current = todo.pop()
        victims.append(current)
        todo.extend(tree.get(current, ()))
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def cleanup_stale() -> List[int]:
    """Kill user-mode-linux guests whose creating process no longer exists (it was SIGKILLed, so its
    clean-up never ran), and remove their work folders. Returns the PIDs killed. Touches only guests started
    by this module (``umid=efwuml<pid>-...``)."""
    killed = []
    for pid, umid, workdir in list(_guests()):
        creator = umid[len("efwuml"):].split("-", 1)[0]
        if not creator.isdigit() or os.path.exists(f"/proc/{creator}"):
            continue
        _kill_umid(umid)
        killed.append(pid)
        if workdir and os.path.basename(workdir) == umid:
            shutil.rmtree(workdir, ignore_errors=True)
    return killed


@atexit.register
def _stop_all() -> None:
    for guest in list(_live):
        guest.stop(timeout=1.0)


__all__ = ["UML", "UMLError", "UMLResult", "cleanup_stale", "unavailable_reason"]
