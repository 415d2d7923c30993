"""GRE (RFC 2784, key per RFC 2890) per-server transform: ``build(server, egress)`` → ``transform(p_prime)``.

Outer IPv4 header (protocol 47) compiled once per server like IPIP's, then the GRE header: no checksum, no
sequence number, version 0, protocol type 0x0800; with ``server.grekey`` the K bit and the 4-byte key
(28 bytes of overhead instead of 24). TOS and DF are copied from the inner header; the identification is a
per-server counter when DF is clear (0 when DF is set, RFC 6864). The header checksum is
``-(sum of words) % 0xFFFF`` with the constant words pre-summed (see the IPIP plugin).

An IPv6 P' (refused by the configuration) is carried with GRE protocol type 0x86DD rather than raising.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

PROTO_GRE = 47


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
    tp = (ttl << 8) | PROTO_GRE
    key = getattr(server, "grekey", None)
    if key is None:
        gre4, gre6 = b"\x00\x00\x08\x00", b"\x00\x00\x86\xdd"
    else:
        gre4 = b"\x20\x00\x08\x00" + struct.pack("!I", key)
        gre6 = b"\x20\x00\x86\xdd" + struct.pack("!I", key)
    extra = 20 + len(gre4)
    # Ethernet + outer IPv4 header + GRE header in one pack: the addresses and the GRE header are one field
    frame = struct.Struct(f"!14sBBHHHHH{8 + len(gre4)}s")
    tail4 = addrs + gre4
    tail6 = addrs + gre6
    base = 0x4500 + _words(addrs) + tp
    neg_df = -(base + 0x4000)
    neg = -base
    pack = frame.pack
    idents = itertools.count(1)

    def other(p) -> bytes:
        """IPv6 (GRE protocol 0x86DD), truncated or oversized P': never raises."""
        p = bytes(p)
        if len(p) >= 2 and p[0] >> 4 == 6:
            tos = ((p[0] & 0x0F) << 4) | (p[1] >> 4)
            tail, flags, ident = tail6, 0x4000, 0
        else:
            tos = p[1] if len(p) >= 2 else 0
            df = len(p) >= 7 and p[6] & 0x40
            tail, flags = tail4, (0x4000 if df else 0)
            ident = 0 if df else next(idents) & 0xFFFF
        total = (len(p) + extra) & 0xFFFF
        ck = -(base + flags + tos + total + ident) % 0xFFFF
        return pack(eth, 0x45, tos, total, ident, flags, tp, ck, tail) + p

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
                total = len(p) + extra
                if p[6] & 0x40:
                    header = pack(eth, 0x45, tos, total, 0, 0x4000, tp, (neg_df - tos - total) % 0xFFFF, tail4)
                    if len(headers) < HEADER_CACHE:
                        headers[(tos << 16) | len(p)] = header
                    return header + p
                ident = next(idents) & 0xFFFF
                return pack(eth, 0x45, tos, total, ident, 0, tp, (neg - tos - total - ident) % 0xFFFF,
                            tail4) + p
        except (IndexError, struct.error, TypeError):
            pass
        return other(p)

    return transform
