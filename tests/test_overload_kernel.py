"""Graceful overload, the kernel half (issue #21; docs/live.md, "Overload").

- A TCP segment of a table port that misses the flow table and cannot open a connection (not SYN without ACK)
  is forwarded by the table but not remembered, by the kernel program (XDP and TC builds) and by the Python
  dispatcher; SYNs and UDP datagrams are remembered. Counted: ``flows_not_remembered["not-syn"]``.
- At most ``executor newflowlimit`` new kernel flow entries per CPU per second (Katran's MAX_CONN_RATE): beyond
  them new flows are still forwarded, not remembered (``flows_not_remembered["rate-limit"]``). Kernel only.
- Pressure (``DataPlane.set_pressure``): the program places new flows of wrr and wlc ports by their pressure
  table (``PortPlan.fallback``) and remembers them, instead of handing them up; stickytime ports and a
  plugin's selector keep going up. Counted: ``pressure_placed``.
- Beyond ``executor handuplimit`` hand-ups of such new flows per CPU per second (windows of a tenth of a second;
  set by the live runtime only), the program places them itself the same way, at once. Counted:
  ``handup_placed``.

The byte-for-byte agreement of both executors, pressure on, is in tests/test_xdp_differential.py.
"""

from __future__ import annotations

import os
import random
import struct
import time

import attrs
import pytest

import xdp_support as X

VIP = X.METHODS["ipip"][0]
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
XDP_PASS, XDP_TX = 2, 3


def _available():
    if os.geteuid() != 0:
        return False, "BPF needs root (CAP_BPF and CAP_NET_ADMIN)"
    from encapfwd.xdp.libbpf import available

    return available()


def _executor(config, **changes):
    return attrs.evolve(config, executor=attrs.evolve(config.executor, **changes))


def _config(newflowlimit=0, **ports):
    """The differential's IPIP cluster (TCP 80, UDP 53, five servers); *ports*: ``"80": ["keyword", "value"]``."""
    from encapfwd import config as cfg

    c = X.make_config(("ipip",))
    for number, words in ports.items():
        c = cfg.port_set(c, f"{VIP}@{number}", words)
    return _executor(c, newflowlimit=newflowlimit)


def tcp(rng, flags=SYN, dport=80, src=None, sport=None):
    """A plain IPv4 TCP frame to VIP:dport (DF, TTL 64, 20 bytes of payload) from a random client."""
    src = src or bytes((198, 18, rng.randrange(256), rng.randrange(1, 255)))
    sport = sport or rng.randrange(1024, 65536)
    payload = b"x" * 20
    l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, flags, 65535, 0, 0) + payload
    return _ipv4(src, 6, l4)


def udp(rng, dport=53):
    src = bytes((198, 19, rng.randrange(256), rng.randrange(1, 255)))
    l4 = struct.pack("!HHHH", rng.randrange(1024, 65536), dport, 8 + 20, 0) + b"y" * 20
    return _ipv4(src, 17, l4)


def _ipv4(src, proto, l4):
    import ipaddress

    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, src,
                         ipaddress.ip_address(VIP).packed)
    header = header[:10] + struct.pack("!H", X._csum(header)) + header[12:]
    return X.DISPATCHER_MAC_B + X.CLIENT_MAC + b"\x08\x00" + header + l4


def kernel_key(frame):
    from encapfwd.xdp import maps as M

    return M.flow_key(frame[26:30], frame[30:34], frame[23], frame[34:38])


@pytest.fixture(params=["xdp", "tc"])
def kind(request):
    ok, why = _available()
    if not ok:
        pytest.skip(why)
    with X.one_cpu() as cpu:  # test runs execute on this CPU: one per-CPU window, one last reason
        yield request.param, cpu


def _load(kind, config):
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.xdp.dataplane import DataPlane
    from encapfwd.xdp.tc import TCDataPlane

    registry, sids = X.registry_with_gue(), SidMap()
    plan = compile_plan(config, registry, sids)
    return registry, sids, plan, (DataPlane if kind == "xdp" else TCDataPlane).load(plan)


def _forwarded(kind, verdict):
    return verdict == (XDP_TX if kind == "xdp" else 7)  # TC_ACT_REDIRECT


def _up(dp, kind, frame):
    """Whether the program handed *frame* up to the slow path (XDP_PASS; TC: marked and redirected)."""
    if kind == "xdp":
        return dp.test_run(frame)[0] == XDP_PASS
    from encapfwd.xdp.tc import SLOW_MARK, TC_ACT_REDIRECT, skb_test_run

    verdict, _, mark = skb_test_run(dp.prog_fd, frame)
    return verdict == TC_ACT_REDIRECT and mark == SLOW_MARK


# -- 1. segments that cannot open a connection ---------------------------------------------------------------
def test_only_syns_and_udp_make_kernel_flow_entries(kind):
    kind, _cpu = kind
    _, _, _, dp = _load(kind, _config())
    rng = random.Random(1)
    with dp:
        flags = [SYN, ACK, ACK | 0x08, SYN | ACK, FIN | ACK, RST, 0, SYN | FIN]
        frames = [tcp(rng, f) for f in flags * 25] + [udp(rng) for _ in range(50)]
        for f in frames:
            assert _forwarded(kind, dp.test_run(f)[0])  # every one forwarded by the table
        remembered = [dp.maps["flows"].lookup(kernel_key(f)) is not None for f in frames]
        expected = [f[23] == 17 or f[47] & (SYN | ACK) == SYN for f in frames]
        assert remembered == expected
        counters = dp.counters()
        assert counters["flows_not_remembered"] == {"not-syn": 25 * 6, "rate-limit": 0}
        assert counters["pressure_placed"] == 0 and counters["pressure"] is False
        # a remembered flow: its later segments (ACK) hit the table and count nothing more
        for f in frames[:8]:
            dp.test_run(f[:47] + bytes((ACK,)) + f[48:])
        assert dp.counters()["flows_not_remembered"]["not-syn"] == 25 * 6 + 6  # all but the two remembered


def test_the_python_dispatcher_remembers_alike():
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.selection.scheduler import Scheduler

    registry = X.registry_with_gue()
    plan = compile_plan(_config(), registry, SidMap())
    d = Dispatcher(plan, registry)
    rng = random.Random(2)
    frames = [tcp(rng, f) for f in (SYN, ACK, SYN | ACK, FIN | ACK, RST) * 20] + [udp(rng) for _ in range(20)]
    for f in frames:
        assert len(d.process(f, 1.0)) == 1
    keys = d.scheduler.table.entries
    assert [f[26:34] + f[23:24] + f[34:38] in keys for f in frames] == \
           [f[23] == 17 or f[47] & (SYN | ACK) == SYN for f in frames]
    flows = d.report()["flows"]
    assert flows["not_remembered"] == {"not-syn": 80} and flows["flows"] == 40
    # a bare Scheduler (no dispatcher) keeps every placed flow, as before
    s = Scheduler(registry, 1000)
    s.configure(plan.config)
    key = frames[1][26:34] + b"\x06" + frames[1][34:38]
    assert s.picker(VIP, 80)(key, key[:4], ACK, 1.0) >= 0 and key in s.table.entries


def test_a_flow_the_table_holds_is_placed_again_whatever_its_flags(kind):
    """A flow whose entry is still there (its server now down) is written again in its entry by an ACK: it
    takes no new entry, so the SYN rule is not for it (the kernel and the Python dispatcher alike)."""
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plan import compile_plan

    kind, _cpu = kind
    registry, sids, plan, dp = _load(kind, _config())
    python = Dispatcher(plan, registry, sids=sids)
    rng = random.Random(5)
    with dp:
        syn = tcp(rng, SYN)
        assert _forwarded(kind, dp.test_run(syn)[0]) and len(python.process(syn, 1.0)) == 1
        first = dp.flow(kernel_key(syn))
        name = next(s.name for s in plan.servers if s.sid == first)
        new = compile_plan(cfg.server_status(plan.config, name, True), registry, sids)
        dp.install(new)
        python.reload(new)
        ack = syn[:47] + bytes((ACK,)) + syn[48:]
        verdict, out = dp.test_run(ack)
        assert _forwarded(kind, verdict) and python.process(ack, 2.0) == [out]
        moved = dp.flow(kernel_key(syn))
        assert moved not in (None, first)
        assert python.scheduler.table.entries.get(syn[26:34] + b"\x06" + syn[34:38]) is not None
        assert dp.counters()["flows_not_remembered"]["not-syn"] == 0
        assert python.report()["flows"]["not_remembered"] == {"not-syn": 0}


# -- 2. the per-CPU limit of new entries ---------------------------------------------------------------------
def test_new_kernel_flow_entries_are_limited_per_cpu_and_second(kind):
    kind, _cpu = kind
    limit = 100
    registry, sids, plan, dp = _load(kind, _config(newflowlimit=limit))
    rng = random.Random(3)
    with dp:
        frames = [tcp(rng, SYN) if i % 3 else udp(rng) for i in range(3 * limit)]
        start = time.monotonic()
        assert all(_forwarded(kind, dp.test_run(f)[0]) for f in frames)  # forwarded all the same
        assert time.monotonic() - start < 0.9, "too slow for one window"
        inserted = sum(dp.maps["flows"].lookup(kernel_key(f)) is not None for f in frames)
        assert inserted == limit
        assert [dp.maps["flows"].lookup(kernel_key(f)) is not None for f in frames] == [True] * limit + \
               [False] * (2 * limit)  # the first N of the window
        assert dp.counters()["flows_not_remembered"] == {"not-syn": 0, "rate-limit": 2 * limit}
        # the next second: a new window
        time.sleep(1.05)
        more = [tcp(rng, SYN) for _ in range(limit // 2)]
        assert all(_forwarded(kind, dp.test_run(f)[0]) for f in more)
        assert all(dp.maps["flows"].lookup(kernel_key(f)) is not None for f in more)
        assert dp.counters()["flows_not_remembered"]["rate-limit"] == 2 * limit
        # the limit comes with the plan: 0 is none
        from encapfwd.plan import compile_plan

        dp.install(compile_plan(_executor(plan.config, newflowlimit=0), registry, sids))
        many = [tcp(rng, SYN) for _ in range(3 * limit)]
        assert all(_forwarded(kind, dp.test_run(f)[0]) for f in many)
        assert all(dp.maps["flows"].lookup(kernel_key(f)) is not None for f in many)


# -- 3. pressure ---------------------------------------------------------------------------------------------
def test_under_pressure_the_kernel_places_new_flows_of_wrr_ports(kind):
    kind, cpu = kind
    config = _config(**{"80": ["selectionalgorithm", "wrr"], "53": ["selectionalgorithm", "wrr", "stickytime", "30"]})
    _, _, plan, dp = _load(kind, config)
    port80, port53 = (next(p for p in plan.ports if p.number == n) for n in (80, 53))
    assert port80.table is None and port80.fallback is not None and port53.fallback is None
    names = {s.sid: s.address for s in plan.servers}
    rng = random.Random(4)
    with dp:
        syn, other, sticky = tcp(rng, SYN), tcp(rng, SYN), udp(rng)
        assert _up(dp, kind, syn) and dp.last_reason(cpu) == "new-flow"  # no pressure: the slow path's
        assert dp.maps["flows"].lookup(kernel_key(syn)) is None
        dp.set_pressure(True)
        assert dp.pressure and dp.counters()["pressure"] is True
        verdict, out = dp.test_run(syn)
        assert _forwarded(kind, verdict)
        sid = dp.flow(kernel_key(syn))
        from encapfwd.selection.algorithms import flow_hash

        expected = port80.fallback[flow_hash(syn[26:34] + b"\x06" + syn[34:38]) % len(port80.fallback)]
        assert sid == expected and out[30:34] == bytes(map(int, names[sid].split(".")))
        assert _up(dp, kind, sticky)  # stickytime: affinity is the slow path's, pressure or not
        ack = tcp(rng, ACK)
        assert _forwarded(kind, dp.test_run(ack)[0]) and dp.maps["flows"].lookup(kernel_key(ack)) is None
        counters = dp.counters()
        assert counters["pressure_placed"] == 2 and counters["flows_not_remembered"]["not-syn"] == 1
        dp.install(plan)  # pressure is kept across installs
        assert _forwarded(kind, dp.test_run(other)[0])
        dp.set_pressure(False)
        assert not dp.pressure
        assert _forwarded(kind, dp.test_run(syn[:47] + bytes((ACK,)) + syn[48:])[0])  # stays on its server
        assert dp.flow(kernel_key(syn)) == sid
        assert _up(dp, kind, tcp(rng, SYN)) and _up(dp, kind, ack)  # new flows go up again
        assert dp.counters()["pressure_placed"] == 3


def test_beyond_the_handup_limit_the_kernel_places_new_flows_itself(kind):
    """``executor handuplimit`` (set by the live runtime: DataPlane.set_handup_limit): at most limit / 10 new
    flows of a wrr/wlc port go up per CPU in a tenth of a second; the next ones are placed at once by the port's
    pressure table, and remembered, as under pressure (the controller then turns pressure on: the first
    milliseconds of a flood no longer wait in the worker's ring). Ports without a pressure table (stickytime)
    keep going up; a new window lets the next ones up again."""
    kind, cpu = kind
    config = _config(**{"80": ["selectionalgorithm", "wrr"], "53": ["selectionalgorithm", "wrr", "stickytime", "30"]})
    _, _, plan, dp = _load(kind, config)
    port80 = next(p for p in plan.ports if p.number == 80)
    from encapfwd.selection.algorithms import flow_hash

    rng = random.Random(6)
    with dp:
        assert all(_up(dp, kind, tcp(rng, SYN)) for _ in range(30))  # offline (replay, tests): no limit
        time.sleep(0.11)  # a window of its own for what follows
        dp.set_handup_limit(50)  # per second: 5 per tenth of a second
        start = time.monotonic()
        syns = [tcp(rng, SYN) for _ in range(20)]
        up = [_up(dp, kind, f) for f in syns]
        sticky = [_up(dp, kind, udp(rng)) for _ in range(5)]
        assert time.monotonic() - start < 0.09, "too slow for one window"
        assert up == [True] * 5 + [False] * 15 and all(sticky)
        assert dp.last_reason(cpu) == "new-flow"  # the sticky ones: the slow path's
        for f in syns[5:]:  # placed by the pressure table, and remembered
            sid = dp.flow(kernel_key(f))
            assert sid == port80.fallback[flow_hash(f[26:34] + b"\x06" + f[34:38]) % len(port80.fallback)]
        assert all(dp.flow(kernel_key(f)) is None for f in syns[:5])  # those are the slow path's to place
        counters = dp.counters()
        assert counters["handup_placed"] == 15 and counters["pressure_placed"] == 0
        assert counters["pressure"] is False
        dp.install(plan)  # kept across installs
        time.sleep(0.11)  # the next window: up again
        assert [_up(dp, kind, tcp(rng, SYN)) for _ in range(6)] == [True] * 5 + [False]
        dp.set_handup_limit(0)
        assert all(_up(dp, kind, tcp(rng, SYN)) for _ in range(30))
        assert dp.counters()["handup_placed"] == 16


def test_pressure_tables_only_for_the_cores_wrr_and_wlc():
    from encapfwd import config as cfg
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.selection.algorithms import maglev_table
    from encapfwd.xdp import maps as M

    registry = X.registry_with_gue()
    c = _config(**{"80": ["selectionalgorithm", "wlc"]})
    plan = compile_plan(c, registry, SidMap())
    p80 = next(p for p in plan.ports if p.number == 80)
    p53 = next(p for p in plan.ports if p.number == 53)
    assert p53.table is not None and p53.fallback is None  # maglev: the table itself
    servers = c.cluster(VIP).port(80).servers
    assert p80.fallback == tuple(p80.servers[j] for j in maglev_table(servers))  # weights kept
    # the maps: the pressure table's slots after the maglev table's, ring_size 0 (new flows go up)
    entries = M.plan_entries(plan, 0, 10 * 65537)
    ports = {M.U32.unpack(k)[0]: M.PORT_ENTRY.unpack(v) for k, v in entries["ports"]}
    assert sorted(ports.values()) == [(0, 65537, 300, 0), (65537, 0, 300, 65537)] or \
           sorted(ports.values()) == [(0, 0, 300, 65537), (65537, 65537, 300, 0)]
    assert M.ring_slots(plan) == 2 * 65537 and len(M.table_ports(plan)) == 2
    # a server down: not in the pressure table; all down: no pressure table
    down = compile_plan(cfg.server_status(c, f"{VIP}@80@{servers[0].address}", True), registry, SidMap())
    assert p80.servers[0] not in next(p for p in down.ports if p.number == 80).fallback
    for s in servers:
        c = cfg.server_status(c, f"{VIP}@80@{s.address}", True)
    assert next(p for p in compile_plan(c, registry, SidMap()).ports if p.number == 80).fallback is None
    # stickytime: none
    sticky = compile_plan(_config(**{"80": ["selectionalgorithm", "wrr", "stickytime", "5"]}), registry, SidMap())
    assert next(p for p in sticky.ports if p.number == 80).fallback is None
    # the digest: newflowlimit is the host's
    a, b = (compile_plan(_config(newflowlimit=n), registry, SidMap()) for n in (0, 5))
    assert a.digest != b.digest and a.selection == b.selection


def test_newflowlimit_is_an_executor_keyword():
    from encapfwd import config as cfg
    from encapfwd.errors import ConfigError
    from encapfwd.model import NEWFLOWLIMIT_DEFAULT

    c = cfg.loads("")
    assert c.executor.newflowlimit == NEWFLOWLIMIT_DEFAULT == 125_000
    c = cfg.executor_set(c, ["newflowlimit", "5000"])
    assert c.executor.newflowlimit == 5000
    assert cfg.loads(cfg.dumps(c)).executor.newflowlimit == 5000
    assert cfg.executor_set(c, ["newflowlimit", "0"]).executor.newflowlimit == 0
    for bad in ("-1", "4294967296", "many"):
        with pytest.raises(ConfigError):
            cfg.executor_set(c, ["newflowlimit", bad])


def test_handuplimit_is_an_executor_keyword_the_live_runtime_gives_the_program(kind):
    from encapfwd import config as cfg
    from encapfwd.errors import ConfigError
    from encapfwd.model import HANDUPLIMIT_DEFAULT
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.runtime.xdp import apply_host_limits

    c = cfg.loads("")
    assert c.executor.handuplimit == HANDUPLIMIT_DEFAULT == 20_000
    c = cfg.executor_set(c, ["handuplimit", "3000"])
    assert cfg.loads(cfg.dumps(c)).executor.handuplimit == 3000
    for bad in ("-1", "4294967296", "many"):
        with pytest.raises(ConfigError):
            cfg.executor_set(c, ["handuplimit", bad])
    registry = X.registry_with_gue()
    a, b = (compile_plan(_executor(_config(), handuplimit=n), registry, SidMap()) for n in (0, 5))
    assert a.digest != b.digest and a.selection == b.selection  # a reload that changes it is installed
    # the program gets it from the live runtime only: DataPlane.load leaves it 0, apply_host_limits sets it
    from encapfwd.xdp import maps as M

    kind, _cpu = kind
    _, _, plan, dp = _load(kind, _executor(_config(), handuplimit=3000))
    with dp:
        assert M.OVERLOAD.unpack(dp.maps["overload"].lookup(0))[3] == 0
        apply_host_limits(dp, plan)
        assert M.OVERLOAD.unpack(dp.maps["overload"].lookup(0)) == (0, 0, 0, 3000)
