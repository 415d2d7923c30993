"""The outer IPv4 header that tunnel forwarders put in front of P', compiled once per server.

IPIP (protocol 4), GRE (protocol 47 + GRE header) and any third-party "IPv4 + fixed header" tunnel share
it: :func:`ipv4_tunnel` returns ``transform(p_prime) -> frame``.

Everything constant (version/IHL, TTL, protocol, addresses, the tunnel header) is pre-summed for the
header checksum, so a packet costs a few integer operations, one ``struct.pack`` and one concatenation.
Per packet the outer header copies the inner TOS and DF bit (RFC 2003 3.1), carries the total length, and
a fresh identification from a per-server counter when DF is clear (0 when DF is set: RFC 6864 allows it
for atomic datagrams). Headers of DF packets are cached by (TOS, length).

Checksum: the one's-complement sum of the header words is congruent to their plain sum modulo 0xFFFF, so
the checksum is ``-(sum) % 0xFFFF`` (0 when the folded sum is 0xFFFF, exactly as RFC 1071 folding gives).

An IPv6 P' (which the configuration refuses for IPv4-only methods) is carried with *proto6*/*header6*
rather than raising; nothing the transform is given makes it raise.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

from .packet import mac_bytes

#: Headers of DF packets kept per server, by TOS and length (DF packets all have identification 0).
HEADER_CACHE = 4096


def _words(raw: bytes) -> int:
    return sum(struct.unpack("!%dH" % (len(raw) // 2), raw))


def ipv4_tunnel(egress, proto: int, header: bytes = b"", proto6: int = 41, header6: bytes = b""):
    """Compile ``transform(p_prime) -> frame`` for an IPv4 tunnel to ``egress.outer_dst``.

    :param proto: outer protocol for an IPv4 P' (4 for IPIP, 47 for GRE).
    :param header: bytes between the outer IPv4 header and an IPv4 P' (the GRE header); even length.
    :param proto6: outer protocol for an IPv6 P' (41 for 6in4, 47 for GRE).
    :param header6: bytes before an IPv6 P' (GRE with protocol type 0x86DD); same length as *header*.
    """
    if len(header6) != len(header):
        raise ValueError("tunnel headers for IPv4 and IPv6 payloads must have the same length")
    eth = mac_bytes(egress.dst_mac) + mac_bytes(egress.src_mac) + b"\x08\x00"
    addrs = ipaddress.IPv4Address(egress.outer_src).packed + ipaddress.IPv4Address(egress.outer_dst).packed
    ttl = int(egress.ttl) & 0xFF
    tp4, tp6 = (ttl << 8) | proto, (ttl << 8) | proto6
    tail4, tail6 = addrs + header, addrs + header6
    extra = 20 + len(header)
    # Ethernet + outer IPv4 header + tunnel header in one pack: addresses and tunnel header are one field
    pack = struct.Struct(f"!14sBBHHHHH{len(tail4)}s").pack
    base4 = 0x4500 + _words(addrs) + tp4  # the tunnel header is not covered by the IP checksum
    base6 = 0x4500 + _words(addrs) + tp6
    neg_df = -(base4 + 0x4000)  # checksum = (neg_df - tos - total) % 0xFFFF
    neg = -base4  # checksum = (neg - tos - total - ident) % 0xFFFF
    idents = itertools.count(1)
    headers = {}  # (TOS << 16 | len(P')) -> complete header of a DF packet

    def other(p) -> bytes:
        """IPv6, truncated or oversized P': never raises."""
        p = bytes(p)
        if len(p) >= 2 and p[0] >> 4 == 6:
            tos = ((p[0] & 0x0F) << 4) | (p[1] >> 4)
            base, tp, tail, flags, ident = base6, tp6, tail6, 0x4000, 0
        else:
            tos = p[1] if len(p) >= 2 else 0
            df = len(p) >= 7 and p[6] & 0x40
            base, tp, tail, flags = base4, tp4, tail4, (0x4000 if df else 0)
            ident = 0 if df else next(idents) & 0xFFFF
        total = (len(p) + extra) & 0xFFFF
        ck = -(base + flags + tos + total + ident) % 0xFFFF
        return pack(eth, 0x45, tos, total, ident, flags, tp, ck, tail) + p

    def transform(p: bytes) -> bytes:
        try:
            if p[0] >> 4 == 4:
                if p[6] & 0x40:
                    key = (p[1] << 16) | len(p)
                    cached = headers.get(key)
                    if cached is not None:
                        return cached + p
                    tos = p[1]
                    total = len(p) + extra
                    cached = pack(eth, 0x45, tos, total, 0, 0x4000, tp4, (neg_df - tos - total) % 0xFFFF, tail4)
                    if len(headers) < HEADER_CACHE:
                        headers[key] = cached
                    return cached + p
                tos = p[1]
                total = len(p) + extra
                ident = next(idents) & 0xFFFF
                return pack(eth, 0x45, tos, total, ident, 0, tp4, (neg - tos - total - ident) % 0xFFFF,
                            tail4) + p
        except (IndexError, struct.error, TypeError):
            pass
        return other(p)

    return transform
