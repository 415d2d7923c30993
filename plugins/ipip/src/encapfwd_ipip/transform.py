"""IPIP (RFC 2003) per-server transform: ``build(server, egress)`` → ``transform(p_prime) -> frame``.

E(P') is an outer IPv4 header with protocol 4 (compiled once per server by :func:`encapfwd.encap.ipv4_tunnel`:
TOS and DF copied from P', a fresh identification when DF is clear). An IPv6 P' cannot be carried by IPIP
(the configuration refuses it); should one arrive anyway it is sent as 6in4 (protocol 41, RFC 4213).
"""

from encapfwd.encap import ipv4_tunnel

PROTO_IPIP = 4
PROTO_IPV6 = 41


def build(server, egress):
    return ipv4_tunnel(egress, PROTO_IPIP, proto6=PROTO_IPV6)
