"""Hypothesis strategies for forwarder tests, shared by the project's plugins and by third parties.

Needs ``hypothesis`` and ``scapy``: ``pip install 'encapfwd[testing]'`` (nothing on the data path imports
this module). Inner packets are built by scapy, so a forwarder's output can be compared, byte for byte, with what scapy
builds from the same inputs: scapy computing its own lengths and checksums is the independent oracle.
"""

from __future__ import annotations

import ipaddress

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "encapfwd.testing needs hypothesis (a test dependency): pip install 'encapfwd[testing]'",
        name=exc.name, path=exc.path,
    ) from exc

from encapfwd.records import Egress

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
    """A random :class:`~encapfwd.records.Egress` (MACs, outer addresses and TTL when *outer*)."""
    return Egress(
        src_mac=draw(macs),
        dst_mac=draw(macs),
        outer_src=ipaddress.ip_address(draw(addresses)) if outer else None,
        outer_dst=ipaddress.ip_address(draw(addresses)),
        ttl=draw(st.integers(1, 255)),
        cluster=ipaddress.ip_address("10.0.9.9"),
        mtu=1500,
    )


# ------------------------------------------------------------------------------- fuzzing the dispatcher

FUZZ_MAC = "02:00:00:00:00:01"
FUZZ_VIP = "10.0.9.9"
FUZZ_VIP6 = "2001:db8:9::9"


def fuzz_config(mtu: int):
    """A configuration exercising every forwarder, port 0, an IPv6 cluster and a small MTU."""
    from encapfwd.model import Cluster, Config, Executor, Port, Server

    return Config(
        executor=Executor(nfa="10.0.2.1", mac=FUZZ_MAC, networks=["10.0.2.0/24", "2001:db8:2::/64"],
                          gatewaymac="02:00:00:00:00:fe", mtu=mtu),
        clusters=[
            Cluster(address=FUZZ_VIP, ports=[
                Port(number=80, servers=[
                    Server(address="10.0.2.10", mac="02:00:00:00:00:10"),
                    Server(address="10.0.3.10", encapforward=True, encaptype="ipip"),
                    Server(address="10.0.4.10", encapforward=True, encaptype="gre", grekey=5),
                ]),
                Port(number=0, porttype="udp", servers=[
                    Server(address="10.0.4.11", encapforward=True, encaptype="gre")]),
            ]),
            Cluster(address=FUZZ_VIP6, ports=[Port(number=0, servers=[
                Server(address="2001:db8:2::10", mac="02:00:00:00:00:20")])]),
        ],
    )


def seed_frames(mtu: int) -> list:
    """Valid and awkward frames for :func:`fuzz_config` (*mtu*): TTL 0/1/2, IP options, too big with and
    without DF, ICMP errors, IPv6 with extension headers and fragments, ARP, VLAN, an IPv4 datagram in
    fragments. Mutating them reaches the dispatcher's corners faster than random bytes do."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, fragment
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import ARP, Dot1Q, Ether
    from scapy.packet import Raw

    def eth(l3):
        return bytes(Ether(src="02:00:00:00:00:aa", dst=FUZZ_MAC) / l3)

    c, vip, vip6 = "198.51.100.7", FUZZ_VIP, FUZZ_VIP6
    seeds = [
        eth(IP(src=c, dst=vip, ttl=9) / TCP(sport=1234, dport=80, flags="S") / Raw(b"x" * 30)),
        eth(IP(src=c, dst=vip, ttl=9, flags="DF", options=[IPOption_RR(routers=["1.1.1.1"])])
            / TCP(dport=80) / Raw(b"y" * (mtu + 100))),
        eth(IP(src=c, dst=vip, ttl=2) / UDP(sport=53, dport=9999) / Raw(b"z" * (mtu + 300))),
        eth(IP(src=c, dst=vip, ttl=1) / UDP(dport=80)),
        eth(IP(src=c, dst=vip, ttl=0) / TCP(dport=80)),
        eth(IP(src="203.0.113.1", dst=vip) / ICMP(type=3, code=4) / IP(src=vip, dst=c) / TCP(sport=80, dport=4)),
        eth(IP(src=c, dst=vip) / ICMP(type=8)),
        eth(IPv6(src="2001:db8::1", dst=vip6, hlim=5) / TCP(dport=80) / Raw(b"v6")),
        eth(IPv6(src="2001:db8::1", dst=vip6) / IPv6ExtHdrHopByHop() / UDP(dport=7) / Raw(b"h" * (mtu + 100))),
        eth(IPv6(src="2001:db8::1", dst=vip6) / IPv6ExtHdrFragment(m=1, id=7) / UDP(dport=7) / Raw(b"f" * 64)),
        eth(IPv6(src="2001:db8::1", dst=vip6) / IPv6ExtHdrFragment(offset=8, id=7) / Raw(b"g" * 64)),
        eth(ARP(pdst=vip)),
        bytes(Ether(dst=FUZZ_MAC) / Dot1Q(vlan=3) / IP(src=c, dst=vip) / TCP(dport=80)),
    ]
    datagram = IP(src=c, dst=vip, id=99, ttl=8) / UDP(sport=4, dport=80) / Raw(b"F" * 2000)
    return seeds + [eth(p) for p in fragment(datagram, fragsize=600)]


# ------------------------------------------------------------------------------------ setup scripts


def assert_shell_syntax(text: str, path) -> None:
    """Write *text* to *path* and have ``dash -n``, ``bash -n`` and ``shellcheck -s sh`` (those installed)
    check it: a generated back-end script must parse in the shells that will run it."""
    import shutil
    import subprocess
    from pathlib import Path

    Path(path).write_text(text)
    for shell in ("dash", "bash"):
        if shutil.which(shell):
            proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
    checker = shutil.which("shellcheck")
    if checker:
        proc = subprocess.run([checker, "-s", "sh", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
