"""IPIP (RFC 2003) per-server transform: ``build(server, egress)`` → ``transform(p_prime) -> frame``.

The outer header is a template compiled once per server: everything constant (version/IHL, TTL,
protocol, source, destination, and DF when set) is pre-summed for the header checksum, so a packet costs
a few integer operations, one ``struct.pack`` and one concatenation. Per packet the outer header copies the
inner TOS and DF bit (RFC 2003 3.1), carries the total length, and a fresh identification from a per-server
counter when DF is clear (0 when DF is set, which RFC 6864 allows for atomic datagrams).

Checksum: the one's-complement sum of the header words is congruent to their plain sum modulo 0xFFFF, so
the checksum is ``-(sum) % 0xFFFF`` (0 when the folded sum is 0xFFFF, exactly as RFC 1071 folding gives).

An IPv6 P' cannot be carried by IPIP (the configuration refuses it); should one arrive anyway it is sent as
6in4 (protocol 41, RFC 4213) rather than raising. Nothing the transform is given makes it raise.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

PROTO_IPIP = 4
PROTO_IPV6 = 41

#: Ethernet header (14) + outer IPv4 header: B vihl, B tos, H len, H id, H flags, H ttl|proto, H checksum,
#: 8s source and destination.
_FRAME = struct.Struct("!14sBBHHHHH8s")


#: Headers of DF packets kept per server, by TOS and length (DF packets all have identification 0).
HEADER_CACHE = 4096


def _mac(text) -> bytes:
    return bytes(int(part, 16) for part in str(text).split(":"))


def _words(raw: bytes) -> int:
    return sum(struct.unpack("!%dH" % (len(raw) // 2), raw))


def build(server, egress):
    eth = _mac(egress.dst_mac) + _mac(egress.src_mac) + b"\x08\x00"
    addrs = ipaddress.IPv4Address(egress.outer_src).packed + ipaddress.IPv4Address(egress.outer_dst).packed
    ttl = int(egress.ttl) & 0xFF
    tp4 = (ttl << 8) | PROTO_IPIP
    tp41 = (ttl << 8) | PROTO_IPV6
    base = 0x4500 + _words(addrs)
    neg_df = -(base + tp4 + 0x4000)  # checksum = (neg_df - tos - total) % 0xFFFF
    neg = -(base + tp4)  # checksum = (neg - tos - total - ident) % 0xFFFF
    pack = _FRAME.pack
    idents = itertools.count(1)

    def other(p) -> bytes:
        """IPv6 (6in4), truncated or oversized P': never raises."""
        p = bytes(p)
        if len(p) >= 2 and p[0] >> 4 == 6:
            tos = ((p[0] & 0x0F) << 4) | (p[1] >> 4)
            tp, flags, ident = tp41, 0x4000, 0
        else:
            tos = p[1] if len(p) >= 2 else 0
            df = len(p) >= 7 and p[6] & 0x40
            tp, flags = tp4, (0x4000 if df else 0)
            ident = 0 if df else next(idents) & 0xFFFF
        total = (len(p) + 20) & 0xFFFF
        ck = -(base + tp + flags + tos + total + ident) % 0xFFFF
        return pack(eth, 0x45, tos, total, ident, flags, tp, ck, addrs) + p

    headers = {}  # (TOS << 16 | len(P')) -> complete header of a DF packet (its identification is 0)

    def transform(p: bytes) -> bytes:
        try:
            if p[0] >> 4 == 4:
                if p[6] & 0x40:
                    key = (p[1] << 16) | len(p)
                    header = headers.get(key)
                    if header is not None:
                        return header + p
                tos = p[1]
                total = len(p) + 20
                if p[6] & 0x40:
                    header = pack(eth, 0x45, tos, total, 0, 0x4000, tp4, (neg_df - tos - total) % 0xFFFF, addrs)
                    if len(headers) < HEADER_CACHE:
                        headers[(tos << 16) | len(p)] = header
                    return header + p
                ident = next(idents) & 0xFFFF
                return pack(eth, 0x45, tos, total, ident, 0, tp4, (neg - tos - total - ident) % 0xFFFF,
                            addrs) + p
        except (IndexError, struct.error, TypeError):
            pass
        return other(p)

    return transform
