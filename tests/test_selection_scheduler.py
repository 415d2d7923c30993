"""The Scheduler: selectors + flow table + affinity, driven directly (no frames)."""

import ipaddress
import json
import random
from collections import Counter

import attrs
import pytest

from encapfwd import hookimpl
from encapfwd.errors import ConfigError
from encapfwd.model import Cluster, Config, Executor, Port, Server
from encapfwd.plugins import get_plugin_manager
from encapfwd.selection.algorithms import flow_hash, wrr_sequence
from encapfwd.selection.scheduler import Scheduler

VIP = ipaddress.ip_address("10.0.9.9")
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def registry(*plugins):
    return get_plugin_manager(load_entrypoints=False, plugins=plugins)


def servers(weights, down=()):
    return [Server(address=f"10.0.2.{10 + i}", weight=w, down=i in down) for i, w in enumerate(weights)]


def config(weights=(1, 1, 1), algorithm="maglev", stickytime=0, staletimeout=300, maxflows=1_000_000,
           down=(), server_list=None):
    port = Port(number=80, selectionalgorithm=algorithm, stickytime=stickytime, staletimeout=staletimeout,
                servers=server_list if server_list is not None else servers(weights, down))
    return Config(executor=Executor(maxflows=maxflows), clusters=[Cluster(address=VIP, ports=[port])])


def with_servers(cfg, server_list):
    port = attrs.evolve(cfg.clusters[0].ports[0], servers=server_list)
    return attrs.evolve(cfg, clusters=[attrs.evolve(cfg.clusters[0], ports=[port])])


def sched(cfg, maxflows=None, reg=None):
    s = Scheduler(reg or registry(), cfg.executor.maxflows if maxflows is None else maxflows)
    s.configure(cfg)
    return s


def key(client: bytes, sport: int, proto=6, dport=80) -> bytes:
    return client + VIP.packed + bytes((proto,)) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")


def random_flows(n, seed=1):
    rnd = random.Random(seed)
    return [key(rnd.randbytes(4), rnd.randrange(1024, 65536)) for _ in range(n)]


def addr(cfg, index):
    return cfg.clusters[0].ports[0].servers[index].address


# -- distribution -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["maglev", "wrr"])
def test_distribution_follows_weights(algorithm):
    weights = (1, 2, 3, 4, 5)
    cfg = config(weights, algorithm)
    pick = sched(cfg).picker(VIP, 80)
    flows = random_flows(100_000)
    counts = Counter(pick(k, k[:4], SYN, 100.0) for k in flows)
    total = sum(weights)
    report = []
    for i, w in enumerate(weights):
        share, expected = counts[i] / len(flows), w / total
        report.append(f"{share:.4f}/{expected:.4f}")
        assert abs(share - expected) < 0.02, (i, share, expected)  # within 2 points of the share
        assert abs(share - expected) / expected < 0.02  # and within 2 % of it, relatively (fixed seed;
        # the sampling noise of the lightest server's 6,667 flows is 1.2 % at one sigma)
    print(f"\n{algorithm} shares (observed/expected): {' '.join(report)}")
    assert -1 not in counts


def test_wrr_is_exact_and_smooth():
    cfg = config((1, 2, 3, 4, 5), "wrr")
    pick = sched(cfg).picker(VIP, 80)
    seq = [pick(k, k[:4], SYN, 1.0) for k in random_flows(15 * 40)]
    assert Counter(seq) == {0: 40, 1: 80, 2: 120, 3: 160, 4: 200}
    # smooth: the heaviest server never takes more than two new flows in a row in one cycle of 15
    cycle = wrr_sequence(servers((1, 2, 3, 4, 5)))
    assert len(cycle) == 15
    runs = max(len(r) for r in "".join(map(str, cycle + cycle)).replace("4", " 4 ").split() if r == "4")
    assert runs == 1


def test_every_packet_of_a_flow_reaches_one_server_even_without_state():
    cfg = config((1, 2, 3, 4, 5))
    stateless = sched(cfg, maxflows=0).picker(VIP, 80)
    other = sched(cfg, maxflows=0).picker(VIP, 80)  # "another dispatcher"
    stateful = sched(cfg).picker(VIP, 80)
    for k in random_flows(2000, seed=3):
        first = stateless(k, k[:4], SYN, 1.0)
        assert stateless(k, k[:4], ACK, 2.0) == first == other(k, k[:4], ACK, 99.0)
        assert stateful(k, k[:4], ACK, 5.0) == first  # mid-stream pickup agrees with the hash


# -- flow table: configuration changes -----------------------------------------------------------------


def _assign(pick, flows, now, flags=ACK):
    return [pick(k, k[:4], flags, now) for k in flows]


def test_established_flows_keep_their_server_when_a_server_is_added_or_reweighted():
    cfg = config((1, 1, 1, 1))
    s = sched(cfg)
    flows = random_flows(20_000, seed=5)
    before = [addr(cfg, i) for i in _assign(s.picker(VIP, 80), flows, 10.0, SYN)]
    added = Server(address="10.0.2.99", weight=5)
    grown = with_servers(cfg, list(cfg.clusters[0].ports[0].servers) + [added])
    grown = with_servers(grown, [attrs.evolve(sv, weight=3) if str(sv.address) == "10.0.2.10" else sv
                                 for sv in grown.clusters[0].ports[0].servers])
    s.configure(grown)
    after = [addr(grown, i) for i in _assign(s.picker(VIP, 80), flows, 11.0)]
    assert after == before  # not a single established flow moved
    # without the flow table, the same change moves many flows
    stateless = sched(grown, maxflows=0).picker(VIP, 80)
    moved = sum(a != addr(grown, stateless(k, k[:4], ACK, 11.0)) for k, a in zip(flows, before))
    assert moved > len(flows) * 0.3
    # new flows do reach the new server
    fresh = Counter(addr(grown, i) for i in _assign(s.picker(VIP, 80), random_flows(5000, seed=6), 12.0, SYN))
    assert fresh[ipaddress.ip_address("10.0.2.99")] > 0


def test_removing_a_server_moves_only_its_flows():
    cfg = config((1,) * 10)
    s = sched(cfg)
    flows = random_flows(50_000, seed=8)
    before = [addr(cfg, i) for i in _assign(s.picker(VIP, 80), flows, 10.0, SYN)]
    gone = addr(cfg, 4)
    rest = [sv for sv in cfg.clusters[0].ports[0].servers if sv.address != gone]
    smaller = with_servers(cfg, rest)
    s.configure(smaller)
    after = [addr(smaller, i) for i in _assign(s.picker(VIP, 80), flows, 11.0)]
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert moved and all(a == gone for a, _ in moved)
    assert len(moved) == before.count(gone)
    frac = len(moved) / len(flows)
    print(f"\nremoving 1 of 10 with the flow table: {frac:.4f} of flows moved, all from the removed server")
    assert 0.09 < frac < 0.11
    assert s.stats()["moved"] == len(moved)


def test_down_moves_only_its_flows_and_up_brings_new_flows_back():
    cfg = config((1, 1, 1, 1))
    s = sched(cfg)
    flows = random_flows(8000, seed=9)
    before = _assign(s.picker(VIP, 80), flows, 10.0, SYN)
    down_cfg = config((1, 1, 1, 1), down=(2,))
    s.configure(down_cfg)
    pick = s.picker(VIP, 80)
    during = _assign(pick, flows, 11.0)
    assert 2 not in during
    assert all(b == d for b, d in zip(before, during) if b != 2)
    s.configure(cfg)  # server up again
    pick = s.picker(VIP, 80)
    after = _assign(pick, flows, 12.0)
    assert after == during  # the flows that moved stay where they went
    new = _assign(pick, random_flows(8000, seed=10), 12.0, SYN)
    assert new.count(2) > 1000


def test_quiesce_weight_zero_keeps_existing_flows_and_takes_no_new_ones():
    for algorithm in ("maglev", "wrr", "wlc"):
        cfg = config((1, 1, 1), algorithm)
        s = sched(cfg)
        flows = random_flows(3000, seed=11)
        before = _assign(s.picker(VIP, 80), flows, 10.0, SYN)
        assert before.count(1) > 500
        s.configure(config((1, 0, 1), algorithm))
        pick = s.picker(VIP, 80)
        assert _assign(pick, flows, 20.0) == before  # existing flows continue, to server 1 too
        assert 1 not in _assign(pick, random_flows(3000, seed=12), 20.0, SYN)
        assert s.stats()["connections"]["10.0.9.9@80@10.0.2.11"] == before.count(1)


def test_no_server_up_gives_minus_one():
    s = sched(config((1, 1), down=(0, 1)))
    assert s.picker(VIP, 80)(key(b"\x01\x02\x03\x04", 5000), b"\x01\x02\x03\x04", SYN, 1.0) == -1
    s = sched(config((0, 0)))
    assert s.picker(str(VIP), 80)(key(b"\x01\x02\x03\x04", 5000), b"\x01\x02\x03\x04", SYN, 1.0) == -1
    assert s.stats()["flows"] == 0


# -- flow table: bounds and timeouts -------------------------------------------------------------------


def test_table_is_bounded_with_lru_eviction():
    cfg = config((1, 1, 1), maxflows=1000)
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    old = random_flows(10, seed=13)
    for k in old:
        pick(k, k[:4], SYN, 1.0)
    flood = random_flows(20_000, seed=14)
    for n, k in enumerate(flood):
        pick(k, k[:4], SYN, 2.0 + n / 10_000)
        if n % 100 == 0:  # the old flows stay active: never least recently used for long
            for o in old:
                pick(o, o[:4], ACK, 2.0 + n / 10_000)
    stats = s.stats()
    assert stats["flows"] == 1000 and stats["maxflows"] == 1000
    assert stats["evictions"] == 10 + 20_000 - 1000
    assert all(o in s.table.entries for o in old)
    json.dumps(stats)


def test_maxflows_change_in_configuration_resizes():
    cfg = config((1, 1), maxflows=500)
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    for k in random_flows(500, seed=15):
        pick(k, k[:4], SYN, 1.0)
    s.configure(config((1, 1), maxflows=100))
    assert s.stats()["flows"] == 100 and s.maxflows == 100


def test_idle_flows_expire_after_staletimeout():
    cfg = config((1,) * 8, staletimeout=30)
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    flows = random_flows(2000, seed=16)
    before = _assign(pick, flows, 100.0, SYN)
    assert s.stats()["connections"] and sum(s.stats()["connections"].values()) == 2000
    # a change that would move many flows, then the flows stay idle beyond the timeout
    s.configure(config((1,) * 8 + (1,), staletimeout=30))
    pick = s.picker(VIP, 80)
    assert _assign(pick, flows, 129.0) == before  # 29 s idle: still established
    assert s.expire(200.0) == 2000  # idle 71 s: gone
    assert s.stats()["flows"] == 0 and sum(s.table.counts) == 0
    moved = sum(a != b for a, b in zip(before, _assign(pick, flows, 201.0)))
    assert moved > 0  # a stale flow is a new flow


def test_fin_and_rst_shorten_the_timeout():
    s = sched(config((1, 1, 1), staletimeout=300))
    pick = s.picker(VIP, 80)
    a, b, c = random_flows(3, seed=17)
    for k in (a, b, c):
        pick(k, k[:4], SYN, 10.0)
    pick(a, a[:4], FIN | ACK, 11.0)
    pick(b, b[:4], RST, 11.0)
    st = s.stats()
    assert st["closed"] == 2 and sum(st["connections"].values()) == 1  # closing flows are not counted
    assert s.expire(14.5, full=True) == 1  # RST: ~2 s
    assert b not in s.table.entries and a in s.table.entries
    pick(a, a[:4], ACK, 15.0)  # the last ACK refreshes the short timeout only
    assert s.expire(24.0, full=True) == 0
    assert s.expire(27.0, full=True) == 1  # FIN: ~10 s after the last packet
    assert c in s.table.entries and s.stats()["flows"] == 1


def test_syn_after_close_is_a_new_connection():
    cfg = config((1, 1, 1, 1))
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    k = random_flows(1, seed=18)[0]
    first = pick(k, k[:4], SYN, 1.0)
    s.configure(config((1, 1, 1, 1), down=(first,)))
    s.configure(cfg)
    pick = s.picker(VIP, 80)
    assert pick(k, k[:4], ACK, 2.0) == first
    pick(k, k[:4], FIN | ACK, 3.0)
    assert pick(k, k[:4], SYN, 4.0) == first  # same config: Maglev agrees anyway
    assert s.stats()["connections"] == {f"10.0.9.9@80@{addr(cfg, first)}": 1}


# -- least connections ---------------------------------------------------------------------------------


def test_weighted_least_connections_counts_from_the_flow_table():
    cfg = config((1, 2, 1), "wlc")
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    flows = random_flows(400, seed=19)
    got = Counter(_assign(pick, flows, 1.0, SYN))
    assert got == {0: 100, 1: 200, 2: 100}  # (active + 1) / weight stays level
    # close most of server 0's flows: the next new flows go there
    zero = [k for k, i in zip(flows, _assign(pick, flows, 2.0)) if i == 0]
    for k in zero[:60]:
        pick(k, k[:4], RST, 3.0)
    nxt = _assign(pick, random_flows(60, seed=20), 3.0, SYN)
    assert Counter(nxt) == {0: 60}
    # counts survive a reconfiguration (they come from the table, not the selector)
    s.configure(config((1, 1, 1), "wlc"))
    pick = s.picker(VIP, 80)
    conns = s.stats()["connections"]
    assert conns == {"10.0.9.9@80@10.0.2.10": 100, "10.0.9.9@80@10.0.2.11": 200,
                     "10.0.9.9@80@10.0.2.12": 100}
    nxt = Counter(_assign(pick, random_flows(200, seed=21), 4.0, SYN))
    assert nxt == {0: 100, 2: 100}


def test_wlc_counts_drop_when_flows_expire_or_are_evicted():
    cfg = config((1, 1), "wlc", maxflows=50, staletimeout=10)
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    _assign(pick, random_flows(200, seed=22), 1.0, SYN)
    assert sum(s.table.counts) == 50 == sum(s.stats()["connections"].values())
    s.expire(100.0)
    assert sum(s.table.counts) == 0


# -- affinity ------------------------------------------------------------------------------------------


def test_stickytime_keeps_a_client_on_its_server():
    cfg = config((1,) * 5, "maglev", stickytime=60)
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    client = bytes([192, 0, 2, 77])
    first = pick(key(client, 40000), client, SYN, 100.0)
    chosen = {pick(key(client, p), client, SYN, 100.0 + (p - 40000) / 1000) for p in range(40001, 40200)}
    assert chosen == {first}
    # the client stays quiet for 59 s: still sticky; then 61 s after its last packet: free again
    hashed = sched(cfg, maxflows=0).picker(VIP, 80)
    p = next(p for p in range(50000, 51000) if hashed(key(client, p), client, SYN, 0.0) != first)
    assert pick(key(client, p), client, SYN, 159.0) == first
    p = next(p for p in range(51000, 52000) if hashed(key(client, p), client, SYN, 0.0) != first)
    second = pick(key(client, p), client, SYN, 221.0)
    assert second == hashed(key(client, p), client, SYN, 0.0) != first
    assert pick(key(client, 60000), client, SYN, 222.0) == second  # and sticks there
    # without stickytime the same client spreads
    plain = sched(config((1,) * 5)).picker(VIP, 80)
    assert len({plain(key(client, p), client, SYN, 1.0) for p in range(40001, 40100)}) == 5


def test_affinity_is_refreshed_by_every_packet_and_respects_down_and_quiesce():
    cfg = config((1,) * 4, "wrr", stickytime=30)
    s = sched(cfg)
    pick = s.picker(VIP, 80)
    client = bytes([192, 0, 2, 78])
    k = key(client, 1234)
    first = pick(k, client, SYN, 0.0)
    for t in range(10, 100, 10):  # one long flow keeps the affinity alive
        assert pick(k, client, ACK, float(t)) == first
    assert pick(key(client, 1235), client, SYN, 100.0) == first
    # quiesced: existing flows continue, new connections of the client go elsewhere (and stick there)
    s.configure(config(tuple(0 if i == first else 1 for i in range(4)), "wrr", stickytime=30))
    pick = s.picker(VIP, 80)
    assert pick(k, client, ACK, 101.0) == first
    second = pick(key(client, 1236), client, SYN, 101.0)
    assert second != first
    assert pick(key(client, 1237), client, SYN, 102.0) == second
    assert pick(k, client, ACK, 103.0) == first
    assert pick(key(client, 1238), client, SYN, 104.0) == second
    # down: everything of the client moves, together
    s.configure(config((1,) * 4, "wrr", stickytime=30, down=(second,)))
    pick = s.picker(VIP, 80)
    third = pick(key(client, 1239), client, SYN, 105.0)
    assert third != second and pick(key(client, 1236), client, ACK, 105.0) == third
    assert s.stats()["affinity"] == 1


def test_affinity_for_ipv6_clients():
    port = Port(number=443, stickytime=10, servers=[Server(address=f"2001:db8::{i}") for i in range(1, 6)])
    vip6 = ipaddress.ip_address("2001:db8::100")
    cfg = Config(clusters=[Cluster(address=vip6, ports=[port])])
    pick = sched(cfg).picker(vip6, 443)
    client = ipaddress.ip_address("2001:db8:1::7").packed
    keys = [client + vip6.packed + b"\x06" + p.to_bytes(2, "big") + (443).to_bytes(2, "big")
            for p in range(1000, 1100)]
    assert len({pick(k, client, SYN, 1.0) for k in keys}) == 1


# -- the hook ------------------------------------------------------------------------------------------


class FirstServer:
    """A third party's scheduler: always the first server; and a replacement for maglev."""

    @hookimpl
    def encapfwd_selection_algorithms(self):
        return ["first"]

    @hookimpl
    def encapfwd_build_selector(self, algorithm, port, servers, connections):
        if algorithm not in ("first", "maglev"):
            return None
        return lambda h: 0 if servers else -1


def test_a_plugin_adds_and_overrides_algorithms():
    reg = registry(FirstServer())
    assert reg.selection_algorithms()[:1] == ["first"] and "wlc" in reg.selection_algorithms()
    for algorithm in ("first", "maglev"):
        pick = sched(config((1, 1, 1), algorithm), reg=reg).picker(VIP, 80)
        assert {pick(k, k[:4], SYN, 1.0) for k in random_flows(100)} == {0}
    pick = sched(config((1, 1, 1), "wrr"), reg=reg).picker(VIP, 80)  # the core's still answer the rest
    assert {pick(k, k[:4], SYN, 1.0) for k in random_flows(100)} == {0, 1, 2}


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown selectionalgorithm 'nope'.*maglev"):
        sched(config((1,), "nope"))


def test_a_bad_selector_result_means_no_server():
    class Bad:
        @hookimpl
        def encapfwd_build_selector(self, algorithm, port, servers, connections):
            return lambda h: 7

    for maxflows in (0, 100):
        pick = sched(config((1, 1)), maxflows=maxflows, reg=registry(Bad())).picker(VIP, 80)
        assert pick(key(b"\x01\x01\x01\x01", 1), b"\x01\x01\x01\x01", SYN, 1.0) == -1


def test_a_selector_that_fails_to_build_is_a_plugin_error():
    from encapfwd.errors import PluginError

    class Broken:
        @hookimpl
        def encapfwd_build_selector(self, algorithm, port, servers, connections):
            raise RuntimeError("boom")

    s = sched(config((1, 1)))
    pick = s.picker(VIP, 80)
    message = "10.0.9.9@80: building the 'maglev' selector failed: RuntimeError: boom"
    with pytest.raises(PluginError, match=message):
        Scheduler(registry(Broken()), 100).configure(config((1, 1)))
    assert s.picker(VIP, 80) is pick


def test_stats_are_json():
    s = sched(config((1, 1), stickytime=5))
    pick = s.picker(VIP, 80)
    for k in random_flows(10):
        pick(k, k[:4], SYN, 1.0)
    stats = json.loads(json.dumps(s.stats()))
    assert stats["flows"] == 10 and stats["affinity"] == 10 and stats["entries"] == 20
    assert {"maxflows", "evictions", "expired", "moved", "closed", "created", "connections"} <= set(stats)


def test_stats_show_maglev_digests_that_ignore_configuration_order():
    a = sched(config((1, 2, 3)))
    reordered = config(server_list=list(reversed(servers((1, 2, 3)))))
    b = sched(reordered)
    da, db = a.stats()["maglev"], b.stats()["maglev"]
    assert list(da) == ["10.0.9.9@80"] and da == db and len(da["10.0.9.9@80"]) == 64
    assert sched(config((1, 2, 4))).stats()["maglev"] != da
    assert sched(config((1, 2, 3), "wrr")).stats()["maglev"] == {}


def test_flow_hash_is_independent_of_python_hash():
    k = key(b"\xc0\x00\x02\x01", 40000)
    assert flow_hash(k) == 0x_0 + __import__("zlib").crc32(k)


# -- bookkeeping invariants under random traffic and configuration changes -------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from encapfwd.selection.flowtable import AFFINITY, COUNTED, SID_MASK  # noqa: E402

_STEP = st.one_of(
    st.tuples(st.just("packet"), st.integers(0, 39), st.sampled_from([SYN, ACK, FIN | ACK, RST, 0]),
              st.floats(0, 20)),
    st.tuples(st.just("configure"), st.lists(st.integers(0, 3), min_size=1, max_size=5),
              st.lists(st.booleans(), min_size=5, max_size=5), st.integers(1, 30),
              st.sampled_from(["maglev", "wrr", "wlc"]), st.sampled_from([0, 5])),
    st.tuples(st.just("expire"), st.booleans()),
)


def _check_invariants(s):
    table = s.table
    entries = table.entries
    assert len(entries) <= table.maxflows
    counted = Counter(v & SID_MASK for v in entries.values() if v & COUNTED)
    assert {sid: c for sid, c in enumerate(table.counts) if c} == dict(counted)
    assert table.ctr[5] == sum(1 for v in entries.values() if v & AFFINITY)  # AFFINITIES
    for sid, (lst, j) in table.slots.items():
        assert lst[j] == table.counts[sid]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_STEP, max_size=60))
def test_flow_table_bookkeeping_stays_consistent(steps):
    cfg = config((1, 1, 1, 1, 1), maxflows=12, staletimeout=8)
    s = sched(cfg)
    now = 0.0
    clients = [bytes([192, 0, 2, i // 4]) for i in range(40)]
    flows = [key(clients[i], 1000 + i) for i in range(40)]
    current = cfg
    for step in steps:
        if step[0] == "packet":
            _, f, flags, dt = step
            now += dt
            i = s.picker(VIP, 80)(flows[f], clients[f], flags, now)
            port = current.clusters[0].ports[0]
            if i >= 0:
                assert not port.servers[i].down
            else:
                assert not any(not sv.down and sv.weight for sv in port.servers)
        elif step[0] == "configure":
            _, weights, downs, maxflows, algorithm, sticky = step
            current = config(tuple(weights), algorithm, stickytime=sticky, staletimeout=8, maxflows=maxflows,
                             down=[k for k in range(len(weights)) if downs[k]])
            s.configure(current)
        else:
            s.expire(now, full=step[1])
        _check_invariants(s)


_STEP2 = st.one_of(
    st.tuples(st.just("packet"), st.integers(0, 39), st.sampled_from([SYN, ACK, ACK, FIN | ACK, RST, 0]),
              st.floats(0, 6)),
    st.tuples(st.just("configure"), st.lists(st.integers(0, 3), min_size=1, max_size=6),
              st.lists(st.booleans(), min_size=6, max_size=6), st.sampled_from(["maglev", "wrr", "wlc"]),
              st.sampled_from([0, 5])),
    st.tuples(st.just("expire"), st.booleans()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_STEP2, max_size=60))
def test_established_flows_stay_while_their_server_is_up(steps):
    timeout = 8
    s = sched(config((1, 1, 1, 1, 1), staletimeout=timeout))
    current = config((1, 1, 1, 1, 1), staletimeout=timeout)
    now = 0.0
    clients = [bytes([192, 0, 2, i // 4]) for i in range(40)]
    flows = [key(clients[i], 1000 + i) for i in range(40)]
    last = {}  # flow -> (server address, time of its last packet)
    for step in steps:
        if step[0] == "packet":
            _, f, flags, dt = step
            now += dt
            i = s.picker(VIP, 80)(flows[f], clients[f], flags, now)
            servers_now = current.clusters[0].ports[0].servers
            address = servers_now[i].address if i >= 0 else None
            if f in last and not flags & SYN:
                previous, seen = last[f]
                up = [sv.address for sv in servers_now if not sv.down]
                if previous in up and now - seen < timeout:
                    assert address == previous
            if i >= 0:
                assert not servers_now[i].down
            if flags & (FIN | RST) or i < 0:
                last.pop(f, None)
            else:
                last[f] = (address, now)
        elif step[0] == "configure":
            _, weights, downs, algorithm, sticky = step
            current = config(tuple(weights), algorithm, stickytime=sticky, staletimeout=timeout,
                             down=[k for k in range(len(weights)) if downs[k]])
            s.configure(current)
        else:
            s.expire(now, full=step[1])
        _check_invariants(s)
