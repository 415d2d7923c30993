"""Replay engine: pcap/pcapng in → :class:`~encapfwd.dispatcher.Dispatcher` → pcap out.

The reader is a raw record reader (like scapy's ``RawPcapReader``/``RawPcapNgReader``, without importing
scapy): frames are handed to the dispatcher as ``bytes`` with their capture time, never dissected. It reads
classic pcap (micro- and nanosecond, either byte order) and pcapng (section, interface, enhanced/simple/
obsolete packet blocks, ``if_tsresol``). Ethernet captures are replayed as they are; raw IP and Linux cooked
(``tcpdump -i any``) captures get an Ethernet header. The output is a classic pcap (Ethernet,
microseconds) whose frames carry the timestamp of the frame that produced them.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from typing import BinaryIO, Callable, Optional, Tuple

from ..errors import EncapfwdError

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"


class CaptureError(EncapfwdError):
    """The input is not a capture this engine can read."""


# Other link types are given an Ethernet header so the dispatcher sees what a live interface delivers:
# raw IP (101, 228, 229, and 12 as some systems write DLT_RAW), Linux cooked captures (113 SLL, 276 SLL2, as
# ``tcpdump -i any`` writes them: the sender's link-layer address becomes the source MAC). The destination
# MAC of a synthesised header is all zeros.
_ZERO_MAC = b"\x00" * 6


def _raw_ip(data: bytes) -> bytes:
    if data and data[0] >> 4 == 6:
        return _ZERO_MAC * 2 + b"\x86\xdd" + data
    return _ZERO_MAC * 2 + b"\x08\x00" + data


def _sll(data: bytes) -> bytes:
    # packet type (2), ARPHRD (2), address length (2), address (8), protocol (2)
    if len(data) < 16:
        return b""
    alen = min((data[4] << 8) | data[5], 6)
    src = (data[6:6 + alen] + _ZERO_MAC)[:6]
    return _ZERO_MAC + src + data[14:16] + data[16:]


def _sll2(data: bytes) -> bytes:
    # protocol (2), reserved (2), interface index (4), ARPHRD (2), packet type (1), address length (1),
    # address (8)
    if len(data) < 20:
        return b""
    alen = min(data[11], 6)
    src = (data[12:12 + alen] + _ZERO_MAC)[:6]
    return _ZERO_MAC + src + data[0:2] + data[20:]


CONVERTERS = {
    LINKTYPE_ETHERNET: None,
    101: _raw_ip,
    228: _raw_ip,
    229: _raw_ip,
    12: _raw_ip,
    113: _sll,
    276: _sll2,
}


def _converter(path: str, linktype: int):
    try:
        return CONVERTERS[linktype]
    except KeyError:
        raise CaptureError(
            f"{path}: link type {linktype} is not supported (Ethernet, raw IP and Linux cooked captures are)"
        ) from None


# ----------------------------------------------------------------------------------------------- reading


def _read_pcap(handle: BinaryIO, path: str, header: bytes) -> Iterator[Tuple[float, bytes]]:
    endian, resolution = _PCAP_MAGIC[header[:4]]
    linktype = struct.unpack(endian + "I", header[20:24])[0] & 0x0FFFFFFF
    convert = _converter(path, linktype)
    record = struct.Struct(endian + "IIII")
    read = handle.read
    while True:
        head = read(16)
        if len(head) < 16:
            return
        sec, frac, caplen, _wirelen = record.unpack(head)
        if caplen > SNAPLEN * 4:
            raise CaptureError(f"{path}: corrupt record (captured length {caplen})")
        data = read(caplen)
        if len(data) < caplen:
            return  # truncated last record: stop like tcpdump does
        yield sec + frac * resolution, (data if convert is None else convert(data))


def _tsresol(options: bytes, endian: str) -> float:
    i = 0
    while i + 4 <= len(options):
        code, length = struct.unpack_from(endian + "HH", options, i)
        if code == 0:
            break
        if code == 9 and length >= 1:
            value = options[i + 4]
            return 2.0 ** -(value & 0x7F) if value & 0x80 else 10.0 ** -value
        i += 4 + ((length + 3) & ~3)
    return 1e-6


def _read_pcapng(handle: BinaryIO, path: str, first: bytes) -> Iterator[Tuple[float, bytes]]:
    read = handle.read
    endian = "<"
    interfaces = []  # (converter to Ethernet or None, timestamp resolution)
    head = first
    while True:
        if len(head) < 8:
            return
        if head[:4] == _PCAPNG_SHB:
            rest = read(4)
            if len(rest) < 4:
                return
            if rest == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif rest == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise CaptureError(f"{path}: corrupt pcapng section header")
            (length,) = struct.unpack(endian + "I", head[4:8])
            if length < 28 or length % 4 or length > 1 << 24:
                raise CaptureError(f"{path}: corrupt pcapng section header")
            if len(read(length - 12)) < length - 12:
                return
            interfaces = []
            head = read(8)
            continue
        btype, length = struct.unpack(endian + "II", head)
        if length < 12 or length % 4 or length > 1 << 26:
            raise CaptureError(f"{path}: corrupt pcapng block (length {length})")
        body = read(length - 8)
        if len(body) < length - 8:
            return
        body = body[:-4]
        if btype == 1:  # interface description
            linktype = struct.unpack_from(endian + "H", body, 0)[0]
            interfaces.append((_converter(path, linktype), _tsresol(body[8:], endian)))
        elif btype == 6 and len(body) >= 20:  # enhanced packet
            ifid, hi, lo, caplen, _wire = struct.unpack_from(endian + "IIIII", body, 0)
            convert, resolution = interfaces[ifid] if ifid < len(interfaces) else (None, 1e-6)
            data = body[20:20 + caplen]
            yield ((hi << 32) | lo) * resolution, (data if convert is None else convert(data))
        elif btype == 3 and len(body) >= 4:  # simple packet
            (wire,) = struct.unpack_from(endian + "I", body, 0)
            convert = interfaces[0][0] if interfaces else None
            data = body[4:4 + wire]
            yield 0.0, (data if convert is None else convert(data))
        elif btype == 2 and len(body) >= 20:  # obsolete packet block
            ifid, _drops, hi, lo, caplen, _wire = struct.unpack_from(endian + "HHIIII", body, 0)
            convert, resolution = interfaces[ifid] if ifid < len(interfaces) else (None, 1e-6)
            data = body[20:20 + caplen]
            yield ((hi << 32) | lo) * resolution, (data if convert is None else convert(data))
        head = read(8)


def read_frames(path) -> Iterator[Tuple[float, bytes]]:
    """Yield ``(timestamp, frame)`` for every record of the pcap or pcapng file *path*."""
    path = os.fspath(path)
    try:
        handle = open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise CaptureError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        header = handle.read(24)
        if header[:4] in _PCAP_MAGIC and len(header) == 24:
            yield from _read_pcap(handle, path, header)
        elif header[:4] == _PCAPNG_SHB:
            handle.seek(0)
            yield from _read_pcapng(handle, path, handle.read(8))
        else:
            raise CaptureError(f"{path}: not a pcap or pcapng capture")


# ----------------------------------------------------------------------------------------------- writing


class PcapWriter:
    """Minimal classic pcap writer (Ethernet, microsecond timestamps)."""

    _record = struct.Struct("<IIII")

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._handle = open(self.path, "wb", buffering=1 << 20)
        except OSError as exc:
            raise CaptureError(f"cannot write {self.path}: {exc.strerror}") from None
        self._handle.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self.count = 0

    def write(self, ts: float, frame: bytes) -> None:
        sec = int(ts)
        usec = round((ts - sec) * 1e6)
        if usec >= 1000000:
            sec, usec = sec + 1, usec - 1000000
        self._handle.write(self._record.pack(sec & 0xFFFFFFFF, usec, len(frame), len(frame)))
        self._handle.write(frame)
        self.count += 1

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------ replay


def replay(dispatcher, in_path, out_path, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Forward every frame of *in_path* through *dispatcher*, write what it sends to *out_path*.

    :param progress: called now and then with the number of input bytes consumed since the last call.
    :returns: a JSON-able summary: frame counts, time, and the dispatcher's report (servers, drops).
    """
    frames_in = 0
    bytes_in = 0
    started = time.perf_counter()
    process = dispatcher.process
    last = 0.0
    with PcapWriter(out_path) as writer:
        write = writer.write
        pending = 0
        for ts, frame in read_frames(in_path):
            frames_in += 1
            size = len(frame) + 16
            bytes_in += size
            last = ts
            for out in process(frame, ts):
                write(ts, out)
            if progress is not None:
                pending += size
                if pending >= 1 << 20:
                    progress(pending)
                    pending = 0
        if progress is not None and pending:
            progress(pending)
        dispatcher_flush = getattr(dispatcher, "flush", None)
        if dispatcher_flush is not None:
            dispatcher_flush()
        frames_out = writer.count
    seconds = time.perf_counter() - started
    report = dispatcher.report()
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
        "servers": report.get("servers", {}),
        "drops": report.get("drops", {}),
        "flows": report.get("flows", {}),
    }
    return summary


__all__ = ["CaptureError", "PcapWriter", "read_frames", "replay"]
