"""Flow synchronisation with the AF_PACKET engine: the workers' Python flow tables (docs/scale-out.md).

With the XDP and TC engines the controller sweeps the kernel flow table (:mod:`.flowsweep`). With the
AF_PACKET engine the flows live in each worker's :class:`~encapfwd.selection.flowtable.FlowTable`, in forked
processes; this module carries them between those tables and :class:`~.flowsync.FlowSync`, over the
controller ↔ worker channel (:mod:`.messaging`), in both directions.

Worker side (:class:`WorkerJournal`, created on the first sync message a worker receives):

- **publish**: the flow table calls ``note(key)`` for every new flow and, while a flow is active, again each
  time its deadline crosses a 32 s boundary (offset per flow: ``flowtable.REFRESH_SHIFT``) — the same
  ~32 s refresh rule as the kernel sweep. Never affinity records, never closing flows. The keys wait in a
  list of at most :data:`JOURNAL_MAX` (beyond, counted in ``dropped``: one ``len`` and one ``append`` in
  the data path, nothing that can raise). The controller asks for them (``sync-take``) every sweep
  interval; the worker answers ``(key, server name, age_ms)`` for those still in its table, servers named
  ``VIP@port@server`` (never local ids), the age from the entry's deadline and its port's ``staletimeout``.
- **apply**: ``sync-apply`` carries peers' entries; each is inserted (``FlowTable.adopt``: within
  ``maxflows``, not counted as created, not noted — no ping-pong) unless the local entry is as fresh or
  fresher (a later or equal deadline, or a closing flow: ``kept_local``), the server is unknown here, down
  here, or the key does not belong to the server's VIP and port. The worker answers with its counts.
- **dump**: ``sync-dump`` answers every live flow of the table, most recently used first, at most *limit*.

Why every worker gets every peer's flow: the workers share one PACKET_FANOUT group in ``PACKET_FANOUT_HASH``
mode, so the kernel picks a worker from the skb's symmetric flow hash (keyed by a per-boot secret) modulo
the number of sockets in the group. User space cannot compute it, and it changes when a worker is
restarted (the group's size changes for a moment). A shifted flow may arrive at any worker, so each holds
them all (a copy that sees no traffic idles out at its deadline, like any flow).

No deadlock on the channel: the controller writes large ``sync-apply`` messages with blocking sends, which
is safe only because a worker never blocks on its own sends while the controller writes — its answers are
bounded (``sync-take``: at most :data:`TAKE_MAX` entries, one outstanding request per worker;
``sync-applied``: a few counters) and the controller reads every waiting answer each time a channel is
readable (``WorkerPool.on_readable``). Only the answer to ``sync-dump`` is large, and the controller reads
it at once (``WorkerPool.ask_all``).

Controller side (:class:`WorkerFlows`): the table :class:`~.flowsync.FlowSync` sweeps and fills
(``named = True``: it gives and takes named entries, not kernel rows). Its requests and the workers'
answers are asynchronous: the answers reach it through :attr:`.supervisor.WorkerPool.on_message`; only a
peer's dump request asks the workers synchronously (at most one per peer per second).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from encapfwd.model import server_key
from encapfwd.runtime.afpacket.messaging import send_msg
from encapfwd.selection.flowtable import AFFINITY, CLOSING, COUNTED, SHIFT, SID_MASK

#: keys noted by a worker and not yet taken by the controller, at most
JOURNAL_MAX = 1 << 16
#: entries in one answer to ``sync-take`` (25–50 bytes each pickled, IPv4–IPv6: the answer fits the
#: channel's socket buffer, so a worker never blocks sending it — see the module's text on deadlocks; the
#: controller asks again at once when there are more)
TAKE_MAX = 2048
#: peers' entries waiting to be handed to the workers, at most (the oldest dropped beyond, counted)
PENDING_MAX = 1 << 18
#: seconds after which a worker that did not answer ``sync-take`` is asked again
ASK_AGAIN = 2.0
#: seconds the controller waits for the workers' dumps
DUMP_TIMEOUT = 3.0


class _Index:
    """One plan's servers as the worker's flow table knows them (its own sids)."""

    def __init__(self, plan, table):
        self.plan = plan
        self.by_sid: Dict[int, tuple] = {}
        self.by_name: Dict[str, tuple] = {}
        for cluster in plan.config.clusters:
            for port in cluster.ports:
                for server in port.servers:
                    sid = table.sid(cluster.address, port.number, server.address)
                    name = server_key(cluster.address, port.number, server.address)
                    self.by_sid[sid] = (name, port.staletimeout)
                    self.by_name[name] = (sid, port.staletimeout, not server.down, cluster.address.packed,
                                          port.number.to_bytes(2, "big"))


class WorkerJournal:
    """A worker's side of flow synchronisation (see the module's text). Never raises into the worker."""

    def __init__(self, dispatcher, bound: int = JOURNAL_MAX):
        self.dispatcher = dispatcher
        self.bound = bound
        self.keys: List[bytes] = []
        self._index: Optional[_Index] = None
        self.stats = {"noted": 0, "dropped": 0, "taken": 0, "applied": 0, "refreshed": 0, "kept_local": 0,
                      "unknown_server": 0, "server_down": 0, "mismatch": 0, "expired": 0, "errors": 0}
        table = self.table
        if table is not None:
            table.note = self.note

    @property
    def table(self):
        scheduler = self.dispatcher.scheduler
        if scheduler.stateless or not scheduler.table.maxflows:
            return None
        return scheduler.table

    def note(self, key: bytes) -> None:
        """The flow table's hook (data path): bounded, cannot raise."""
        keys = self.keys
        if len(keys) < self.bound:
            keys.append(key)
        else:
            self.stats["dropped"] += 1

    def close(self) -> None:
        table = self.table
        if table is not None and table.note == self.note:
            table.note = None

    def index(self) -> Optional[_Index]:
        plan = self.dispatcher.plan
        table = self.table
        if table is None:
            return None
        if self._index is None or self._index.plan is not plan:
            self._index = _Index(plan, table)
        return self._index

    def _named(self, key: bytes, value: int, by_sid, now: float):
        if value & (AFFINITY | CLOSING):
            return None
        found = by_sid.get(value & SID_MASK)
        if found is None:
            return None
        name, timeout = found
        deadline = value >> SHIFT
        if deadline <= now:
            return None
        age = now - (deadline - timeout - 1)  # the deadline is int(last packet) + timeout + 1
        return (key, name, int(age * 1000) if age > 0 else 0)

    def take(self, now: float, most: Optional[int] = None) -> list:
        """The flows noted since the last call (the first *most* of them, default TAKE_MAX: :attr:`keys`
        keeps the rest), named (those no longer in the table left out)."""
        most = TAKE_MAX if most is None else most
        keys, self.keys = self.keys[:most], self.keys[most:]
        try:
            index = self.index()
            if index is None or not keys:
                return []
            self.stats["noted"] += len(keys)
            get = self.table.entries.get
            by_sid = index.by_sid
            out = []
            for key in dict.fromkeys(keys):
                value = get(key)
                if value is not None:
                    entry = self._named(key, value, by_sid, now)
                    if entry is not None:
                        out.append(entry)
            self.stats["taken"] += len(out)
            return out
        except Exception:  # noqa: BLE001 - synchronisation never stops forwarding
            self.stats["errors"] += 1
            return []

    def apply(self, entries, now: float) -> dict:
        """Insert peers' entries ``(key, name, age_ms)`` unless the local one is as fresh (see the module)."""
        counts = {"applied": 0, "refreshed": 0, "kept_local": 0, "unknown_server": 0, "server_down": 0,
                  "mismatch": 0, "expired": 0, "errors": 0}
        try:
            index = self.index()
            if index is None:
                counts["errors"] += len(entries)
                return counts
            table = self.table
            get, adopt, by_name = table.entries.get, table.adopt, index.by_name
            for key, name, age in entries:
                found = by_name.get(name)
                if found is None:
                    counts["unknown_server"] += 1
                    continue
                sid, timeout, up, vip, port = found
                if not up:
                    counts["server_down"] += 1
                    continue
                n = (len(key) - 5) // 2
                if n not in (4, 16) or len(key) != 2 * n + 5 or key[n:2 * n] != vip or key[-2:] != port:
                    counts["mismatch"] += 1
                    continue
                deadline = int(now - age / 1000) + timeout + 1
                if deadline <= now:
                    counts["expired"] += 1
                    continue
                local = get(key)
                if local is not None:
                    if local & (AFFINITY | CLOSING) or (local >> SHIFT) >= deadline:
                        counts["kept_local"] += 1
                        continue
                    counts["refreshed"] += 1
                else:
                    counts["applied"] += 1
                adopt(key, (deadline << SHIFT) | COUNTED | sid, now)
        except Exception:  # noqa: BLE001 - synchronisation never stops forwarding
            counts["errors"] += 1
        for name, count in counts.items():
            self.stats[name] += count
        return counts

    def dump(self, limit: int, now: float) -> list:
        """Every live flow, named, most recently used first, at most *limit*."""
        out = []
        try:
            index = self.index()
            if index is None:
                return out
            by_sid = index.by_sid
            for key, value in reversed(self.table.entries.items()):
                if len(out) >= limit:
                    break
                entry = self._named(key, value, by_sid, now)
                if entry is not None:
                    out.append(entry)
        except Exception:  # noqa: BLE001
            self.stats["errors"] += 1
        return out

    def handle(self, channel, message, now: Optional[float] = None) -> None:
        """A ``sync-*`` message from the controller (answered on *channel*)."""
        now = time.monotonic() if now is None else now
        kind = message[0]
        if kind == "sync-take":
            entries = self.take(now)
            send_msg(channel, ("sync-flows", (entries, len(self.keys))))
        elif kind == "sync-apply":
            send_msg(channel, ("sync-applied", self.apply(message[1], now)))
        elif kind == "sync-dump":
            send_msg(channel, ("sync-dump", self.dump(int(message[1]), now)))


class WorkerFlows:
    """The workers' flow tables as :class:`~.flowsync.FlowSync` sees them (the AF_PACKET engine)."""

    named = True

    def __init__(self, pool, dump_limit: int = 1 << 18):
        self.pool = pool
        pool.on_message = self.on_message
        self.dump_limit = dump_limit
        #: FlowSync's counters (set by flowsync_for): what the first worker applied is added to them
        self.stats: Optional[dict] = None
        self.received: List[tuple] = []
        self.pending: List[tuple] = []
        #: (worker number, pid) -> when it was asked for its journal and has not answered yet (keyed by pid
        #: too: a worker started again is asked at the next sweep)
        self.asked: Dict[tuple, float] = {}
        self.counts = {"collected": 0, "handed": 0, "pending_dropped": 0, "send_errors": 0, "workers_started_again": 0}
        #: worker number -> the pid last seen: a new pid is a worker started again, with an empty flow table
        self.pids: Dict[int, object] = {}
        #: set when a worker started again: FlowSync asks the peers for a dump, which every worker applies (the
        #: peers hold this dispatcher's published flows too, so the new worker gets its predecessor's back)
        self.refill_wanted = False
        #: per worker number: its counts of peers' entries (applied, refreshed, kept_local, …)
        self.workers: Dict[int, dict] = {}
        self.errors = 0
        self.last_sweep_seconds = 0.0
        self.last_sweep_entries = 0

    def _send(self, number: int, message) -> bool:
        worker = self.pool.workers.get(number)
        if worker is None:
            return False
        try:
            send_msg(worker["channel"], message)
            return True
        except OSError:
            self.counts["send_errors"] += 1
            return False

    # -- what FlowSync calls
    def sweep(self) -> list:
        """The flows the workers sent since the last call; asks each worker for its new ones."""
        started = time.perf_counter()
        out, self.received = self.received, []
        now = time.monotonic()
        for number, worker in list(self.pool.workers.items()):
            pid = worker.get("pid")
            if number in self.pids and self.pids[number] != pid:
                self.refill_wanted = True
                self.counts["workers_started_again"] += 1
            self.pids[number] = pid
            ident = (number, pid)
            if now - self.asked.get(ident, -1e9) >= ASK_AGAIN:
                self.asked[ident] = now  # before sending: the answer may come at once
                if not self._send(number, ("sync-take",)):
                    self.asked.pop(ident, None)
        if len(self.asked) > 4 * len(self.pool.workers) + 16:  # workers gone: forget them
            self.asked = {k: v for k, v in self.asked.items() if now - v < ASK_AGAIN}
        self.last_sweep_entries = len(out)
        self.last_sweep_seconds = time.perf_counter() - started
        return out

    def snapshot(self) -> list:
        """Every live flow of every worker (a peer's dump), each key once with its smallest age."""
        answers = self.pool.ask_all(("sync-dump", self.dump_limit), "sync-dump", DUMP_TIMEOUT)
        best: Dict[bytes, tuple] = {}
        for entries in answers.values():
            for entry in entries or ():
                old = best.get(entry[0])
                if old is None or entry[2] < old[2]:
                    best[entry[0]] = entry
        return list(best.values())

    def insert_many(self, rows) -> dict:
        """Peers' entries ``(key, name, age_ms)``: handed to every worker at the next :meth:`flush` (their
        results come back asynchronously)."""
        self.pending.extend(rows)
        over = len(self.pending) - PENDING_MAX
        if over > 0:
            del self.pending[:over]
            self.counts["pending_dropped"] += over
        return {"inserted": 0, "refreshed": 0, "kept-local": 0, "error": 0}

    def flush(self) -> None:
        """Hand the peers' entries waiting to every worker."""
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        message = ("sync-apply", rows)
        for number in list(self.pool.workers):
            if self._send(number, message):
                self.counts["handed"] += len(rows)

    # -- the workers' answers (WorkerPool.on_message)
    def on_message(self, number: int, kind: str, payload) -> None:
        if kind == "sync-flows":
            entries, more = payload
            ident = (number, (self.pool.workers.get(number) or {}).get("pid"))
            self.asked.pop(ident, None)
            if more:  # the worker has more noted flows than one answer holds: ask again now
                self.asked[ident] = time.monotonic()
                if not self._send(number, ("sync-take",)):
                    self.asked.pop(ident, None)
            entries = list(entries or ())
            self.counts["collected"] += len(entries)
            self.received.extend(entries)
            over = len(self.received) - PENDING_MAX
            if over > 0:
                del self.received[:over]
                self.counts["pending_dropped"] += over
        elif kind == "sync-applied" and isinstance(payload, dict):
            mine = self.workers.setdefault(number, {})
            for name, count in payload.items():
                mine[name] = mine.get(name, 0) + count
            if self.stats is not None and number == min(self.pool.workers, default=number):
                # every worker applies every entry: the first one's results are the dispatcher's
                self.stats["applied"] += payload.get("applied", 0)
                self.stats["refreshed"] += payload.get("refreshed", 0)
                self.stats["kept_local"] += payload.get("kept_local", 0)
                self.stats["apply_errors"] += payload.get("errors", 0)

    def report(self) -> dict:
        return {**self.counts, "pending": len(self.pending),
                "per_worker": {str(n): dict(c) for n, c in sorted(self.workers.items())}}


__all__ = ["JOURNAL_MAX", "WorkerFlows", "WorkerJournal"]
