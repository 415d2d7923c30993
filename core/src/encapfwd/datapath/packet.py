"""IPv4/IPv6/L4 helpers on plain ``bytes`` (no scapy): checksums, TTL update, ICMP builders, fragmentation.

Everything here works on Python ``bytes``/``bytearray`` and :mod:`struct` only, so the dispatcher can call
it per packet. Offsets are into an IP packet (not an Ethernet frame) unless a name says otherwise.

- :func:`checksum` — the Internet checksum (RFC 1071).
- :func:`ttl_decrement_checksum` — RFC 1624 eqn. 3 for a TTL decremented by one.
- :func:`icmp4_error` / :func:`icmp6_error` — ICMP "time exceeded" and "fragmentation needed" (and the
  ICMPv6 equivalents) quoting the offending packet, as RFC 792/1812/4443 ask.
- :func:`fragment4` — RFC 791 fragmentation of an IPv4 packet (options with the copy bit are copied).
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

ETH_HLEN = 14

PROTO_ICMP = 1
PROTO_ICMPV6 = 58

IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF

ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED = 4  # code of type 3
ICMP_TIME_EXCEEDED = 11
ICMP_TTL_EXCEEDED = 0  # code of type 11
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3

#: ICMPv4 error types whose body quotes the offending packet (RFC 792).
ICMP4_ERRORS = frozenset((3, 4, 5, 11, 12))
#: ICMPv6 error types whose body quotes the offending packet (RFC 4443).
ICMP6_ERRORS = frozenset((1, 2, 3, 4))
#: IPv6 extension headers we walk over (hop-by-hop, routing, destination options); 44 is the fragment header.
IPV6_EXT = frozenset((0, 43, 60))
IPV6_FRAG = 44


def ones_sum(data) -> int:
    """One's-complement sum (folded to 16 bits) of *data* taken as big-endian 16-bit words (RFC 1071).

    Odd lengths are padded with a zero byte. Uses a big-integer trick: summing 16-bit words is the same as
    reducing the whole big-endian number modulo 0xFFFF (with 0 mapped to 0xFFFF for non-zero data).
    """
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    if not data:
        return 0
    value = int.from_bytes(data, "big")
    if value == 0:
        return 0
    total = value % 0xFFFF
    return total or 0xFFFF


def checksum(data) -> int:
    """The Internet checksum of *data* (RFC 1071): one's complement of the one's-complement sum."""
    return ~ones_sum(data) & 0xFFFF


def ttl_decrement_checksum(old_checksum: int) -> int:
    """New IPv4 header checksum after the TTL was decremented by one (RFC 1624, eqn. 3).

    ``HC' = ~(~HC + ~m + m')`` with m = TTL·256 + protocol and m' = m − 256, so ``~m + m'`` is the
    constant 0xFEFF. Unlike RFC 1141's shortcut this never produces the −0 (0xFFFF) form wrongly.
    """
    # one's-complement sums are congruent to plain sums modulo 0xFFFF, and ~x = 0xFFFF - x, so
    # ~(~HC + 0xFEFF) = (HC - 0xFEFF) mod 0xFFFF (a result of 0xFFFF, "-0", is never produced)
    return (old_checksum - 0xFEFF) % 0xFFFF


def header_ok(packet, ihl_bytes: int) -> bool:
    """True when the IPv4 header checksum of *packet* (first *ihl_bytes*) verifies."""
    return ones_sum(packet[:ihl_bytes]) == 0xFFFF


# --------------------------------------------------------------------------------------------- parsing


class IPv4Info:
    """A parsed IPv4 header (used off the hot path: tests, explain, ICMP building)."""

    __slots__ = (
        "checksum",
        "dst",
        "flags_frag",
        "ident",
        "ihl",
        "proto",
        "src",
        "tos",
        "total_length",
        "ttl",
    )

    def __init__(self, packet):
        (vihl, self.tos, self.total_length, self.ident, self.flags_frag, self.ttl, self.proto,
         self.checksum, self.src, self.dst) = struct.unpack_from("!BBHHHBBH4s4s", packet, 0)
        self.ihl = (vihl & 0x0F) * 4

    @property
    def df(self) -> bool:
        return bool(self.flags_frag & IP_DF)

    @property
    def mf(self) -> bool:
        return bool(self.flags_frag & IP_MF)

    @property
    def offset(self) -> int:
        return (self.flags_frag & IP_OFFMASK) * 8


def parse_ipv4(packet) -> Optional[IPv4Info]:
    """Parse and sanity-check an IPv4 packet; None when it is not a well-formed IPv4 header."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    info = IPv4Info(packet)
    if info.ihl < 20 or info.ihl > len(packet) or info.total_length < info.ihl:
        return None
    return info


def ipv6_upper_layer(packet, limit: int = 8) -> Tuple[int, int, Optional[Tuple[int, int, bytes]]]:
    """Walk an IPv6 packet's extension headers.

    :returns: ``(next_header, offset, fragment)`` where *offset* is where the upper-layer header starts and
        *fragment* is ``(offset_bytes, more_fragments, identification)`` when a fragment header was seen.
        ``next_header`` is -1 when the chain is truncated or too long.
    """
    nxt = packet[6]
    off = 40
    frag = None
    n = len(packet)
    for _ in range(limit):
        if nxt in IPV6_EXT:
            if off + 8 > n:
                return -1, off, frag
            nh = packet[off]
            off += (packet[off + 1] + 1) * 8
            nxt = nh
        elif nxt == IPV6_FRAG:
            if off + 8 > n:
                return -1, off, frag
            fo = (packet[off + 2] << 8) | packet[off + 3]
            frag = (fo & 0xFFF8, fo & 1, bytes(packet[off + 4:off + 8]))
            nxt = packet[off]
            off += 8
        else:
            return nxt, off, frag
    return -1, off, frag


# ----------------------------------------------------------------------------------------- ICMP errors

_ICMP_HDR = struct.Struct("!BBHI")
_IP_HDR = struct.Struct("!BBHHHBBH4s4s")
_IP6_HDR = struct.Struct("!IHBB16s16s")

#: RFC 1812 4.3.2.3: an ICMP error should quote as much of the original as fits in 576 bytes.
ICMP4_MAX = 576
#: RFC 4443 2.4(c): as much as fits in the IPv6 minimum MTU (1280).
ICMP6_MAX = 1280


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ttl: int = 64, tos: int = 0,
                ident: int = 0, flags_frag: int = 0) -> bytes:
    """A 20-byte IPv4 header with a correct checksum."""
    hdr = _IP_HDR.pack(0x45, tos, 20 + payload_len, ident, flags_frag, ttl, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]


def icmp4_error(original, src: bytes, icmp_type: int, code: int, rest: int = 0, *, ident: int = 0,
                ttl: int = 64) -> bytes:
    """An IPv4 ICMP error packet (IP header + ICMP) from *src* to the source of *original*.

    *original* is the offending IP packet as received; it is quoted up to 576 bytes in total
    (RFC 1812). *rest* is the 32-bit "rest of header" (for type 3 code 4: next-hop MTU in the low 16 bits).
    """
    quote = bytes(original[:ICMP4_MAX - 28])
    body = _ICMP_HDR.pack(icmp_type, code, 0, rest) + quote
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4_header(src, bytes(original[12:16]), PROTO_ICMP, len(body), ttl=ttl, ident=ident) + body


def icmp6_error(original, src: bytes, icmp_type: int, code: int, rest: int = 0, *,
                hop_limit: int = 64) -> bytes:
    """An IPv6 ICMPv6 error packet from *src* to the source of *original* (RFC 4443)."""
    quote = bytes(original[:ICMP6_MAX - 48])
    dst = bytes(original[8:24])
    body = _ICMP_HDR.pack(icmp_type, code, 0, rest) + quote
    pseudo = src + dst + struct.pack("!IxxxB", len(body), PROTO_ICMPV6)
    csum = checksum(pseudo + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    return _IP6_HDR.pack(0x60000000, len(body), PROTO_ICMPV6, hop_limit, src, dst) + body


def mac_bytes(text: Optional[str]) -> bytes:
    """``02:00:00:00:00:01`` → 6 bytes (None → zeros)."""
    if not text:
        return b"\x00" * 6
    return bytes(int(part, 16) for part in text.split(":"))


# --------------------------------------------------------------------------------------- fragmentation


def _copied_options(options: bytes) -> bytes:
    """The options of a first fragment that RFC 791 copies into every later fragment (copy bit set)."""
    out = bytearray()
    i = 0
    n = len(options)
    while i < n:
        kind = options[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= n:
            break
        length = options[i + 1]
        if length < 2 or i + length > n:
            break
        if kind & 0x80:
            out += options[i:i + length]
        i += length
    while len(out) % 4:
        out.append(0)  # end-of-options padding
    return bytes(out)


def fragment4(packet, mtu: int) -> List[bytes]:
    """Fragment the IPv4 *packet* so that every piece is at most *mtu* bytes (RFC 791).

    The packet may already be a fragment (its offset and MF are honoured). Options with the copy bit are
    repeated in every fragment but the first keeps all its options. Returns ``[packet]`` when it fits; an
    empty list when it cannot be fragmented (the header alone leaves no room for 8 bytes of data).
    The total length is taken from ``len(packet)``, not from the header, so a packet whose header could
    not hold its length (over 65535 bytes) is still split correctly.
    """
    packet = bytes(packet)
    n = len(packet)
    if n <= mtu:
        return [packet]
    ihl = (packet[0] & 0x0F) * 4
    (flags_frag,) = struct.unpack_from("!H", packet, 6)
    base_off = (flags_frag & IP_OFFMASK) * 8
    last_mf = flags_frag & IP_MF
    keep_flags = flags_frag & ~(IP_MF | IP_OFFMASK) & 0xFFFF
    first_hdr = bytearray(packet[:ihl])
    later_opts = _copied_options(packet[20:ihl])
    later_hdr = bytearray(packet[:20] + later_opts)
    later_hdr[0] = 0x40 | (len(later_hdr) // 4)
    data = packet[ihl:]
    out: List[bytes] = []
    pos = 0
    total = len(data)
    while pos < total:
        hdr = first_hdr if pos == 0 else later_hdr
        room = (mtu - len(hdr)) & ~7
        if room <= 0:
            return []
        chunk = data[pos:pos + room]
        last = pos + len(chunk) >= total
        off = base_off + pos
        if off >> 3 > IP_OFFMASK:
            return []
        h = bytearray(hdr)
        struct.pack_into("!H", h, 2, len(h) + len(chunk))
        struct.pack_into("!H", h, 6, keep_flags | (off >> 3) | (last_mf if last else IP_MF))
        h[10] = h[11] = 0
        struct.pack_into("!H", h, 10, checksum(h))
        out.append(bytes(h) + chunk)
        pos += len(chunk)
    return out


__all__ = [
    "checksum",
    "fragment4",
    "header_ok",
    "icmp4_error",
    "icmp6_error",
    "ipv4_header",
    "ipv6_upper_layer",
    "ones_sum",
    "parse_ipv4",
    "ttl_decrement_checksum",
]
