"""Checksum completion for frames whose sender left the TCP/UDP checksum to offload."""

from __future__ import annotations

import struct


def pseudo_header(frame: bytes, v4: bool, proto: int, length: int) -> bytes:
    """The TCP/UDP pseudo-header of the IPv4 (*v4*) or IPv6 packet in Ethernet frame *frame*, for an L4 segment of
    *length* bytes of protocol *proto*."""
    if v4:
        return frame[26:34] + struct.pack("!BBH", 0, proto, length)
    return frame[22:54] + struct.pack("!IxxxB", length, proto)


def complete_checksum(frame: bytes) -> bytes:
    """Fill in the TCP/UDP checksum of a frame whose sender left it to offload (TP_STATUS_CSUMNOTREADY:
    a local or veth sender with TX checksum offload; the field then holds only the pseudo-header sum)."""
    from encapfwd.datapath.packet import checksum

    try:
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0x0F) * 4
            total = struct.unpack_from("!H", frame, 16)[0]
            proto = frame[23]
            if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:  # a fragment: nothing to complete
                return frame
            start, end = 14 + ihl, 14 + total
        elif ethertype == 0x86DD:
            proto = frame[20]
            start = 54
            end = start + struct.unpack_from("!H", frame, 18)[0]
        else:
            return frame
        if proto == 6:
            offset = 16
        elif proto == 17:
            offset = 6
        else:
            return frame
        if end > len(frame) or end - start < offset + 2:
            return frame
        segment = bytearray(frame[start:end])
        segment[offset : offset + 2] = b"\x00\x00"
        value = checksum(pseudo_header(frame, ethertype == 0x0800, proto, end - start) + segment)
        if proto == 17 and value == 0:
            value = 0xFFFF
        out = bytearray(frame)
        struct.pack_into("!H", out, start + offset, value)
        return bytes(out)
    except (IndexError, struct.error):
        return frame
