"""MAC forwarding transform against scapy as the independent oracle.

P' is sent unchanged in a frame from the dispatcher's MAC to the next hop; scapy's ``Ether()/IP(P')`` (or
``/IPv6``) picks the ethertype itself.
"""

import ipaddress

import pytest
from encapfwd.hookspecs import Egress
from encapfwd.model import Server
from encapfwd_mac.transform import build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

addresses = st.integers(1, 2**32 - 2).map(lambda n: str(ipaddress.IPv4Address(n)))
addresses6 = st.integers(1, 2**128 - 2).map(lambda n: str(ipaddress.IPv6Address(n)))
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
OPTIONS = [lambda: IPOption_NOP(), lambda: IPOption_Router_Alert(),
           lambda: IPOption_RR(routers=["192.0.2.1"])]


@st.composite
def l4s(draw):
    kind = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    if kind == "tcp":
        l4 = TCP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)),
                 flags=draw(st.integers(0, 255)))
    elif kind == "udp":
        l4 = UDP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)))
    else:
        l4 = ICMP(type=draw(st.sampled_from([0, 3, 8, 11])))
    return l4 / Raw(draw(st.binary(max_size=1400)))


@st.composite
def inner_packets(draw):
    if draw(st.booleans()):
        options = [OPTIONS[i]() for i in draw(st.lists(st.integers(0, len(OPTIONS) - 1), max_size=3))]
        return bytes(IP(src=draw(addresses), dst=draw(addresses), tos=draw(st.integers(0, 255)),
                        ttl=draw(st.integers(0, 254)), flags="DF" if draw(st.booleans()) else 0,
                        options=options) / draw(l4s()))
    return bytes(IPv6(src=draw(addresses6), dst=draw(addresses6), tc=draw(st.integers(0, 255)),
                      hlim=draw(st.integers(0, 254))) / draw(l4s()))


def egress_for(src_mac, dst_mac):
    return Egress(src_mac=src_mac, dst_mac=dst_mac, outer_src=None,
                  outer_dst=ipaddress.ip_address("10.0.2.10"), ttl=64,
                  cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)


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
