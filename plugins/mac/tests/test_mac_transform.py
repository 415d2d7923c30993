"""MAC forwarding template (empty header), run by the core's Python executor, against scapy as the oracle.

P' is sent unchanged in a frame from the dispatcher's MAC to the next hop; scapy's ``Ether()/IP(P')`` (or
``/IPv6``) picks the ethertype itself.
"""

import ipaddress

import pytest
from encapfwd.datapath.templates import template_transform
from encapfwd.hookspecs import Egress, Template
from encapfwd.model import Server
from encapfwd.testing import SETTINGS, inner_ipv4, inner_ipv6, macs
from encapfwd_mac import encapfwd_build_template
from encapfwd_mac.template import template
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether


@st.composite
def inner_packets(draw):
    return draw(st.one_of(inner_ipv4(), inner_ipv6()))


def egress_for(src_mac, dst_mac):
    return Egress(src_mac=src_mac, dst_mac=dst_mac, outer_src=None,
                  outer_dst=ipaddress.ip_address("10.0.2.10"), ttl=64,
                  cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)


def build(server, egress):
    return template_transform(template(server, egress), egress)


def test_the_hook_gives_an_empty_template():
    egress = egress_for("02:00:00:00:00:01", "02:00:00:00:00:10")
    t = encapfwd_build_template(forwarder="mac", server=Server(address="10.0.2.10"), egress=egress)
    assert t == Template() and t.xdp_capable and not t.fields
    assert encapfwd_build_template(forwarder="ipip", server=Server(address="10.0.2.10"),
                                   egress=egress) is None


@SETTINGS
@given(inner=inner_packets(), src_mac=macs, dst_mac=macs)
def test_mac_equals_scapy(inner, src_mac, dst_mac):
    out = build(Server(address="10.0.2.10", mac=dst_mac), egress_for(src_mac, dst_mac))(inner)
    layer = IP(inner) if inner[0] >> 4 == 4 else IPv6(inner)
    assert bytes(layer) == inner
    assert out == bytes(Ether(src=src_mac, dst=dst_mac) / layer)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80))
def test_never_raises_on_any_bytes(data):
    out = build(Server(address="10.0.2.10"), egress_for("02:00:00:00:00:01", "02:00:00:00:00:10"))(data)
    assert out[:12] == bytes.fromhex("020000000010020000000001") and out[14:] == data
    assert out[12:14] == (b"\x86\xdd" if data and data[0] >> 4 == 6 else b"\x08\x00")
