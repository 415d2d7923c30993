"""The kernel flow table as flow synchronisation sees it: the program's ring of new flows, and a map the
controller sweeps (docs/scale-out.md).

While flow synchronisation runs, the program writes every new flow entry to its ``new_flows`` ring buffer
as well (``struct overload``'s ``publish``, set by :class:`TableOf`), and marks the entry published (``pad``
below). :meth:`KernelTable.drain` reads that ring by mmap (:mod:`encapfwd.xdp.ringbuf`): a new flow costs
the controller one record read, not a share of a sweep of the whole table. The sweep remains for what the
ring does not carry, at a longer interval: refreshes of long-lived flows, flows the AF_PACKET workers write
(``pad`` 0), and new flows the program could not publish because the ring was full (``pad`` 0 too).

The XDP (and TC) program places new flows itself, in its ``flows`` map (``struct flow_value {sid, pad,
seen_ns}``), and the AF_PACKET workers write the flows they place there too (:class:`KernelFlows`). The
program writes ``pad = 0`` for a flow it creates and never reads ``pad``. The controller uses that word as
a **publication mark**:

- ``pad == 0``: never published (a new flow, from the program or from a worker);
- otherwise ``pad`` is ``seen_ns >> 30`` (units of 1.07 s, never 0) as it was when the entry was last
  published or inserted from a peer.

:meth:`KernelTable.sweep` reads the whole map in batches (``BPF_MAP_LOOKUP_BATCH``), returns the entries
that are new, or whose ``seen_ns`` advanced :data:`REFRESH_UNITS` past their mark (a long-lived flow this
dispatcher carries is published again about every 30 s, so that the peers' copies do not idle out), and
writes their new mark back in one batch (the kernel's batch update takes only ``BPF_ANY``: an entry evicted
between the read and the write comes back with its old value — it then idles out or is evicted again — and
a refresh of ``seen_ns`` by the program in that window is undone, which costs at most one extra refresh a
second later; writing one entry at a time with ``BPF_EXIST`` would avoid both at twice the syscalls of a
replicated flow). An entry inserted
from a peer carries the peer's ``seen`` as its mark, so it is published again only when this dispatcher's
own traffic refreshes it (no ping-pong between peers).

:meth:`KernelTable.insert` writes a peer's flow unless the local entry is fresher (``seen_ns`` later).
"""

from __future__ import annotations

import ctypes
import errno as errnos
import struct
import time
from typing import Iterator, List, Optional, Tuple

from encapfwd.xdp import maps as M

#: one publication mark unit: 2**30 ns (1.07 s)
MARK_SHIFT = 30
#: an entry is published again when its last packet is this many units (about 32 s) past its mark
REFRESH_UNITS = 30
#: entries read per BPF_MAP_LOOKUP_BATCH call
BATCH = 4096
_U32 = ctypes.c_uint32
_VALUE = M.FLOW_VALUE  # <IIQ: sid, pad (our mark), seen_ns
_KEY = M.FLOW_KEY  # <16s16s2s2sB3x
#: a ``struct flow_record`` of the ``new_flows`` ring (maps.FLOW_RECORD) with its key as raw bytes
_RECORD = struct.Struct(f"<{_KEY.size}s{_VALUE.format[1:]}")
assert _RECORD.size == M.FLOW_RECORD.size
BPF_NOEXIST, BPF_EXIST = 1, 2


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def mark_of(seen_ns: int) -> int:
    """The publication mark of an entry last seen at *seen_ns* (never 0: 0 means unpublished)."""
    return ((seen_ns >> MARK_SHIFT) & 0xFFFFFFFF) or 1


def due(pad: int, seen_ns: int) -> bool:
    """True when an entry must be published: never was, or its traffic ran REFRESH_UNITS past the mark."""
    if pad == 0:
        return True
    return ((mark_of(seen_ns) - pad) & 0xFFFFFFFF) >= REFRESH_UNITS and (
        (mark_of(seen_ns) - pad) & 0xFFFFFFFF) < 0x80000000


def _lookup_batch_fn():
    from encapfwd.xdp.libbpf import _lib

    lib = _lib()
    fn = lib.bpf_map_lookup_batch
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.POINTER(_U32), ctypes.c_void_p]
    return lib, fn


class KernelTable:
    """Sweep and insert on the kernel's ``flows`` map (a :class:`~encapfwd.xdp.libbpf.Map`)."""

    def __init__(self, flow_map, ring_map=None):
        self.map = flow_map
        self.fd = flow_map.fd
        self.ring = None
        if ring_map is not None:
            from encapfwd.xdp.ringbuf import RingBuffer

            self.ring = RingBuffer.of(ring_map, _RECORD)
        self.lib, self._lookup_batch = _lookup_batch_fn()
        self.update = self.lib.bpf_map_update_elem
        self.lookup = self.lib.bpf_map_lookup_elem
        self.errors = 0
        self.last_sweep_seconds = 0.0
        self.last_sweep_entries = 0

    # -- reading -----------------------------------------------------------------------------------------
    def drain(self, limit: int = 1 << 20) -> List[Tuple[bytes, int, int]]:
        """The new flows the program published since the last call, ``[(kernel key, sid, seen_ns)]`` (none
        without a ring). Already marked published in the table by the program."""
        if self.ring is None:
            return []
        try:
            return [(key, sid, seen) for key, sid, _pad, seen in self.ring.read(limit)]
        except Exception:  # noqa: BLE001 - never raises into the controller
            self.errors += 1
            return []

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def entries(self) -> Iterator[Tuple[bytes, int, int, int]]:
        """Every ``(kernel key, sid, pad, seen_ns)`` of the map, read in batches. A hash map that changes
        meanwhile may show an entry twice or miss one that moved (the next sweep sees it)."""
        chunk = BATCH
        ksize, vsize = _KEY.size, _VALUE.size
        in_batch = None
        out_batch = ctypes.create_string_buffer(8)
        while True:
            keys = ctypes.create_string_buffer(chunk * ksize)
            values = ctypes.create_string_buffer(chunk * vsize)
            count = _U32(chunk)
            opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
            ret = self._lookup_batch(self.fd, in_batch, out_batch, keys, values, ctypes.byref(count),
                                     ctypes.byref(opts))
            if ret < 0 and -ret == errnos.ENOSPC and chunk < (1 << 20):  # one bucket larger than the chunk
                chunk *= 4
                continue
            if ret < 0 and -ret != errnos.ENOENT:
                self.errors += 1
                return
            n = count.value
            kraw = keys.raw
            for i, (sid, pad, seen) in enumerate(_VALUE.iter_unpack(values.raw[:n * vsize])):
                yield kraw[i * ksize:(i + 1) * ksize], sid, pad, seen
            if ret < 0:  # ENOENT: that was the last batch
                return
            in_batch = ctypes.create_string_buffer(out_batch.raw, 8)

    def sweep(self, limit: int = 1 << 30) -> List[Tuple[bytes, int, int]]:
        """The entries to publish, ``[(kernel key, sid, seen_ns)]`` (at most *limit*), marked as published."""
        started = time.perf_counter()
        out = []
        seen_total = 0
        for key, sid, pad, seen in self.entries():
            seen_total += 1
            if len(out) < limit and due(pad, seen):
                out.append((key, sid, seen))
        if out:  # the marks, in batches (BPF_MAP_UPDATE_BATCH takes BPF_ANY only: see the module's text)
            try:
                self.map.update_batch(b"".join(k for k, _, _ in out),
                                      b"".join(_VALUE.pack(sid, mark_of(seen), seen) for _, sid, seen in out),
                                      len(out))
            except Exception:  # noqa: BLE001 - unmarked entries are published again next time
                self.errors += 1
        self.last_sweep_seconds = time.perf_counter() - started
        self.last_sweep_entries = seen_total
        return out

    def snapshot(self) -> List[Tuple[bytes, int, int]]:
        """Every entry, ``[(kernel key, sid, seen_ns)]`` (a bulk dump for a peer that starts)."""
        return [(key, sid, seen) for key, sid, pad, seen in self.entries()]

    def get(self, key: bytes) -> Optional[Tuple[int, int, int]]:
        raw = self.map.lookup(key)
        return None if raw is None else _VALUE.unpack(raw)

    # -- writing -----------------------------------------------------------------------------------------
    def _write(self, key: bytes, sid: int, pad: int, seen: int, flags: int) -> int:
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(_VALUE.pack(sid, pad, seen), _VALUE.size)
        return self.update(self.fd, kbuf, vbuf, flags)

    def update_many(self, keys: bytes, values: bytes, count: int, flags: int) -> List[Tuple[int, int]]:
        """Write *count* entries (concatenated keys and values), one ``bpf_map_update_elem`` each: the
        kernel's batch update takes no BPF_NOEXIST/BPF_EXIST. ``[(index, errno)]`` of those refused."""
        kbuf = ctypes.create_string_buffer(keys, len(keys))
        vbuf = ctypes.create_string_buffer(values, len(values))
        ksize, vsize = _KEY.size, _VALUE.size
        update, fd = self.update, self.fd
        kaddr, vaddr = ctypes.addressof(kbuf), ctypes.addressof(vbuf)  # plain addresses: no object per call
        failed = []
        for i in range(count):
            ret = update(fd, kaddr + i * ksize, vaddr + i * vsize, flags)
            if ret:
                failed.append((i, -ret))
        return failed

    def insert_many(self, rows: List[Tuple[bytes, int, int]]) -> dict:
        """Insert peers' flows ``[(kernel key, sid, seen_ns)]`` in batches (BPF_NOEXIST); an existing entry
        is compared and replaced only when older (:meth:`insert`). Counts by result."""
        out = {"inserted": 0, "refreshed": 0, "kept-local": 0, "error": 0}
        if not rows:
            return out
        pack = _VALUE.pack
        try:  # the mark inline (mark_of): one call fewer per entry
            failed = self.update_many(b"".join([k for k, _, _ in rows]),
                                      b"".join([pack(sid, ((seen >> MARK_SHIFT) & 0xFFFFFFFF) or 1, seen)
                                                for _, sid, seen in rows]),
                                      len(rows), BPF_NOEXIST)
        except Exception:  # noqa: BLE001 - never raises
            self.errors += 1
            out["error"] += len(rows)
            return out
        out["inserted"] = len(rows) - len(failed)
        for index, err in failed:
            result = self.insert(*rows[index]) if err == errnos.EEXIST else "error"
            out[result] += 1
            if result == "error":
                self.errors += 1
        return out

    def insert(self, key: bytes, sid: int, seen_ns: int) -> str:
        """Insert a peer's flow: ``inserted``, ``refreshed`` (the peer's copy is fresher), ``kept-local``
        (the local entry is as fresh or fresher) or ``error``. Never raises."""
        try:
            ret = self._write(key, sid, mark_of(seen_ns), seen_ns, BPF_NOEXIST)
            if ret == 0:
                return "inserted"
            if -ret != errnos.EEXIST:
                self.errors += 1
                return "error"
            current = self.get(key)
            if current is None:  # evicted meanwhile: try once more
                return "inserted" if self._write(key, sid, mark_of(seen_ns), seen_ns, BPF_NOEXIST) == 0 else "error"
            _, pad, local_seen = current
            if local_seen >= seen_ns:
                return "kept-local"
            ret = self._write(key, sid, mark_of(seen_ns), seen_ns, BPF_EXIST)
            return "refreshed" if ret == 0 else "error"
        except Exception:  # noqa: BLE001 - sync never raises into the controller
            self.errors += 1
            return "error"


def kernel_key(family: int, proto: int, src: bytes, dst: bytes, ports4: bytes) -> bytes:
    return M.flow_key(src, dst, proto, ports4)


def split_kernel_key(key: bytes) -> Tuple[bytes, bytes, bytes, bytes, int]:
    """``(src16, dst16, sport2, dport2, proto)`` of a kernel flow key."""
    return _KEY.unpack(key)


__all__ = ["KernelTable", "REFRESH_UNITS", "due", "mark_of", "split_kernel_key"]


class TableOf:
    """The :class:`KernelTable` of the data plane a :class:`~.xdp_executor.KernelFlows` holds now (None
    without one: the AF_PACKET engine, or before the program is loaded)."""

    def __init__(self, kernel_flows):
        self.kernel_flows = kernel_flows
        self._dataplane = None
        self._table: Optional[KernelTable] = None

    def __call__(self) -> Optional[KernelTable]:
        dataplane = getattr(self.kernel_flows, "dataplane", None)
        if dataplane is None:
            return None
        if dataplane is not self._dataplane:
            if self._table is not None:
                self._table.close()
            ring = dataplane.maps.get("new_flows")
            self._dataplane, self._table = dataplane, KernelTable(dataplane.maps["flows"], ring)
            if ring is not None:
                dataplane.set_publish(True)
        return self._table

    def close(self) -> None:
        """Flow synchronisation stops: the program stops publishing, the ring is unmapped."""
        if self._dataplane is not None and self._table is not None and self._table.ring is not None:
            try:
                self._dataplane.set_publish(False)
            except Exception:  # noqa: BLE001 - the program may be gone already
                pass
        if self._table is not None:
            self._table.close()
        self._dataplane = self._table = None
