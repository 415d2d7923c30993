"""GRE template (RFC 2784, key per RFC 2890), run by the core's Python executor, against scapy as the oracle.

For random inner TCP/UDP/ICMP packets (sizes, IP options, DF, TOS, TTL) and an optional key, the frame
``template_transform(template(server, egress), egress)`` returns must equal, byte for byte,
``Ether()/IP(TOS, DF of the inner, TTL = egress.ttl)/GRE()/inner`` built by scapy (which picks protocol 47
and GRE protocol 0x0800 and computes lengths and checksums itself).
"""

import ipaddress

import pytest
from encapfwd.datapath.templates import template_transform
from encapfwd.hookspecs import Egress, Template
from encapfwd.model import Server
from encapfwd.testing import SETTINGS, egresses
from encapfwd.testing import inner_ipv4 as inner_packets
from encapfwd_gre import encapfwd_build_template
from encapfwd_gre.template import template
from hypothesis import given, settings
from hypothesis import strategies as st

scapy_inet = pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from scapy.layers.l2 import GRE, Ether

keys = st.one_of(st.none(), st.integers(0, 2**32 - 1))


def build(server, egress):
    return template_transform(template(server, egress), egress)


def expected(egress, key, inner: bytes, ident: int) -> bytes:
    parsed = IP(inner)
    assert bytes(parsed) == inner
    outer = IP(src=str(egress.outer_src), dst=str(egress.outer_dst), tos=parsed.tos,
               flags="DF" if parsed.flags.DF else 0, ttl=egress.ttl, id=ident)
    gre = GRE() if key is None else GRE(key_present=1, key=key)
    return bytes(Ether(src=egress.src_mac, dst=egress.dst_mac) / outer / gre / parsed)


def _egress(**kw):
    values = dict(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:fe",
                  outer_src=ipaddress.ip_address("10.0.2.1"), outer_dst=ipaddress.ip_address("10.0.4.10"),
                  ttl=64, cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)
    values.update(kw)
    return Egress(**values)


@pytest.mark.parametrize("key, size", [(None, 24), (0, 28), (2**32 - 1, 28)])
def test_the_hook_gives_a_template_the_xdp_program_can_run(key, size):
    server = Server(address="10.0.4.10", encapforward=True, encaptype="gre", grekey=key)
    t = encapfwd_build_template(forwarder="gre", server=server, egress=_egress())
    assert isinstance(t, Template) and t.xdp_capable and len(t.header) == size
    assert t.fields == {"ipv4", "tos", "df", "ident"}
    assert t.header[20:24] == (b"\x00\x00\x08\x00" if key is None else b"\x20\x00\x08\x00")
    assert encapfwd_build_template(forwarder="ipip", server=server, egress=_egress()) is None


@SETTINGS
@given(inner=inner_packets(), egress=egresses(), key=keys)
def test_gre_equals_scapy(inner, egress, key):
    server = Server(address=str(egress.outer_dst), encapforward=True, encaptype="gre", grekey=key)
    out = build(server, egress)(inner)
    ident = int.from_bytes(out[18:20], "big")
    if inner[6] & 0x40:
        assert ident == 0
    assert out == expected(egress, key, inner, ident)
    decoded = Ether(out)
    assert decoded[IP].proto == 47
    assert decoded[GRE].proto == 0x0800
    assert len(out) - 14 - len(inner) == (24 if key is None else 28)


@SETTINGS
@given(inner=inner_packets(), key=keys)
def test_fresh_ident_when_df_clear(inner, key):
    inner = bytearray(inner)
    inner[6] &= ~0x40 & 0xFF
    egress = _egress()
    transform = build(Server(address="10.0.4.10", encaptype="gre", grekey=key), egress)
    outs = [transform(bytes(inner)) for _ in range(3)]
    assert [int.from_bytes(o[18:20], "big") for o in outs] == [1, 2, 3]
    for out in outs:
        assert out == expected(egress, key, bytes(inner), int.from_bytes(out[18:20], "big"))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80), key=keys)
def test_never_raises_on_any_bytes(data, key):
    out = build(Server(address="10.0.4.10", encaptype="gre", grekey=key), _egress())(data)
    assert out.endswith(data) and len(out) == 14 + (24 if key is None else 28) + len(data)


def test_ipv6_inner_does_not_raise():
    """GRE here carries IPv4 only (the configuration refuses IPv6 clusters for it); an IPv6 P' that arrives
    anyway is framed per the Template contract (GRE protocol stays 0x0800, DF set, identification 0)."""
    inner = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP())
    out = build(Server(address="10.0.4.10", encaptype="gre", grekey=5), _egress())(inner)
    want = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:fe") / IP(
        src="10.0.2.1", dst="10.0.4.10", flags="DF", ttl=64, id=0, proto=47) / GRE(
        key_present=1, key=5, proto=0x0800) / Raw(inner)
    assert out == bytes(want)
