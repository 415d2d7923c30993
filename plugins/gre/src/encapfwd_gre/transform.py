"""GRE (RFC 2784, key per RFC 2890) per-server transform: ``build(server, egress)`` → ``transform(p_prime)``.

E(P') is an outer IPv4 header with protocol 47 (compiled once per server by
:func:`encapfwd.encap.ipv4_tunnel`), then the GRE header: no checksum, no sequence number, version 0,
protocol type 0x0800; with ``server.grekey`` the K bit and the 4-byte key (28 bytes of overhead instead of
24). An IPv6 P' (refused by the configuration) is carried with protocol type 0x86DD rather than raising.
"""

import struct

from encapfwd.encap import ipv4_tunnel

PROTO_GRE = 47


def build(server, egress):
    key = getattr(server, "grekey", None)
    flags = b"\x00\x00" if key is None else b"\x20\x00"
    key_field = b"" if key is None else struct.pack("!I", key)
    return ipv4_tunnel(egress, PROTO_GRE, flags + b"\x08\x00" + key_field,
                       proto6=PROTO_GRE, header6=flags + b"\x86\xdd" + key_field)
