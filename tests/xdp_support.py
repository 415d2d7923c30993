"""Frames and a plan for the differential tests of the XDP program against the Python dispatcher.

The frames are built with ``struct`` (scapy is the oracle elsewhere; here it would cost minutes for the
hundreds of thousands of frames the tests run), covering every branch of both executors: DF set and
clear, TOS values, TTL 0/1/2/255, IP options, fragments, bad checksums, truncation, Ethernet padding,
frames too big for the MTU, ICMP, other protocols, non-cluster and non-IP traffic, IPv6 with and without
extension headers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import struct
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
GUE_SRC = ROOT / "docs" / "examples" / "encapfwd-gue" / "src"

CLIENT_MAC = bytes.fromhex("020000000001")
DISPATCHER_MAC = "02:00:00:00:00:02"
DISPATCHER_MAC_B = bytes.fromhex("020000000002")
#: destinations of frames not sent to the dispatcher: other hosts (one differs from the dispatcher's MAC in
#: its last bit only), broadcast, IPv4 and IPv6 multicast
OTHER_MACS = (bytes.fromhex("020000000003"), bytes.fromhex("0200000000fe"), bytes.fromhex("f20000000002"),
              bytes.fromhex("000000000000"))
GROUP_MACS = (b"\xff" * 6, bytes.fromhex("01005e000001"), bytes.fromhex("333300000001"),
              bytes.fromhex("030000000002"))

#: method -> (cluster address, server words); every cluster serves TCP 80, UDP 53 and a UDP wildcard port
METHODS = {
    "mac": ("10.0.9.1", "encapforward no mac 02:00:00:00:01:{i:02x}", "10.0.2.{n}"),
    "ipip": ("10.0.9.2", "encapforward yes encaptype ipip", "10.0.3.{n}"),
    "gre": ("10.0.9.3", "encapforward yes encaptype gre", "10.0.3.{n}"),
    "gre-key": ("10.0.9.4", "encapforward yes encaptype gre grekey {key}", "10.0.3.{n}"),
    "gue": ("10.0.9.5", "encapforward yes encaptype gue", "10.0.3.{n}"),
    "mac6": ("fd00:9::1", "encapforward no mac 02:00:00:00:02:{i:02x}", "fd00:2::{n}"),
}
SERVERS_PER_PORT = 5
MTU = 1500


def registry_with_gue():
    """The plugin registry with the GUE example (docs/examples) registered like an installed plugin."""
    from encapfwd.plugins import get_plugin_manager

    if str(GUE_SRC) not in sys.path:
        sys.path.insert(0, str(GUE_SRC))
    import encapfwd_gue

    registry = get_plugin_manager()
    if "gue" not in registry.forwarders:
        registry.pm.register(encapfwd_gue, name="encapfwd-gue")
        registry.hook.encapfwd_register_forwarders(register=lambda f: registry.forwarders.setdefault(f.name, f))
        registry.owners.setdefault("gue", "encapfwd-gue")
    return registry


def make_config(methods=tuple(METHODS)):
    """A configuration with one cluster per method: TCP 80 and UDP 53 (maglev), five servers each."""
    from encapfwd import config as cfg

    c = cfg.loads("")
    c = cfg.executor_set(c, ["nfa", "10.0.2.1", "mac", DISPATCHER_MAC, "networks", "10.0.2.0/24,fd00:2::/64",
                             "gatewaymac", "02:00:00:00:00:fe", "mtu", str(MTU), "maxflows", "200000"])
    for method in methods:
        vip, words, server = METHODS[method]
        c = cfg.cluster_add(c, [vip])
        for port in ("80 porttype tcp", "53 porttype udp"):
            number, *pwords = port.split()
            target = f"{vip}@{number}" if ":" not in vip else f"{vip}@{number}"
            c = cfg.port_add(c, target, pwords)
            for i in range(SERVERS_PER_PORT):
                n = 10 + i + 10 * list(METHODS).index(method)
                address = server.format(n=n)
                w = words.format(i=n, key=1000 + n).split()
                c = cfg.server_add(c, f"{target}@{address}", w + ["weight", str(1 + i % 3)])
    return c


def _csum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_frame(rng: random.Random, vip: str, *, kind: str = "plain") -> bytes:
    """One Ethernet/IPv4 frame towards *vip*; *kind* picks the special case."""
    proto = rng.choice((6, 6, 17))
    dport = 80 if proto == 6 else 53
    if kind == "not-port":
        dport = rng.choice((81, 8080, 443))
    sport = rng.randrange(1024, 65536)
    src = bytes((rng.choice((172, 192, 198)), rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)))
    dst = ipaddress.ip_address(vip).packed
    if kind == "not-cluster":
        dst = bytes((10, 0, 8, rng.randrange(1, 255)))
    size = rng.choice((0, 0, 1, 20, 100, 512, 1200, rng.randrange(0, 1500)))
    if kind == "too-big":
        size = rng.randrange(1440, 1480)
    payload = rng.randbytes(size)
    if proto == 6:
        flags = rng.choice((0x02, 0x10, 0x18, 0x11, 0x04, 0x12))
        l4 = struct.pack("!HHIIBBHHH", sport, dport, rng.getrandbits(32), rng.getrandbits(32), 0x50, flags,
                         65535, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if kind == "other-proto":
        proto = rng.choice((1, 47, 50, 132))
    options = b""
    if kind == "options":
        options = b"\x01" * 3 + b"\x00" * (rng.choice((1, 5, 9)))  # NOPs + EOL, padded to a 4-byte multiple
        options = options[: (len(options) // 4) * 4] or b"\x01\x01\x01\x00"
    ihl = 5 + len(options) // 4
    df = rng.random() < 0.5
    frag = 0x4000 if df else 0
    if kind == "fragment":
        frag = rng.choice((0x2000, 0x2000 | rng.randrange(1, 100), rng.randrange(1, 100)))
    ttl = rng.choice((64, 64, 2, 255, rng.randrange(2, 256)))
    if kind == "ttl":
        ttl = rng.choice((0, 1))
    tos = rng.choice((0, 0, 0x10, 0xB8, rng.randrange(256)))
    total = 4 * ihl + len(l4)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, rng.getrandbits(16), frag, ttl, proto, 0,
                         src, dst) + options
    ck = _csum(header)
    if kind == "bad-checksum":
        ck ^= 1 + rng.randrange(0xFFFE)
    header = header[:10] + struct.pack("!H", ck) + header[12:]
    frame = DISPATCHER_MAC_B + CLIENT_MAC + b"\x08\x00" + header + l4
    if kind == "padding":
        frame += bytes(rng.randrange(1, 30))
    if kind == "truncated":
        frame = frame[: rng.randrange(14, len(frame))]
    if kind == "short-l4":
        # a datagram whose IP length ends inside the TCP/UDP header
        cut = 4 * ihl + rng.randrange(0, 8)
        header = header[:2] + struct.pack("!H", cut) + header[4:10] + b"\0\0" + header[12:]
        header = header[:10] + struct.pack("!H", _csum(header)) + header[12:]
        frame = DISPATCHER_MAC_B + CLIENT_MAC + b"\x08\x00" + header + l4[: cut - 4 * ihl]
    if kind == "bad-version":
        frame = frame[:14] + bytes((rng.choice((0x55, 0x65, 0x44)),)) + frame[15:]
    return frame


def ipv6_frame(rng: random.Random, vip: str, *, kind: str = "plain") -> bytes:
    proto = rng.choice((6, 17))
    dport = 80 if proto == 6 else 53
    if kind == "not-port":
        dport = 8443
    sport = rng.randrange(1024, 65536)
    payload = rng.randbytes(rng.choice((0, 10, 400, rng.randrange(0, 1400))))
    if kind == "too-big":
        payload = rng.randbytes(rng.randrange(1440, 1460))
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 65535, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    nxt = proto
    if kind == "ext-header":
        l4 = bytes((proto, 0)) + bytes(6) + l4  # hop-by-hop options, 8 bytes
        nxt = 0
    hl = rng.choice((64, 255, 2)) if kind != "ttl" else rng.choice((0, 1))
    src = b"\xfd\x00\x00\x07" + rng.randbytes(12)
    dst = ipaddress.ip_address(vip).packed if kind != "not-cluster" else b"\xfd\x00\x00\x08" + bytes(12)
    tc = rng.randrange(256)
    header = struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20) | rng.getrandbits(20), len(l4), nxt, hl, src, dst)
    frame = DISPATCHER_MAC_B + CLIENT_MAC + b"\x86\xdd" + header + l4
    if kind == "truncated":
        frame = frame[: rng.randrange(14, len(frame))]
    return frame


KINDS4 = ("plain",) * 12 + ("padding", "options", "fragment", "ttl", "bad-checksum", "truncated", "short-l4",
                              "not-port", "not-cluster", "other-proto", "too-big", "bad-version")
KINDS6 = ("plain",) * 8 + ("ttl", "ext-header", "truncated", "not-port", "not-cluster", "too-big")


def readdressed(frame: bytes, rng: random.Random) -> bytes:
    """*frame* sent to another host's MAC, or to a broadcast or multicast one."""
    return rng.choice(OTHER_MACS + GROUP_MACS) + frame[6:]


def frames(method: str, count: int, seed: int = 1):
    """*count* frames for *method*'s cluster (about half plain, the rest every special case), and a few
    non-IP ones (ARP, VLAN-tagged); about one in 11 of all of them sent to another host's MAC, a broadcast or
    a multicast one (a bridge flooding unknown unicast, link-layer broadcasts)."""
    rng = random.Random(f"{seed}-{method}")
    other = random.Random(f"{seed}-{method}-mac")  # its own: the frames themselves stay those of rng
    vip = METHODS[method][0]
    six = ":" in vip
    for i in range(count):
        if i % 97 == 0:
            frame = DISPATCHER_MAC_B + CLIENT_MAC + rng.choice((b"\x08\x06", b"\x81\x00")) + rng.randbytes(46)
        elif six:
            frame = ipv6_frame(rng, vip, kind=rng.choice(KINDS6))
        else:
            frame = ipv4_frame(rng, vip, kind=rng.choice(KINDS4))
        yield readdressed(frame, other) if other.random() < 1 / 11 else frame


@contextlib.contextmanager
def one_cpu(cpu: Optional[int] = None):
    """This process pinned to one CPU (*cpu*, else the first it may run on; yielded) meanwhile:
    BPF_PROG_TEST_RUN runs there, so its per-CPU values (the last reason, the new-flow window) are the ones
    the test reads."""
    saved = os.sched_getaffinity(0)
    cpu = min(saved) if cpu is None else cpu
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, saved)

