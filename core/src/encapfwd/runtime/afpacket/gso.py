"""Cutting a GSO buffer into the segments it stands for, for the AF_PACKET workers (docs/live.md, "GSO buffers").

A socket buffer may carry several segments of one flow: merged by GRO on a NIC, or never cut, by a sender's
TSO over a veth (a host's bridge hands a container what its NIC's GRO made). The workers forward frames one
by one, so each such buffer is first cut here into the frames the sender's segmentation would have sent,
exactly as the kernel's own GSO does (``tcp_gso_segment``, ``__udp_gso_segment``, ``inet_gso_segment``):

- each segment gets ``gso_size`` bytes of the payload (the last one what is left), the headers copied;
- TCP: the sequence number advanced by the payload before it; FIN and PSH only on the last segment, CWR only
  on the first; IPv4: the IP identification incremented per segment, the total length and header checksum
  rewritten; IPv6: the payload length;
- UDP (``VIRTIO_NET_HDR_GSO_UDP_L4``: a sender's UDP_SEGMENT, or UDP GRO): a UDP header per datagram;
- the TCP/UDP checksum of every segment computed in full (such buffers come with CHECKSUM_PARTIAL: the field
  holds only the pseudo-header's sum).

The receive ring gives the buffer's ``struct virtio_net_hdr`` (``PACKET_VNET_HDR``, set on the ring's socket):
its ``gso_type`` and ``gso_size``. Each segment then goes through the dispatcher as if it had arrived alone,
so the forwarding rules are the reference's: a segment too big for an encapsulated server's MTU is answered
with ICMP "fragmentation needed", as a full-size frame would be, and the client's path MTU discovery takes
the stream below it.
"""

from __future__ import annotations

import struct
from typing import List, Optional

from encapfwd.datapath.packet import checksum
from encapfwd.runtime.afpacket.checksum import pseudo_header

#: ``struct virtio_net_hdr``: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (little endian, as
#: AF_PACKET writes it on x86 and every little-endian host; the ring gives it just before the frame)
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO: IP fragments, not datagrams — not cut here
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_FIN, _PSH, _CWR = 0x01, 0x08, 0x80


def segments(frame: bytes, gso_type: int, gso_size: int) -> Optional[List[bytes]]:
    """The frames *frame* (a GSO buffer: Ethernet + IPv4/IPv6 + TCP/UDP + payload) stands for, or None when it
    cannot be cut (another gso_type, a malformed header, IPv6 extension headers, gso_size 0)."""
    kind = gso_type & ~GSO_ECN
    if gso_size <= 0 or len(frame) < 14 + 20:
        return None
    et = frame[12:14]
    if et == b"\x08\x00":
        if frame[14] >> 4 != 4:
            return None
        ihl = (frame[14] & 0x0F) * 4
        total = int.from_bytes(frame[16:18], "big")
        l4, proto, v4 = 14 + ihl, frame[23], True
        end = 14 + total if total else len(frame)  # 0: a buffer longer than 64 KiB (BIG TCP)
        if ihl < 20 or int.from_bytes(frame[20:22], "big") & 0x3FFF:  # a fragment is nobody's GSO buffer
            return None
    elif et == b"\x86\xdd":
        if len(frame) < 54:
            return None
        plen = int.from_bytes(frame[18:20], "big")
        l4, proto, v4 = 54, frame[20], False
        end = 54 + plen if plen else len(frame)
    else:
        return None
    if end > len(frame):
        return None
    if kind in (GSO_TCPV4, GSO_TCPV6) and proto == 6:
        return _tcp(frame, l4, end, gso_size, v4)
    if kind == GSO_UDP_L4 and proto == 17:
        return _udp(frame, l4, end, gso_size, v4)
    return None


def _ip(frame: bytes, l4: int, v4: bool, i: int, l4_len: int) -> bytes:
    """The IP header of segment *i* carrying *l4_len* bytes of TCP/UDP."""
    ip = bytearray(frame[14:l4])
    if v4:
        ip[2:4] = (len(ip) + l4_len).to_bytes(2, "big")
        ip[4:6] = ((int.from_bytes(ip[4:6], "big") + i) & 0xFFFF).to_bytes(2, "big")
        ip[10:12] = b"\x00\x00"
        ip[10:12] = checksum(ip).to_bytes(2, "big")
    else:
        ip[4:6] = l4_len.to_bytes(2, "big")
    return bytes(ip)


def _tcp(frame: bytes, l4: int, end: int, size: int, v4: bool) -> Optional[List[bytes]]:
    if end < l4 + 20:
        return None
    doff = (frame[l4 + 12] >> 4) * 4
    start = l4 + doff
    if doff < 20 or start >= end:
        return None
    seq = int.from_bytes(frame[l4 + 4 : l4 + 8], "big")
    flags = frame[l4 + 13]
    eth = frame[:14]
    out = []
    count = (end - start + size - 1) // size
    for i in range(count):
        chunk = frame[start + i * size : min(start + (i + 1) * size, end)]
        tcp = bytearray(frame[l4:start])
        tcp[4:8] = ((seq + i * size) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags if i == 0 else flags & ~_CWR
        tcp[13] = f if i == count - 1 else f & ~(_FIN | _PSH)
        tcp[16:18] = b"\x00\x00"
        length = doff + len(chunk)
        tcp[16:18] = checksum(pseudo_header(frame, v4, 6, length) + tcp + chunk).to_bytes(2, "big")
        out.append(eth + _ip(frame, l4, v4, i, length) + bytes(tcp) + chunk)
    return out


def _udp(frame: bytes, l4: int, end: int, size: int, v4: bool) -> Optional[List[bytes]]:
    start = l4 + 8
    if start >= end:
        return None
    eth, ports = frame[:14], frame[l4 : l4 + 4]
    out = []
    for i, at in enumerate(range(start, end, size)):
        chunk = frame[at : min(at + size, end)]
        length = 8 + len(chunk)
        head = ports + length.to_bytes(2, "big")
        value = checksum(pseudo_header(frame, v4, 17, length) + head + b"\x00\x00" + chunk) or 0xFFFF
        out.append(eth + _ip(frame, l4, v4, i, length) + head + value.to_bytes(2, "big") + chunk)
    return out


__all__ = ["GSO_TCPV4", "GSO_TCPV6", "GSO_UDP_L4", "VNET_HDR", "VNET_HDR_LEN", "segments"]
