"""Known-client admission (runtime/afpacket/admission.py; docs/live.md, "Overload").

- The classic BPF program against the real kernel: attached to an AF_PACKET socket on a veth end in a
  network namespace the test creates, frames crafted with scapy sent from the peer end; which ones the
  socket receives (sampling 0 % and 100 %: deterministic).
- The known clients (most recent, expiry), the worker learning them from its flow table and admitting their
  SYNs while it sheds, the filter following the triage (attached while it sheds, the usual program after).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

VIP = "10.0.9.1"
KNOWN = "198.51.100.7"
STRANGER = "10.200.1.2"


# ---------------------------------------------------------------------------- the program, in the kernel


@pytest.fixture(scope="module")
def veth():
    """(namespace, sending socket on ``adm0``, receiving interface ``adm1``, its MAC)."""
    from encapfwd.lab import netns

    reason = netns.lab_unavailable_reason(("ip",))
    if reason:
        pytest.skip(f"namespace lab unavailable: {reason}")
    pytest.importorskip("scapy")
    with netns.Namespace("adm") as ns:
        netns.veth_pair(ns, "adm0", ns, "adm1", up=False)
        for dev in ("adm0", "adm1"):
            ns.ip("link", "set", dev, "up")
        sender = netns.packet_socket(ns, "adm0")
        try:
            yield ns, sender, "adm1", ns.mac("adm1")
        finally:
            sender.close()


def _frames(mac):
    from scapy.layers.inet import IP, TCP, UDP, fragment
    from scapy.layers.l2 import ARP, Ether

    eth = Ether(dst=mac, src="02:00:00:00:00:aa")
    frames = {
        "known-syn": eth / IP(src=KNOWN, dst=VIP) / TCP(sport=40000, dport=80, flags="S"),
        "stranger-syn": eth / IP(src=STRANGER, dst=VIP) / TCP(sport=40001, dport=80, flags="S"),
        "stranger-ack": eth / IP(src=STRANGER, dst=VIP) / TCP(sport=40002, dport=80, flags="A"),
        "stranger-synack": eth / IP(src=STRANGER, dst=VIP) / TCP(sport=40003, dport=80, flags="SA"),
        "stranger-udp": eth / IP(src=STRANGER, dst=VIP) / UDP(sport=40004, dport=80),
        "stranger-syn-other-port": eth / IP(src=STRANGER, dst=VIP) / TCP(sport=40005, dport=81, flags="S"),
        "stranger-syn-options": eth / IP(src=STRANGER, dst=VIP, options=b"\x01\x01\x01\x00")
        / TCP(sport=40006, dport=80, flags="S"),
        "arp": eth.copy() / ARP(pdst=VIP, psrc=STRANGER),
        "not-ours": eth / IP(src=STRANGER, dst="10.0.9.2") / TCP(sport=40007, dport=80, flags="S"),
    }
    frames["arp"][Ether].dst = "ff:ff:ff:ff:ff:ff"
    frag = fragment(eth / IP(src=STRANGER, dst=VIP, flags=0) / TCP(sport=40008, dport=80, flags="S")
                    / (b"x" * 64), fragsize=24)[1]
    frames["stranger-fragment"] = frag
    return {name: bytes(f) for name, f in frames.items()}


def _received(ns, dev, program, frames, sender):
    """The names of *frames* (sent from the peer in this order) that a packet socket with *program* gets."""
    from encapfwd.runtime.afpacket.rings import ETH_P_ALL, attach_filter

    sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        attach_filter(sock, program)
        sock.bind((dev, ETH_P_ALL))
        sock.settimeout(0.3)
        time.sleep(0.05)
        for frame in frames.values():
            sender.send(frame)
        got = []
        by_bytes = {frame: name for name, frame in frames.items()}
        while True:
            try:
                data = sock.recv(65535)
            except socket.timeout:
                break
            name = by_bytes.get(data)
            if name is not None:
                got.append(name)
        return got
    finally:
        sock.close()


def _base(arp=True):
    from encapfwd.runtime.afpacket.rings import cluster_filter

    return cluster_filter([VIP], arp=arp)


def _shed():
    return [(socket.inet_aton(VIP), 80)]


def test_filter_admits_known_clients_and_samples_the_rest(veth):
    from encapfwd.runtime.afpacket.admission import admission_filter

    ns, sender, dev, mac = veth
    frames = _frames(mac)
    everything_but_not_ours = [n for n in frames if n != "not-ours"]
    # the usual program alone: every frame for the cluster address (and the ARP request) arrives
    assert _received(ns, dev, _base(), frames, sender) == everything_but_not_ours
    known = [socket.inet_aton(KNOWN), socket.inet_aton("192.0.2.99")]
    # sampling 0 %: only the stranger's SYN to the shed port is dropped
    got = _received(ns, dev, admission_filter(_base(), _shed(), known, 0.0), frames, sender)
    assert got == [n for n in everything_but_not_ours if n != "stranger-syn"]
    # sampling 100 %: it passes too
    got = _received(ns, dev, admission_filter(_base(), _shed(), known, 1.0), frames, sender)
    assert got == everything_but_not_ours
    # no known client at all, sampling 0 %: every SYN to the shed port dropped, the known one's too
    got = _received(ns, dev, admission_filter(_base(), _shed(), [], 0.0), frames, sender)
    assert got == [n for n in everything_but_not_ours if n not in ("stranger-syn", "known-syn")]


def test_filter_binary_search_over_many_known_clients(veth):
    """256 known clients (the search tree of the program): each of a few chosen ones is admitted, a source
    between two of them is not; the usual program's semantics are kept (its MAC check, its addresses)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from encapfwd.runtime.afpacket.admission import KNOWN_MAX, admission_filter

    ns, sender, dev, mac = veth
    known = [struct.pack("!I", 0xC6336400 + 2 * i) for i in range(KNOWN_MAX)]  # 198.51.100.0, .2, .4 …
    program = admission_filter(_base(), _shed() + [(socket.inet_aton("10.0.9.3"), 443)], known, 0.0)
    frames = {}
    for i in (0, 1, 2, 77, 128, 129, 254, 255):
        for odd in (0, 1):
            src = socket.inet_ntoa(struct.pack("!I", 0xC6336400 + 2 * i + odd))
            frames[f"{i}+{odd}"] = bytes(Ether(dst=mac, src="02:00:00:00:00:aa") / IP(src=src, dst=VIP)
                                         / TCP(sport=1000 + i, dport=80, flags="S"))
    got = _received(ns, dev, program, frames, sender)
    assert got == [name for name in frames if name.endswith("+0")]


# ------------------------------------------------------------------------------------ without a kernel


def test_known_clients_keep_the_most_recent_and_expire():
    from encapfwd.runtime.afpacket.admission import KnownClients

    known = KnownClients(size=3, ttl=10.0)
    for i, t in zip(range(4), (0.0, 1.0, 2.0, 3.0)):
        known.learn(bytes((10, 0, 0, i)), t)
    assert known.addresses() == [bytes((10, 0, 0, i)) for i in (1, 2, 3)]
    known.learn(bytes((10, 0, 0, 1)), 5.0)  # refreshed: now the most recent
    assert known.addresses()[-1] == bytes((10, 0, 0, 1))
    changes = known.changes
    known.expire(13.5)  # .2 (2.0) and .3 (3.0) are past 10 s; .1 (5.0) is not
    assert known.addresses() == [bytes((10, 0, 0, 1))] and known.changes == changes + 2


def test_admission_follows_the_triage():
    from encapfwd.runtime.afpacket.admission import Admission

    attached = []
    base = [(0x06, 0, 0, 0xFFFF)]
    admission = Admission(base, attached.append)
    admission.update([], 1.0, 0.0)
    assert attached == []  # nothing shed, nothing attached yet: the usual program stays
    admission.known.learn(socket.inet_aton(KNOWN), 0.0)
    admission.update(_shed(), 0.01, 0.1)
    assert len(attached) == 1 and attached[-1][-1] == base[0] and admission.filtered == frozenset(_shed())
    admission.update(_shed(), 0.011, 0.2)  # within a fifth: no change
    assert len(attached) == 1
    admission.update(_shed(), 0.5, 0.3)
    assert len(attached) == 2 and admission.sample == 0.5
    admission.known.learn(socket.inet_aton("192.0.2.1"), 0.35)
    admission.update(_shed(), 0.5, 0.4)  # a new known client
    assert len(attached) == 3
    admission.update([], 0.5, 0.5)  # the triage ends: the usual program back
    assert attached[-1] == base and admission.state is None and admission.sample == 1.0

    def refuse(program):
        raise OSError(22, "Invalid argument")

    lines = []
    broken = Admission(base, refuse, log=lines.append)
    broken.update(_shed(), 0.1, 0.0)
    broken.update(_shed(), 0.1, 0.1)
    assert broken.state is None and len(lines) == 1 and "not attached" in lines[0]


# ------------------------------------------------------------------------------ the worker and its triage


def _lab_helpers():
    import test_overload_live as t  # the ring-in-memory worker of the triage tests

    return t


def test_worker_learns_known_clients_and_admits_their_syns():
    """A client whose ACK belongs to a flow of the table becomes known (a stranger's lone ACK does not);
    under triage its SYNs to a shed port go through whatever the stride, a stranger's do not."""
    t = _lab_helpers()
    vip = socket.inet_aton(t.VIP)
    other = "192.0.2.55"
    warm = [t._tcp(80, 0x02, src=KNOWN, sport=5000), t._tcp(80, 0x18, src=KNOWN, sport=5000),
            t._tcp(80, 0x18, src=STRANGER, sport=6000),
            t._tcp(80, 0x02, src=other, sport=5000), t._tcp(80, 0x10, src=other, sport=5000)]
    unlooked, ring0, pair0 = t._worker(warm)
    assert len(list(unlooked._outputs(0, ring0.count, 1.0, False, False))) == 5
    assert unlooked.admission.known.addresses() == []  # a block not looked at (one in LEARN_EVERY is)
    for s in pair0:
        s.close()
    worker, ring, pair = t._worker(warm)
    try:
        out = list(worker._outputs(0, ring.count, 1.0))
        assert len(out) == 5
        # outside triage only the client's data (PSH) is looked at: the pure ACK of *other* teaches nothing
        assert worker.admission.known.addresses() == [socket.inet_aton(KNOWN)]
        flood = [t._tcp(80, 0x02, src=KNOWN, sport=5001 + i) for i in range(3)]
        flood += [t._tcp(80, 0x02, src=f"10.200.0.{i + 1}", sport=7000 + i) for i in range(3)]
        ring2 = t._Ring(flood)
        worker.rx = ring2
        triage = worker.triage
        triage.active = True
        triage.shed = {(vip, 80): f"{t.VIP}@80"}
        triage.filtered = frozenset(triage.shed)
        triage.stride = triage.skip = 1000  # the Python side admits none of the strangers
        out = [o for o in worker._triaged(0, ring2.count, 2.0)]
        assert len(out) == 3 and all(out)  # the known client's three SYNs
        assert worker.stats["overload_known_admitted"] == 3
        assert worker.stats["overload_dropped"] == {f"{t.VIP}@80": 3}
        assert triage.counts == {(vip, 80): 3} and triage.sampled == {(vip, 80): 3}
        # the worker's tick: the filter follows the triage (attached through the ring)
        programs = []
        ring2.set_filter = programs.append
        triage.counts[(vip, 80)] = 10_000  # 100 k new connections/s: still shed
        triage.window_start = 2.0
        worker._overload_tick(2.1)
        assert triage.shed == {(vip, 80): f"{t.VIP}@80"} and len(programs) == 1
        assert triage.filtered == frozenset(triage.shed) and triage.sample == worker.admission.sample < 1
        # the triage ends: the usual program back
        triage.active = False
        worker._overload_tick(2.2)
        assert programs[-1] == worker.admission.base and triage.filtered == frozenset()
        # a ring that refuses: the error is kept (once in the log), forwarding goes on
        del ring2.set_filter
        triage.active = True
        worker._overload_tick(2.3)
        assert worker.admission.error and "AttributeError" in worker.admission.error
    finally:
        for s in pair:
            s.close()


def test_triage_estimates_the_flood_behind_the_filter():
    """The kernel's filter let through a sample of the shed port's unknown SYNs: the triage scales them back
    (the port stays shed, the episode goes on), estimates what the filter dropped, and asks for the sample
    that brings the unknown SYNs down to the admit rate."""
    from encapfwd.runtime.afpacket import triage as tr

    stats = {}
    triage = tr.Triage(stats)
    vip = socket.inet_aton(VIP)
    key = (vip, 80)
    triage.active = True
    triage.last_pressure = 0.0
    triage.shed = {key: f"{VIP}@80"}
    triage.filtered = frozenset(triage.shed)
    triage.sample = triage.sample_before = 0.01
    triage.admit = 2000.0
    now = 0.0
    for _ in range(30):  # 3 s: beyond the hold, but the filter is still dropping the flood
        triage.window_start = now
        now += tr.WINDOW
        triage.counts = {key: 350, (vip, 81): 3}  # 35 kSYN/s reach the worker at 1 %: 3.5 M/s behind it
        triage.sampled = {key: 350}
        triage.frames = 400
        triage.tick(now, 0)
        assert triage.active and key in triage.shed
    assert stats["overload_filter_dropped"][f"{VIP}@80"] == 30 * round(350 * 99)
    assert triage.want_sample == pytest.approx(triage.admit * tr.WINDOW / 35_000, rel=0.01)
    # the flood stops: nothing sampled, nothing shed: the episode ends after the hold
    while triage.active:
        triage.window_start = now
        now += tr.WINDOW
        triage.counts, triage.frames = {(vip, 81): 3}, 3
        triage.tick(now, 0)
        assert now < 30 * tr.WINDOW + tr.HOLD + 3 * tr.WINDOW
    assert triage.want_sample == 1.0


def test_triage_leaves_alone_a_port_of_only_new_udp_flows():
    """Start-up under a stream of UDP datagrams whose flows are not in the table yet: nothing else to
    protect, so the port is not shed (what the worker forwards becomes established); the same rate of new
    UDP flows beside other traffic (established flows, other ports) is a flood, and shed."""
    from encapfwd.runtime.afpacket import triage as tr

    vip = socket.inet_aton(VIP)
    key = (vip, 53)
    for others, shed in ((0, False), (10, False), (2000, True)):
        triage = tr.Triage({})
        triage.active = True
        triage.last_pressure = 0.0
        triage.window_start = 0.0
        triage.counts = {key: 20_000}
        triage.udp = {key: 20_000}
        triage.frames = 20_000 + others
        triage.backlog = True
        triage.tick(0.1, 0)
        assert (key in triage.shed) is shed, others
    # a TCP SYN flood alone is shed all the same (its genuine clients are known: admission.py)
    triage = tr.Triage({})
    triage.active = True
    triage.last_pressure = 0.0
    triage.window_start = 0.0
    triage.counts = {(vip, 80): 20_000}
    triage.frames = 20_000
    triage.backlog = True
    triage.tick(0.1, 0)
    assert (vip, 80) in triage.shed


def test_a_stateless_worker_does_not_count_udp_as_new():
    """Without a flow table (maxflows 0) no UDP flow is ever established: its datagrams are not new
    connections for the triage (else such a port would be shed at the admit rate for good)."""
    t = _lab_helpers()
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plugins import get_plugin_manager

    frames = []
    for i in range(4):
        frame = bytearray(t._tcp(80, 0x02, sport=9000 + i))
        frame[23] = 17  # UDP (the checksum is not looked at by the triage)
        frames.append(bytes(frame))
    worker, ring, pair = t._worker(frames)
    try:
        worker.triage.active = True
        list(worker._triaged(0, ring.count, 1.0))
        assert worker.triage.udp == {(socket.inet_aton(t.VIP), 80): 4}
        from encapfwd.selection.scheduler import Scheduler

        plugins = get_plugin_manager()
        worker.dispatcher = Dispatcher(cfg.loads(t.CONFIG), plugins, scheduler=Scheduler(plugins, 0, syn_only=True))
        assert worker.dispatcher.scheduler.stateless
        worker.triage.counts.clear()
        worker.triage.udp.clear()
        list(worker._triaged(0, ring.count, 1.0))
        assert worker.triage.counts == {} and worker.triage.udp == {}
    finally:
        for s in pair:
            s.close()


def test_a_program_too_long_is_trimmed_or_refused():
    """The kernel takes 4,096 instructions: the known clients are trimmed to the most recent that fit; when
    even the shed ports do not fit, nothing is attached (one log line) and the usual program stays."""
    from encapfwd.runtime.afpacket.admission import MAX_INSNS, Admission, admission_filter

    base = [(0x06, 0, 0, 0xFFFF)] * 4000
    attached, lines = [], []
    admission = Admission(base, attached.append, log=lines.append)
    for i in range(256):
        admission.known.learn(struct.pack("!I", 0xC6336400 + i), 0.0)
    admission.update(_shed(), 0.0, 1.0)
    assert len(attached) == 1 and len(attached[0]) <= MAX_INSNS and not lines
    assert len(attached[0]) > len(admission_filter(base, _shed(), [], 0.0))  # some known clients in it
    with pytest.raises(ValueError):
        admission_filter(base, _shed(), admission.known.addresses(), 0.0)
    many = [(struct.pack("!I", 0x0A000900 + i), 80) for i in range(40)]
    admission.update(many, 0.0, 1.1)
    assert len(attached) == 1 and lines and "too long" in lines[0] and admission.filtered == frozenset(_shed())
