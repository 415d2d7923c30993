"""Neighbour resolution (ARP, IPv6 ND) in the background, so that the controller's loop never waits for it.

The controller needs the MAC of every server on an attached network (unless pinned with ``server … mac``)
and of the gateway (unless ``gatewaymac``). Asking the kernel costs nothing (``NTF_USE``, as
``ip neigh replace ADDR dev IF use``: the kernel sends the ARP/ND request); *waiting* for the answer is
what must never happen in the loop that serves control requests and signals. So :class:`NeighbourResolver`
runs in a thread of its own:

- :meth:`~NeighbourResolver.request` — "these addresses, within *bound* seconds": every missing one is asked
  at once (all concurrently, one total bound, :data:`RESOLVE_BOUND` by default); the ticket is done when all
  resolved or the bound passed, and the controller is woken (a byte on a pipe its poll loop watches).
  ``encapfwd run`` waits for one such ticket at start, and a reload's second half runs when its ticket is
  done — the loop keeps serving meanwhile.
- :meth:`~NeighbourResolver.watch` — the MACs the running plan uses. Unresolved ones are asked again
  (1 s, 2 s, 4 s … apart, at most :data:`MAX_ASK_INTERVAL`) and looked up every :data:`UNRESOLVED_POLL`
  seconds, so a server that starts answering comes back on its own; resolved ones are read again every
  *refresh* seconds (``ENCAPFWD_NEIGH_REFRESH``, 0 = never) to follow a replaced server or router.
  :meth:`~NeighbourResolver.changes` says what differs from the plan; the controller builds a new plan.

Reading the table is one netlink dump (:func:`~.netlink.neighbour_table`); nothing here blocks on the
network.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from encapfwd.runtime.common import WakePipe
from encapfwd.runtime.netlink import ask_neighbour, neighbour_table, open_ipr

#: seconds a start or a reload waits, in total, for the MACs it needs (all resolved concurrently)
RESOLVE_BOUND = 2.0
#: seconds between two reads of the table while a request is open
FAST_POLL = 0.05
#: seconds between two reads of the table while a watched address is unresolved
UNRESOLVED_POLL = 0.5
#: longest pause between two ARP/ND requests for an address that does not answer
MAX_ASK_INTERVAL = 10.0


class Ticket:
    """A request: *addresses* within *deadline* (monotonic); :attr:`macs` once :attr:`done`."""

    def __init__(self, addresses: Iterable[str], deadline: float):
        self.addresses = tuple(dict.fromkeys(str(a) for a in addresses))
        self.deadline = deadline
        self.done = False
        self.macs: Dict[str, Optional[str]] = {}
        #: what the kernel's table said since the request (an older answer may be stale)
        self.fresh: Dict[str, str] = {}


class NeighbourResolver:
    """See the module's text. *ifindex*: the interface; *refresh*: seconds between two reads of the resolved
    MACs of the running plan (0 = never)."""

    def __init__(self, ifindex: int, refresh: float = 10.0, *, opener=open_ipr, table=neighbour_table,
                 ask=ask_neighbour, clock=time.monotonic):
        self.ifindex = ifindex
        self.refresh = max(0.0, float(refresh or 0))
        self._opener, self._table_of, self._ask, self.clock = opener, table, ask, clock
        self._cond = threading.Condition()
        self._tickets: List[Ticket] = []
        self._watched: Dict[str, Optional[str]] = {}  # address -> the MAC the running plan uses (None: none)
        self._seen: Dict[str, str] = {}  # address -> the last valid MAC the kernel's table held
        self._asked: Dict[str, Tuple[float, float]] = {}  # address -> (next ask, pause after it)
        self._notified: frozenset = frozenset()
        self._next_full = 0.0
        self._stopping = False
        self.errors = 0
        self.last_error: Optional[str] = None
        self._pipe = WakePipe()
        self._thread = threading.Thread(target=self._run, name="encapfwd-neighbours", daemon=True)
        self._thread.start()

    # -- the controller's side

    def fileno(self) -> int:
        """Readable when a ticket is done or a watched MAC changed."""
        return self._pipe.fileno()

    def drain(self) -> None:
        self._pipe.drain()

    def request(self, addresses: Iterable[str], bound: float = RESOLVE_BOUND) -> Ticket:
        ticket = Ticket(addresses, self.clock() + max(0.0, bound))
        with self._cond:
            now = self.clock()
            for address in ticket.addresses:  # asked at once, whatever pause they were in
                self._asked[address] = (now, 1.0)
            self._tickets.append(ticket)
            self._cond.notify_all()
        return ticket

    def resolve(self, addresses: Iterable[str], bound: float = RESOLVE_BOUND) -> Dict[str, Optional[str]]:
        """Block until every address resolved or *bound* seconds passed (for the start, before the loop)."""
        ticket = self.request(addresses, bound)
        with self._cond:
            while not ticket.done and not self._stopping:
                self._cond.wait(max(0.01, ticket.deadline - self.clock() + 0.2))
                if self.clock() > ticket.deadline + 5:  # the thread is gone: what is known
                    self._finish(ticket)
        return dict(ticket.macs)

    def result(self, ticket: Ticket) -> Dict[str, Optional[str]]:
        """The MACs of *ticket*: all of them once done, else what resolved so far."""
        with self._cond:
            return dict(ticket.macs) if ticket.done else {a: ticket.fresh.get(a) for a in ticket.addresses}

    def cancel(self, ticket: Optional[Ticket]) -> None:
        with self._cond:
            if ticket in self._tickets:
                self._tickets.remove(ticket)

    def watch(self, macs: Mapping[str, Optional[str]]) -> None:
        """The MACs the running plan uses (None: unresolved, left out of the plan)."""
        with self._cond:
            self._watched = {str(a): m for a, m in macs.items()}
            now = self.clock()
            for address, mac in self._watched.items():
                if mac is None and address not in self._asked:
                    self._asked[address] = (now, 1.0)
            for address in [a for a in self._asked if a not in self._watched and not self._in_ticket(a)]:
                del self._asked[address]
            self._notified = frozenset()
            self._cond.notify_all()

    def changes(self) -> Dict[str, Tuple[Optional[str], str]]:
        """``{address: (MAC in the plan or None, MAC now)}`` for every watched address that resolved since
        or whose MAC changed."""
        with self._cond:
            return {a: (m, self._seen[a]) for a, m in self._watched.items() if a in self._seen and self._seen[a] != m}

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(2)
        self.close_in_child()

    def close_in_child(self) -> None:
        self._pipe.close()

    # -- the thread

    def _in_ticket(self, address: str) -> bool:
        return any(address in t.addresses for t in self._tickets)

    def _finish(self, ticket: Ticket) -> None:  # with the lock
        ticket.macs = {a: ticket.fresh.get(a) for a in ticket.addresses}
        ticket.done = True
        if ticket in self._tickets:
            self._tickets.remove(ticket)

    def _wake(self) -> None:
        self._pipe.wake()

    def _run(self) -> None:
        ipr = None
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        return
                    now = self.clock()
                    full = self.refresh > 0 and now >= self._next_full and any(
                        m is not None for m in self._watched.values())
                    unresolved = [a for a, m in self._watched.items() if m is None and a not in self._seen]
                    busy = bool(self._tickets)
                    if full:
                        self._next_full = now + self.refresh
                look = busy or full or bool(unresolved)
                table: Optional[Dict[str, str]] = None
                if look:
                    try:
                        if ipr is None:
                            ipr = self._opener()
                        table = self._table_of(ipr, self.ifindex)
                    except Exception as exc:  # noqa: BLE001 - netlink trouble: tried again at the next round
                        self.errors += 1
                        self.last_error = f"{type(exc).__name__}: {exc}"
                        if ipr is not None:
                            try:
                                ipr.close()
                            except Exception:  # noqa: BLE001
                                pass
                        ipr = None
                asks: List[str] = []
                wake = False
                with self._cond:
                    now = self.clock()
                    if table is not None:
                        interesting = set(self._watched)
                        for ticket in self._tickets:
                            interesting.update(ticket.addresses)
                        for address in interesting:
                            mac = table.get(address)
                            if mac is not None:
                                self._seen[address] = mac
                                self._asked.pop(address, None)
                                for ticket in self._tickets:
                                    if address in ticket.addresses:
                                        ticket.fresh[address] = mac
                            elif address in self._asked and self._asked[address][0] <= now:
                                pause = self._asked[address][1]
                                self._asked[address] = (now + pause, min(pause * 2, MAX_ASK_INTERVAL))
                                asks.append(address)
                    for ticket in list(self._tickets):
                        if all(a in ticket.fresh for a in ticket.addresses) or now >= ticket.deadline:
                            self._finish(ticket)
                            wake = True
                    changed = frozenset(a for a, m in self._watched.items() if a in self._seen and self._seen[a] != m)
                    if changed and changed != self._notified:
                        self._notified = changed
                        wake = True
                    if wake:
                        self._cond.notify_all()
                if asks and ipr is not None:
                    for address in asks:
                        self._ask(ipr, address, self.ifindex)
                if wake:
                    self._wake()
                with self._cond:
                    if self._stopping:
                        return
                    now = self.clock()
                    if self._tickets:
                        pause = FAST_POLL
                    elif any(m is None and a not in self._seen for a, m in self._watched.items()):
                        pause = UNRESOLVED_POLL
                    elif self.refresh > 0 and any(m is not None for m in self._watched.values()):
                        pause = max(0.01, self._next_full - now)
                    else:
                        pause = 60.0
                    self._cond.wait(pause)
        finally:
            if ipr is not None:
                try:
                    ipr.close()
                except Exception:  # noqa: BLE001
                    pass


__all__ = ["FAST_POLL", "MAX_ASK_INTERVAL", "NeighbourResolver", "RESOLVE_BOUND", "Ticket", "UNRESOLVED_POLL"]
