"""systemd integration of ``encapfwd run`` (``Type=notify``), standard library only.

- :class:`Notifier`: ``sd_notify(3)`` in a few lines — one datagram per message on the ``AF_UNIX`` socket
  named by ``$NOTIFY_SOCKET`` (a path, or an abstract name written ``@name``). The variable is read once and
  removed from the environment, so neither the forked workers nor ExaBGP ever speak for the service. Without
  ``$NOTIFY_SOCKET`` every call does nothing; a send that fails is ignored (systemd is advice, never a reason
  to stop forwarding).
- :func:`journal_priorities`: true when standard error *is* the journal (``$JOURNAL_STREAM`` names the
  device and inode of descriptor 2); then every log line carries a syslog priority prefix (``<3>`` … ``<7>``,
  see :func:`priority_of`), which journald strips and stores as the line's priority.

The sequence the controller sends (engines/live.py; docs/operations.md):

- start: ``STATUS=starting …``; ``READY=1`` + ``STATUS=…`` once the plan is installed in every executor and,
  with BGP configured, once the session is up or its first attempt failed (at most :data:`BGP_READY_BOUND`
  seconds after start);
- SIGHUP or a control ``reload``: ``RELOADING=1`` + ``MONOTONIC_USEC=…`` (systemd ≥ 253 wants it), then
  ``READY=1`` + ``STATUS=…`` when the reload finished — applied, or failed with the old plan kept, then the
  status says ``reload failed, running the previous plan: ERROR``;
- SIGTERM/SIGINT: ``STOPPING=1`` + ``STATUS=stopping …``;
- with ``WatchdogSec=`` (``$WATCHDOG_USEC``): ``WATCHDOG=1`` from the controller's loop every quarter of the
  period, so systemd restarts a controller whose loop is stuck.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

from encapfwd.errors import one_line

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_JOURNAL = "JOURNAL_STREAM"
ENV_WATCHDOG, ENV_WATCHDOG_PID = "WATCHDOG_USEC", "WATCHDOG_PID"
#: seconds after start at most before READY=1 when the BGP session neither came up nor failed yet
BGP_READY_BOUND = 30.0
#: characters of a STATUS= text at most
STATUS_LIMIT = 400


class Notifier:
    """``sd_notify`` on ``$NOTIFY_SOCKET`` (see the module's text)."""

    def __init__(self, address: Optional[str] = None, *, take_from_env: bool = True):
        if address is None and take_from_env:
            address = os.environ.pop(ENV_SOCKET, None)  # unset: children must not notify for us
        self.address = None
        if address and address.startswith(("/", "@")):
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sent = []  # messages sent (for the report and tests)
        self._sock: Optional[socket.socket] = None
        #: WatchdogSec= of the unit (seconds; None without): WATCHDOG=1 at least twice per period
        self.watchdog: Optional[float] = None
        usec = os.environ.pop(ENV_WATCHDOG, None) if take_from_env else None
        pid = os.environ.pop(ENV_WATCHDOG_PID, None) if take_from_env else None
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send the ``KEY=VALUE`` *fields* as one datagram (newline-separated); False when not sent."""
        if self.address is None:
            return False
        message = "\n".join(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError:
            return False
        self.sent.append(message)
        return True

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={status_text(text)}")

    def ready(self, text: str) -> bool:
        return self.notify("READY=1", f"STATUS={status_text(text)}")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, text: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status_text(text)}")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close_in_child(self) -> None:
        """In a forked worker: never notify (the socket is the parent's)."""
        self.close()
        self.address = None


def status_text(text: str) -> str:
    """One line, at most :data:`STATUS_LIMIT` characters (STATUS= is a single line)."""
    return one_line(text, STATUS_LIMIT)


def journal_priorities(fd: int = 2) -> bool:
    """True when descriptor *fd* is the journal's stream ($JOURNAL_STREAM is ``DEVICE:INODE`` of it)."""
    value = os.environ.get(ENV_JOURNAL, "")
    try:
        device, inode = (int(part) for part in value.split(":", 1))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == device and st.st_ino == inode


#: syslog priorities (sd-daemon.h): error, warning, notice, info
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6

_ERROR_WORDS = ("error:", "failed", "cannot", "could not", "refused", "died", "exited (")
_WARNING_WORDS = ("warning:", "lost", "down", "not up", "unresolved", "dropping", "fallback", "no relay")


def priority_of(line: str) -> int:
    """The syslog priority of a log line, from its words: ``error:``/failures → 3, warnings, losses and
    things down → 4, start, stop and reload lines → 5, everything else 6."""
    low = line.lower()
    if low.startswith("error:") or any(word in low for word in _ERROR_WORDS):
        return ERR
    if any(word in low for word in _WARNING_WORDS):
        return WARNING
    if low.startswith(("engine:", "forwarding ", "stopped:", "configuration reloaded", "metrics on")):
        return NOTICE
    return INFO


def servers_up(report: dict) -> tuple:
    """``(up, total)`` servers in a controller report."""
    servers = report.get("servers") if isinstance(report, dict) else None
    if not isinstance(servers, dict):
        return 0, 0
    rows = [r for r in servers.values() if isinstance(r, dict)]
    return sum(1 for r in rows if r.get("state") != "down"), len(rows)


__all__ = ["BGP_READY_BOUND", "Notifier", "journal_priorities", "priority_of", "servers_up", "status_text"]


class Lifecycle:
    """What the controller tells systemd, and when (the sequence in the module's text). The controller calls
    :meth:`installed` once every executor runs the first plan, :meth:`poll` from its loop, :meth:`reloading`
    when a reload starts, :meth:`reloaded` when it ended (applied or not) and :meth:`stopping`."""

    def __init__(self, controller, notifier: Optional[Notifier] = None, clock=time.monotonic):
        self.controller = controller
        self.notifier = notifier if notifier is not None else Notifier()
        self.clock = clock
        self.state = "starting"  # starting, waiting-bgp, ready, reloading, stopping
        self.since = clock()
        self._status = ""
        self.last_reload: Optional[dict] = None
        self._petted = -1e18  # when WATCHDOG=1 was sent last
        if self.notifier.enabled:
            self._send_status(f"starting: {getattr(controller, 'engine', '?')} engine")

    def _send_status(self, text: str) -> None:
        self._status = text
        self.notifier.status(text)

    def describe(self, error: Optional[str] = None) -> str:
        """``xdp (generic); 3/4 servers up; plan 0123abcd4567[; bgp session up, 2 route(s) announced]``."""
        c = self.controller
        parts = []
        xdp = getattr(c, "xdp", None)
        parts.append(f"{c.engine} ({xdp.mode})" if xdp is not None and getattr(xdp, "mode", None) else c.engine)
        try:
            plan = c.plan
            up = sum(1 for s in plan.servers if s.up and s.weight > 0)
            parts.append(f"{up}/{len(plan.servers)} servers up")
            parts.append(f"plan {plan.digest[:12]}")
        except AttributeError:
            pass
        bgp = getattr(c, "bgp", None)
        if bgp is not None:
            routes = len(bgp.announced)
            parts.append(f"bgp session {bgp.session}, {routes} route(s) "
                         + ("announced" if bgp.session == "up" else "to announce"))
        text = "; ".join(parts)
        if error:
            text = f"reload failed, running the previous plan: {error}; {text}"
        return text

    def _bgp_settled(self) -> bool:
        bgp = getattr(self.controller, "bgp", None)
        if bgp is None:
            return True
        if bgp.session in ("up", "down") or bgp.failed_attempts > 0:
            return True
        return self.clock() - self.since >= BGP_READY_BOUND

    def installed(self) -> None:
        """The first plan runs in every executor (and BGP, when configured, was started)."""
        self.state = "waiting-bgp"
        if getattr(self.controller, "bgp", None) is not None:
            self._send_status(f"{self.describe()}; waiting for the BGP session")
        self.poll()

    def poll(self) -> None:
        period = self.notifier.watchdog
        if period and self.notifier.enabled and self.clock() - self._petted >= period / 4:
            self._petted = self.clock()  # the loop runs (it wakes at least once a second)
            self.notifier.notify("WATCHDOG=1")
        if not self.notifier.enabled:
            if self.state == "waiting-bgp" and self._bgp_settled():
                self.state = "ready"
            return
        if self.state == "waiting-bgp":
            if self._bgp_settled():
                self.state = "ready"
                self._status = self.describe()
                self.notifier.ready(self._status)
            return
        if self.state == "ready":
            error = getattr(self.controller, "last_reload_error", None)
            text = self.describe(error if self._status.startswith("reload failed") else None)
            if text != self._status:
                self._send_status(text)

    def reloading(self) -> None:
        if self.state in ("ready", "reloading"):
            if self.state == "ready":
                self.notifier.reloading()
            self.state = "reloading"

    def reloaded(self) -> None:
        if self.state != "stopping":  # the report's engine.last_reload (status page)
            error = getattr(self.controller, "last_reload_error", None)
            self.last_reload = {"at": time.time(), "ok": error is None, "error": error}
        if self.state != "reloading":
            return
        self.state = "ready"
        self._status = self.describe(getattr(self.controller, "last_reload_error", None))
        self.notifier.ready(self._status)

    def stopping(self) -> None:
        if self.state != "stopping":
            self.state = "stopping"
            self.notifier.stopping(f"stopping: {self.describe()}")


__all__.append("Lifecycle")


class _Quiet:
    """A lifecycle that tells nobody anything (a controller built without ``__init__``, e.g. in tests)."""

    state = "ready"
    last_reload = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


#: the controller's class default (engines/live.py)
QUIET = _Quiet()
__all__.append("QUIET")
