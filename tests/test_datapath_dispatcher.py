"""Dispatcher behaviour: compile errors, classification, P' (TTL and checksum), methods, ICMP, counters.

Expected frames are built by scapy from the same inputs (scapy computes every checksum itself); the
dispatcher's output is never compared with something our own code computed.
"""

import json

import pytest
from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.errors import ConfigError, PluginError
from encapfwd.model import Cluster, Config, Executor, Port, Server
from encapfwd.plugins import get_plugin_manager

pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6
from scapy.layers.l2 import ARP, GRE, Dot1Q, Ether
from scapy.packet import Raw

ME = "02:00:00:00:00:01"
ROUTER = "02:00:00:00:00:aa"
GW = "02:00:00:00:00:fe"
VIP = "10.0.9.9"
VIP6 = "2001:db8:9::9"


def executor(**kw):
    values = dict(nfa="10.0.2.1", mac=ME, networks=["10.0.2.0/24", "2001:db8:2::/64"], gateway="10.0.2.254",
                  gatewaymac=GW)
    values.update(kw)
    return Executor(**values)


def one_server(server, number=80, porttype="both", vip=VIP, **ex):
    return Config(executor=executor(**ex), clusters=[
        Cluster(address=vip, ports=[Port(number=number, porttype=porttype, servers=[server])])])


MAC_SERVER = Server(address="10.0.2.10", mac="02:00:00:00:00:10")
IPIP_SERVER = Server(address="10.0.3.10", encapforward=True, encaptype="ipip")
GRE_SERVER = Server(address="10.0.4.10", encapforward=True, encaptype="gre", grekey=77)


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager()


def frame(l3, src=ROUTER, dst=ME):
    return bytes(Ether(src=src, dst=dst) / l3)


def client_packet(ttl=20, dport=80, flags="DF", **kw):
    return IP(src="198.51.100.7", dst=VIP, ttl=ttl, id=4242, flags=flags, **kw) / TCP(
        sport=40000, dport=dport, flags="S") / Raw(b"hello")


def p_prime(pkt):
    """What P' must be: the client packet with TTL - 1, rebuilt by scapy (fresh checksum)."""
    q = IP(bytes(pkt))
    q.ttl -= 1
    del q.chksum
    return IP(bytes(q))


# ---------------------------------------------------------------------------------- compile errors


def test_mac_forwarding_to_a_server_not_on_an_attached_network_is_refused(registry):
    with pytest.raises(ConfigError, match="attached"):
        Dispatcher(one_server(Server(address="10.0.3.10", mac="02:00:00:00:00:10")), registry)


def test_missing_macs_and_nfa_are_one_line_errors(registry):
    with pytest.raises(ConfigError, match="mac"):
        Dispatcher(one_server(Server(address="10.0.2.10")), registry)
    with pytest.raises(ConfigError, match="gatewaymac"):
        Dispatcher(one_server(IPIP_SERVER, gatewaymac=None), registry)
    with pytest.raises(ConfigError, match="nfa"):
        Dispatcher(one_server(IPIP_SERVER, nfa=None), registry)
    with pytest.raises(ConfigError, match="executor mac"):
        Dispatcher(one_server(MAC_SERVER, mac=None), registry)
    attached_ipip = Server(address="10.0.2.20", encapforward=True, encaptype="ipip")
    with pytest.raises(ConfigError, match="mac"):
        Dispatcher(one_server(attached_ipip), registry)
    for exc in (ConfigError,):
        try:
            Dispatcher(one_server(IPIP_SERVER, nfa=None), registry)
        except exc as err:
            assert "\n" not in str(err)


def test_missing_forwarder_plugin_names_the_distribution():
    registry = get_plugin_manager(load_entrypoints=False)
    with pytest.raises(PluginError, match="encapfwd-gre"):
        Dispatcher(one_server(GRE_SERVER), registry)


def test_encapsource_overrides_nfa(registry):
    server = Server(address="10.0.3.10", encapforward=True, encaptype="ipip", encapsource="10.0.2.2")
    d = Dispatcher(one_server(server), registry)
    out = d.process(frame(client_packet()))
    assert Ether(out[0])[IP].src == "10.0.2.2"


# ------------------------------------------------------------------------------------- each method


@pytest.mark.parametrize("options", [[], [IPOption_RR(routers=["192.0.2.1", "192.0.2.2"])]])
def test_mac_forwarding_is_p_prime_to_the_server_mac(registry, options):
    d = Dispatcher(one_server(MAC_SERVER), registry)
    pkt = client_packet(options=options)
    out = d.process(frame(pkt), 1.0)
    assert out == [bytes(Ether(src=ME, dst="02:00:00:00:00:10") / p_prime(pkt))]


def test_ipip_frame_equals_scapy(registry):
    d = Dispatcher(one_server(IPIP_SERVER), registry)
    pkt = client_packet(tos=0xB8)
    (out,) = d.process(frame(pkt), 1.0)
    want = Ether(src=ME, dst=GW) / IP(src="10.0.2.1", dst="10.0.3.10", tos=0xB8, flags="DF", ttl=64,
                                      id=0) / p_prime(pkt)
    assert out == bytes(want)


def test_gre_frame_equals_scapy_and_ipip_ttl_is_configurable(registry):
    d = Dispatcher(one_server(GRE_SERVER, encapttl=9), registry)
    pkt = client_packet(flags=0)
    (out,) = d.process(frame(pkt), 1.0)
    ident = Ether(out)[IP].id
    want = Ether(src=ME, dst=GW) / IP(src="10.0.2.1", dst="10.0.4.10", ttl=9, id=ident) / GRE(
        key_present=1, key=77) / p_prime(pkt)
    assert out == bytes(want)


def test_encapcond_auto_mac_forwards_on_an_attached_network_and_encapsulates_otherwise(registry):
    near = Server(address="10.0.2.11", mac="02:00:00:00:00:11", encapforward=True, encaptype="gre",
                  encapcond="auto")
    far = Server(address="10.0.3.11", encapforward=True, encaptype="gre", encapcond="auto")
    always_near = Server(address="10.0.2.12", mac="02:00:00:00:00:12", encapforward=True, encaptype="gre")
    pkt = client_packet()
    (out,) = Dispatcher(one_server(near), registry).process(frame(pkt))
    assert out == bytes(Ether(src=ME, dst="02:00:00:00:00:11") / p_prime(pkt))
    (out,) = Dispatcher(one_server(far), registry).process(frame(pkt))
    assert Ether(out).dst == GW and Ether(out)[IP].proto == 47
    (out,) = Dispatcher(one_server(always_near), registry).process(frame(pkt))
    assert Ether(out).dst == "02:00:00:00:00:12" and Ether(out)[IP].proto == 47  # on-link: server's MAC


def test_ipv6_cluster_mac_forwarding_decrements_hop_limit(registry):
    server = Server(address="2001:db8:2::10", mac="02:00:00:00:00:20")
    d = Dispatcher(one_server(server, vip=VIP6), registry)
    pkt = IPv6(src="2001:db8:100::1", dst=VIP6, hlim=30) / TCP(sport=1234, dport=80) / Raw(b"x")
    (out,) = d.process(frame(pkt))
    want = IPv6(bytes(pkt))
    want.hlim = 29
    assert out == bytes(Ether(src=ME, dst="02:00:00:00:00:20") / want)


def test_ipv6_cluster_with_encapsulation_is_a_config_error(registry):
    server = Server(address="10.0.3.10", encapforward=True, encaptype="ipip")
    with pytest.raises(ConfigError, match="IPv4"):
        Dispatcher(one_server(server, vip=VIP6), registry)


# ---------------------------------------------------------------------------------- classification


def test_porttype_and_port_zero(registry):
    tcp_only = Dispatcher(one_server(MAC_SERVER, porttype="tcp"), registry)
    udp = frame(IP(src="198.51.100.7", dst=VIP) / UDP(sport=5, dport=80))
    assert tcp_only.process(udp) == [] and tcp_only.drops == {"not-port": 1}
    every = Dispatcher(one_server(MAC_SERVER, number=0), registry)
    for dport in (1, 80, 65535):
        assert len(every.process(frame(client_packet(dport=dport)))) == 1
        assert len(every.process(frame(IP(src="198.51.100.7", dst=VIP) / UDP(dport=dport)))) == 1
    assert every.drops == {}


def test_drop_reasons(registry):
    d = Dispatcher(one_server(MAC_SERVER), registry)
    good = frame(client_packet())
    bad_ck = bytearray(good)
    bad_ck[24] ^= 0xFF
    cases = {
        "not-ip": frame(ARP(pdst=VIP)),
        "vlan-tagged": bytes(Ether(src=ROUTER, dst=ME) / Dot1Q(vlan=5) / client_packet()),
        "not-cluster": frame(IP(src="198.51.100.7", dst="10.9.9.9") / TCP(dport=80)),
        "not-port": frame(client_packet(dport=81)),
        "not-tcp-udp": frame(IP(src="198.51.100.7", dst=VIP, proto=132) / Raw(b"x" * 20)),
        "truncated": good[:40],
        "bad-checksum": bytes(bad_ck),
        "icmp-unmatched": frame(IP(src="198.51.100.7", dst=VIP) / ICMP(type=8)),
        "bad-ihl": good[:14] + bytes([0x43]) + good[15:],
        "bad-total-length": good[:16] + b"\x00\x10" + good[18:],
    }
    for reason, f in cases.items():
        before = dict(d.drops)
        assert d.process(f) == [], reason
        assert d.drops.get(reason, 0) == before.get(reason, 0) + 1, (reason, d.drops)
    assert sum(d.drops.values()) == len(cases)


def test_ethernet_padding_is_not_forwarded(registry):
    d = Dispatcher(one_server(MAC_SERVER), registry)
    pkt = IP(src="198.51.100.7", dst=VIP, ttl=5) / UDP(sport=1, dport=80)
    padded = frame(pkt) + b"\x00" * 18  # a 60-byte minimum frame
    (out,) = d.process(padded)
    assert out == bytes(Ether(src=ME, dst="02:00:00:00:00:10") / p_prime(pkt))


# ------------------------------------------------------------------------------------------- ICMP


def test_ttl_one_is_dropped_and_answered_with_time_exceeded(registry):
    d = Dispatcher(one_server(IPIP_SERVER), registry)
    pkt = client_packet(ttl=1)
    (reply,) = d.process(frame(pkt))
    assert d.drops == {"ttl-exceeded": 1}
    r = Ether(reply)
    assert r.dst == ROUTER and r.src == ME
    assert r[IP].src == VIP and r[IP].dst == "198.51.100.7"
    check = IP(bytes(r[IP]))
    del check.chksum
    del check[ICMP].chksum
    assert bytes(IP(bytes(check))) == bytes(r[IP])  # scapy's checksums equal ours
    assert r[ICMP].type == 11 and r[ICMP].code == 0
    assert bytes(r[ICMP].payload)[:28] == bytes(pkt)[:28]
    (reply0,) = d.process(frame(client_packet(ttl=0)))
    assert Ether(reply0)[ICMP].type == 11 and d.drops == {"ttl-exceeded": 2}


def test_no_icmp_error_about_an_icmp_error(registry):
    d = Dispatcher(one_server(MAC_SERVER), registry)
    err = IP(src="203.0.113.1", dst=VIP, ttl=1) / ICMP(type=3, code=1) / IP(src=VIP, dst="198.51.100.7") / TCP(
        sport=80, dport=40000)
    assert d.process(frame(err)) == []
    assert d.drops == {"ttl-exceeded": 1}


def test_icmp_error_quoting_a_client_flow_goes_to_the_flows_server(registry):
    servers = [Server(address=f"10.0.2.{10 + i}", mac=f"02:00:00:00:00:{10 + i:02x}") for i in range(8)]
    config = Config(executor=executor(), clusters=[
        Cluster(address=VIP, ports=[Port(number=80, servers=servers)])])
    d = Dispatcher(config, get_plugin_manager())
    for cport in range(40000, 40020):
        syn = IP(src="198.51.100.7", dst=VIP, ttl=30) / TCP(sport=cport, dport=80, flags="S")
        (out,) = d.process(frame(syn), 1.0)
        server_mac = Ether(out).dst
        # the server's reply (VIP:80 -> client) hit a small MTU on the way: a router tells the VIP
        err = IP(src="203.0.113.1", dst=VIP, ttl=30) / ICMP(type=3, code=4, nexthopmtu=1280) / IP(
            src=VIP, dst="198.51.100.7", ttl=63) / TCP(sport=80, dport=cport, flags="A")
        (fwd,) = d.process(frame(err), 2.0)
        assert Ether(fwd).dst == server_mac
        assert Ether(fwd)[ICMP].type == 3


def test_ipv6_hop_limit_one_gets_icmpv6_time_exceeded(registry):
    server = Server(address="2001:db8:2::10", mac="02:00:00:00:00:20")
    d = Dispatcher(one_server(server, vip=VIP6), registry)
    pkt = IPv6(src="2001:db8:100::1", dst=VIP6, hlim=1) / UDP(sport=1234, dport=80)
    (reply,) = d.process(frame(pkt))
    r = Ether(reply)
    assert r[IPv6].src == VIP6 and r[IPv6].dst == "2001:db8:100::1"
    assert ICMPv6TimeExceeded in r
    ck = r[ICMPv6TimeExceeded].cksum
    r2 = Ether(reply)
    del r2[ICMPv6TimeExceeded].cksum
    assert Ether(bytes(r2))[ICMPv6TimeExceeded].cksum == ck


def test_ipv6_too_big_answers_packet_too_big(registry):
    server = Server(address="2001:db8:2::10", mac="02:00:00:00:00:20")
    d = Dispatcher(one_server(server, vip=VIP6, mtu=1280), registry)
    pkt = IPv6(src="2001:db8:100::1", dst=VIP6) / UDP(sport=1234, dport=80) / Raw(b"x" * 1300)
    (reply,) = d.process(frame(pkt))
    assert Ether(reply)[ICMPv6PacketTooBig].mtu == 1280
    assert d.drops == {"frag-needed": 1}


# ------------------------------------------------------------------------------------ counters


def test_counters_and_report(registry):
    servers = [MAC_SERVER, IPIP_SERVER, GRE_SERVER]
    config = Config(executor=executor(), clusters=[Cluster(address=VIP, ports=[Port(number=80, servers=servers)])])
    d = Dispatcher(config, registry)
    sizes = 0
    for i in range(200):
        pkt = IP(src=f"198.51.100.{i % 250 + 1}", dst=VIP, ttl=30) / TCP(sport=1000 + i, dport=80) / Raw(
            b"x" * i)
        sizes += len(pkt)
        assert len(d.process(frame(pkt), float(i))) == 1
    d.process(frame(ARP()))
    report = d.report()
    json.dumps(report)
    rows = report["servers"]
    assert set(rows) == {f"{VIP}@80@10.0.2.10", f"{VIP}@80@10.0.3.10", f"{VIP}@80@10.0.4.10"}
    assert sum(r["packets"] for r in rows.values()) == 200 == report["forwarded"]
    assert sum(r["bytes"] for r in rows.values()) == sizes
    assert {r["method"] for r in rows.values()} == {"mac", "ipip", "gre"}
    assert report["drops"] == {"not-ip": 1}
    # reload keeps the counters of servers that stay
    d.reload(config)
    assert d.report()["forwarded"] == 200


def test_process_without_now_and_with_bytearray_or_memoryview(registry):
    d = Dispatcher(one_server(MAC_SERVER), registry)
    f = frame(client_packet())
    assert d.process(f) == d.process(bytearray(f)) == [bytes(Ether(src=ME, dst="02:00:00:00:00:10")
                                                            / p_prime(client_packet()))]
    assert isinstance(d.process(memoryview(f)), list)


# ------------------------------------------------------------------------------ third-party forwarders


class _ThirdParty:
    """A throw-away forwarder plugin: 'tag' puts a 4-byte marker after the Ethernet header."""

    from encapfwd import hookimpl

    @staticmethod
    @hookimpl
    def encapfwd_register_forwarders(register):
        from encapfwd.hookspecs import Forwarder

        register(Forwarder(name="tag", overhead=4))
        register(Forwarder(name="boom", overhead=0))

    @staticmethod
    @hookimpl
    def encapfwd_build_transform(forwarder, server, egress):
        if forwarder == "boom":
            raise RuntimeError("template failed\nsecond line")
        if forwarder != "tag":
            return None
        head = bytes.fromhex(egress.dst_mac.replace(":", "") + egress.src_mac.replace(":", "")) + b"\x08\x00"
        return lambda p: head + b"TAG!" + p


def test_a_third_party_forwarder_is_used_and_its_failures_are_one_line():
    registry = get_plugin_manager(load_entrypoints=False, plugins=[_ThirdParty])
    server = Server(address="10.0.3.10", encapforward=True, encaptype="tag")
    d = Dispatcher(one_server(server), registry)
    pkt = client_packet()
    (out,) = d.process(frame(pkt))
    assert out == bytes(Ether(src=ME, dst=GW, type=0x0800)) + b"TAG!" + bytes(p_prime(pkt))
    assert d.report()["servers"][f"{VIP}@80@10.0.3.10"]["method"] == "tag"
    with pytest.raises(PluginError, match="template failed") as info:
        Dispatcher(one_server(Server(address="10.0.3.10", encapforward=True, encaptype="boom")), registry)
    assert "\n" not in str(info.value) and f"{VIP}@80@10.0.3.10" in str(info.value)
