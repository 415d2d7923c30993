"""IPIP (RFC 2003) per-server transform: ``build(server, egress)`` → ``transform(p_prime) -> frame``.

The outer header is a template compiled once per server: everything constant (version/IHL, TTL,
protocol, source, destination) is pre-summed for the header checksum, so a packet costs one
``struct.pack`` and one concatenation. Per packet the outer header copies the inner TOS and DF bit
(RFC 2003 3.1), carries the total length, and a fresh identification from a per-server counter when DF is
clear (0 when DF is set, which RFC 6864 allows for atomic datagrams).

An IPv6 P' cannot be carried by IPIP (the configuration refuses it); should one arrive anyway it is sent as
6in4 (protocol 41, RFC 4213) rather than raising.
"""

from __future__ import annotations

import ipaddress
import struct

PROTO_IPIP = 4
PROTO_IPV6 = 41

#: Ethernet header (14) + outer IPv4 header split as: B vihl, B tos, H len, H id, H flags, H ttl|proto,
#: H checksum, 8s src+dst.
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
    ttlproto4 = (ttl << 8) | PROTO_IPIP
    ttlproto41 = (ttl << 8) | PROTO_IPV6
    # constant part of the header sum: version/IHL word (0x4500 without TOS), addresses
    base = 0x4500 + _words(addrs)
    base4 = base + ttlproto4
    base41 = base + ttlproto41
    pack = _FRAME.pack
    state = [0]  # identification counter (per server)

    def transform(p: bytes) -> bytes:
        try:
            first = p[0]
            if first >> 4 == 4:
                tos = p[1]
                df = p[6] & 0x40
                tp = ttlproto4
                s = base4
            else:
                tos = ((first & 0x0F) << 4) | (p[1] >> 4)  # IPv6 traffic class
                df = 0x40
                tp = ttlproto41
                s = base41
        except IndexError:
            tos = df = 0
            tp = ttlproto4
            s = base4
        total = (len(p) + 20) & 0xFFFF
        if df:
            ident = 0
            flags = 0x4000
        else:
            ident = state[0] = (state[0] + 1) & 0xFFFF
            flags = 0
        s += tos + total + ident + flags
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return pack(eth, 0x45, tos, total, ident, flags, tp, ~s & 0xFFFF, addrs) + p

    return transform
