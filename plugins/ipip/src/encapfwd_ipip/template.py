"""IPIP (RFC 2003) as a template: ``template(server, egress) -> Template``.

E(P') is an outer IPv4 header with protocol 4 from ``egress.outer_src`` to the server, TTL ``egress.ttl``;
per packet (the template's fields, run by the core's Python executor and by the XDP program alike) it
copies P''s TOS and DF bit (RFC 2003 3.1), carries the total length and checksum, and takes a fresh
identification when DF is clear (0 when set, RFC 6864). IPIP carries IPv4 only: the configuration refuses
IPv6 clusters for it (an IPv6 P' that arrived anyway would be framed, not raised on).
"""

from encapfwd.datapath.templates import TUNNEL_FIELDS, ipv4_header
from encapfwd.records import Template

PROTO_IPIP = 4


def template(server, egress) -> Template:
    return Template(header=ipv4_header(egress, PROTO_IPIP), fields=TUNNEL_FIELDS)
