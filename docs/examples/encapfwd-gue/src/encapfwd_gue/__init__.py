"""encapfwd-gue: Generic UDP Encapsulation, an example of a third-party forwarder plugin.

Everything an encapsulation type needs is here: metadata (``encapfwd_register_forwarders``), a per-server
transform compiled once (``encapfwd_build_transform``) and back-end setup scripts
(``encapfwd_backend_setup``). Nothing in encapfwd's core changes.
"""

import struct
import zlib

from encapfwd import hookimpl
from encapfwd.errors import SetupRefused
from encapfwd.hookspecs import Forwarder

NAME = "gue"
GUE_PORT = 6080
OVERHEAD = 20 + 8 + 4  # outer IPv4 + UDP + GUE header


@hookimpl
def encapfwd_register_forwarders(register):
    register(
        Forwarder(
            name=NAME,
            overhead=OVERHEAD,
            ipv4_only=True,
            operating_systems=("linux", "windows"),
            description=f"Generic UDP Encapsulation: IPv4/UDP port {GUE_PORT}/GUE (variant 0)",
        )
    )


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@hookimpl
def encapfwd_build_transform(forwarder, server, egress):
    if forwarder != NAME:
        return None
    # Everything that does not change per packet is prepared here, once per configuration change.
    ethernet = bytes.fromhex(egress.dst_mac.replace(":", "") + egress.src_mac.replace(":", "")) + b"\x08\x00"
    src, dst, ttl = egress.outer_src.packed, egress.outer_dst.packed, egress.ttl
    gue = b"\x00\x04\x00\x00"  # version 0, C 0, Hlen 0, protocol 4 (IPv4), no flags
    pack_ip = struct.Struct("!BBHHHBBH4s4s").pack
    dst_port = GUE_PORT

    def transform(inner: bytes) -> bytes:
        # Flow entropy in the UDP source port (as RFC 8086 asks of UDP tunnels): a hash of the inner
        # addresses and ports, so ECMP on the way spreads flows but keeps each on one path.
        src_port = 0xC000 | (zlib.crc32(inner[12:24]) & 0x3FFF)
        udp_len = 8 + 4 + len(inner)
        tos = inner[1] if inner else 0
        flags = (inner[6] & 0x40) << 8 if len(inner) > 6 else 0  # copy DF
        header = pack_ip(0x45, tos, 20 + udp_len, 0, flags, ttl, 17, 0, src, dst)
        header = header[:10] + _checksum(header).to_bytes(2, "big") + header[12:]
        # UDP checksum 0: allowed for IPv4 tunnels (RFC 768, RFC 8086 section 3.1)
        return ethernet + header + struct.pack("!HHHH", src_port, dst_port, udp_len, 0) + gue + inner
    return transform


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
