"""Reading a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) from Python by mmap, without libbpf's per-record C
callback: the program's ``new_flows`` ring, whose records flow synchronisation publishes (docs/scale-out.md).

The kernel's layout (``kernel/bpf/ringbuf.c``, as libbpf's ``ring_buffer__poll`` reads it): page 0 holds
the consumer position (mapped read-write: the reader advances it); the next page holds the producer
position, followed by the data area mapped twice in a row, so that a record that wraps round the end is
still contiguous. Each record starts with an 8-byte header, ``u32 len`` (bit 31: still being written,
bit 30: discarded) and ``u32 page offset``, and takes ``len + 8`` bytes rounded up to 8. Positions only grow;
``position & (size - 1)`` is the offset in the data area.

One reader per ring (the controller): the consumer position is not shared with anyone else.
"""

from __future__ import annotations

import mmap
import struct
from typing import List, Tuple

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBuffer:
    """The consumer side of a ring buffer map whose records are all *record* (a ``struct.Struct``)."""

    def __init__(self, fd: int, size: int, record: struct.Struct):
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"a ring buffer's size is a power of 2 and a multiple of the page size, not {size}")
        page = mmap.PAGESIZE
        self.size, self.mask, self.record = size, size - 1, record
        self.step = (record.size + HEADER + 7) & ~7
        # the record as it sits in the ring, header included (the bulk read's unit)
        self._framed = struct.Struct(f"<II{record.format.lstrip('<=!@>')}{self.step - HEADER - record.size}x")
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        self.read_records = 0
        self.skipped = 0  # discarded records, or records of another size

    @classmethod
    def of(cls, ring_map, record: struct.Struct) -> "RingBuffer":
        """The reader of a loaded ring buffer :class:`~encapfwd.xdp.libbpf.Map`."""
        return cls(ring_map.fd, ring_map.max_entries, record)

    def pending(self) -> int:
        """Bytes written and not yet read."""
        return _U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def read(self, most: int = 1 << 20) -> List[Tuple]:
        """The complete records written since the last read (unpacked, header dropped), at most *most*; the
        consumer position advanced past them. Stops at a record still being written."""
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        out: List[Tuple] = []
        data, mask, step, framed, want = self._data, self.mask, self.step, self._framed, self.record.size
        while cons < prod and len(out) < most:
            # a run of records that sit one after the other (they do while every record has our size)
            off = cons & mask
            count = min((prod - cons) // step, most - len(out))  # within 2 × size: mapped
            taken = 0
            for row in framed.iter_unpack(data[off:off + count * step]):
                length = row[0]
                if length != want:  # busy, discarded, or another size: the careful path below
                    break
                out.append(row[2:])
                taken += 1
            cons += taken * step
            if taken == count and count:
                continue
            length = _U32.unpack_from(data, cons & mask)[0]
            if length & BUSY:
                break
            size = length & ~(BUSY | DISCARD)
            if length & DISCARD or size != want:
                self.skipped += 1
            else:
                out.append(self.record.unpack_from(data, (cons & mask) + HEADER))
            cons += (size + HEADER + 7) & ~7
        _U64.pack_into(self._consumer, 0, cons)
        self.read_records += len(out)
        return out

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()


__all__ = ["RingBuffer"]
