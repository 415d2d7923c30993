"""Flow synchronisation between dispatchers (engines/flowsync.py, engines/flowsweep.py; docs/scale-out.md).

Without BPF: the wire format, the batching bounds, authentication and replay rejection by reason, the key
file's checks, the executor keywords (one-line errors, file untouched), and a fuzz of 100,000 random and
mutated datagrams against the receiver (never raises, never applies what it should not).

With BPF (root): two real data planes with different server ids, real UDP between two FlowSync instances on
the loopback: the flows A's program placed reach B's kernel table by server name, and an established flow
that ECMP shifts to B after a server was added keeps its server (0 moved, against ~1/(N+1) without sync);
a fresher local entry is never overwritten; a dump answers a starting dispatcher's catch-up.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import time
import types

import pytest
from test_scaleout_consistency import _xdp_or_skip

from encapfwd.flowsync import service as FS
from encapfwd.errors import ConfigError

KEY = b"k" * 32


def _entries(n, v6=False, names=3, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if v6:
            src, dst = rng.randbytes(16), ipaddress.ip_address("fd00:9::1").packed
        else:
            src, dst = rng.randbytes(4), ipaddress.ip_address("10.0.9.1").packed
        key = src + dst + bytes((6,)) + rng.randbytes(2) + (80).to_bytes(2, "big")
        out.append(FS.Entry(key, f"10.0.9.1@80@10.0.3.{10 + i % names}", rng.randrange(1 << 20)))
    return out


def _message(entries, seq=1, epoch=5, sender=9, kind=FS.FLOWS, sent_ms=None, key=KEY):
    return FS.encode(key, kind, epoch, sender, seq, entries, sent_ms=sent_ms)


# -- codec and batching ------------------------------------------------------------------------------------

@pytest.mark.parametrize("v6", [False, True])
def test_entries_round_trip_in_bounded_datagrams(v6):
    entries = _entries(500, v6=v6, names=7)
    batches = list(FS.Batcher().batches(entries))
    assert [e for b in batches for e in b] == entries
    receiver = FS.Receiver(KEY)
    got = []
    for seq, batch in enumerate(batches, 1):
        data = _message(batch, seq=seq)
        assert len(data) <= FS.MAX_DATAGRAM
        kind, sender, epoch, decoded = receiver.accept(data, ("10.0.2.2", 7900))
        assert (kind, sender, epoch) == (FS.FLOWS, 9, 5)
        got += decoded
    assert got == entries
    assert len(batches) <= len(entries) // (26 if v6 else 60) + 1  # full datagrams


def test_a_batch_never_holds_more_than_255_names():
    entries = [FS.Entry(b"\1" * 13, f"n{i}", 0) for i in range(600)]
    for batch in FS.Batcher().batches(entries):
        assert len({e[1] for e in batch}) <= 255
        assert len(_message(batch)) <= FS.MAX_DATAGRAM


# -- authentication and replay -------------------------------------------------------------------------------

def test_rejections_are_counted_by_reason_and_never_applied():
    now = [1000.0]
    receiver = FS.Receiver(KEY, peers=["10.0.2.2"], clock=lambda: now[0])
    ms = int(now[0] * 1000)
    good = _message(_entries(3), seq=100, sent_ms=ms)
    assert receiver.accept(good, ("10.0.2.2", 1)) is not None
    cases = [
        (good, ("10.0.2.2", 1), "replay"),  # the same datagram again
        (_message(_entries(3), seq=101, sent_ms=ms), ("10.0.2.9", 1), "unknown-peer"),
        (_message(_entries(3), seq=101, sent_ms=ms, key=b"x" * 32), ("10.0.2.2", 1), "bad-mac"),
        (good[:-1] + bytes((good[-1] ^ 1,)), ("10.0.2.2", 1), "bad-mac"),
        (b"\0" * (FS.MAX_DATAGRAM + 1), ("10.0.2.2", 1), "oversized"),
        (b"EFSY", ("10.0.2.2", 1), "short"),
        (_message([], seq=102, sent_ms=ms - 31_000), ("10.0.2.2", 1), "stale"),
        (_message([], seq=103, sent_ms=ms + 31_000), ("10.0.2.2", 1), "stale"),
        (_message([], seq=99, epoch=4, sent_ms=ms), ("10.0.2.2", 1), "replay"),  # an older epoch
        (_message([], seq=100 - FS.REPLAY_WIDTH, sent_ms=ms), ("10.0.2.2", 1), "replay"),  # too old
        (_message([], seq=104, kind=9, sent_ms=ms), ("10.0.2.2", 1), "bad-type"),
    ]
    for data, address, reason in cases:
        before = dict(receiver.rejected)
        assert receiver.accept(data, address) is None, reason
        assert receiver.rejected[reason] == before[reason] + 1, (reason, receiver.rejected)
    # an authenticated body that does not parse
    head = FS.HEADER.pack(FS.MAGIC, FS.VERSION, FS.FLOWS, 5, 5, 9, 120, ms) + b"\x01\x03abc"
    import hashlib
    import hmac

    assert receiver.accept(head + hmac.new(KEY, head, hashlib.sha256).digest(), ("10.0.2.2", 1)) is None
    assert receiver.rejected["malformed"] == 1
    # out of order within the window: accepted once; a new epoch starts a new sequence
    assert receiver.accept(_message([], seq=98, sent_ms=ms), ("10.0.2.2", 1)) is not None
    assert receiver.accept(_message([], seq=98, sent_ms=ms), ("10.0.2.2", 1)) is None
    assert receiver.accept(_message([], seq=1, epoch=6, sent_ms=ms), ("10.0.2.2", 1)) is not None
    assert receiver.accept(_message([], seq=130, epoch=5, sent_ms=ms), ("10.0.2.2", 1)) is None
    assert receiver.accepted == 3


def test_the_receiver_survives_100000_random_and_mutated_datagrams():
    """Random bytes, and valid datagrams mutated (bit flips, truncations, insertions, splices), some signed
    again with the key so that the body parser sees them: never raises, accepts only well-formed ones, and
    everything is counted."""
    rng = random.Random(2026)
    now = time.time()
    receiver = FS.Receiver(KEY, peers=["10.0.2.2"], clock=lambda: now)
    ms = int(now * 1000)
    seeds = [_message(_entries(rng.randrange(0, 70), v6=rng.random() < 0.3), seq=i + 1, sent_ms=ms)
             for i in range(50)] + [_message([], seq=100 + i, kind=k, sent_ms=ms)
                                    for i, k in enumerate((FS.DUMP_REQ, FS.DUMP_END))]
    import hashlib
    import hmac

    accepted = 0
    n = 100_000
    for i in range(n):
        choice = rng.random()
        if choice < 0.2:
            data = rng.randbytes(rng.randrange(0, 1600))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(4)
                if op == 0 and data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                elif op == 1:
                    del data[rng.randrange(len(data) + 1):]
                elif op == 2:
                    at = rng.randrange(len(data) + 1)
                    data[at:at] = rng.randbytes(rng.randrange(1, 40))
                else:
                    other = rng.choice(seeds)
                    at = rng.randrange(min(len(data), len(other)) + 1)
                    data = data[:at] + other[at:]
            if choice > 0.6 and len(data) > FS.MAC_SIZE:  # signed again: reaches the header and body checks
                body = bytes(data[:-FS.MAC_SIZE])
                if len(body) >= FS.HEADER.size:  # fresh sequence numbers, so that the parser is what decides
                    head = list(FS.HEADER.unpack_from(body))
                    head[6] = 1000 + i
                    body = FS.HEADER.pack(*head) + body[FS.HEADER.size:]
                data = body + hmac.new(KEY, body, hashlib.sha256).digest()
            data = bytes(data)
        got = receiver.accept(data, ("10.0.2.2", 7900))
        if got is not None:
            accepted += 1
            kind, _, _, entries = got
            assert kind in FS.TYPES
            for key, name, age in entries:
                assert len(key) in (13, 37) and name and 0 <= age <= 0xFFFFFFFF
    assert receiver.accepted == accepted
    assert accepted + sum(receiver.rejected.values()) == n
    for reason in ("oversized", "short", "bad-mac", "bad-magic", "malformed", "replay"):
        assert receiver.rejected[reason] > 0, receiver.rejected


# -- the key file and the keywords ----------------------------------------------------------------------------

def test_the_key_file_must_be_private(tmp_path):
    path = tmp_path / "sync.key"
    path.write_bytes(b"0123456789abcdef0123\n")
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="readable or writable by group or others .*chmod 600"):
        FS.read_key(str(path))
    os.chmod(path, 0o600)
    assert FS.read_key(str(path)) == b"0123456789abcdef0123"
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="16 to 4096 bytes"):
        FS.read_key(str(path))
    with pytest.raises(ConfigError, match="No such file"):
        FS.read_key(str(tmp_path / "absent"))


def test_sync_keywords_are_checked_in_one_line_and_leave_the_file_unchanged(cli, tmp_path):
    key = tmp_path / "sync.key"
    key.write_text("a" * 32)
    os.chmod(key, 0o644)
    assert cli("executor", "set", "nfa", "10.0.2.1").returncode == 0
    for args, message in [
        (("syncpeers", "10.0.2.2"), "syncpeers needs synckey"),
        (("syncpeers", "127.0.0.1", "synckey", str(key)), "syncpeers 127.0.0.1 is a loopback address"),
        (("syncpeers", "10.0.2.2,10.0.2.2", "synckey", str(key)), "listed twice"),
        (("syncport", "0"), "syncport must be between 1 and 65535"),
        (("synckey", "relative.key"), "absolute path"),
        (("syncpeers", "10.0.2.2", "synckey", str(key)), "readable or writable by group or others"),
    ]:
        before = cli.config.read_bytes()
        proc = cli("executor", "set", *args)
        assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert cli.config.read_bytes() == before
    os.chmod(key, 0o600)
    proc = cli("executor", "set", "syncpeers", "10.0.2.2,10.0.2.3", "syncport", "7901", "synckey", str(key))
    assert proc.returncode == 0, proc.stderr
    text = cli.config.read_text()
    assert "10.0.2.3" in text and "7901" in text and str(key) in text
    assert cli("executor", "set", "syncpeers", "none").returncode == 0


# -- with the kernel ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(dp_or_table, plan_of, me, peer, port):
    from encapfwd.flowsync.sweep import KernelTable

    table = KernelTable(dp_or_table.maps["flows"]) if hasattr(dp_or_table, "maps") else dp_or_table
    executor = types.SimpleNamespace(syncpeers=(ipaddress.ip_address(peer),), syncport=port, synckey=None)
    return FS.FlowSync(executor, plan_of, lambda: table, key=KEY, bind=me), table


def catch_up_served_by(starting, peer, timeout=5.0):
    """*starting*'s catch-up at start while *peer* runs its loop (answers the dump request) in a thread."""
    import threading

    stop = threading.Event()

    def serve():
        while not stop.is_set():
            peer.on_readable()
            peer.flush(time.monotonic())
            time.sleep(0.002)

    server = threading.Thread(target=serve)
    server.start()
    try:
        return starting.catch_up(timeout=timeout)
    finally:
        stop.set()
        server.join()


def _pump(a, b, until, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in (a, b):
            s.flush(time.monotonic())
            s.on_readable()
        if until():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("synced", [True, False], ids=["sync", "no-sync"])
def test_a_shifted_flow_keeps_its_server_after_a_server_was_added(synced):
    """A holds established flows placed with P1 (5 servers), then installs P2 (one more). ECMP shifts them
    to B (P2, other server ids). With sync (A's sweep → UDP → B's kernel table, by name) every flow reaches
    its first server at B; without, about 1/6 move (reset)."""
    _xdp_or_skip()
    import test_scaleout_consistency as C
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.xdp.dataplane import DataPlane

    n, new, count = 5, "10.0.3.200", 2000
    flow_list = C.flows(count, seed=11, first_octet=100, ports=[(C.VIP1, 80, 6)])
    reg = C.registry()
    sids_a, sids_b = SidMap(), SidMap()
    p1 = compile_plan(C.make_config(C.HOST_A, servers=C.simple_servers(n)), reg, sids_a)
    p2 = compile_plan(C.make_config(C.HOST_A, servers=C.simple_servers(n, extra=new)), reg, sids_a)
    # B's history: the new server first, then the others in reverse: other ids for the same names
    compile_plan(C.make_config(C.HOST_B, servers=C.simple_servers(1, extra=new)), reg, sids_b)
    p2_b = compile_plan(C.make_config(C.HOST_B, servers=C.simple_servers(n, extra=new), reverse=True), reg, sids_b)
    ids = lambda plan: {s.name: s.sid for s in plan.servers}  # noqa: E731
    assert ids(p2) != ids(p2_b) and p2.selection == p2_b.selection
    syn = [C.frame(f, C._SYN) for f in flow_list]
    data = [C.frame(f, C._ACK | C._PSH, b"data") for f in flow_list]
    port = free_port()
    with DataPlane.load(p1) as dp_a, DataPlane.load(p2_b) as dp_b:
        plans = {"a": p1}
        sa, ta = _sync(dp_a, lambda: plans["a"], "127.0.0.1", "127.0.0.2", port)
        sb, tb = _sync(dp_b, lambda: p2_b, "127.0.0.2", "127.0.0.1", port)
        try:
            before = [dp_a.test_run(C.to_host(C.HOST_A, f)) for f in syn]
            assert all(v == C.XDP_TX for v, _ in before)
            dp_a.install(p2)
            plans["a"] = p2
            if synced:
                assert sa.sweep(time.monotonic()) == count
                assert sa.sweep(time.monotonic()) == 0  # published once
                assert _pump(sa, sb, lambda: sb.stats["applied"] == count), (sa.snapshot(), sb.snapshot())
            at_b = [dp_b.test_run(C.to_host(C.HOST_B, f)) for f in data]
        finally:
            sa.close()
            sb.close()
    assert all(v == C.XDP_TX for v, _ in at_b)
    old = [o[30:34] for _, o in before]
    moved = sum(x != y[30:34] for x, (_, y) in zip(old, at_b))
    if synced:
        assert moved == 0
        assert sb.receiver.rejected == {r: 0 for r in FS.REASONS}
        assert sa.snapshot()["sent_entries"] == count and sb.snapshot()["received_entries"] == count
    else:
        assert abs(moved / count - 1 / (n + 1)) < 0.05, moved


def test_the_program_publishes_new_flows_in_its_ring_and_the_sweep_takes_what_a_full_ring_could_not(monkeypatch):
    """With sync on, the program writes each new flow entry to its ``new_flows`` ring (read by mmap, the
    ring wrapping round its end twice), marked published so that the sweep skips it; the entries a
    full ring could not take keep pad 0 and the sweep publishes exactly those; a TCP segment that cannot open
    a connection is not remembered, so not published. Everything reaches the peer's kernel table by name,
    and a closed sync turns publishing off."""
    _xdp_or_skip()
    import test_scaleout_consistency as C
    from encapfwd.flowsync.sweep import TableOf
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.xdp import maps as M
    from encapfwd.xdp.dataplane import DataPlane

    monkeypatch.setattr(DataPlane, "NEW_FLOWS_BYTES", 4 * 4096)  # room for 255 records of 64 bytes
    reg = C.registry()
    sids_b = SidMap()
    plan = compile_plan(C.make_config(C.HOST_A, servers=C.simple_servers(5)), reg, SidMap())
    compile_plan(C.make_config(C.HOST_B, servers=C.simple_servers(1, extra="10.0.3.200")), reg, sids_b)
    plan_b = compile_plan(C.make_config(C.HOST_B, servers=C.simple_servers(5), reverse=True), reg, sids_b)
    flow_list = C.flows(1000, seed=12, first_octet=101, ports=[(C.VIP1, 80, 6)])
    port = free_port()
    with DataPlane.load(plan) as dp_a, DataPlane.load(plan_b) as dp_b:
        table_of = TableOf(types.SimpleNamespace(dataplane=dp_a))
        executor = types.SimpleNamespace(syncpeers=(ipaddress.ip_address("127.0.0.2"),), syncport=port, synckey=None)
        sa = FS.FlowSync(executor, lambda: plan, table_of, key=KEY, bind="127.0.0.1")
        sb, tb = _sync(dp_b, lambda: plan_b, "127.0.0.2", "127.0.0.1", port)
        try:
            assert table_of().ring is not None and dp_a.pressure is False
            assert M.OVERLOAD.unpack(dp_a.maps["overload"].lookup(0))[2] == 1  # publish on
            placed = {}

            def syn(flows):
                for f in flows:
                    verdict, out = dp_a.test_run(C.to_host(C.HOST_A, C.frame(f, C._SYN)))
                    assert verdict == C.XDP_TX
                    placed[f] = out[30:34]

            for i in range(3):  # 600 new flows in rounds of 200, read between: the ring wraps round
                syn(flow_list[i * 200:(i + 1) * 200])
                assert sa.drain() == 200
            assert sa.sweep(time.monotonic()) == 0  # every one of them marked published by the program
            # 300 without a read: 255 fit in the ring (the kernel holds at most size - 1 bytes unread: 16 KiB take
            # 255 of 64 bytes), 45 keep pad 0
            syn(flow_list[600:900])
            assert sa.drain() == 255
            assert sa.drain() == 0
            assert sa.sweep(time.monotonic()) == 45
            for f in flow_list[900:910]:  # not a SYN: forwarded, not remembered, not published
                assert dp_a.test_run(C.to_host(C.HOST_A, C.frame(f, C._ACK)))[0] == C.XDP_TX
            assert sa.drain() == 0 and sa.sweep(time.monotonic()) == 0
            assert sa.stats["published"] == 900 and sa.stats["from_ring"] == 855
            assert _pump(sa, sb, lambda: sb.stats["applied"] == 900), (sa.snapshot(), sb.snapshot())
            # at B (other server ids) every flow's next segment goes where A sent its SYN
            for f in flow_list[:900]:
                verdict, out = dp_b.test_run(C.to_host(C.HOST_B, C.frame(f, C._ACK | C._PSH, b"data")))
                assert verdict == C.XDP_TX and out[30:34] == placed[f]
        finally:
            sa.close()
            sb.close()
        assert M.OVERLOAD.unpack(dp_a.maps["overload"].lookup(0))[2] == 0  # publish off with the sync closed
    assert sb.receiver.rejected == {r: 0 for r in FS.REASONS}


def test_a_fresher_local_entry_wins_and_a_dump_answers_the_catch_up():
    _xdp_or_skip()
    import test_scaleout_consistency as C
    from encapfwd.flowsync.sweep import mark_of
    from encapfwd.plan import compile_plan
    from encapfwd.xdp.dataplane import DataPlane

    reg = C.registry()
    plan = compile_plan(C.make_config(C.HOST_A, servers=C.simple_servers(3)), reg)
    flow_list = C.flows(300, seed=12, first_octet=100, ports=[(C.VIP1, 80, 6)])
    port = free_port()
    with DataPlane.load(plan) as dp_a, DataPlane.load(plan) as dp_b:
        sa, ta = _sync(dp_a, lambda: plan, "127.0.0.1", "127.0.0.2", port)
        sb, tb = _sync(dp_b, lambda: plan, "127.0.0.2", "127.0.0.1", port)
        try:
            for f in flow_list:
                assert dp_a.test_run(C.to_host(C.HOST_A, C.frame(f, C._SYN)))[0] == C.XDP_TX
            # B holds one of the flows itself, seen just now, on another server: it stays
            key0, sid0, pad0, seen0 = next(ta.entries())
            other = next(s.sid for s in plan.servers if s.sid != sid0)
            now = time.monotonic_ns()
            assert tb.insert(key0, other, now) == "inserted"
            assert tb.insert(key0, sid0, now - 10**9) == "kept-local"
            fresh = now + 5 * 10**9  # B's own copy: seen more recently than anything A can send
            assert tb.insert(key0, other, fresh) == "refreshed"
            assert tb.get(key0) == (other, mark_of(fresh), fresh)
            assert tb.insert(key0, other, now) == "kept-local"
            # B starts: asks A for a dump before it would announce
            state = catch_up_served_by(sb, sa)
            assert state["state"] == "done" and state["flows"] == 300 and state["peers"] == ["127.0.0.1"]
            assert sb.stats["applied"] == 299 and sb.stats["kept_local"] == 1
            assert tb.get(key0)[0] == other
            assert sum(1 for _ in tb.entries()) == 300
            # B's copies are not published back (no ping-pong); A's flows are published once
            assert sb.sweep(time.monotonic()) == 0  # entries from a peer carry its mark: not published again
        finally:
            sa.close()
            sb.close()


def test_the_report_section_and_its_metrics():
    """The ``sync`` section of ``server report`` and the Prometheus families made from it."""
    pytest.importorskip("prometheus_client")
    from encapfwd.runtime.metrics import metric_families

    executor = types.SimpleNamespace(syncpeers=(ipaddress.ip_address("127.0.0.2"),), syncport=free_port(),
                                     synckey=None)
    sync = FS.FlowSync(executor, lambda: None, lambda: None, key=KEY, bind="127.0.0.1")
    try:
        sync.handle(b"junk", ("127.0.0.2", 1))
        sync.handle(b"x" * 2000, ("127.0.0.9", 1))
        snap = sync.snapshot()
    finally:
        sync.close()
    assert snap["rejected"]["short"] == 1 and snap["rejected"]["oversized"] == 1
    assert snap["peers"][0]["address"] == "127.0.0.2" and snap["catchup"] == {"state": "not started"}
    families = {f.name: f for f in metric_families({"sync": snap})}
    rejected = {s.labels["reason"]: s.value for s in families["encapfwd_sync_rejected"].samples
                if s.name.endswith("_total")}
    assert rejected["short"] == 1 and rejected["oversized"] == 1 and rejected["bad-mac"] == 0
    for name in ("encapfwd_sync_published", "encapfwd_sync_received", "encapfwd_sync_applied",
                 "encapfwd_sync_sent", "encapfwd_sync_peer_lag_seconds", "encapfwd_sync_queue"):
        assert name in families, sorted(families)


def test_bounds_a_full_queue_a_peer_at_its_rate_and_a_catch_up_nobody_answers(monkeypatch):
    """The queue keeps the newest QUEUE_MAX entries (the rest counted); a round sends at most FLUSH_BUDGET
    datagrams and each peer at most its token bucket; a catch-up without any answer ends at its bound."""
    monkeypatch.setattr(FS, "QUEUE_MAX", 1000)
    monkeypatch.setattr(FS, "RATE", 10)
    port = free_port()
    executor = types.SimpleNamespace(syncpeers=(ipaddress.ip_address("127.0.0.2"),), syncport=port, synckey=None)
    sync = FS.FlowSync(executor, lambda: None, lambda: None, key=KEY, bind="127.0.0.1")
    try:
        entries = _entries(1500)
        sync.publish(entries[:700])
        sync.publish(entries[700:])
        assert len(sync.queue) == 1000 and sync.stats["queue_dropped"] == 500
        assert list(sync.queue) == entries[500:]  # the oldest went
        sync.flush(time.monotonic())
        assert sync.stats["sent_datagrams"] == 10  # the peer's bucket
        assert len(sync.queue) == 1000 - sync.stats["sent_entries"]
        started = time.monotonic()
        state = sync.catch_up(timeout=0.3)
        took = time.monotonic() - started
        assert state["state"] == "timed out" and 0.3 <= took < 1.0, (state, took)
    finally:
        sync.close()


def test_changed_sync_settings_need_a_restart(tmp_path):
    from encapfwd import config as cfg
    from encapfwd.runtime import controller as live

    key = tmp_path / "sync.key"
    controller = live.Controller.__new__(live.Controller)
    controller.interface = "eth0"
    controller.config = cfg.loads(f'[executor]\nsyncpeers = ["10.0.2.2"]\nsynckey = "{key}"\n')
    same = cfg.loads(f'[executor]\nsyncpeers = ["10.0.2.2"]\nsynckey = "{key}"\n')
    assert controller._static_changes(same) == []
    lines = controller._static_changes(cfg.loads(f'[executor]\nsyncpeers = "10.0.2.3"\nsynckey = "{key}"\n'))
    assert len(lines) == 1 and "restarted" in lines[0]
