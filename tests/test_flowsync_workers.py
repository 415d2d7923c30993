"""Flow synchronisation with the AF_PACKET engine (engines/flowsync_workers.py; docs/scale-out.md).

Real Dispatchers, no kernel: a worker's journal names the flows its dispatcher places (once, then about
every 32 s while active), a peer's flows applied to another dispatcher keep their server after a server was
added (0 moved, against ~1/(N+1) without), a fresher local entry wins, and two FlowSync instances over real
UDP on the loopback carry the flows between the workers' tables of two "dispatchers" (two workers each:
every peer flow reaches both), including a catch-up dump.
"""

from __future__ import annotations

import ipaddress
import pickle
import socket
import struct
import time
import types

import pytest
import test_scaleout_consistency as C
from test_flowsync import catch_up_served_by, free_port
from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.flowsync import service as FS
from encapfwd.flowsync.workers import WorkerFlows, WorkerJournal

KEY = b"k" * 32
N = 5
NEW = "10.0.3.200"


def _dispatcher(n=N, extra=None, host=C.HOST_A, reverse=False):
    return Dispatcher(C.make_config(host, servers=C.simple_servers(n, extra=extra), reverse=reverse), C.registry())


def _server(out: bytes) -> str:
    return str(ipaddress.IPv4Address(out[30:34]))  # IPIP: the outer destination


def _place(dispatcher, flows, now, flags=C._SYN, host=C.HOST_A):
    got = []
    for f in flows:
        out = dispatcher.process(C.to_host(host, C.frame(f, flags)), now)
        assert len(out) == 1, dispatcher.drops
        got.append(_server(out[0]))
    return got


def test_the_journal_names_new_flows_once_then_about_every_32_seconds():
    d = _dispatcher()
    journal = WorkerJournal(d)
    flows = C.flows(200, seed=21, first_octet=100, ports=[(C.VIP1, 80, 6)])
    now = 1000.0
    servers = _place(d, flows, now)
    taken = journal.take(now + 0.5)
    assert [e[0] for e in taken] == [C.flow_key(f) for f in flows]
    assert [e[1].split("@")[2] for e in taken] == servers  # by name: VIP@port@server
    assert all(e[1].startswith(f"{C.VIP1}@80@") for e in taken)
    assert all(0 <= e[2] <= 1500 for e in taken), taken[:3]  # age: from the deadline (1 s resolution)
    assert journal.take(now + 0.6) == []
    # 70 s of one packet a second per flow: each flow named again twice or three times (every ~32 s)
    counts = {}
    for second in range(1, 71):
        _place(d, flows, now + second, flags=C._ACK)
        for key, _, _ in journal.take(now + second):
            counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {C.flow_key(f) for f in flows}
    assert set(counts.values()) <= {2, 3}, sorted(set(counts.values()))
    # closing flows and affinity records are never noted; the journal is bounded
    _place(d, C.flows(5, seed=22, first_octet=101, ports=[(C.VIP1, 80, 6)]), now + 71, flags=C._ACK | 0x01)
    assert journal.take(now + 71) == []
    small = WorkerJournal(_dispatcher(), bound=10)
    _place(small.dispatcher, flows[:25], now)
    assert len(small.take(now)) == 10 and small.stats["dropped"] == 15


@pytest.mark.parametrize("synced", [True, False], ids=["sync", "no-sync"])
def test_a_peers_flows_keep_their_server_after_a_server_was_added(synced):
    """A places flows with N servers; B (N + 1 servers, other server order) receives them by name: with the
    entries applied every flow reaches its first server at B, without about 1/(N+1) move."""
    count = 2000
    a, b = _dispatcher(), _dispatcher(extra=NEW, host=C.HOST_B, reverse=True)
    ja, jb = WorkerJournal(a), WorkerJournal(b)
    flows = C.flows(count, seed=23, first_octet=100, ports=[(C.VIP1, 80, 6)])
    now = 500.0
    first = _place(a, flows, now)
    if synced:
        counts = jb.apply(ja.take(now + 1), now + 1)
        assert counts["applied"] == count and counts["kept_local"] == 0
        assert jb.take(now + 1) == []  # a peer's flow is not published back (no ping-pong)
        assert b.scheduler.table.ctr[0] == 0  # not counted as created here
    at_b = _place(b, flows, now + 2, flags=C._ACK, host=C.HOST_B)
    moved = sum(x != y for x, y in zip(first, at_b))
    if synced:
        assert moved == 0
    else:
        assert abs(moved / count - 1 / (N + 1)) < 0.05, moved


def test_a_fresher_local_entry_wins_and_bad_entries_are_counted():
    a, b = _dispatcher(), _dispatcher(extra=NEW)
    ja, jb = WorkerJournal(a), WorkerJournal(b)
    flows = C.flows(50, seed=24, first_octet=100, ports=[(C.VIP1, 80, 6)])
    now = 800.0
    _place(a, flows, now)
    entries = ja.take(now)
    key0, name0, _ = entries[0]
    other = next(f"{C.VIP1}@80@10.0.3.{10 + i}" for i in range(N) if f"{C.VIP1}@80@10.0.3.{10 + i}" != name0)
    # B saw flow 0 itself 10 s later, on another server: A's older copy does not replace it
    assert jb.apply([(key0, other, 0)], now + 10)["applied"] == 1
    counts = jb.apply(entries, now + 10)  # A's entries are 10 s old by now
    assert counts["kept_local"] == 1 and counts["applied"] == 49
    table = b.scheduler.table
    assert table.names[table.entries[key0] & 0x1FFFFF][2] == ipaddress.ip_address(other.split("@")[2])
    # a fresher copy from a peer replaces an older local one (its server too)
    assert jb.apply([(key0, name0, 0)], now + 30)["refreshed"] == 1
    assert table.names[table.entries[key0] & 0x1FFFFF][2] == ipaddress.ip_address(name0.split("@")[2])
    connections = sum(table.counts)
    assert connections == 50  # counted once each (least connections)
    bad = [(key0, "10.0.9.9@80@10.0.3.1", 0),  # unknown server
           (key0[:4] + bytes(4) + key0[8:], name0, 0),  # another VIP than the server's
           (key0, name0, 10**9)]  # idle longer than the port's staletimeout
    counts = jb.apply(bad, now + 30)
    assert (counts["unknown_server"], counts["mismatch"], counts["expired"]) == (1, 1, 1)
    assert sum(table.counts) == connections
    dump = jb.dump(1000, now + 30)
    assert {e[0] for e in dump} == {C.flow_key(f) for f in flows} and dump[0][0] == key0  # MRU first


class _Channel:
    """A channel whose other end is handled at once (send_msg writes a length and a pickle)."""

    def __init__(self, deliver):
        self.deliver = deliver

    def sendall(self, data: bytes) -> None:
        (length,) = struct.unpack("!I", data[:4])
        self.deliver(pickle.loads(data[4:4 + length]))


class _Pool:
    """WorkerPool's interface to flow synchronisation, with in-process workers (real Dispatchers)."""

    def __init__(self, dispatchers):
        self.on_message = None
        self.journals = {}
        self.dispatchers = dict(enumerate(dispatchers))
        self.workers = {n: {"channel": _Channel(lambda m, n=n: self._to_worker(n, m))} for n in self.dispatchers}
        self._waiting, self._answers = None, {}

    def _to_worker(self, n, message):
        if n not in self.journals:  # as Worker.handle: made on the first sync message
            self.journals[n] = WorkerJournal(self.dispatchers[n])
        self.journals[n].handle(_Channel(lambda reply: self._from_worker(n, reply)), message)

    def _from_worker(self, n, reply):
        if reply[0] == self._waiting:
            self._answers[n] = reply[1]
        else:
            self.on_message(n, *reply)

    def ask_all(self, message, kind, timeout):
        self._waiting, self._answers = kind, {}
        for n in self.workers:
            self._to_worker(n, message)
        self._waiting = None
        return self._answers


def _sync(pool, me, peers, port):
    flows = WorkerFlows(pool)
    executor = types.SimpleNamespace(syncpeers=tuple(ipaddress.ip_address(p) for p in peers), syncport=port,
                                     synckey=None)
    sync = FS.FlowSync(executor, lambda: pool.dispatchers[0].plan, lambda: flows, key=KEY, bind=me)
    flows.stats = sync.stats
    return sync, flows


def _pump(a, b, until, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in (a, b):
            s.poll(time.monotonic())
            s.on_readable()
        if until():
            return True
        time.sleep(0.002)
    return False


def test_workers_tables_synchronised_over_udp_and_a_catch_up_from_them(monkeypatch):
    """A (two workers, N servers) ↔ B (two workers, N + 1 servers, other order) over UDP: every flow A's
    workers place reaches both of B's workers by name and keeps its server there (in answers of at most
    TAKE_MAX entries); C, starting, catches up from A's workers' tables."""
    from encapfwd.flowsync import workers as flowsync_workers

    monkeypatch.setattr(flowsync_workers, "TAKE_MAX", 100)
    count = 600
    flows = C.flows(count, seed=25, first_octet=100, ports=[(C.VIP1, 80, 6)])
    now = time.monotonic()
    pool_a = _Pool([_dispatcher(), _dispatcher()])
    pool_b = _Pool([_dispatcher(extra=NEW, host=C.HOST_B, reverse=True) for _ in range(2)])
    port = free_port()
    sa, _ = _sync(pool_a, "127.0.0.1", ["127.0.0.2", "127.0.0.3"], port)
    sb, _ = _sync(pool_b, "127.0.0.2", ["127.0.0.1"], port)
    try:
        assert sa.sweep(now) == 0  # the first sweep asks the workers (their answers come asynchronously)
        half = count // 2  # the fanout spreads the flows over A's two workers
        first = _place(pool_a.dispatchers[0], flows[:half], now) + _place(pool_a.dispatchers[1], flows[half:], now)
        assert sa.sweep(now) == 0 and sa.sweep(now) == count  # asked, then collected and published
        assert sa.sweep(now) == 0  # published once
        assert _pump(sa, sb, lambda: sb.stats["applied"] == count), (sa.snapshot(), sb.snapshot())
        report = sb.snapshot()
        assert report["received_entries"] == count and not any(report["rejected"].values())
        assert report["workers"]["per_worker"]["1"]["applied"] == count  # every worker got every flow
        assert sb.sweep(now) == 0 and sb.sweep(now) == 0  # B's copies are not published back (no ping-pong)
        for d in pool_b.dispatchers.values():
            assert _place(d, flows, now + 1, flags=C._ACK, host=C.HOST_B) == first
        # C starts with an empty table and asks its peers (A) before it would announce
        pool_c = _Pool([_dispatcher(extra=NEW, reverse=True)])
        sc, _ = _sync(pool_c, "127.0.0.3", ["127.0.0.1"], port)
        state = catch_up_served_by(sc, sa)
        try:
            assert state["state"] == "done" and state["flows"] == count, state
            assert sc.stats["applied"] == count
            assert _place(pool_c.dispatchers[0], flows, now + 2, flags=C._ACK) == first
        finally:
            sc.close()
    finally:
        sa.close()
        sb.close()


def test_a_worker_started_again_is_refilled_from_the_peers():
    """A's workers place flows, B's two workers get them; B's worker 1 then starts again (a new pid, an empty
    table): B's next sweep sees it, asks A for a dump, and the new worker has every flow again, on its server."""
    count = 300
    flows = C.flows(count, seed=26, first_octet=100, ports=[(C.VIP1, 80, 6)])
    now = time.monotonic()
    pool_a = _Pool([_dispatcher()])
    pool_b = _Pool([_dispatcher(extra=NEW, host=C.HOST_B, reverse=True) for _ in range(2)])
    for n, worker in pool_b.workers.items():
        worker["pid"] = 100 + n
    port = free_port()
    sa, _ = _sync(pool_a, "127.0.0.1", ["127.0.0.2"], port)
    sb, flows_b = _sync(pool_b, "127.0.0.2", ["127.0.0.1"], port)
    try:
        assert sa.sweep(now) == 0 and sb.sweep(now) == 0  # the workers asked (their journals start)
        first = _place(pool_a.dispatchers[0], flows, now)
        assert sa.sweep(now) == 0 and sa.sweep(now) == count
        assert not flows_b.refill_wanted
        assert _pump(sa, sb, lambda: sb.stats["applied"] == count), (sa.snapshot(), sb.snapshot())
        # worker 1 starts again: a fresh dispatcher, a new pid, no journal
        pool_b.dispatchers[1] = _dispatcher(extra=NEW, host=C.HOST_B, reverse=True)
        pool_b.journals.pop(1, None)
        pool_b.workers[1]["pid"] = 201
        assert sb.sweep(now) == 0
        assert flows_b.counts["workers_started_again"] == 1 and sb.stats["refills"] == 1
        assert _pump(sa, sb, lambda: flows_b.report()["per_worker"]["1"].get("applied", 0) == 2 * count), (
            sa.snapshot(), sb.snapshot())
        assert _place(pool_b.dispatchers[1], flows, now + 1, flags=C._ACK, host=C.HOST_B) == first
        assert sb.sweep(now) == 0 and sb.stats["refills"] == 1  # once per start
    finally:
        sa.close()
        sb.close()


def test_the_pool_hands_unsolicited_answers_to_on_message():
    from encapfwd.runtime.afpacket.messaging import send_msg
    from encapfwd.runtime.afpacket.pool import WorkerPool

    ours, theirs = socket.socketpair()
    pool = WorkerPool.__new__(WorkerPool)
    pool.workers = {0: {"pid": 0, "channel": ours}}
    got = []
    pool.on_message = lambda n, kind, payload: got.append((n, kind, payload))
    try:
        send_msg(theirs, ("sync-flows", ([(b"k", "n", 1)], 0)))
        send_msg(theirs, ("report", {"x": 1}))
        assert pool.ask_all(("report",), "report", 2.0) == {0: {"x": 1}}
        send_msg(theirs, ("sync-applied", {"applied": 3}))
        assert pool.on_readable(ours.fileno())
        assert got == [(0, "sync-flows", ([(b"k", "n", 1)], 0)), (0, "sync-applied", {"applied": 3})]
    finally:
        ours.close()
        theirs.close()


def test_a_worker_answers_the_sync_messages_with_its_dispatchers_table():
    """Worker.handle: the journal is made on the first sync message; take, apply and dump are answered on
    the channel; the worker's report shows its counters."""
    from encapfwd.runtime.afpacket import worker as worker_mod
    from encapfwd.runtime.afpacket.messaging import recv_msg

    ours, theirs = socket.socketpair()
    d = _dispatcher()
    iface = types.SimpleNamespace(name="eth0", mac=C.HOST_A["mac"], mtu=1500, index=1)
    w = worker_mod.Worker(0, iface, d.plan.config, d, theirs, 0, rings=(None, None))
    try:
        w.handle(("sync-take",))
        assert recv_msg(ours) == ("sync-flows", ([], 0))
        flows = C.flows(20, seed=26, first_octet=100, ports=[(C.VIP1, 80, 6)])
        _place(d, flows, time.monotonic())
        w.handle(("sync-take",))
        kind, (entries, more) = recv_msg(ours)
        assert kind == "sync-flows" and [e[0] for e in entries] == [C.flow_key(f) for f in flows] and not more
        other = _dispatcher()
        wo = worker_mod.Worker(1, iface, other.plan.config, other, theirs, 0, rings=(None, None))
        wo.handle(("sync-apply", entries))
        kind, counts = recv_msg(ours)
        assert kind == "sync-applied" and counts["applied"] == 20
        wo.handle(("sync-dump", 5))
        kind, dump = recv_msg(ours)
        assert kind == "sync-dump" and len(dump) == 5
        w.rx = types.SimpleNamespace(statistics=lambda: (0, 0))
        w.tx = types.SimpleNamespace(sent=0, full=0, too_big=0, errors=0)
        assert w.report()["engine"]["sync"]["taken"] == 20
    finally:
        ours.close()
        theirs.close()
