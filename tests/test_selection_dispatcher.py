"""Server selection through the real dispatcher: frames in, the server a frame went to read from its
destination MAC (MAC forwarding), configuration changes through ``Dispatcher.reload``."""

import ipaddress
import json
import random
import struct
from collections import Counter

import attrs
import pytest

import encapfwd_mac
from encapfwd.datapath import packet as pk
from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.model import Cluster, Config, Executor, Port, Server
from encapfwd.plugins import get_plugin_manager

VIP = ipaddress.ip_address("10.0.9.9")
DISPATCHER_MAC = bytes.fromhex("020000000001")
CLIENT_MAC = bytes.fromhex("0200000000fe")
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def registry():
    return get_plugin_manager(load_entrypoints=False, plugins=[encapfwd_mac])


def server(i, weight=1, down=False):
    return Server(address=f"10.0.2.{10 + i}", weight=weight, down=down, mac=f"02:00:00:00:01:{10 + i:02x}")


def server_index(frame: bytes) -> int:
    """Which server() a forwarded frame is addressed to."""
    assert frame[:5] == bytes.fromhex("0200000001"), frame[:6].hex()
    return frame[5] - 10


def config(weights=(1, 1, 1), algorithm="maglev", stickytime=0, staletimeout=300, maxflows=1_000_000,
           down=()):
    port = Port(number=80, porttype="both", selectionalgorithm=algorithm, stickytime=stickytime,
                staletimeout=staletimeout,
                servers=[server(i, w, i in down) for i, w in enumerate(weights)])
    executor = Executor(mac="02:00:00:00:00:01", networks=["10.0.2.0/24"], nfa="10.0.2.1", maxflows=maxflows)
    return Config(executor=executor, clusters=[Cluster(address=VIP, ports=[port])])


_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


def tcp_frame(client: bytes, sport: int, flags: int, dport: int = 80, payload: bytes = b"") -> bytes:
    """An Ethernet/IPv4/TCP frame to the VIP (valid IP header checksum), built without scapy for speed;
    ``test_frame_builder_matches_scapy`` checks it against scapy."""
    tcp = _TCP.pack(sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    header = _IP.pack(0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, client, VIP.packed)
    header = header[:10] + pk.checksum(header).to_bytes(2, "big") + header[12:]
    return DISPATCHER_MAC + CLIENT_MAC + b"\x08\x00" + header + tcp


def udp_frame(client: bytes, sport: int, dport: int = 80) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8, 0)
    header = _IP.pack(0x45, 0, 28, 1, 0, 64, 17, 0, client, VIP.packed)
    header = header[:10] + pk.checksum(header).to_bytes(2, "big") + header[12:]
    return DISPATCHER_MAC + CLIENT_MAC + b"\x08\x00" + header + udp


def random_clients(n, seed):
    rnd = random.Random(seed)
    return [(bytes((rnd.randrange(1, 224),)) + rnd.randbytes(3), rnd.randrange(1024, 65536))
            for _ in range(n)]


def send(d, flows, flags, now):
    """Send one TCP packet of each flow; the server index each went to (-1: dropped)."""
    out = []
    for client, sport in flows:
        frames = d.process(tcp_frame(client, sport, flags), now)
        out.append(server_index(frames[0]) if frames else -1)
    return out


def test_frame_builder_matches_scapy():
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    ours = tcp_frame(bytes([192, 0, 2, 1]), 40000, SYN)
    theirs = Ether(ours)
    assert theirs[IP].src == "192.0.2.1" and theirs[IP].dst == str(VIP) and theirs[TCP].flags == "S"
    rebuilt = Ether(dst=theirs.dst, src=theirs.src) / IP(src="192.0.2.1", dst=str(VIP), id=1, flags="DF") / \
        TCP(sport=40000, dport=80, seq=1, flags="S", window=65535, chksum=0)
    assert bytes(rebuilt) == ours


@pytest.mark.parametrize("algorithm", ["maglev", "wrr"])
def test_distribution_through_the_dispatcher(algorithm):
    weights = (1, 2, 3, 4, 5)
    d = Dispatcher(config(weights, algorithm), registry())
    flows = random_clients(100_000, seed=31)
    got = Counter(send(d, flows, SYN, 1.0))
    assert -1 not in got
    total = sum(weights)
    shares = [got[i] / len(flows) for i in range(5)]
    print(f"\n{algorithm} through the dispatcher: "
          + " ".join(f"{s:.4f}/{w / total:.4f}" for s, w in zip(shares, weights)))
    for share, w in zip(shares, weights):
        assert abs(share - w / total) < 0.02
        assert abs(share - w / total) / (w / total) < 0.02
    report = d.report()
    assert report["flows"]["flows"] == 100_000
    assert sum(report["flows"]["connections"].values()) == 100_000
    for i in range(len(weights)):
        assert report["servers"][f"10.0.9.9@80@10.0.2.{10 + i}"]["packets"] == got[i]


def test_removing_a_server_moves_only_its_flows_through_the_dispatcher():
    cfg = config((1,) * 10)
    d = Dispatcher(cfg, registry())
    flows = random_clients(30_000, seed=32)
    before = send(d, flows, SYN, 1.0)
    smaller = attrs.evolve(cfg, clusters=[attrs.evolve(cfg.clusters[0], ports=[attrs.evolve(
        cfg.clusters[0].ports[0], servers=[s for s in cfg.clusters[0].ports[0].servers
                                           if str(s.address) != "10.0.2.13"])])])
    d.reload(smaller)
    after = send(d, flows, ACK, 2.0)
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert {a for a, _ in moved} == {3} and 3 not in after
    frac = len(moved) / len(flows)
    # the same change on a fresh dispatcher (no flow table entries): Maglev alone
    fresh = Dispatcher(smaller, registry())
    stateless = send(fresh, flows, ACK, 2.0)
    hash_moved = sum(a != b for a, b in zip(before, stateless))
    others = sum(a != b for a, b in zip(before, stateless) if a != 3)
    print(f"\nremove 1 of 10 through the dispatcher: {frac:.4f} of flows moved with the flow table "
          f"(only the removed server's); Maglev alone: {hash_moved / len(flows):.4f} "
          f"({others / len(flows):.4f} from other servers)")
    assert 0.08 < frac < 0.12
    assert others / len(flows) < 0.01


def test_two_dispatchers_agree_on_every_flow_without_sharing_state():
    cfg = config((1, 2, 3, 4, 5))
    a, b = Dispatcher(cfg, registry()), Dispatcher(cfg, registry())
    flows = random_clients(5000, seed=33)
    assert send(a, flows, SYN, 1.0) == send(b, flows, ACK, 50.0)  # b sees them mid-stream


def test_quiesce_through_the_dispatcher():
    d = Dispatcher(config((1, 1, 1), "wlc"), registry())
    flows = random_clients(3000, seed=34)
    before = send(d, flows, SYN, 1.0)
    assert Counter(before) == {0: 1000, 1: 1000, 2: 1000}
    d.reload(config((1, 0, 1), "wlc"))
    assert send(d, flows, ACK, 2.0) == before  # existing connections continue on server 1
    new = send(d, random_clients(3000, seed=35), SYN, 2.0)
    assert 1 not in new and -1 not in new
    d.reload(config((1, 1, 1), "wlc"))  # unquiesce: least connections sends new flows to it first
    new = send(d, random_clients(1000, seed=36), SYN, 3.0)
    assert Counter(new) == {1: 1000}


def test_down_and_up_through_the_dispatcher():
    d = Dispatcher(config((1, 1, 1, 1)), registry())
    flows = random_clients(4000, seed=37)
    before = send(d, flows, SYN, 1.0)
    d.reload(config((1, 1, 1, 1), down=(0,)))
    during = send(d, flows, ACK, 2.0)
    assert 0 not in during
    assert [b for b in before if b != 0] == [x for b, x in zip(before, during) if b != 0]
    d.reload(config((1, 1, 1, 1)))
    after = send(d, flows, ACK, 3.0)
    assert after == during  # established flows stay where they are
    assert 0 in send(d, random_clients(400, seed=38), SYN, 3.0)
    # all down: no server
    d.reload(config((1, 1, 1, 1), down=(0, 1, 2, 3)))
    assert send(d, flows[:10], ACK, 4.0) == [-1] * 10
    assert d.drops["no-server"] == 10


def test_affinity_through_the_dispatcher():
    d = Dispatcher(config((1,) * 5, "wrr", stickytime=30), registry())
    client = bytes([192, 0, 2, 50])
    got = {i for i in send(d, [(client, p) for p in range(2000, 2050)], SYN, 1.0)}
    assert len(got) == 1
    # UDP from the same client on the same port follows it too
    (first,) = got
    out = d.process(udp_frame(client, 5353), 2.0)
    assert server_index(out[0]) == first
    # other clients spread (round robin)
    others = send(d, [(bytes([192, 0, 2, 60 + i]), 3000) for i in range(10)], SYN, 3.0)
    assert len(set(others)) == 5
    # 31 s of silence later, the client is free: a new connection goes where round robin says
    nxt = send(d, [(client, p) for p in range(4000, 4005)], SYN, 40.0)
    assert len(set(nxt)) == 1
    assert d.report()["flows"]["affinity"] == 11


def test_least_connections_through_the_dispatcher():
    d = Dispatcher(config((1, 3), "wlc"), registry())
    flows = random_clients(400, seed=39)
    assert Counter(send(d, flows, SYN, 1.0)) == {0: 100, 1: 300}
    # server 1's connections close (FIN): the next new flows go to it until the counts are level again
    ones = [f for f, i in zip(flows, send(d, flows, ACK, 2.0)) if i == 1]
    send(d, ones, FIN | ACK, 3.0)
    assert Counter(send(d, random_clients(300, seed=40), SYN, 3.0)) == {1: 300}


def test_icmp_errors_follow_their_flow():
    """An ICMP error about a server's reply (VIP:80 -> client) reaches the flow's server, even under
    round robin, where hashing alone could not tell."""
    d = Dispatcher(config((1,) * 4, "wrr"), registry())
    flows = random_clients(40, seed=41)
    servers = send(d, flows, SYN, 1.0)
    for (client, sport), expected in zip(flows, servers):
        quoted_tcp = _TCP.pack(80, sport, 1, 0, 5 << 4, ACK, 100, 0, 0)
        quoted = _IP.pack(0x45, 0, 40, 7, 0x4000, 63, 6, 0, VIP.packed, client) + quoted_tcp
        icmp = pk.icmp4_error(quoted, bytes([198, 51, 100, 1]), pk.ICMP_DEST_UNREACH, pk.ICMP_FRAG_NEEDED,
                              1400)
        # icmp4_error builds the error *from* the router to the quoted packet's source: the VIP
        frame = DISPATCHER_MAC + CLIENT_MAC + b"\x08\x00" + icmp
        out = d.process(frame, 2.0)
        assert out and server_index(out[0]) == expected


def test_a_flood_keeps_the_table_at_its_bound():
    d = Dispatcher(config((1, 1, 1), maxflows=2000, staletimeout=300), registry())
    established = random_clients(50, seed=42)
    servers = send(d, established, SYN, 0.0)
    rnd = random.Random(43)
    for n in range(30_000):
        d.process(tcp_frame(rnd.randbytes(4), rnd.randrange(1024, 65536), SYN), n / 10_000)
        if n % 500 == 0:
            assert send(d, established, ACK, n / 10_000) == servers
    flows = d.report()["flows"]
    assert flows["flows"] == 2000 and flows["maxflows"] == 2000
    assert flows["evictions"] >= 30_000 - 2000
    json.dumps(d.report())
