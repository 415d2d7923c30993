"""Replay engine: pcap/pcapng in → :class:`~encapfwd.datapath.dispatcher.Dispatcher` → pcap out.

The reader is a raw record reader (like scapy's ``RawPcapReader``/``RawPcapNgReader``, without importing
scapy): frames are handed to the dispatcher as ``bytes`` with their capture time, never dissected. It reads
classic pcap (micro- and nanosecond, either byte order) and pcapng (section, interface, enhanced/simple/
obsolete packet blocks, ``if_tsresol``). Ethernet captures are replayed as they are; raw IP and Linux cooked
(``tcpdump -i any``) captures get an Ethernet header. The output is a classic pcap (Ethernet,
microseconds) whose frames carry the timestamp of the frame that produced them.

A capture that ends in the middle of a record or block (a copy cut short, a capture still being written)
is read up to its last whole frame and says where it was cut (:attr:`CaptureReader.truncation`); anything
else wrong with the bytes, and every I/O error, is a :class:`CaptureError` (one line in the CLI).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from itertools import count
from typing import Callable, NamedTuple, Optional, Tuple

from encapfwd.errors import CaptureError  # the class lives with the other exceptions

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"


# Other link types are given an Ethernet header so the dispatcher sees what a live interface delivers:
# raw IP (101, 228, 229, and 12 as some systems write DLT_RAW), Linux cooked captures (113 SLL, 276 SLL2, as
# ``tcpdump -i any`` writes them: the sender's link-layer address becomes the source MAC). The destination
# MAC of a synthesised header is the dispatcher's own (*local*: the frame is taken as sent to it), except
# where a cooked capture says the frame went elsewhere: broadcast and multicast packet types get such an
# address, a frame seen for another host (PACKET_OTHERHOST) the all-zero one. Without *local* (None), every
# synthesised destination is all zeros.
_ZERO_MAC = b"\x00" * 6
_BROADCAST_MAC = b"\xff" * 6
#: cooked-capture packet type (PACKET_HOST 0, BROADCAST 1, MULTICAST 2, OTHERHOST 3, OUTGOING 4) → the
#: destination MAC to give the frame (None: the dispatcher's own)
_SLL_DESTINATION = {1: _BROADCAST_MAC, 2: b"\x01\x00\x5e\x00\x00\x01", 3: _ZERO_MAC}


def _sll_destination(pkttype: int, local: Optional[bytes]) -> bytes:
    if local is None:
        return _ZERO_MAC
    return _SLL_DESTINATION.get(pkttype) or local


def _raw_ip(data: bytes, local: Optional[bytes] = None) -> bytes:
    dst = local or _ZERO_MAC
    if data and data[0] >> 4 == 6:
        return dst + _ZERO_MAC + b"\x86\xdd" + data
    return dst + _ZERO_MAC + b"\x08\x00" + data


def _sll(data: bytes, local: Optional[bytes] = None) -> bytes:
    # packet type (2), ARPHRD (2), address length (2), address (8), protocol (2)
    if len(data) < 16:
        return b""
    alen = min((data[4] << 8) | data[5], 6)
    src = (data[6:6 + alen] + _ZERO_MAC)[:6]
    return _sll_destination((data[0] << 8) | data[1], local) + src + data[14:16] + data[16:]


def _sll2(data: bytes, local: Optional[bytes] = None) -> bytes:
    # protocol (2), reserved (2), interface index (4), ARPHRD (2), packet type (1), address length (1),
    # address (8)
    if len(data) < 20:
        return b""
    alen = min(data[11], 6)
    src = (data[12:12 + alen] + _ZERO_MAC)[:6]
    return _sll_destination(data[10], local) + src + data[0:2] + data[20:]


CONVERTERS = {
    LINKTYPE_ETHERNET: None,
    101: _raw_ip,
    228: _raw_ip,
    229: _raw_ip,
    12: _raw_ip,
    113: _sll,
    276: _sll2,
}


def _converter(path: str, linktype: int, local: Optional[bytes] = None):
    try:
        convert = CONVERTERS[linktype]
    except KeyError:
        raise CaptureError(
            f"{path}: link type {linktype} is not supported (Ethernet, raw IP and Linux cooked captures are)"
        ) from None
    if convert is None or local is None:
        return convert
    return lambda data: convert(data, local)


# ----------------------------------------------------------------------------------------------- reading

#: A pcap record longer than this is taken for a corrupt record header, not for a frame.
MAX_CAPLEN = SNAPLEN * 4

_BLOCK_NAMES = {
    0x0A0D0D0A: "section header block",
    1: "interface description block",
    2: "packet block",
    3: "simple packet block",
    4: "name resolution block",
    5: "interface statistics block",
    6: "enhanced packet block",
}
_PACKET_BLOCKS = (2, 3, 6)


def _block_name(btype: int) -> str:
    return "pcapng " + _BLOCK_NAMES.get(btype, f"block of type 0x{btype:08x}")


def _corrupt(path: str, what: str, offset: int, detail: str) -> CaptureError:
    return CaptureError(f"{path}: corrupt {what} at byte offset {offset} ({detail})")


class Truncation(NamedTuple):
    """Where a capture ends in the middle of a record (pcap) or block (pcapng)."""

    frame: int  #: the frame being read when the file ended, counted from 1 like tshark's ``frame.number``
    offset: int  #: byte offset of the record or block that is cut short
    what: str  #: "record", "record header", "pcapng enhanced packet block", "pcapng block header" …
    have: int  #: bytes present from *offset* to the end of the file
    need: int  #: bytes the record or block announces (the header's size when the header itself is cut short)
    packet: bool  #: whether the record or block cut short holds a frame

    def describe(self, path) -> str:
        where = f"{self.what} at byte offset {self.offset}: {self.have} of {self.need} bytes present"
        if self.packet:
            return f"{path} appears to have been cut short in the middle of frame {self.frame} ({where})"
        after = f"after frame {self.frame - 1}" if self.frame > 1 else "before the first frame"
        return f"{path} appears to have been cut short in the middle of a {self.what} ({where}), {after}"

    def as_dict(self, path) -> dict:
        """JSON-able, with the one-line :meth:`describe` as ``message``."""
        return {"frame": self.frame, "offset": self.offset, "what": self.what, "have": self.have,
                "need": self.need, "message": self.describe(path)}


def _tsresol(options: bytes, endian: str) -> float:
    i = 0
    while i + 4 <= len(options):
        code, length = struct.unpack_from(endian + "HH", options, i)
        if code == 0:
            break
        if code == 9 and length >= 1 and i + 4 < len(options):
            value = options[i + 4]
            return 2.0 ** -(value & 0x7F) if value & 0x80 else 10.0 ** -value
        i += 4 + ((length + 3) & ~3)
    return 1e-6


def _section_header(path: str, offset: int, head: bytes) -> Tuple[str, int]:
    """Byte order and length of the pcapng section header block whose first 12 bytes are *head*."""
    bom = head[8:12]
    if bom == b"\x4d\x3c\x2b\x1a":
        endian = "<"
    elif bom == b"\x1a\x2b\x3c\x4d":
        endian = ">"
    else:
        raise _corrupt(path, _block_name(0x0A0D0D0A), offset, f"byte-order magic {bom.hex()}")
    (length,) = struct.unpack(endian + "I", head[4:8])
    if length < 28 or length % 4 or length > 1 << 24:
        raise _corrupt(path, _block_name(0x0A0D0D0A), offset, f"block length {length}")
    return endian, length


class CaptureReader:
    """The frames of a pcap or pcapng file as ``(timestamp, frame)``; iterate once.

    The file is opened and its header checked at once, so a file that is not a capture is refused before
    anything else happens. The only exception raised, for any bytes, is :class:`CaptureError`. A file that
    ends in the middle of a record or block is not an error: iteration stops after the last whole frame
    and :attr:`truncation` then says where the file was cut short (``None`` for a whole file).
    """

    def __init__(self, path, local_mac: Optional[bytes] = None):
        self.path = os.fspath(path)
        #: the dispatcher's MAC: the destination of the Ethernet header given to raw IP and cooked frames
        self.local_mac = local_mac
        self.truncation: Optional[Truncation] = None
        try:
            self._handle = open(self.path, "rb", buffering=1 << 20)
        except OSError as exc:
            raise CaptureError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            self._frames = self._start()
        except OSError as exc:
            self._handle.close()
            raise CaptureError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            self._handle.close()
            raise

    def _start(self) -> Iterator[Tuple[float, bytes]]:
        path = self.path
        header = self._handle.read(24)
        if header[:4] in _PCAP_MAGIC:
            if len(header) < 24:
                raise CaptureError(f"{path}: the pcap file header is cut short ({len(header)} of 24 bytes)")
            endian, resolution = _PCAP_MAGIC[header[:4]]
            linktype = struct.unpack(endian + "I", header[20:24])[0] & 0x0FFFFFFF
            return self._read_pcap(endian, resolution, _converter(path, linktype, self.local_mac))
        if header[:4] == _PCAPNG_SHB:
            if len(header) < 12:
                raise CaptureError(f"{path}: the pcapng section header block is cut short "
                                   f"({len(header)} of at least 28 bytes)")
            endian, length = _section_header(path, 0, header)
            self._handle.seek(0)
            block = self._handle.read(length)
            if len(block) < length:
                raise CaptureError(f"{path}: the pcapng section header block is cut short "
                                   f"({len(block)} of {length} bytes)")
            if block[-4:] != block[4:8]:
                raise _corrupt(path, _block_name(0x0A0D0D0A), 0, "its two block lengths differ")
            return self._read_pcapng(endian, length)
        if not header:
            raise CaptureError(f"{path}: empty file, not a pcap or pcapng capture")
        raise CaptureError(f"{path}: not a pcap or pcapng capture (it begins with {header[:4].hex(' ')})")

    def __iter__(self) -> Iterator[Tuple[float, bytes]]:
        return self._frames

    def close(self) -> None:
        self._frames.close()
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _cut(self, frame: int, offset: int, what: str, have: int, need: int, packet: bool) -> None:
        self.truncation = Truncation(frame, offset, what, have, need, packet)

    def _read_pcap(self, endian: str, resolution: float, convert) -> Iterator[Tuple[float, bytes]]:
        path = self.path
        record = struct.Struct(endian + "IIII").unpack
        read = self._handle.read
        tell = self._handle.tell  # byte offsets are only worked out for a message: the loop stays lean
        try:
            for n in count(1):  # n: the number of the frame being read, from 1
                head = read(16)
                if len(head) < 16:
                    if head:
                        self._cut(n, tell() - len(head), "record header", len(head), 16, True)
                    return
                sec, frac, caplen, _wirelen = record(head)
                if caplen > MAX_CAPLEN:
                    raise _corrupt(path, f"record header of frame {n}", tell() - 16,
                                   f"captured length {caplen}, more than {MAX_CAPLEN}")
                data = read(caplen)
                if len(data) < caplen:
                    self._cut(n, tell() - 16 - len(data), "record", 16 + len(data), 16 + caplen, True)
                    return
                yield sec + frac * resolution, (data if convert is None else convert(data))
        except OSError as exc:
            raise CaptureError(f"cannot read {path}: {exc.strerror or exc}") from None

    def _read_pcapng(self, endian: str, pos: int) -> Iterator[Tuple[float, bytes]]:
        path = self.path
        read = self._handle.read
        unpack_from = struct.unpack_from
        interfaces = []  # (converter to Ethernet or None, timestamp resolution)
        n = 0  # frames read
        try:
            while True:
                head = read(8)
                if len(head) < 8:
                    if head:
                        self._cut(n + 1, pos, "pcapng block header", len(head), 8, False)
                    return
                start = pos
                if head[:4] == _PCAPNG_SHB:
                    rest = read(4)
                    if len(rest) < 4:
                        self._cut(n + 1, start, _block_name(0x0A0D0D0A), 8 + len(rest), 28, False)
                        return
                    endian, length = _section_header(path, start, head + rest)
                    body = read(length - 12)
                    if len(body) < length - 12:
                        self._cut(n + 1, start, _block_name(0x0A0D0D0A), 12 + len(body), length, False)
                        return
                    if body[-4:] != head[4:]:
                        raise _corrupt(path, _block_name(0x0A0D0D0A), start, "its two block lengths differ")
                    interfaces = []
                    pos += length
                    continue
                btype, length = unpack_from(endian + "II", head)
                if length < 12 or length % 4 or length > 1 << 26:
                    raise _corrupt(path, _block_name(btype), start, f"block length {length}")
                body = read(length - 8)
                if len(body) < length - 8:
                    packet = btype in _PACKET_BLOCKS
                    self._cut(n + 1, start, _block_name(btype), 8 + len(body), length, packet)
                    return
                if body[-4:] != head[4:]:
                    raise _corrupt(path, _block_name(btype), start, "its two block lengths differ")
                pos += length
                size = length - 12  # the body without the trailing block length
                if btype in (6, 2):  # enhanced packet, or the obsolete packet block
                    if size < 20:
                        raise _corrupt(path, _block_name(btype), start,
                                       f"block length {length}, at least 32 needed")
                    if btype == 6:
                        ifid, hi, lo, caplen, _wire = unpack_from(endian + "IIIII", body, 0)
                    else:
                        ifid, _drops, hi, lo, caplen, _wire = unpack_from(endian + "HHIIII", body, 0)
                    if caplen > size - 20:
                        raise _corrupt(path, _block_name(btype), start,
                                       f"captured length {caplen} does not fit in block length {length}")
                    convert, resolution = interfaces[ifid] if ifid < len(interfaces) else (None, 1e-6)
                    data = body[20:20 + caplen]
                    n += 1
                    yield ((hi << 32) | lo) * resolution, (data if convert is None else convert(data))
                elif btype == 1:  # interface description
                    if size < 8:
                        raise _corrupt(path, _block_name(1), start,
                                       f"block length {length}, at least 20 needed")
                    linktype = unpack_from(endian + "H", body, 0)[0]
                    interfaces.append((_converter(path, linktype, self.local_mac),
                                       _tsresol(body[8:size], endian)))
                elif btype == 3:  # simple packet
                    if size < 4:
                        raise _corrupt(path, _block_name(3), start,
                                       f"block length {length}, at least 16 needed")
                    (wire,) = unpack_from(endian + "I", body, 0)
                    convert = interfaces[0][0] if interfaces else None
                    data = body[4:4 + min(wire, size - 4)]
                    n += 1
                    yield 0.0, (data if convert is None else convert(data))
        except OSError as exc:
            raise CaptureError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_frames(path) -> Iterator[Tuple[float, bytes]]:
    """Yield ``(timestamp, frame)`` for every record of the pcap or pcapng file *path*.

    Stops quietly at a record cut short; use :class:`CaptureReader` to learn whether that happened.
    """
    with CaptureReader(path) as reader:
        yield from reader


# ----------------------------------------------------------------------------------------------- writing


class PcapWriter:
    """Minimal classic pcap writer (Ethernet, microsecond timestamps).

    Every failure to write (no space left, a read-only or missing folder …) is a :class:`CaptureError`
    ``cannot write PATH: reason``.
    """

    _record = struct.Struct("<IIII")

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._handle = open(self.path, "wb", buffering=1 << 20)
        except OSError as exc:
            raise self._error(exc) from None
        self._write = self._handle.write
        self.count = 0
        try:
            self._write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        except OSError as exc:
            self._abort()
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> CaptureError:
        return CaptureError(f"cannot write {self.path}: {exc.strerror or exc}")

    def write(self, ts: float, frame: bytes) -> None:
        sec = int(ts)
        usec = round((ts - sec) * 1e6)
        if usec >= 1000000:
            sec, usec = sec + 1, usec - 1000000
        try:
            self._write(self._record.pack(sec & 0xFFFFFFFF, usec, len(frame), len(frame)))
            self._write(frame)
        except OSError as exc:
            raise self._error(exc) from None
        self.count += 1

    def close(self) -> None:
        try:
            self._handle.close()  # flushes: where a full disk is usually noticed
        except OSError as exc:
            raise self._error(exc) from None

    def _abort(self) -> None:
        try:
            self._handle.close()  # the file descriptor is closed even when the flush fails
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._abort()  # the error on its way out says what went wrong; don't replace it


# ------------------------------------------------------------------------------------------------ replay


def local_mac(executor) -> Optional[bytes]:
    """The MAC *executor* forwards frames for (its plan's executor ``mac``), or None when it has none."""
    mac = executor.plan.config.executor.mac
    if not mac:
        return None
    from encapfwd.datapath.packet import mac_bytes

    return mac_bytes(mac)


def readdress(frame: bytes, local: Optional[bytes]) -> bytes:
    """*frame* sent to *local* instead of its unicast destination (``--any-mac``: a capture taken where the
    frames were addressed to another host); broadcast, multicast and short frames stay as they are."""
    if local is None or len(frame) < 14 or frame[0] & 1:
        return frame
    return local + frame[6:]


def replay(dispatcher, in_path, out_path, progress: Optional[Callable[[int], None]] = None,
           any_mac: bool = False) -> dict:
    """Forward every frame of *in_path* through *dispatcher* (any :class:`~encapfwd.executor.FrameExecutor`),
    write what it sends to *out_path*.

    Only frames sent to the dispatcher's MAC are forwarded, as live (raw IP and cooked frames are given
    it); with *any_mac* every unicast frame is taken as sent to it.

    :param progress: called now and then with the number of input bytes consumed since the last call.
    :returns: a JSON-able summary: frame counts, time, and the dispatcher's report (servers, drops);
        ``truncated`` is true when *in_path* ends in the middle of a record or block (the frames before it
        are forwarded and written, ``truncation`` says where: frame number, byte offset, what was cut short).
    :raises CaptureError: *in_path* is not a capture or is corrupt, *out_path* cannot be written.
    """
    frames_in = 0
    bytes_in = 0
    started = time.perf_counter()
    process = dispatcher.process
    last = 0.0
    local = local_mac(dispatcher)
    # The capture is opened first: an input that is not a capture is refused before OUT is created.
    with CaptureReader(in_path, local) as reader, PcapWriter(out_path) as writer:
        write = writer.write
        pending = 0
        for ts, frame in reader:
            frames_in += 1
            size = len(frame) + 16
            bytes_in += size
            last = ts
            if any_mac:
                frame = readdress(frame, local)
            for out in process(frame, ts):
                write(ts, out)
            if progress is not None:
                pending += size
                if pending >= 1 << 20:
                    progress(pending)
                    pending = 0
        if progress is not None and pending:
            progress(pending)
        dispatcher.flush()
        frames_out = writer.count
    seconds = time.perf_counter() - started
    report = dispatcher.report()
    truncation = reader.truncation
    summary = {
        "input": os.fspath(in_path),
        "output": os.fspath(out_path),
        "frames_in": frames_in,
        "frames_out": frames_out,
        "forwarded": report.get("forwarded", 0),
        "dropped": report.get("dropped", 0),
        "icmp_sent": report.get("icmp_sent", 0),
        "seconds": round(seconds, 6),
        "frames_per_second": round(frames_in / seconds) if seconds > 0 else None,
        "last_timestamp": last,
        "truncated": truncation is not None,
        "truncation": None if truncation is None else truncation.as_dict(os.fspath(in_path)),
        "servers": report.get("servers", {}),
        "drops": report.get("drops", {}),
        "any_mac": bool(any_mac),
        "flows": report.get("flows", {}),
        "engines": report.get("engines") or {"xdp": 0, "python": frames_in},
    }
    return summary


__all__ = ["CaptureError", "CaptureReader", "PcapWriter", "Truncation", "local_mac", "read_frames",
           "readdress", "replay"]
