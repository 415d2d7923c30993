"""packet.py helpers against scapy: RFC 1071 checksum, RFC 1624 TTL update, fragmentation, ICMP errors."""

import struct

import pytest
from encapfwd.datapath import packet as pk
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import ICMP, IP, UDP, IPOption_RR, IPOption_Security, defragment
from scapy.layers.inet6 import ICMPv6TimeExceeded, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_checksum_equals_scapy(data):
    assert pk.checksum(data) == scapy_checksum(data)


@settings(max_examples=300, deadline=None)
@given(ttl=st.integers(1, 255), tos=st.integers(0, 255), ident=st.integers(0, 65535), proto=st.integers(0, 255),
       src=st.binary(min_size=4, max_size=4), dst=st.binary(min_size=4, max_size=4),
       flags=st.sampled_from([0, 1, 2]), length=st.integers(20, 65535))
def test_ttl_decrement_checksum_equals_a_full_recomputation(ttl, tos, ident, proto, src, dst, flags, length):
    hdr = IP(ttl=ttl, tos=tos, id=ident, proto=proto, flags=flags, len=length,
             src=".".join(map(str, src)), dst=".".join(map(str, dst)))
    before = IP(bytes(hdr))
    after = IP(bytes(hdr))
    after.ttl = ttl - 1
    del after.chksum
    assert pk.ttl_decrement_checksum(before.chksum) == IP(bytes(after)).chksum


def test_ttl_decrement_checksum_edge_values():
    # every possible old checksum: the result matches folding the RFC 1624 formula by hand
    for hc in range(0, 0x10000, 97):
        total = (~hc & 0xFFFF) + (~0x4006 & 0xFFFF) + 0x3F06
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        assert pk.ttl_decrement_checksum(hc) == ~total & 0xFFFF


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 6000), mtu=st.integers(68, 1500), options=st.booleans())
def test_fragment4_reassembles_with_scapy(size, mtu, options):
    opts = [IPOption_RR(routers=["192.0.2.1"]), IPOption_Security()] if options else []
    pkt = IP(src="198.51.100.1", dst="10.0.3.10", id=321, ttl=9, options=opts) / UDP(sport=1, dport=2) / Raw(
        b"a" * size)
    raw = bytes(pkt)
    pieces = pk.fragment4(raw, mtu)
    if len(raw) <= mtu:
        assert pieces == [raw]
        return
    if mtu - (IP(raw).ihl * 4) < 8:
        assert pieces == []
        return
    assert len(pieces) >= 2
    parsed = [IP(p) for p in pieces]
    for p, q in zip(pieces, parsed):
        assert len(p) <= mtu and q.len == len(p)
        fresh = IP(p)
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == q.chksum
    whole = defragment(parsed)
    assert len(whole) == 1
    got = IP(bytes(whole[0]))
    assert bytes(got[UDP]) == bytes(pkt[UDP])
    assert got.id == 321 and got.src == pkt.src and got.ttl == 9


def test_icmp4_error_is_what_scapy_builds():
    original = bytes(IP(src="198.51.100.7", dst="10.0.9.9", ttl=1) / UDP(sport=9, dport=80) / Raw(b"q" * 1000))
    icmp = pk.icmp4_error(original, bytes([10, 0, 9, 9]), 3, 4, 1480, ident=7)
    want = IP(src="10.0.9.9", dst="198.51.100.7", id=7, ttl=64) / ICMP(type=3, code=4, nexthopmtu=1480) / Raw(
        original[:548])
    assert icmp == bytes(want)
    assert len(icmp) == 576


def test_icmp6_error_is_what_scapy_builds():
    original = bytes(IPv6(src="2001:db8::7", dst="2001:db8:9::9", hlim=1) / UDP(sport=9, dport=80) / Raw(b"q" * 2000))
    src = bytes.fromhex("20010db8000900000000000000000009")
    icmp = pk.icmp6_error(original, src, 3, 0)
    want = IPv6(src="2001:db8:9::9", dst="2001:db8::7", hlim=64) / ICMPv6TimeExceeded() / Raw(original[:1232])
    assert icmp == bytes(want)
    assert len(icmp) == 1280


def test_ipv6_upper_layer_walks_extension_headers():
    pkt = bytes(IPv6(src="::1", dst="::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(offset=3, m=1, id=0xABCD)
                / UDP(sport=1, dport=2))
    nxt, off, frag = pk.ipv6_upper_layer(pkt)
    assert nxt == 17 and off == 40 + 8 + 8
    assert frag == (24, 1, struct.pack("!I", 0xABCD))
    assert pk.ipv6_upper_layer(pkt[:44])[0] == -1


def test_parse_ipv4():
    raw = bytes(IP(src="1.2.3.4", dst="5.6.7.8", flags="DF", ttl=3) / UDP())
    info = pk.parse_ipv4(raw)
    assert info.df and not info.mf and info.ttl == 3 and info.src == bytes([1, 2, 3, 4]) and info.ihl == 20
    assert pk.header_ok(raw, 20)
    assert pk.parse_ipv4(raw[:10]) is None
    assert pk.parse_ipv4(b"\x46" + raw[1:]) is not None
    assert pk.parse_ipv4(b"\x44" + raw[1:]) is None
