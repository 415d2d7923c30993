"""Hypothesis strategies for forwarder tests, shared by the project's plugins and by third parties.

Needs ``hypothesis`` and ``scapy`` (test dependencies; nothing on the data path imports this module).
Inner packets are built by scapy, so a forwarder's output can be compared, byte for byte, with what scapy
builds from the same inputs: scapy computing its own lengths and checksums is the independent oracle.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from .hookspecs import Egress

#: Settings for the property tests: enough examples to cover options/flags/sizes, no deadline (CI load).
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

addresses = st.integers(1, 2**32 - 2).map(lambda n: str(ipaddress.IPv4Address(n)))
addresses6 = st.integers(1, 2**128 - 2).map(lambda n: str(ipaddress.IPv6Address(n)))
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))


def _options():
    from scapy.layers.inet import IPOption_NOP, IPOption_Router_Alert, IPOption_RR, IPOption_Timestamp

    return [
        lambda: IPOption_NOP(),
        lambda: IPOption_Router_Alert(),
        lambda: IPOption_RR(routers=["192.0.2.1", "192.0.2.2"]),
        lambda: IPOption_Timestamp(flg=0, timestamp=[1, 2]),
    ]


@st.composite
def transport(draw):
    """A TCP, UDP or ICMP layer (scapy) with a payload of up to 1400 bytes."""
    from scapy.layers.inet import ICMP, TCP, UDP
    from scapy.packet import Raw

    kind = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    if kind == "tcp":
        l4 = TCP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)),
                 flags=draw(st.integers(0, 255)), seq=draw(st.integers(0, 2**32 - 1)))
    elif kind == "udp":
        l4 = UDP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)))
    else:
        l4 = ICMP(type=draw(st.sampled_from([0, 3, 8, 11])), id=draw(st.integers(0, 65535)))
    return l4 / Raw(draw(st.binary(max_size=1400)))


@st.composite
def inner_ipv4(draw):
    """Bytes of a random IPv4 packet P' (addresses, TOS, TTL, ID, DF, IP options, TCP/UDP/ICMP)."""
    from scapy.layers.inet import IP

    choices = _options()
    options = [choices[i]() for i in draw(st.lists(st.integers(0, len(choices) - 1), max_size=3))]
    ip = IP(src=draw(addresses), dst=draw(addresses), tos=draw(st.integers(0, 255)),
            ttl=draw(st.integers(0, 254)), id=draw(st.integers(0, 65535)),
            flags="DF" if draw(st.booleans()) else 0, options=options)
    return bytes(ip / draw(transport()))


@st.composite
def inner_ipv6(draw):
    """Bytes of a random IPv6 packet P' (addresses, traffic class, hop limit, TCP/UDP/ICMP)."""
    from scapy.layers.inet6 import IPv6

    return bytes(IPv6(src=draw(addresses6), dst=draw(addresses6), tc=draw(st.integers(0, 255)),
                      hlim=draw(st.integers(0, 254))) / draw(transport()))


@st.composite
def egresses(draw, outer: bool = True):
    """A random :class:`~encapfwd.hookspecs.Egress` (MACs, outer addresses and TTL when *outer*)."""
    return Egress(
        src_mac=draw(macs),
        dst_mac=draw(macs),
        outer_src=ipaddress.ip_address(draw(addresses)) if outer else None,
        outer_dst=ipaddress.ip_address(draw(addresses)),
        ttl=draw(st.integers(1, 255)),
        cluster=ipaddress.ip_address("10.0.9.9"),
        mtu=1500,
    )
