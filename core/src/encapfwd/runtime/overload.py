"""Overload control in the controller: the slow path (the AF_PACKET workers) cannot keep up — what to do,
what to say (docs/live.md, "Overload").

Each worker judges its own pressure (its RX ring dropping frames, or a backlog of ready ring blocks:
:mod:`encapfwd.runtime.afpacket.triage`) and tells the controller when it starts or stops triaging (an
unsolicited ``pressure`` message on its channel, :attr:`.afpacket.pool.WorkerPool.on_pressure` →
:meth:`Overload.on_worker`). Nothing here waits: a message is handled when the controller's loop reads it,
and :meth:`Overload.poll` (called once per loop turn) reads the kernel program's counters at most every
:data:`CHECK_INTERVAL` seconds.

- With a kernel program (``--engine xdp`` or ``tc``) the first worker under pressure turns the program's
  *pressure mode* on (``DataPlane.set_pressure(True)``): the kernel then places new flows of wrr/wlc ports
  itself by its weighted consistent table instead of handing them up; the workers' dispatchers follow
  (``Dispatcher.set_pressure``, a ``set-pressure`` message), so a frame of such a flow that still comes up
  finds the same server. The program itself places new flows of those ports beyond ``executor handuplimit``
  hand-ups per CPU per second, at once (the first milliseconds of a flood, before any worker has measured
  its backlog); :meth:`Overload.poll` sees that count grow and turns the pressure mode on just the same.
  Pressure has ended when no worker
  reports it and the program places fewer new flows under pressure than :data:`EXIT_SHARE` of the slow
  path's measured capacity (when the program counts them), for :attr:`Overload.hold` seconds; then the
  mode goes off and the exact algorithm decides again. The hold starts at :data:`HOLD` and doubles (up to
  :data:`MAX_HOLD`) when pressure comes back within twice the hold after an episode ended (a flood that
  outlasts the hold does not make the mode flap every few seconds); it is back to :data:`HOLD` after a calm
  episode.
- With ``--engine afpacket`` there is no kernel to place flows: the workers' triage is the whole answer.
  The episode lasts while any worker triages.

One log line when an episode starts (which worker, why, and what is done), one when it ends; the report's
``overload`` (:meth:`Overload.snapshot`) and the metrics ``encapfwd_overload`` (gauge),
``encapfwd_overload_episodes_total`` and ``encapfwd_overload_dropped_total`` (per port) say the same.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

from encapfwd.runtime.common import log as default_log

#: seconds without pressure before the kernel program's pressure mode goes off (the first hold)
HOLD = 2.0
#: the longest hold (a flood that keeps coming back)
MAX_HOLD = 30.0
#: seconds between two readings of the kernel program's counters while engaged
CHECK_INTERVAL = 0.25
#: pressure has ended when the kernel places fewer new flows per second under pressure than this share of
#: the slow path's measured capacity (frames per second while it had a backlog)
EXIT_SHARE = 0.5
#: frames per second assumed for the slow path before any worker measured its own
DEFAULT_CAPACITY = 20000.0


class Overload:
    """The controller's overload state. *kernel*: a callable giving the kernel program's executor
    (:class:`~.xdp.XDPProgram` or :class:`~.tc.TCProgram`) or None with the AF_PACKET engine."""

    def __init__(self, kernel: Callable[[], object] = lambda: None, log: Callable[[str], None] = default_log,
                 clock: Callable[[], float] = time.monotonic, tell: Callable[[bool], None] = lambda on: None):
        self.kernel = kernel
        #: ``tell(on)``: the workers' dispatchers follow the kernel's pressure mode (the same pressure table
        #: for the frames of a flow the kernel placed that still come up: docs/live.md, "Overload")
        self.tell = tell
        self.log = log
        self.clock = clock
        #: worker number -> its last ``pressure`` message while it triages
        self.workers: Dict[int, dict] = {}
        self.engaged = False
        self.mode: Optional[str] = None  # "kernel" (the program's pressure mode) or "workers" (triage only)
        self.episodes = 0
        self.since: Optional[float] = None
        self.reason: Optional[str] = None
        self.last_pressure = -math.inf
        self.last_end = -math.inf
        self.hold = HOLD
        self.kernel_error: Optional[str] = None
        self.capacity = 0.0
        self._placed: Optional[tuple] = None  # (count, when) of the kernel's pressure placements
        self._handups: Optional[tuple] = None  # (count, when) of its placements beyond the hand-up limit
        self._next_handups = 0.0
        self.placed_rate: Optional[float] = None
        self._next = 0.0
        self.last_episode: Optional[dict] = None

    # -- the workers' messages

    def on_worker(self, number: int, payload: dict) -> None:
        now = self.clock()
        payload = payload or {}
        if payload.get("on"):
            was = self.workers.get(number)
            self.workers[number] = payload
            self.last_pressure = now
            if payload.get("capacity"):
                self.capacity = max(self.capacity * 0.5, float(payload["capacity"]))
            if not self.engaged:
                self._engage(now, f"worker {number}", payload.get("why") or "under pressure",
                             payload.get("shed") or [])
            elif self.mode == "workers" and payload.get("shed") and (was or {}).get("shed") != payload["shed"]:
                self.log(f"overload: worker {number} sheds new connections of {', '.join(payload['shed'])} "
                         f"first ({payload.get('why') or 'under pressure'})")
        else:
            self.workers.pop(number, None)
            if self.engaged and self.mode == "workers" and not self.workers:
                self._disengage(now, payload.get("why") or "no worker under pressure")

    # -- the loop

    def poll(self, now: Optional[float] = None) -> None:
        """Once per loop turn: while the kernel's pressure mode is on, end it when the pressure has ended
        for the hold time; while it is off, turn it on when the program has placed new flows itself beyond its
        hand-up limit (reads the program's counters at most every :data:`CHECK_INTERVAL` s)."""
        if not self.engaged:
            self._watch_handups(self.clock() if now is None else now)
            return
        if self.mode != "kernel":
            return
        now = self.clock() if now is None else now
        if now < self._next:
            return
        self._next = now + CHECK_INTERVAL
        if self.workers:
            self.last_pressure = now
            return
        rate = self._kernel_rate(now)
        if rate is not None and rate >= EXIT_SHARE * (self.capacity or DEFAULT_CAPACITY):
            self.last_pressure = now
            return
        if now - self.last_pressure >= self.hold:
            quiet = f"no worker under pressure for {self.hold:g} s"
            if rate is not None:
                quiet += f" and the kernel placed {rate:,.0f} new flows/s under pressure"
            self._disengage(now, quiet)

    def _watch_handups(self, now: float) -> None:
        """The program placed new flows itself beyond ``executor handuplimit`` since the last reading: the
        slow path is being handed more new flows than it is meant to serve — pressure mode on."""
        if now < self._next_handups or self.kernel_error is not None:  # its mode failed once: it places them
            return
        self._next_handups = now + CHECK_INTERVAL
        kernel = self.kernel()
        count = self._count(kernel, "handup_placed")
        if count is None:
            self._handups = None
            return
        last, self._handups = self._handups, (count, now)
        if last is None or count <= last[0]:
            return
        self.last_pressure = now
        kind = getattr(kernel, "kind", "kernel").upper()
        self._engage(now, f"the {kind} program",
                     f"{count - last[0]:,} new flows of wrr/wlc ports beyond executor handuplimit placed by "
                     f"it in {now - last[1]:.2f} s", [])
        if self.mode != "kernel":  # its pressure mode could not be turned on: no worker triages, nothing to hold
            self._disengage(now, "the kernel program keeps placing them by itself")

    @staticmethod
    def _count(kernel, name: str) -> Optional[int]:
        """The kernel executor's counter *name* (``pressure_placed``, ``handup_placed``), None without it."""
        if kernel is None or not hasattr(kernel, name):
            return None
        try:
            return getattr(kernel, name)()
        except Exception:  # noqa: BLE001 - the counters are advice
            return None

    def _kernel_rate(self, now: float) -> Optional[float]:
        count = self._count(self.kernel(), "pressure_placed")
        if count is None:
            self.placed_rate = None
            return None
        last, self._placed = self._placed, (count, now)
        if last is None or now <= last[1]:
            return self.placed_rate
        self.placed_rate = max(0.0, (count - last[0]) / (now - last[1]))
        return self.placed_rate

    # -- episodes

    def _engage(self, now: float, who: str, why: str, shed: List[str]) -> None:
        """An episode starts: *who* (``worker N``, or ``the XDP program`` beyond its hand-up limit) says
        *why*; *shed*: the ports a worker sheds first."""
        self.engaged = True
        self.episodes += 1
        self.since = now
        self.reason = f"{who}: {why}"
        if now - self.last_end < 2 * self.hold:
            self.hold = min(MAX_HOLD, self.hold * 2)  # back soon after the last episode: hold longer
        else:
            self.hold = HOLD
        kernel = self.kernel()
        error = None
        if kernel is not None:
            setter = getattr(kernel, "set_pressure", None)
            error = setter(True) if setter is not None else "the kernel program has no pressure mode"
        if kernel is not None and error is None:
            self.mode = "kernel"
            self.tell(True)
            self._placed = None
            self._kernel_rate(now)
            self.log(f"overload: the slow path cannot keep up ({who}: {why}): pressure mode on — "
                     f"the {getattr(kernel, 'kind', 'kernel').upper()} program places new flows of wrr/wlc "
                     f"ports itself by its weighted table until the pressure has ended for {self.hold:g} s")
        else:
            self.mode = "workers"
            if error is not None and error != self.kernel_error:
                self.kernel_error = error
            self.log(f"overload: {who} cannot keep up ({why}): shedding new connections of the "
                     f"ports with the most of them first{' (' + ', '.join(shed) + ')' if shed else ''}; "
                     "established flows and other ports are still forwarded"
                     + (f" (no kernel pressure mode: {error})" if error else
                        " (AF_PACKET engine: no kernel program to place flows)"))

    def _disengage(self, now: float, why: str) -> None:
        lasted = now - (self.since or now)
        kernel = self.kernel()
        error = None
        if self.mode == "kernel" and kernel is not None:
            error = kernel.set_pressure(False)
            self.tell(False)
        self.last_episode = {"seconds": round(lasted, 3), "reason": self.reason, "mode": self.mode,
                             "ended": why}
        if self.mode == "kernel":
            self.log(f"overload ended: {why}: pressure mode off after {lasted:.1f} s — new flows of wrr/wlc "
                     f"ports are placed by the exact algorithm again"
                     + (f" (turning it off failed: {error})" if error else ""))
        else:
            self.log(f"overload ended after {lasted:.1f} s: {why}; the workers forward every new connection "
                     "again")
        self.engaged = False
        self.mode = None
        self.since = None
        self.last_end = now
        self._handups = None  # read afresh: the count did not move while the pressure mode placed flows
        self._next_handups = now

    def close(self) -> None:
        """Stopping: nothing to undo (the kernel program goes with its executor)."""
        self.engaged = False

    # -- the report

    def snapshot(self) -> dict:
        now = self.clock()
        shed: List[str] = sorted({p for m in self.workers.values() for p in (m.get("shed") or ())})
        return {
            "engaged": self.engaged,
            "mode": self.mode,
            "episodes": self.episodes,
            "seconds": round(now - self.since, 3) if self.since is not None else None,
            "reason": self.reason if self.engaged else None,
            "hold": self.hold,
            "workers": sorted(self.workers),
            "shed": shed,
            "capacity": round(self.capacity),
            "kernel_placed_rate": None if self.placed_rate is None else round(self.placed_rate),
            "kernel_error": self.kernel_error,
            "last_episode": self.last_episode,
        }


__all__ = ["CHECK_INTERVAL", "EXIT_SHARE", "HOLD", "MAX_HOLD", "Overload"]
