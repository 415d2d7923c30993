"""GRE (RFC 2784, key per RFC 2890) as a template: ``template(server, egress) -> Template``.

E(P') is an outer IPv4 header with protocol 47 (TOS and DF copied from P', fresh identification when DF is
clear: the template's fields), then the GRE header: no checksum, no sequence number, version 0, protocol
type 0x0800; with ``server.grekey`` the K bit and the 4-byte key (28 bytes of overhead instead of 24). GRE
here carries IPv4 only: the configuration refuses IPv6 clusters for it.
"""

import struct

from encapfwd.datapath.templates import TUNNEL_FIELDS, ipv4_header
from encapfwd.records import Template

PROTO_GRE = 47
GRE_IPV4 = 0x0800
GRE_KEY = 0x2000  # K bit (RFC 2890)


def gre_header(key=None) -> bytes:
    if key is None:
        return struct.pack("!HH", 0, GRE_IPV4)
    return struct.pack("!HHI", GRE_KEY, GRE_IPV4, key)


def template(server, egress) -> Template:
    key = getattr(server, "grekey", None)
    return Template(header=ipv4_header(egress, PROTO_GRE) + gre_header(key), fields=TUNNEL_FIELDS)
