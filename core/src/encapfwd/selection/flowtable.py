"""The bounded flow (connection) table shared by every port of a dispatcher.

One ``OrderedDict`` maps keys to packed integers, in least-recently-used order (oldest first):

- flow entries: key = the flow 5-tuple bytes (13 bytes for IPv4, 37 for IPv6);
- affinity entries (``stickytime``): key = a per-port prefix + the client address.

A value is one ``int`` (no object per flow besides the key and the value)::

    value = deadline << SHIFT | AFFINITY? | CLOSING? | COUNTED? | sid

``deadline`` is the whole second (same clock as the ``now`` the dispatcher passes) from which the entry is
stale; ``sid`` a server id, stable across configuration changes, one per (cluster, port, server address);
``COUNTED`` marks a flow included in its server's active-connection count (weighted least connections),
``CLOSING`` a TCP flow that has seen FIN or RST (short timeout, no longer counted).

Every packet moves its entry to the most-recently-used end (exact LRU); the deadline itself is rewritten
at most once per second of ``now``, so a packet of an established flow costs one dictionary lookup and
one ``move_to_end``. New entries sweep a few stale entries off the
LRU end and evict the least recently used beyond ``maxflows``: the table never holds more than
``maxflows`` entries, whatever arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Tuple

SID_BITS = 21
SID_MASK = (1 << SID_BITS) - 1
COUNTED = 1 << SID_BITS
CLOSING = 1 << (SID_BITS + 1)
AFFINITY = 1 << (SID_BITS + 2)
SHIFT = SID_BITS + 3
_ACCOUNTED = COUNTED | AFFINITY

#: Idle timeout of a TCP flow after FIN (refreshed by each later packet of the flow, e.g. the last ACKs
#: or a half-closed stream's ACKs), capped by the port's staletimeout.
FIN_TIMEOUT = 10
#: Idle timeout of a TCP flow after RST.
RST_TIMEOUT = 2

#: Stale entries removed from the LRU end each time a new entry is inserted.
SWEEP = 2

#: flow synchronisation (engines/flowsync_workers.py): a refreshed flow is noted again when its deadline
#: crosses a boundary of 2**REFRESH_SHIFT seconds (offset per flow by its client port): ~32 s while active
REFRESH_SHIFT = 5

# counters (indices into FlowTable.ctr)
CREATED, EVICTED, EXPIRED, MOVED, CLOSED, AFFINITIES = range(6)
_COUNTER_NAMES = ("created", "evictions", "expired", "moved", "closed")


class FlowTable:
    """State shared by the pick callables of a :class:`encapfwd.selection.Scheduler`.

    :param maxflows: bound on the number of entries (flows + affinity records); 0 = no table at all.
    """

    def __init__(self, maxflows: int):
        self.maxflows = maxflows
        self.entries: "OrderedDict[bytes, int]" = OrderedDict()
        #: counted (active, not closing) flows per sid
        self.counts: List[int] = []
        #: sid -> (connections list given to a selector, index in it): kept live for least connections
        self.slots: Dict[int, Tuple[list, int]] = {}
        #: sid -> (cluster, port, server address) for reports
        self.names: List[tuple] = []
        self._sids: Dict[tuple, int] = {}
        self.ctr = [0] * 6
        #: ``note(key)`` (flow synchronisation, None otherwise): told every new flow, and a refreshed one
        #: about every 2**REFRESH_SHIFT seconds; never affinity records nor closing flows
        self.note = None

    # -- server ids ------------------------------------------------------------------------------
    def sid(self, cluster, port: int, address) -> int:
        """The stable id of server *address* on *cluster*:*port* (allocated on first use)."""
        name = (cluster, port, address)
        sid = self._sids.get(name)
        if sid is None:
            sid = len(self.names)
            if sid > SID_MASK:
                raise OverflowError("too many distinct servers over the dispatcher's lifetime")
            self._sids[name] = sid
            self.names.append(name)
            self.counts.append(0)
        return sid

    # -- bookkeeping -----------------------------------------------------------------------------
    def release(self, value: int) -> None:
        """Forget *value*'s contribution to the counts (it is being removed or closed)."""
        if value & COUNTED:
            sid = value & SID_MASK
            self.counts[sid] -= 1
            slot = self.slots.get(sid)
            if slot is not None:
                slot[0][slot[1]] -= 1
        if value & AFFINITY:
            self.ctr[AFFINITIES] -= 1

    def remove(self, key: bytes, value: int, reason) -> None:
        """Remove *key* (whose current value is *value*), counting it under *reason* (a counter index,
        or None)."""
        del self.entries[key]
        self.release(value)
        if reason is not None:
            self.ctr[reason] += 1

    def insert(self, key: bytes, value: int, now: float) -> None:
        """Add a new entry (*key* not present): evict the least recently used one when the table is full
        (counted as expired when it was stale anyway), else sweep a few stale ones off the LRU end."""
        entries = self.entries
        n = len(entries)
        maxflows = self.maxflows
        ctr = self.ctr
        if n >= maxflows:
            if not maxflows:
                return
            popitem = entries.popitem
            while n >= maxflows:
                ov = popitem(False)[1]
                if ov & COUNTED:  # release(), inlined: this runs for every new flow of a flood
                    sid = ov & SID_MASK
                    self.counts[sid] -= 1
                    slot = self.slots.get(sid)
                    if slot is not None:
                        slot[0][slot[1]] -= 1
                elif ov & AFFINITY:
                    ctr[AFFINITIES] -= 1
                ctr[EVICTED if (ov >> SHIFT) > now else EXPIRED] += 1
                n -= 1
        elif n:
            sweep = SWEEP
            while sweep and entries:
                old = next(iter(entries))
                ov = entries[old]
                if (ov >> SHIFT) > now:
                    break
                del entries[old]
                if ov & _ACCOUNTED:
                    self.release(ov)
                ctr[EXPIRED] += 1
                sweep -= 1
        entries[key] = value
        self._count(value)
        ctr[CREATED] += 1
        note = self.note
        if note is not None and not value & (AFFINITY | CLOSING):
            note(key)

    def replace(self, key: bytes, old: int, new: int) -> None:
        """Refresh an entry in place: new value, moved to the most-recently-used end."""
        if (old & COUNTED) and not (new & COUNTED):
            self.release(old & ~AFFINITY)
        self.entries[key] = new
        self.entries.move_to_end(key)
        note = self.note
        if note is not None and not new & (AFFINITY | CLOSING):
            offset = key[-3]  # the client port's low byte: refreshes spread over the period
            if ((new >> SHIFT) + offset) >> REFRESH_SHIFT != ((old >> SHIFT) + offset) >> REFRESH_SHIFT:
                note(key)

    def adopt(self, key: bytes, value: int, now: float) -> None:
        """Insert or overwrite an entry learnt elsewhere (a peer's flow: flow synchronisation): at the
        most-recently-used end, within ``maxflows``, neither counted as created nor noted."""
        if not self.maxflows:
            return
        entries = self.entries
        old = entries.get(key)
        if old is None:
            note, self.note = self.note, None
            try:
                self.insert(key, value, now)
            finally:
                self.note = note
            self.ctr[CREATED] -= 1
            return
        self.release(old)
        entries[key] = value
        entries.move_to_end(key)
        self._count(value)

    def _count(self, value: int) -> None:
        """Account a new entry: its server's active connections, or one more affinity record."""
        if value & COUNTED:
            sid = value & SID_MASK
            self.counts[sid] += 1
            slot = self.slots.get(sid)
            if slot is not None:
                slot[0][slot[1]] += 1
        elif value & AFFINITY:
            self.ctr[AFFINITIES] += 1

    def resize(self, maxflows: int) -> None:
        self.maxflows = maxflows
        entries = self.entries
        while len(entries) > maxflows:
            _, ov = entries.popitem(last=False)
            self.release(ov)
            self.ctr[EVICTED] += 1

    def expire(self, now: float, full: bool = False) -> int:
        """Remove stale entries: from the LRU end until a live one (or, with *full*, everywhere).

        The LRU end holds the least recently seen entries, so the cheap sweep finds nearly all of them;
        *full* also finds flows whose shorter timeout (FIN/RST, a short staletimeout) ran out behind
        a longer-lived one. Returns the number removed.
        """
        entries = self.entries
        removed = 0
        if full:
            stale = [k for k, v in entries.items() if (v >> SHIFT) <= now]
            for k in stale:
                v = entries.pop(k)
                self.release(v)
            removed = len(stale)
        else:
            while entries:
                old = next(iter(entries))
                ov = entries[old]
                if (ov >> SHIFT) > now:
                    break
                del entries[old]
                self.release(ov)
                removed += 1
        self.ctr[EXPIRED] += removed
        return removed

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict:
        ctr = self.ctr
        affinity = ctr[AFFINITIES]
        out = {
            "flows": len(self.entries) - affinity,
            "affinity": affinity,
            "entries": len(self.entries),
            "maxflows": self.maxflows,
        }
        for index, name in enumerate(_COUNTER_NAMES):
            out[name] = ctr[index]
        return out

    def connections(self) -> Dict[str, int]:
        """Active (counted) flows per ``cluster@port@server``, servers with at least one."""
        out = {}
        for sid, count in enumerate(self.counts):
            if count:
                cluster, port, address = self.names[sid]
                out[f"{cluster}@{port}@{address}"] = count
        return out
