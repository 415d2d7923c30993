"""IPIP transform (RFC 2003) against scapy as the independent oracle.

For random inner TCP/UDP/ICMP packets (sizes, IP options, DF, TOS, TTL) the frame the transform returns must
equal, byte for byte, ``Ether()/IP(proto 4, TOS and DF of the inner, TTL = egress.ttl)/inner`` built by
scapy, which computes the outer total length and header checksum itself.
"""

import ipaddress

import pytest
from encapfwd.hookspecs import Egress
from encapfwd.model import Server
from encapfwd_ipip.transform import build
from encapfwd.testing import SETTINGS, egresses
from encapfwd.testing import inner_ipv4 as inner_packets
from hypothesis import given, settings
from hypothesis import strategies as st

scapy_inet = pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

def expected(egress, inner: bytes, ident: int) -> bytes:
    parsed = IP(inner)
    assert bytes(parsed) == inner  # scapy reproduces the inner packet untouched
    outer = IP(src=str(egress.outer_src), dst=str(egress.outer_dst), tos=parsed.tos,
               flags="DF" if parsed.flags.DF else 0, ttl=egress.ttl, id=ident)
    return bytes(Ether(src=egress.src_mac, dst=egress.dst_mac) / outer / parsed)


@SETTINGS
@given(inner=inner_packets(), egress=egresses())
def test_ipip_equals_scapy(inner, egress):
    server = Server(address=str(egress.outer_dst), encapforward=True, encaptype="ipip")
    transform = build(server, egress)
    out = transform(inner)
    df = bool(inner[6] & 0x40)
    ident = int.from_bytes(out[18:20], "big")
    if df:
        assert ident == 0
    assert out == expected(egress, inner, ident)
    decoded = Ether(out)
    assert decoded[IP].proto == 4 and decoded[IP].len == len(inner) + 20


@SETTINGS
@given(inner=inner_packets(), egress=egresses())
def test_fresh_ident_when_df_clear(inner, egress):
    inner = bytearray(inner)
    inner[6] &= ~0x40 & 0xFF  # clear DF (the inner checksum is irrelevant to the outer header)
    transform = build(Server(address=str(egress.outer_dst)), egress)
    idents = [int.from_bytes(transform(bytes(inner))[18:20], "big") for _ in range(3)]
    assert len(set(idents)) == 3
    for ident in idents:
        out = transform(bytes(inner))
        assert out == expected(egress, bytes(inner), int.from_bytes(out[18:20], "big"))


def test_ident_wraps_and_other_servers_count_separately():
    egress = Egress(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:fe",
                    outer_src=ipaddress.ip_address("10.0.2.1"), outer_dst=ipaddress.ip_address("10.0.3.10"),
                    ttl=64, cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)
    inner = bytes(IP(src="1.2.3.4", dst="10.0.9.9", flags=0) / UDP())
    a = build(Server(address="10.0.3.10"), egress)
    b = build(Server(address="10.0.3.10"), egress)
    for _ in range(70000):
        out = a(inner)
    assert out == expected(egress, inner, int.from_bytes(out[18:20], "big"))
    assert int.from_bytes(b(inner)[18:20], "big") == 1


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80))
def test_never_raises_on_any_bytes(data):
    egress = Egress(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:fe",
                    outer_src=ipaddress.ip_address("10.0.2.1"), outer_dst=ipaddress.ip_address("10.0.3.10"),
                    ttl=64, cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)
    out = build(Server(address="10.0.3.10"), egress)(data)
    assert out.endswith(data) and len(out) == 34 + len(data)


def test_ipv6_inner_does_not_raise_and_is_6in4():
    egress = Egress(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:fe",
                    outer_src=ipaddress.ip_address("10.0.2.1"), outer_dst=ipaddress.ip_address("10.0.3.10"),
                    ttl=64, cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)
    inner = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0x28) / UDP())
    out = build(Server(address="10.0.3.10"), egress)(inner)
    want = Ether(src=egress.src_mac, dst=egress.dst_mac) / IP(src="10.0.2.1", dst="10.0.3.10", tos=0x28,
                                                             flags="DF", ttl=64, id=0) / IPv6(inner)
    assert out == bytes(want)
    assert Ether(out)[IP].proto == 41
