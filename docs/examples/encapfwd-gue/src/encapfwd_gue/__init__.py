"""encapfwd-gue: Generic UDP Encapsulation, an example of a third-party forwarder plugin.

Everything an encapsulation type needs is here: metadata (``encapfwd_register_forwarders``), the
encapsulation described as data once per server (``encapfwd_build_template``) and back-end setup scripts
(``encapfwd_backend_setup``). Nothing in encapfwd's core changes, and there is no per-packet code: the core
runs the template in Python and in its XDP program (in the kernel), from the same bytes.
"""

import struct

from encapfwd import hookimpl
from encapfwd.datapath.templates import ipv4_header
from encapfwd.errors import SetupRefused
from encapfwd.records import Forwarder, Template

NAME = "gue"
GUE_PORT = 6080
GUE_HEADER = b"\x00\x04\x00\x00"  # version 0, C 0, Hlen 0, protocol 4 (IPv4), no flags
OVERHEAD = 20 + 8 + 4  # outer IPv4 + UDP + GUE header


@hookimpl
def encapfwd_register_forwarders(register):
    register(
        Forwarder(
            name=NAME,
            overhead=OVERHEAD,
            ipv4_only=True,
            operating_systems=("linux", "windows"),
            template=True,  # encapfwd_build_template describes it: it runs in XDP too
            description=f"Generic UDP Encapsulation: IPv4/UDP port {GUE_PORT}/GUE (variant 0)",
        )
    )


@hookimpl
def encapfwd_build_template(forwarder, server, egress):
    if forwarder != NAME:
        return None
    # The constant bytes, once per configuration change: outer IPv4 header (version/IHL 0x45, TTL
    # egress.ttl, protocol 17, egress.outer_src -> egress.outer_dst; lengths, TOS, flags, identification and
    # checksum are filled per packet), UDP header to port 6080 (source port, length and checksum filled per
    # packet), GUE header.
    ip = ipv4_header(egress, 17)
    udp = struct.pack("!HHHH", 0, GUE_PORT, 0, 0)
    # Per packet: outer total length and checksum (ipv4), TOS and DF copied from P' (tos, df), a fresh
    # identification when DF is clear (ident), UDP length with checksum 0 (udp: RFC 768, RFC 8086 3.1),
    # and flow entropy in the UDP source port from P''s addresses (entropy: RFC 8086 5.1), so ECMP on the
    # way spreads flows but keeps each (and every fragment of it) on one path.
    return Template(header=ip + udp + GUE_HEADER, fields={"ipv4", "tos", "df", "ident", "udp", "entropy"})


@hookimpl
def encapfwd_backend_setup(forwarder, os, target, undo):
    if forwarder != NAME:
        return None
    if os == "windows":
        raise SetupRefused("Tunneling is not supported on Windows operating systems")
    if os != "linux":
        raise SetupRefused(f"encapfwd-gue has no recipe for {os}")
    from encapfwd.setup import quote  # the core's validated quoting

    vip = quote(str(target.cluster))
    if undo:
        return "\n".join([
            f"ip addr del {vip}/32 dev tunl0 2>/dev/null || true",
            f"ip fou del port {GUE_PORT} 2>/dev/null || true",
        ]) + "\n"
    return "\n".join([
        "modprobe fou",
        "modprobe ipip",
        f"ip fou show | grep -q 'port {GUE_PORT} gue' || ip fou add port {GUE_PORT} gue",
        "ip link set tunl0 up",
        f"ip -4 addr show dev tunl0 | grep -q ' {vip}/32 ' || ip addr add {vip}/32 scope host dev tunl0",
        "sysctl -qw net.ipv4.conf.all.arp_ignore=3 net.ipv4.conf.all.arp_announce=2",
        "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.tunl0.rp_filter=0",
    ]) + "\n"
