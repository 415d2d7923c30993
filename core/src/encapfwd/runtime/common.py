"""What every part of the live engine shares: its one-line error and its log line.

The log line (:func:`log`):

- **one write per line.** The whole line, newline included, goes out in a single ``write(2)`` on the
  standard error descriptor (under a lock, so two threads of one process never split each other's lines;
  a line of at most ``PIPE_BUF`` bytes written to a pipe is atomic between processes too — forked workers
  log through the same descriptor). Without a real descriptor (a test's captured ``sys.stderr``) it is one
  ``write`` call on the stream.
- **repeated identical lines are collapsed.** The first :data:`BURST` identical lines in a window of
  :data:`WINDOW` seconds are written; the others are counted, and one line
  ``… N more in the last minute: MESSAGE`` says so when the window ends (on the next log call or
  :func:`flush_log`, which the controller's loop calls about once a second, and at stop).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Dict, List

from encapfwd.errors import (
    LiveError,  # noqa: F401 - defined in errors.py, imported from here by the runtime
    one_line,  # noqa: F401 - defined in errors.py, imported from here by the runtime
)

#: identical lines written in full per window (the rest are counted)
BURST = 5
#: seconds of a rate-limiting window
WINDOW = 60.0
#: distinct messages remembered (the oldest windows are flushed beyond it)
MAX_KEYS = 1024


class _Limiter:
    """Per message: when its window started, how many were written and how many were held back."""

    def __init__(self, burst: int = BURST, window: float = WINDOW, clock=time.monotonic):
        self.burst, self.window, self.clock = burst, window, clock
        self.windows: Dict[str, List] = {}  # key -> [start, written, suppressed]

    def admit(self, key: str) -> bool:
        now = self.clock()
        entry = self.windows.get(key)
        if entry is None or now - entry[0] >= self.window:
            entry = self.windows[key] = [now, 0, 0]
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        return False

    def due(self, force: bool = False) -> List[str]:
        """Summary lines of the windows that ended (all of them with *force*); those windows are forgotten."""
        now = self.clock()
        lines = []
        for key, (start, _written, suppressed) in list(self.windows.items()):
            if force or now - start >= self.window or len(self.windows) > MAX_KEYS:
                del self.windows[key]
                if suppressed:
                    lines.append(f"… {suppressed} more in the last minute: {key}")
        return lines


_lock = threading.Lock()
_limiter = _Limiter()


def _reinit_after_fork() -> None:  # a lock held by another thread at fork time would never be released
    global _lock
    _lock = threading.Lock()
    _limiter.windows.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


_journal = None  # stderr is the journal (systemd): every line starts with its syslog priority, e.g. <4>


def _priority(line: str) -> str:
    global _journal
    if _journal is None:
        from encapfwd.runtime.sdnotify import journal_priorities

        _journal = journal_priorities()
    if not _journal:
        return ""
    from encapfwd.runtime.sdnotify import priority_of

    return f"<{priority_of(line)}>"


def _emit(lines: List[str]) -> None:  # with the lock
    if not lines:
        return
    stream = sys.stderr
    if stream is None:
        return
    data = "".join(f"{_priority(line)}encapfwd: {line}\n" for line in lines)
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): one write call on it
        fd = None
    if fd is None or stream is not sys.__stderr__:
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass
        return
    try:
        stream.flush()  # whatever someone else left in the stream's buffer goes first
    except (OSError, ValueError):
        pass
    raw = data.encode("utf-8", "replace")
    while raw:
        try:
            written = os.write(fd, raw)
        except InterruptedError:
            continue
        except OSError:
            return
        raw = raw[written:]


def log(message: str, *, limit: bool = True) -> None:
    """Write ``encapfwd: MESSAGE`` on standard error as one write; identical lines beyond :data:`BURST` in
    :data:`WINDOW` seconds are counted instead (``limit=False``: always written)."""
    message = str(message)
    with _lock:
        lines = _limiter.due()
        if not limit or _limiter.admit(message):
            lines.append(message)
        _emit(lines)


def flush_log(force: bool = False) -> None:
    """Write the summary of every rate-limiting window that ended (every window with *force*, at stop)."""
    with _lock:
        _emit(_limiter.due(force))


class WakePipe:
    """A thread's way to wake the controller's poll loop: :meth:`wake` from the thread (never blocks, never
    raises), :meth:`fileno` in the loop's poll set, :meth:`drain` once it is readable, :meth:`close` at the end
    (or in a forked child)."""

    def __init__(self):
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)

    def fileno(self) -> int:
        return self._rfd

    def wake(self) -> None:
        try:
            os.write(self._wfd, b"!")
        except OSError:  # full: the loop is woken already; closed: stopping
            pass

    def drain(self) -> None:
        try:
            while os.read(self._rfd, 512):
                pass
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._rfd = self._wfd = -1


def summarize(items, shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 52 more`` (for lines about many servers)."""
    items = [str(i) for i in items]
    if len(items) <= shown:
        return ", ".join(items)
    return ", ".join(items[:shown]) + f" and {len(items) - shown} more"


__all__: List[str] = ["BURST", "LiveError", "WINDOW", "flush_log", "log", "one_line", "summarize"]
