"""``Dispatcher.process`` never raises: arbitrary bytes and mutated valid frames (hypothesis).

Every frame is accounted for exactly once (forwarded, or dropped under one reason, after ``flush``), and
every frame sent starts with an Ethernet header carrying IPv4 or IPv6 whose IPv4 header checksum verifies
(checked here with a plain word sum, independent of the dispatcher's code).
"""

import struct

import pytest
from encapfwd.dispatcher import Dispatcher
from encapfwd.model import Cluster, Config, Executor, Port, Server
from encapfwd.plugins import get_plugin_manager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

ME = "02:00:00:00:00:01"
VIP = "10.0.9.9"
VIP6 = "2001:db8:9::9"

CONFIG = Config(
    executor=Executor(nfa="10.0.2.1", mac=ME, networks=["10.0.2.0/24", "2001:db8:2::/64"],
                      gatewaymac="02:00:00:00:00:fe", mtu=600),
    clusters=[
        Cluster(address=VIP, ports=[Port(number=80, servers=[
            Server(address="10.0.2.10", mac="02:00:00:00:00:10"),
            Server(address="10.0.3.10", encapforward=True, encaptype="ipip"),
            Server(address="10.0.4.10", encapforward=True, encaptype="gre", grekey=5),
        ]), Port(number=0, porttype="udp", servers=[
            Server(address="10.0.4.11", encapforward=True, encaptype="gre")])]),
        Cluster(address=VIP6, ports=[Port(number=0, servers=[
            Server(address="2001:db8:2::10", mac="02:00:00:00:00:20")])]),
    ],
)


def eth(l3, ethertype=None):
    e = Ether(src="02:00:00:00:00:aa", dst=ME)
    if ethertype:
        e.type = ethertype
    return bytes(e / l3)


def _seeds():
    c = "198.51.100.7"
    seeds = [
        eth(IP(src=c, dst=VIP, ttl=9) / TCP(sport=1234, dport=80, flags="S") / Raw(b"x" * 30)),
        eth(IP(src=c, dst=VIP, ttl=9, flags="DF", options=[IPOption_RR(routers=["1.1.1.1"])])
            / TCP(dport=80) / Raw(b"y" * 700)),
        eth(IP(src=c, dst=VIP, ttl=2) / UDP(sport=53, dport=9999) / Raw(b"z" * 900)),
        eth(IP(src=c, dst=VIP, ttl=1) / UDP(dport=80)),
        eth(IP(src=c, dst=VIP, ttl=0) / TCP(dport=80)),
        eth(IP(src="203.0.113.1", dst=VIP) / ICMP(type=3, code=4) / IP(src=VIP, dst=c) / TCP(sport=80, dport=4)),
        eth(IP(src=c, dst=VIP) / ICMP(type=8)),
        eth(IPv6(src="2001:db8::1", dst=VIP6, hlim=5) / TCP(dport=80) / Raw(b"v6")),
        eth(IPv6(src="2001:db8::1", dst=VIP6) / IPv6ExtHdrHopByHop() / UDP(dport=7) / Raw(b"h" * 700)),
        eth(IPv6(src="2001:db8::1", dst=VIP6) / IPv6ExtHdrFragment(m=1, id=7) / UDP(dport=7) / Raw(b"f" * 64)),
        eth(IPv6(src="2001:db8::1", dst=VIP6) / IPv6ExtHdrFragment(offset=8, id=7) / Raw(b"g" * 64)),
        eth(ARP(pdst=VIP)),
        bytes(Ether(dst=ME) / Dot1Q(vlan=3) / IP(src=c, dst=VIP) / TCP(dport=80)),
    ]
    dg = IP(src=c, dst=VIP, id=99, ttl=8) / UDP(sport=4, dport=80) / Raw(b"F" * 2000)
    seeds += [eth(p) for p in fragment(dg, fragsize=600)]
    return seeds


SEEDS = _seeds()


def _ipv4_header_ok(ip: bytes) -> bool:
    ihl = (ip[0] & 0x0F) * 4
    total = sum(struct.unpack(f"!{ihl // 2}H", ip[:ihl]))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def run(frames):
    d = Dispatcher(CONFIG, get_plugin_manager())
    for i, f in enumerate(frames):
        out = d.process(f, float(i))
        assert isinstance(out, list)
        for o in out:
            assert isinstance(o, bytes) and len(o) >= 34
            assert o[12:14] in (b"\x08\x00", b"\x86\xdd")
            if o[12:14] == b"\x08\x00":
                assert _ipv4_header_ok(o[14:]) and len(o) - 14 <= 600
    d.flush()
    report = d.report()
    assert report["forwarded"] + report["dropped"] == len(frames), report
    assert "internal-error" not in report["drops"], report
    return report


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=8))
def test_arbitrary_bytes(frames):
    run(frames)


@st.composite
def mutated(draw):
    f = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "byte", "ihl", "totlen", "ttl", "frag", "ethertype",
                                     "vlan", "extend", "plen"]))
        if kind == "truncate" and f:
            del f[draw(st.integers(0, len(f) - 1)):]
        elif kind == "byte" and f:
            f[draw(st.integers(0, len(f) - 1))] = draw(st.integers(0, 255))
        elif kind == "ihl" and len(f) > 14:
            f[14] = (f[14] & 0xF0) | draw(st.integers(0, 15))
        elif kind == "totlen" and len(f) > 17:
            f[16:18] = struct.pack("!H", draw(st.integers(0, 65535)))
        elif kind == "ttl" and len(f) > 22:
            f[22] = draw(st.sampled_from([0, 1, 2, 255]))
        elif kind == "frag" and len(f) > 21:
            f[20:22] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
        elif kind == "ethertype" and len(f) > 13:
            f[12:14] = draw(st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00", b"\xff\xff"]))
        elif kind == "vlan" and len(f) > 12:
            f[12:12] = b"\x81\x00\x00\x05"
        elif kind == "extend":
            f += draw(st.binary(max_size=40))
        elif kind == "plen" and len(f) > 19:
            f[18:20] = struct.pack("!H", draw(st.integers(0, 65535)))
    return bytes(f)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated(), min_size=1, max_size=10))
def test_mutated_frames(frames):
    run(frames)


def test_every_seed_unmutated_is_accounted_for():
    report = run(SEEDS)
    assert report["forwarded"] > 0
    assert {"not-ip", "vlan-tagged", "ttl-exceeded", "icmp-unmatched"} <= set(report["drops"])
