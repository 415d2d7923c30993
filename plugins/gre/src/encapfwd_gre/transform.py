"""GRE (RFC 2784, key per RFC 2890) per-server transform: ``build(server, egress)`` → ``transform(p_prime)``.

Outer IPv4 header (protocol 47) compiled once per server like IPIP's, then the GRE header: no checksum, no
sequence number, version 0, protocol type 0x0800; with ``server.grekey`` the K bit and the 4-byte key
(28 bytes of overhead instead of 24). TOS and DF are copied from the inner header; the identification is a
per-server counter when DF is clear (0 when DF is set, RFC 6864).

An IPv6 P' (refused by the configuration) is carried with GRE protocol type 0x86DD rather than raising.
"""

from __future__ import annotations

import ipaddress
import struct

PROTO_GRE = 47

_FRAME = struct.Struct("!14sBBHHHHH8s")


def _mac(text) -> bytes:
    return bytes(int(part, 16) for part in str(text).split(":"))


def _words(raw: bytes) -> int:
    return sum(struct.unpack("!%dH" % (len(raw) // 2), raw))


def build(server, egress):
    eth = _mac(egress.dst_mac) + _mac(egress.src_mac) + b"\x08\x00"
    src = ipaddress.IPv4Address(egress.outer_src).packed
    dst = ipaddress.IPv4Address(egress.outer_dst).packed
    addrs = src + dst
    ttl = int(egress.ttl) & 0xFF
    tp = (ttl << 8) | PROTO_GRE
    key = getattr(server, "grekey", None)
    if key is None:
        gre4 = b"\x00\x00\x08\x00"
        gre6 = b"\x00\x00\x86\xdd"
    else:
        gre4 = b"\x20\x00\x08\x00" + struct.pack("!I", key)
        gre6 = b"\x20\x00\x86\xdd" + struct.pack("!I", key)
    extra = 20 + len(gre4)
    base = 0x4500 + _words(addrs) + tp
    pack = _FRAME.pack
    state = [0]

    def transform(p: bytes) -> bytes:
        try:
            first = p[0]
            if first >> 4 == 4:
                tos = p[1]
                df = p[6] & 0x40
                gre = gre4
            else:
                tos = ((first & 0x0F) << 4) | (p[1] >> 4)
                df = 0x40
                gre = gre6
        except IndexError:
            tos = df = 0
            gre = gre4
        total = (len(p) + extra) & 0xFFFF
        if df:
            ident = 0
            flags = 0x4000
        else:
            ident = state[0] = (state[0] + 1) & 0xFFFF
            flags = 0
        s = base + tos + total + ident + flags
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return pack(eth, 0x45, tos, total, ident, flags, tp, ~s & 0xFFFF, addrs) + gre + p

    return transform
