"""Scale-out, end to end with real kernels and a real router: three ``encapfwd run`` dispatchers announce the
VIPs over BGP (ExaBGP) to BIRD 2, whose kernel spreads the client's flows over them by ECMP (L4 hash).

Sixty long-lived TCP connections (20 each to the MAC, IPIP and GRE servers; the IPIP and GRE back-ends are
user-mode-linux kernels) send a request every 100 ms throughout. One dispatcher is SIGKILLed, started
again, and another one stopped gracefully: the router's routes follow, and no connection is ever reset,
because every dispatcher picks the same server for a flow (Maglev over the same configuration).
"""

from __future__ import annotations

import signal
import socket
import time

import pytest

pytestmark = pytest.mark.slow

scaleout = pytest.importorskip("encapfwd.lab.scaleout")
topology = pytest.importorskip("encapfwd.lab.topology")

REASON = scaleout.scaleout_unavailable(("mac", "ipip", "gre"))
if REASON:
    pytest.skip(f"scale-out tests need: {REASON}", allow_module_level=True)

METHODS = ("mac", "ipip", "gre")
VIPS = {m: topology.SERVERS[m][0] for m in METHODS}
VIP6 = topology.SERVERS["mac6"][0]
ALL = [scaleout.address_of(i) for i in (1, 2, 3)]
PER_METHOD = 20
TICK = 0.1


@pytest.fixture(scope="module")
def lab():
    with scaleout.ScaleOut(3, METHODS, ipv6=True) as built:
        built.start_all()
        for vip in built.vip_list():
            wanted = built.next_hops_of(vip)
            assert built.wait_nexthops(vip, wanted, 20) is not None, (vip, built.nexthops(vip), built.bird_protocols())
        assert VIP6 in built.vip_list()
        yield built


def Connections(lab, per_method: int = PER_METHOD, timeout: float = 5.0):
    """Long-lived connections from the client, each sending one request every 100 ms in its own thread."""
    return topology.LongLived(lab, METHODS, per_method, timeout=timeout, tick=TICK)


def _carriers(lab, conns):
    return {i: lab.carrier(VIPS[m], sport) for i, (m, _, sport) in enumerate(conns.conns)}


def _packets(lab, index):
    servers = lab.report_of(index).get("servers") or {}
    return sum(s.get("packets", 0) for s in servers.values())



def _attached(member, kind: str) -> bool:
    """Whether the member's kernel program is still on its eth0: XDP (``ip link``), or TC at ingress (tcx or
    clsact: queried inside its namespace)."""
    if kind == "xdp":
        return "xdp" in member.ns.ip("link", "show", "eth0").stdout
    from encapfwd.xdp import tc

    def query():
        index = socket.if_nametoindex("eth0")
        return tc.attached_owners(index) or tc.clsact_owners(index)

    return bool(member.ns.call(query))


def test_losing_and_adding_a_dispatcher_resets_no_connection(lab):
    conns = Connections(lab)
    try:
        carriers = _carriers(lab, conns)
        per = {a: sum(1 for c in carriers.values() if c == a) for a in ALL}
        print(f"\nECMP spread of the 60 connections: {per}")
        assert all(per[a] > 0 for a in ALL), per
        assert conns.flowing(1.0) == [] and not conns.errors, conns.errors
        assert all(_packets(lab, i) > 0 for i in (1, 2, 3))
        # every connection was answered by its own method's server, always the same one
        assert all(a == {f"server={m}"} for (m, _, _), a in zip(conns.conns, conns.answers)), conns.answers

        # SIGKILL dispatcher 2: its routes go, its flows move to the others and reach the same servers
        moved = [i for i, c in carriers.items() if c == ALL[1]]
        lab.kill(2, signal.SIGKILL)
        gone = {vip: lab.wait_nexthops(vip, [ALL[0], ALL[2]], scaleout.HOLD + 1) for vip in VIPS.values()}
        print(f"SIGKILL of dispatcher 2: its routes left the router after "
              f"{', '.join(f'{t:.3f}' if t is not None else 'never' for t in gone.values())} s (hold {scaleout.HOLD} s); "
              f"{len(moved)} connections moved")
        assert all(t is not None for t in gone.values()), {v: lab.nexthops(v) for v in VIPS.values()}
        assert lab.wait_nexthops(VIP6, lab.next_hops_of(VIP6, but=2), 1) is not None, lab.nexthops(VIP6)
        stalled = conns.flowing(1.5)
        assert stalled == [] and not conns.errors, (stalled, conns.errors)
        for method in METHODS + ("mac6",):  # new connections succeed
            answers = lab.curl(method, 3)
            assert all(a.startswith(f"server={method.rstrip('6')}") for a in answers), answers

        # start it again: announced again, takes flows again, still no reset
        lab.start(2)
        back = {vip: lab.wait_nexthops(vip, ALL, 15) for vip in VIPS.values()}
        print(f"dispatcher 2 started again: announced after {', '.join(f'{t:.3f}' for t in back.values() if t)} s")
        assert all(t is not None for t in back.values())
        assert lab.wait_nexthops(VIP6, lab.next_hops_of(VIP6), 5) is not None, lab.nexthops(VIP6)
        stalled = conns.flowing(1.5)
        assert stalled == [] and not conns.errors, (stalled, conns.errors)
        assert _packets(lab, 2) > 0, "dispatcher 2 carries flows again"

        # stop dispatcher 3 gracefully: withdrawn while its kernel program still forwards, then detached
        member = lab.members[3]
        kind = lab.report_of(3)["engine"]["engine"]
        assert kind in ("xdp", "tc") and _attached(member, kind)
        member.proc.send_signal(signal.SIGTERM)
        withdrawn = detached = None
        started = time.monotonic()
        while time.monotonic() - started < 10 and (withdrawn is None or detached is None):
            now = time.monotonic() - started
            if withdrawn is None and all(ALL[2] not in lab.nexthops(v) for v in VIPS.values()):
                withdrawn = now
            if detached is None and not _attached(member, kind):
                detached = now
            time.sleep(0.005)
        lab.kill(3, signal.SIGTERM)
        print(f"graceful stop of dispatcher 3 ({kind}): routes withdrawn after {withdrawn:.3f} s, "
              f"its program detached after {detached:.3f} s")
        assert withdrawn is not None and detached is not None and withdrawn < detached
        stalled = conns.flowing(1.5)
        assert stalled == [] and not conns.errors, (stalled, conns.errors)
        assert all(a == {f"server={m}"} for (m, _, _), a in zip(conns.conns, conns.answers))
        print(f"requests answered on the 60 connections: {sum(conns.counts())}, errors: {len(conns.errors)}")
    finally:
        conns.close()
    lab.start(3)
    for vip in VIPS.values():
        assert lab.wait_nexthops(vip, ALL, 15) is not None


def test_a_dispatcher_that_falls_silent_is_dropped_after_the_hold_time(lab):
    """A dispatcher whose machine dies sends no FIN: its link goes down (its processes run on), the router's
    hold timer ends the session, the flows move; TCP retransmits across the gap and nothing is reset."""
    conns = Connections(lab, per_method=10, timeout=15.0)
    try:
        silent = lab.members[2]
        moved = [i for i, c in _carriers(lab, conns).items() if c == silent.address]
        silent.ns.ip("link", "set", "eth0", "down")
        try:
            gone = lab.wait_nexthops(VIPS["mac"], [ALL[0], ALL[2]], scaleout.HOLD + 2)
            print(f"\ndispatcher 2 fell silent: the router dropped it after {gone:.2f} s (hold {scaleout.HOLD} s); "
                  f"{len(moved)} connections waited for it")
            assert gone is not None and gone > 1.0, gone  # the hold timer, not a closed session
            for vip in VIPS.values():
                assert lab.wait_nexthops(vip, [ALL[0], ALL[2]], 1) is not None
            time.sleep(3.0)  # TCP's retransmission timer after the gap (200 ms, 400 ms, 800 ms …)
            stalled = conns.flowing(2.0)
            assert stalled == [] and not conns.errors, (stalled, conns.errors)
        finally:
            silent.ns.ip("link", "set", "eth0", "up")
        back = lab.wait_nexthops(VIPS["mac"], ALL, 15)
        print(f"its link up again: announced again after {back:.2f} s")
        assert back is not None
        for vip in VIPS.values():
            assert lab.wait_nexthops(vip, ALL, 5) is not None
        stalled = conns.flowing(1.5)
        assert stalled == [] and not conns.errors, (stalled, conns.errors)
    finally:
        conns.close()


def test_a_router_restart_interrupts_but_resets_nothing(lab):
    """BIRD stops (its routes leave the kernel) and starts again: the dispatchers' ExaBGP sessions come back,
    announce again, and the connections resume."""
    conns = Connections(lab, per_method=5, timeout=20.0)
    try:
        lab.stop_router()
        assert all(lab.nexthops(vip) == [] for vip in VIPS.values())
        started = time.monotonic()
        lab.start_router()
        back = max(lab.wait_nexthops(vip, ALL, 20) or float("inf") for vip in VIPS.values())
        print(f"\nrouter restarted: every route back after {time.monotonic() - started:.2f} s "
              f"(the last one {back:.2f} s after the previous)")
        assert back != float("inf")
        time.sleep(3.0)  # retransmissions across the gap
        stalled = conns.flowing(2.0)
        assert stalled == [] and not conns.errors, (stalled, conns.errors)
    finally:
        conns.close()


def test_a_dispatcher_whose_servers_are_all_down_withdraws_that_vip(lab):
    vip, server = topology.SERVERS["mac"][:2]
    lab.cli_on(1, "server", "down", f"{vip}@80@{server}")
    lab.members[1].proc.send_signal(signal.SIGHUP)
    try:
        took = lab.wait_nexthops(vip, ALL[1:], 5)
        assert took is not None, lab.nexthops(vip)
        assert lab.nexthops(VIPS["ipip"]) == ALL and lab.nexthops(VIPS["gre"]) == ALL
        bgp = lab.report_of(1)["bgp"]
        assert f"{vip}/32" not in bgp["announced"] and bgp["session"] == "up", bgp
        print(f"\nevery server of {vip} down on dispatcher 1: withdrawn after {took:.3f} s")
    finally:
        lab.cli_on(1, "server", "up", f"{vip}@80@{server}")
        lab.members[1].proc.send_signal(signal.SIGHUP)
    assert lab.wait_nexthops(vip, ALL, 5) is not None


def test_every_dispatcher_reports_the_same_selection(lab):
    digests = [lab.report_of(i)["engine"] for i in (1, 2, 3)]
    assert len({d["selection_digest"] for d in digests}) == 1, digests
    assert len({d["plan_digest"] for d in digests}) == 3  # each host's own bytes (MAC, outer source)


def test_teardown_leaves_no_namespace_daemon_or_vm(lab):
    import subprocess

    names = [ns.name for ns in lab.ns.values()]
    pids = [p.pid for p in lab.procs] + [m.proc.pid for m in lab.members.values() if m.proc is not None]
    guests = [g.pid for g in lab.guests.values() if getattr(g, "pid", None)]
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed
    alive = [pid for pid in pids + guests if _alive(pid)]
    assert alive == [], alive
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(lab.workdir) not in ps, [line for line in ps.splitlines() if str(lab.workdir) in line]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
