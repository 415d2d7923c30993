"""What an *executor* of a plan provides: the one interface between the compiled plan and what runs it.

The controller (``encapfwd run``) and ``encapfwd replay`` compile a configuration into one immutable
:class:`~encapfwd.plan.Plan` (:func:`~encapfwd.plan.compile_plan`); executors receive only that plan. Two
kinds, both checked structurally (:pep:`544`), nothing probed with ``getattr``:

- :class:`FrameExecutor` runs a plan on frames handed to it, one call per frame: the Python
  :class:`~encapfwd.datapath.dispatcher.Dispatcher`, and the kernel programs run through
  ``BPF_PROG_TEST_RUN`` (:class:`encapfwd.xdp.offline.XDPExecutor`, :class:`encapfwd.xdp.tc.TCExecutor`).
  ``replay``, ``explain`` and the differential tests use them interchangeably.
- :class:`LiveExecutor` forwards live traffic under the controller: the AF_PACKET worker pool
  (:class:`encapfwd.runtime.afpacket.pool.WorkerPool`), the XDP program
  (:class:`encapfwd.runtime.xdp.XDPProgram`) and the TC program (:class:`encapfwd.runtime.tc.TCProgram`).
  Each is made of *units* (a worker process, a kernel program) and reports per unit.

Both: ``install(plan)`` switches to a new plan (flows keep their server), ``report()`` counts, ``close()``
releases everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from encapfwd.plan import Plan


@runtime_checkable
class FrameExecutor(Protocol):
    """Runs a plan on one frame at a time."""

    #: the plan installed
    plan: "Plan"
    #: frames not forwarded, by reason (docs/datapath.md)
    drops: Dict[str, int]

    def install(self, plan: "Plan") -> None:
        """Run *plan* from now on; raises :class:`~encapfwd.errors.EncapfwdError` (the old plan stays)."""

    def process(self, frame: bytes, now: float = 0.0) -> List[bytes]:
        """The frames to send for *frame* ([]: dropped and counted in :attr:`drops`); never raises."""

    def flush(self) -> None:
        """Drop what is held for later frames (fragments waiting for their first); at the end of a capture."""

    def report(self) -> dict:
        """Per server packets and bytes, drops by reason (JSON-able)."""

    def close(self) -> None:
        """Release what the executor holds (a loaded program); the Python dispatcher holds nothing."""


@runtime_checkable
class LiveExecutor(Protocol):
    """Forwards live traffic with a plan, under the controller's poll loop."""

    #: ``afpacket``, ``xdp`` or ``tc``: the report's name for it
    kind: str
    #: units started again after they died
    restarts: int

    def __len__(self) -> int:
        """How many units forward now (worker processes, an attached program)."""

    def start(self, plan: "Plan") -> None:
        """Begin forwarding with *plan*; :class:`~encapfwd.errors.LiveError` when it cannot."""

    def install(self, plan: "Plan") -> Dict[str, Optional[str]]:
        """Switch to *plan*: ``{unit: None}`` when installed, ``{unit: error}`` when a unit kept its old one."""

    def report(self) -> List[dict]:
        """One ``{"dispatcher": counters, "engine": counters}`` per unit (the controller sums them)."""

    def close(self) -> List[dict]:
        """Stop forwarding and release everything; the units' last reports."""

    def fds(self) -> List[int]:
        """Descriptors the controller's poll loop watches for it."""

    def owns(self, fd: int) -> bool:
        """Whether *fd* is one of :meth:`fds`."""

    def on_readable(self, fd: int) -> bool:
        """*fd* is readable; False: the executor cannot go on (the controller stops)."""

    def close_in_child(self) -> None:
        """In a freshly forked process: drop descriptors it must not keep (never detach, never unload)."""


__all__ = ["FrameExecutor", "LiveExecutor"]
