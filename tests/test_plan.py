"""The forwarding plan: compiled once, comparable by digest, the same data for every executor."""

from __future__ import annotations

import pickle

import attrs

import xdp_support as X
from encapfwd import config as cfg
from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.plan import NO_SERVER, SidMap, compile_plan


def _plan(config=None, sids=None):
    return compile_plan(config or X.make_config(), X.registry_with_gue(), sids)


def test_digest_depends_on_configuration_not_on_history():
    config = X.make_config()
    fresh = _plan(config)
    # another dispatcher that saw other servers first has other server ids, and the same digest
    used = SidMap()
    for i in range(50):
        used("10.9.9.9", 1, f"10.9.0.{i}")
    aged = _plan(config, used)
    assert all(a.sid == f.sid + 50 for a, f in zip(aged.servers, fresh.servers))
    assert aged.digest == fresh.digest
    # configuration order of the servers does not change what is forwarded where
    first = config.clusters[0]
    port = first.ports[0]
    reordered = attrs.evolve(first, ports=(attrs.evolve(port, servers=port.servers[::-1]),) + first.ports[1:])
    shuffled = attrs.evolve(config, clusters=(reordered,) + config.clusters[1:])
    assert _plan(shuffled).digest == fresh.digest  # Maglev orders servers by address, not by the file
    # a server going down, a weight, a MAC: each is a different plan
    vip = X.METHODS["ipip"][0]
    down = cfg.server_status(config, f"{vip}@80@10.0.3.22", True)
    weight = cfg.server_set(config, f"{vip}@80@10.0.3.22", ["weight", "7"])
    mtu = cfg.executor_set(config, ["mtu", "1400"])
    digests = {fresh.digest, _plan(down).digest, _plan(weight).digest, _plan(mtu).digest}
    assert len(digests) == 4


def test_maglev_tables_are_server_ids_and_a_down_server_leaves_them():
    plan = _plan()
    vip = X.METHODS["ipip"][0]
    port = next(p for p in plan.ports if p.cluster == vip and p.number == 80)
    assert len(port.table) == 65537 and set(port.table) == set(port.servers)
    sids = SidMap()
    plan = _plan(sids=sids)
    down = _plan(cfg.server_status(plan.config, f"{vip}@80@10.0.3.22", True), sids)
    gone = next(s.sid for s in down.servers if s.name == f"{vip}@80@10.0.3.22")
    port = next(p for p in down.ports if p.cluster == vip and p.number == 80)
    assert gone not in port.table and gone in port.servers
    before = next(p for p in plan.ports if p.cluster == vip and p.number == 80).table
    moved = sum(1 for a, b in zip(before, port.table) if a != b)
    own = sum(1 for a in before if a == gone)
    assert own <= moved <= own * 1.5  # Maglev: the down server's slots move, plus a little churn


def test_a_port_with_no_eligible_server_has_a_table_of_no_server():
    config = X.make_config(("mac",))
    vip = X.METHODS["mac"][0]
    for i in range(X.SERVERS_PER_PORT):
        config = cfg.server_status(config, f"{vip}@80@10.0.2.{10 + i}", True)
    port = next(p for p in _plan(config).ports if p.number == 80)
    assert set(port.table) == {NO_SERVER}


def test_non_table_selection_has_no_table():
    config = X.make_config(("gre",))
    vip = X.METHODS["gre"][0]
    config = cfg.port_set(config, f"{vip}@80", ["selectionalgorithm", "wrr"])
    config = cfg.port_set(config, f"{vip}@53", ["stickytime", "60"])
    assert all(p.table is None for p in _plan(config).ports)


def test_a_pickled_plan_forwards_like_the_original():
    """Workers receive the plan pickled (transforms dropped) and derive the transforms from the templates."""
    plan = _plan()
    copy = pickle.loads(pickle.dumps(plan))
    assert not copy.bound and copy == plan and copy.digest == plan.digest
    a = Dispatcher(plan, X.registry_with_gue())
    b = Dispatcher(copy, X.registry_with_gue())
    for method in X.METHODS:
        for frame in X.frames(method, 300, seed=5):
            out_a, out_b = a.process(frame), b.process(frame)
            assert len(out_a) == len(out_b)
            for x, y in zip(out_a, out_b):
                assert x[:18] == y[:18] and x[20:24] == y[20:24] and x[26:] == y[26:]
