"""IPIP (RFC 2003) template, run by the core's Python executor, against scapy as the independent oracle.

For random inner TCP/UDP/ICMP packets (sizes, IP options, DF, TOS, TTL) the frame
``template_transform(template(server, egress), egress)`` returns must equal, byte for byte,
``Ether()/IP(proto 4, TOS and DF of the inner, TTL = egress.ttl)/inner`` built by scapy, which computes the
outer total length and header checksum itself.
"""

import ipaddress

import pytest
from encapfwd.datapath.templates import template_transform
from encapfwd.hookspecs import Egress, Template
from encapfwd.model import Server
from encapfwd.testing import SETTINGS, egresses
from encapfwd.testing import inner_ipv4 as inner_packets
from encapfwd_ipip import encapfwd_build_template
from encapfwd_ipip.template import template
from hypothesis import given, settings
from hypothesis import strategies as st

scapy_inet = pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from scapy.layers.l2 import Ether

EGRESS = Egress(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:fe",
                outer_src=ipaddress.ip_address("10.0.2.1"), outer_dst=ipaddress.ip_address("10.0.3.10"),
                ttl=64, cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)


def build(server, egress):
    return template_transform(template(server, egress), egress)


def expected(egress, inner: bytes, ident: int) -> bytes:
    parsed = IP(inner)
    assert bytes(parsed) == inner  # scapy reproduces the inner packet untouched
    outer = IP(src=str(egress.outer_src), dst=str(egress.outer_dst), tos=parsed.tos,
               flags="DF" if parsed.flags.DF else 0, ttl=egress.ttl, id=ident)
    return bytes(Ether(src=egress.src_mac, dst=egress.dst_mac) / outer / parsed)


def test_the_hook_gives_a_template_the_xdp_program_can_run():
    server = Server(address="10.0.3.10", encapforward=True, encaptype="ipip")
    t = encapfwd_build_template(forwarder="ipip", server=server, egress=EGRESS)
    assert isinstance(t, Template) and t.xdp_capable and len(t.header) == 20
    assert t.fields == {"ipv4", "tos", "df", "ident"}
    assert encapfwd_build_template(forwarder="gre", server=server, egress=EGRESS) is None


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
    assert idents == [1, 2, 3]
    for _ in idents:
        out = transform(bytes(inner))
        assert out == expected(egress, bytes(inner), int.from_bytes(out[18:20], "big"))


def test_ident_wraps_and_other_servers_count_separately():
    inner = bytes(IP(src="1.2.3.4", dst="10.0.9.9", flags=0) / UDP())
    a = build(Server(address="10.0.3.10"), EGRESS)
    b = build(Server(address="10.0.3.10"), EGRESS)
    for _ in range(70000):
        out = a(inner)
    assert int.from_bytes(out[18:20], "big") == 70000 & 0xFFFF
    assert out == expected(EGRESS, inner, 70000 & 0xFFFF)
    assert int.from_bytes(b(inner)[18:20], "big") == 1


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80))
def test_never_raises_on_any_bytes(data):
    out = build(Server(address="10.0.3.10"), EGRESS)(data)
    assert out.endswith(data) and len(out) == 34 + len(data)


def test_ipv6_inner_does_not_raise():
    """IPIP carries IPv4 only (the configuration refuses IPv6 clusters for it); an IPv6 P' that arrives anyway
    is framed per the Template contract (TOS = traffic class, DF set, identification 0), not raised on."""
    inner = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0x28) / UDP())
    out = build(Server(address="10.0.3.10"), EGRESS)(inner)
    want = Ether(src=EGRESS.src_mac, dst=EGRESS.dst_mac) / IP(src="10.0.2.1", dst="10.0.3.10", tos=0x28,
                                                             flags="DF", ttl=64, id=0, proto=4) / Raw(inner)
    assert out == bytes(want)
