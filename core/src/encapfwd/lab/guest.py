"""A real Linux kernel as a lab back-end: what every kind of guest shares (see :mod:`.kernels` for the kinds).

A guest is a Linux kernel booted as a process on the host, with

- the host's ``/`` as its root filesystem, read-only, under a tmpfs overlay, so the guest can write anywhere
  (``/etc``, ``/run``) and nothing reaches the host's files, and the host's programs (``ip``, ``modprobe``,
  this project's Python) run inside it;
- the guest kernel's own modules on ``/lib/modules``, so a plain ``modprobe ipip`` works;
- ``eth0`` on a TAP device in a network namespace;
- a host work folder mounted at ``/lab`` in the guest: the host drops shell scripts there, a runner in the
  guest runs each one and writes back its output and exit code (:meth:`Guest.run`).

Subclasses say how to boot (:meth:`Guest.boot_argv`, :meth:`Guest.prepare`): :class:`encapfwd.lab.uml.UML`
(user-mode-linux, about 2 s) and :class:`encapfwd.lab.qemu.QEMU` (a distribution kernel under QEMU, with
KVM or TCG). ``stop()`` powers the guest off and then kills every host process of it.
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

from encapfwd.errors import GuestError  # defined with the other exceptions; importable from here too
from encapfwd.lab.netns import LabUnavailable, Namespace

_live: "weakref.WeakSet[Guest]" = weakref.WeakSet()

#: names of guest work folders: ``efwuml<creator pid>-…`` (the prefix predates QEMU guests)
WORKDIR_PREFIX = "efwuml"


@frozen
class GuestResult:
    returncode: int
    output: str  # stdout and stderr, interleaved

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


RUNNER = r"""#!/bin/sh
# encapfwd lab: guest runner (inside the overlay root)
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
        echo {halt} > /proc/sysrq-trigger
        sleep 30
    fi
    sleep {poll}
done
"""


class Guest:
    """One guest kernel; use as a context manager (boots on enter, always stops on exit).

    :param ns: the namespace holding *tap*; the guest's ``eth0`` is attached to it.
    :param tap: an existing TAP device in *ns* (see :meth:`Namespace.tap`), or None for no network.
    :param mac: the guest's ``eth0`` MAC.
    :param address: ``eth0``'s address with prefix, e.g. ``192.0.2.10/24`` (None: no address).
    :param gateway: the guest's default route (None: no default route).
    :param mem: guest memory.
    """

    #: short name of the kind, shown in test output and by ``encapfwd lab`` (``UML 6.1``, ``QEMU+TCG 6.1``)
    kind = "guest"
    #: the sysrq that ends the guest (``o`` powers off; ``b`` reboots, which ``-no-reboot`` turns into an exit)
    halt_sysrq = "o"
    #: how often the runner looks for a new command (seconds)
    poll = 0.02

    def __init__(self, ns: Optional[Namespace], tap: Optional[str], *, mac: str = "02:00:00:00:00:0a",
                 address: Optional[str] = None, gateway: Optional[str] = None, mem: str = "256M",
                 boot_timeout: float = 30.0, hostname: str = "encapfwd-backend"):
        self.ns = ns
        self.tap = tap
        self.mac = mac
        self.address = address
        self.gateway = gateway
        self.mem = mem
        self.boot_timeout = boot_timeout
        self.hostname = hostname
        self.workdir: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.boot_seconds: Optional[float] = None
        self._seq = 0
        self._log = None

    # -- what a kind provides -----------------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """Why this kind cannot run here (a missing file or package), or None."""
        return None

    def prepare(self) -> None:
        """Write what the boot needs into ``self.workdir`` (init scripts, an initramfs)."""

    def boot_argv(self) -> List[str]:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """What ran, e.g. ``UML 6.1.176`` or ``QEMU+TCG 6.1.0-57-amd64``."""
        return self.kind

    # -- life cycle -------------------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def _write(self, name: str, text: str, mode: int = 0o644) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def start(self) -> "Guest":
        reason = self.unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        # the creator's PID in the name lets cleanup_stale() find guests whose test process died
        self.workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
        os.chmod(self.workdir, 0o755)
        network = []
        if self.address:
            network.append(f"    ip addr add {quote(self.address)} dev eth0")
        if self.gateway:
            network.append(f"    ip route add default via {quote(self.gateway)}")
        self._write("runner.sh", RUNNER.format(hostname=quote(self.hostname), network="\n".join(network) or "    :",
                                               halt=self.halt_sysrq, poll=self.poll), 0o755)
        try:
            self.prepare()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            raise
        self._log = open(os.path.join(self.workdir, "console.log"), "wb")
        argv = self.boot_argv()
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

    def __enter__(self) -> "Guest":
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
                raise GuestError(f"{self.kind} exited during {what}; console:\n{self.console()}")
            if time.monotonic() > deadline:
                raise GuestError(f"{self.kind}: no answer within {timeout:g} s ({what}); console:\n{self.console()}")
            time.sleep(0.01)

    def run(self, script: str, timeout: float = 60.0) -> GuestResult:
        """Run *script* with ``/bin/sh`` inside the guest, as root, and wait for it.

        Output is collected in a file, so a command started in the background must redirect its own output
        (or it keeps writing to the file after ``run`` returned, which is harmless).
        """
        if self.proc is None or self.proc.poll() is not None:
            raise GuestError(f"the {self.kind} guest is not running")
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
        return GuestResult(rc, output)

    def stop(self, timeout: float = 5.0) -> None:
        """Power the guest off, then make sure every host process of it is gone; remove the work folder."""
        proc = self.proc
        if proc is not None:
            # only a runner that is up can read the halt file (a guest that never booted is killed at once)
            if proc.poll() is None and self.workdir and os.path.exists(os.path.join(self.workdir, "ready")):
                try:
                    open(os.path.join(self.workdir, "halt"), "w").close()
                    proc.wait(timeout)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                # still running and not reaped: its PID (and process group) cannot have been reused
                kill_tree(proc.pid)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            # helpers that outlived the main process, found by this guest's unique work folder
            if self.workdir:
                _kill_workdir(os.path.basename(self.workdir))
            self.proc = None
        _live.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def guest_processes():
    """(pid, tag, workdir) of every guest process started by this module: its command line names its work
    folder (``umid=efwuml…`` for user-mode-linux, ``…/efwuml…/…`` paths for QEMU)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for arg in argv:
            start = arg.find(f"/{WORKDIR_PREFIX}")
            if arg.startswith(f"umid={WORKDIR_PREFIX}"):
                tag = arg[len("umid="):]
            elif start >= 0 and ("qemu" in argv[0] or "linux" in argv[0]):
                tag = arg[start + 1:].split("/", 1)[0].split(",", 1)[0]
            else:
                continue
            yield int(entry), tag, os.path.join(tempfile.gettempdir(), tag)
            break


def _kill_workdir(tag: str) -> None:
    for pid, other, _ in list(guest_processes()):
        if other == tag:
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


def kill_tree(pid: int) -> None:
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
    """Kill guests whose creating process no longer exists (it was SIGKILLed, so its clean-up never ran),
    and remove their work folders. Returns the PIDs killed. Touches only guests started by this module."""
    killed = []
    for pid, tag, workdir in list(guest_processes()):
        creator = tag[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if not creator.isdigit() or os.path.exists(f"/proc/{creator}"):
            continue
        _kill_workdir(tag)
        killed.append(pid)
        if workdir and os.path.basename(workdir) == tag:
            shutil.rmtree(workdir, ignore_errors=True)
    # work folders of dead creators whose guests are gone too
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        creator = name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if name.startswith(WORKDIR_PREFIX) and creator.isdigit() and not os.path.exists(f"/proc/{creator}"):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    return killed


@atexit.register
def _stop_all() -> None:
    for guest in list(_live):
        guest.stop(timeout=1.0)


__all__ = ["Guest", "GuestError", "GuestResult", "cleanup_stale", "guest_processes", "kill_tree", "quote"]
