"""MTU behaviour (ICMP fragmentation needed, outer fragmentation) and the client-fragment policy.

Oracles: scapy builds the unfragmented packets and reassembles our fragments (``defragment``); scapy
recomputes every checksum of the ICMP errors.
"""

import random

import pytest
from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.model import Cluster, Config, Executor, Port, Server
from encapfwd.plugins import get_plugin_manager

pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import ICMP, IP, UDP, IPOption_RR, IPOption_Security, defragment, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw

ME = "02:00:00:00:00:01"
ROUTER = "02:00:00:00:00:aa"
GW = "02:00:00:00:00:fe"
VIP = "10.0.9.9"
VIP6 = "2001:db8:9::9"

SERVERS = {
    "mac": Server(address="10.0.2.10", mac="02:00:00:00:00:10"),
    "ipip": Server(address="10.0.3.10", encapforward=True, encaptype="ipip"),
    "gre": Server(address="10.0.4.10", encapforward=True, encaptype="gre"),
    "grekey": Server(address="10.0.4.11", encapforward=True, encaptype="gre", grekey=99),
}
OVERHEAD = {"mac": 0, "ipip": 20, "gre": 24, "grekey": 28}


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager()


def config(servers, mtu=1500, vip=VIP, number=80):
    return Config(
        executor=Executor(nfa="10.0.2.1", mac=ME, networks=["10.0.2.0/24", "2001:db8:2::/64"], gatewaymac=GW,
                          mtu=mtu),
        clusters=[Cluster(address=vip, ports=[Port(number=number, servers=servers)])],
    )


def frame(l3):
    return bytes(Ether(src=ROUTER, dst=ME) / l3)


def decremented(pkt):
    q = IP(bytes(pkt))
    q.ttl -= 1
    del q.chksum
    return IP(bytes(q))


def scapy_encapsulate(method, inner, ident, df):
    """The unfragmented outer IP packet scapy builds for *inner* (already P')."""
    server = SERVERS[method]
    if method == "mac":
        return inner
    outer = IP(src="10.0.2.1", dst=str(server.address), tos=inner.tos, flags="DF" if df else 0, ttl=64,
               id=ident)
    if method == "ipip":
        return IP(bytes(outer / inner))
    gre = GRE() if server.grekey is None else GRE(key_present=1, key=server.grekey)
    return IP(bytes(outer / gre / inner))


# ------------------------------------------------------------------------------- fragmentation needed


@pytest.mark.parametrize("method", sorted(SERVERS))
@pytest.mark.parametrize("mtu", [576, 1500])
def test_df_packet_too_big_gets_frag_needed_with_mtu_minus_overhead(registry, method, mtu):
    d = Dispatcher(config([SERVERS[method]], mtu=mtu), registry)
    size = mtu - OVERHEAD[method] + 1
    pkt = IP(src="198.51.100.7", dst=VIP, ttl=30, flags="DF") / UDP(sport=5000, dport=80) / Raw(
        b"z" * (size - 28))
    assert len(pkt) == size
    (reply,) = d.process(frame(pkt))
    assert d.drops == {"frag-needed": 1}
    r = Ether(reply)
    assert (r.src, r.dst) == (ME, ROUTER)
    assert r[IP].src == VIP and r[IP].dst == "198.51.100.7" and r[IP].proto == 1
    assert r[ICMP].type == 3 and r[ICMP].code == 4
    assert r[ICMP].nexthopmtu == mtu - OVERHEAD[method]
    assert len(r[IP]) <= 576
    quoted = bytes(r[ICMP].payload)
    assert quoted == bytes(pkt)[:len(quoted)] and len(quoted) >= 28
    fresh = IP(bytes(r[IP]))
    del fresh.chksum
    del fresh[ICMP].chksum
    assert bytes(IP(bytes(fresh))) == bytes(r[IP])  # scapy agrees with both checksums
    # one byte less fits
    small = IP(src="198.51.100.7", dst=VIP, ttl=30, flags="DF") / UDP(sport=5000, dport=80) / Raw(
        b"z" * (size - 29))
    (out,) = d.process(frame(small))
    assert len(out) - 14 == mtu


# ------------------------------------------------------------------------------ outer fragmentation


@pytest.mark.parametrize("method", sorted(SERVERS))
@pytest.mark.parametrize("mtu,size", [(576, 577), (576, 3000), (1500, 1481), (1500, 1500), (1500, 9000)])
def test_df_clear_outer_is_fragmented_and_scapy_reassembles_it(registry, method, mtu, size):
    d = Dispatcher(config([SERVERS[method]], mtu=mtu), registry)
    options = [IPOption_RR(routers=["192.0.2.1"]), IPOption_Security()] if method == "mac" else []
    pkt = IP(src="198.51.100.7", dst=VIP, ttl=30, flags=0, id=777, options=options) / UDP(
        sport=5000, dport=80)
    pkt = pkt / Raw(bytes(random.Random(size).getrandbits(8) for _ in range(size - len(pkt))))
    outs = d.process(frame(pkt))
    if size + OVERHEAD[method] <= mtu:  # fits: one frame, unfragmented
        assert len(outs) == 1 and not Ether(outs[0])[IP].flags.MF
        return
    assert len(outs) >= 2 and d.drops == {}
    ips = []
    for out in outs:
        e = Ether(out)
        assert e.src == ME and e.dst == (GW if method != "mac" else "02:00:00:00:00:10")
        assert len(out) - 14 <= mtu
        fresh = IP(bytes(e[IP]))
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == e[IP].chksum
        ips.append(e[IP])
    assert all(ip.flags.MF for ip in ips[:-1]) and not ips[-1].flags.MF
    whole = defragment(ips)
    assert len(whole) == 1
    expected = scapy_encapsulate(method, decremented(pkt), ips[0].id, df=False)
    got = IP(bytes(whole[0]))
    assert bytes(got) == bytes(expected)
    if method == "mac":  # options: the copied one (security) in every fragment, record route only in the first
        assert {o.option for o in ips[0].options} >= {2, 7}
        for ip in ips[1:]:
            kinds = {o.option for o in ip.options}
            assert 2 in kinds and 7 not in kinds
    assert d.report()["forwarded"] == 1


# ----------------------------------------------------------------------------- client fragments


def many_servers(n=8):
    return [Server(address=f"10.0.2.{10 + i}", mac=f"02:00:00:00:00:{0x10 + i:02x}") for i in range(n)]


def test_all_fragments_of_a_datagram_go_to_the_first_fragments_flow_server(registry):
    d = Dispatcher(config(many_servers(), number=0), registry)
    rnd = random.Random(7)
    datagrams = []
    for i in range(40):
        sport = 20000 + i
        dg = IP(src=f"198.51.100.{i + 1}", dst=VIP, ttl=30, id=1000 + i, flags=0) / UDP(
            sport=sport, dport=53) / Raw(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1500, 5000))))
        pieces = [frame(p) for p in fragment(dg, fragsize=rnd.choice([504, 1000, 1480]))]
        order = rnd.choice(["in", "reverse", "shuffle"])
        if order == "reverse":
            pieces.reverse()
        elif order == "shuffle":
            rnd.shuffle(pieces)
        datagrams.append((dg, pieces))
    # interleave the datagrams' fragments
    queue = [(i, j) for i, (_, pieces) in enumerate(datagrams) for j in range(len(pieces))]
    rnd.shuffle(queue)
    got = {i: [] for i in range(len(datagrams))}
    cursors = {i: 0 for i in range(len(datagrams))}
    order = [i for i, _ in queue]
    for i in order:
        _, pieces = datagrams[i]
        f = pieces[cursors[i]]
        cursors[i] += 1
        for out in d.process(f, 5.0):
            e = Ether(out)
            got[e[IP].src and int(e[IP].src.split(".")[-1]) - 1].append(e)
    assert d.drops == {}
    for i, (dg, pieces) in enumerate(datagrams):
        outs = got[i]
        assert len(outs) == len(pieces)
        assert len({e.dst for e in outs}) == 1, "fragments of one datagram on different servers"
        # scapy's defragment needs the fragments in offset order
        whole = defragment(sorted((e[IP] for e in outs), key=lambda ip: ip.frag))
        assert len(whole) == 1 and bytes(IP(bytes(whole[0]))) == bytes(decremented(dg))
        # the first fragment went to the flow's server: an unfragmented packet of the same flow follows it
        follow = IP(src=dg.src, dst=VIP, ttl=30) / UDP(sport=dg[UDP].sport, dport=53) / Raw(b"q")
        (out,) = d.process(frame(follow), 6.0)
        assert Ether(out).dst == outs[0].dst


def test_fragments_whose_first_fragment_never_comes_time_out(registry):
    d = Dispatcher(config(many_servers()), registry)
    dg = IP(src="198.51.100.1", dst=VIP, ttl=30, id=5) / UDP(sport=1, dport=80) / Raw(b"x" * 3000)
    pieces = fragment(dg, fragsize=1000)
    for p in pieces[1:]:
        assert d.process(frame(p), 1.0) == []
    assert d.report()["fragments"]["held"] == len(pieces) - 1
    d.process(frame(IP(src="198.51.100.9", dst=VIP, id=6, flags="MF", frag=100) / Raw(b"y" * 8)), 100.0)
    assert d.drops["frag-timeout"] == len(pieces) - 1
    d.flush()
    assert d.drops["frag-timeout"] == len(pieces)
    assert d.report()["fragments"]["held"] == 0


def test_fragments_of_a_datagram_for_an_unconfigured_port_are_all_dropped(registry):
    d = Dispatcher(config(many_servers()), registry)
    dg = IP(src="198.51.100.1", dst=VIP, ttl=30, id=5) / UDP(sport=1, dport=81) / Raw(b"x" * 3000)
    pieces = fragment(dg, fragsize=1000)
    for p in [pieces[1], pieces[0], *pieces[2:]]:
        assert d.process(frame(p), 1.0) == []
    assert d.drops == {"not-port": len(pieces)}


def test_ipv6_fragments_stay_together(registry):
    d = Dispatcher(config(many_servers(), vip=VIP6, number=0), registry)
    rnd = random.Random(3)
    for i in range(10):
        dg = IPv6(src=f"2001:db8:100::{i + 1}", dst=VIP6, hlim=20) / IPv6ExtHdrFragment(id=i) / UDP(
            sport=3000 + i, dport=53) / Raw(b"p" * rnd.randint(1500, 4000))
        pieces = fragment6(dg, 1280)
        if i % 2:
            pieces = list(reversed(pieces))
        outs = [o for p in pieces for o in d.process(frame(p), 1.0)]
        assert len(outs) == len(pieces)
        assert len({Ether(o).dst for o in outs}) == 1
        assert all(Ether(o)[IPv6].hlim == 19 for o in outs)
    assert d.drops == {}


def test_tiny_first_fragment_without_ports_is_dropped(registry):
    d = Dispatcher(config(many_servers()), registry)
    first = IP(src="198.51.100.1", dst=VIP, ttl=30, id=9, flags="MF", proto=6) / Raw(b"\x00\x50")
    assert d.process(frame(first)) == []
    assert d.drops == {"truncated": 1}


def test_held_fragments_are_bounded(registry):
    from encapfwd.datapath.dispatcher import FRAG_HELD_DATAGRAMS

    d = Dispatcher(config(many_servers()), registry)
    n = FRAG_HELD_DATAGRAMS + 500
    for i in range(n):
        later = IP(src="198.51.100.1", dst=VIP, ttl=30, id=i, proto=17, frag=100) / Raw(b"x" * 16)
        assert d.process(frame(later), 1.0) == []
    assert d.report()["fragments"]["held"] == FRAG_HELD_DATAGRAMS
    assert d.drops == {"frag-overflow": 500}
    d.flush()
    assert d.drops == {"frag-overflow": 500, "frag-timeout": FRAG_HELD_DATAGRAMS}
    assert d.report()["fragments"]["held"] == 0
