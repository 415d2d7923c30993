"""Flow synchronisation, end to end (docs/scale-out.md, "Flow synchronisation"): three ``encapfwd run``
dispatchers behind BIRD with ECMP, two MAC servers, 60 long-lived connections (one request every 100 ms
each). A third server is added and every dispatcher reloaded; then the dispatcher that carries the most
connections is SIGKILLed, so its connections shift to the others, whose new table sends about a third of
them to the new server.

- with sync: 60/60 survive; the killed dispatcher, started again (with the new configuration, its flow
  table empty), catches up from its peers before it announces, and the connections the router sends back
  to it survive too;
- without sync: the same run loses some (each shifted connection with probability about 1/3);
- with sync and ``--engine afpacket``: the same as with sync (the flows live in the workers' Python tables).
"""

from __future__ import annotations

import json
import signal
import time

import pytest

scaleout = pytest.importorskip("encapfwd.lab.scaleout")
topology = pytest.importorskip("encapfwd.lab.topology")

REASON = scaleout.scaleout_unavailable(("mac",))
if REASON:
    pytest.skip(f"scale-out tests need: {REASON}", allow_module_level=True)

VIP = topology.SERVERS["mac"][0]
ALL = [scaleout.address_of(i) for i in (1, 2, 3)]
COUNT = 60
TICK = 0.1


def Connections(lab, count: int):
    return topology.LongLived(lab, ("mac",), count, timeout=3.0, tick=TICK)


def _forwarded(lab) -> dict:
    out = {}
    for i, member in lab.members.items():
        if member.running:
            out[ALL[i - 1]] = sum(s.get("packets", 0) for s in (lab.report_of(i).get("servers") or {}).values())
    return out


def _shares(lab, conns, seconds: float = 1.0) -> dict:
    """Connections per dispatcher, estimated from the packets each forwarded to the servers in *seconds*
    (every connection sends at the same rate)."""
    before = _forwarded(lab)
    alive = conns.alive(seconds)
    after = _forwarded(lab)
    grown = {a: after.get(a, 0) - before.get(a, 0) for a in ALL}
    total = sum(grown.values()) or 1
    assert len(alive) == COUNT, conns.errors
    return {a: round(COUNT * grown[a] / total) for a in ALL}


def _reload_all(lab) -> None:
    before = {i: lab.report_of(i)["engine"]["reloads"] for i in lab.members}
    for member in lab.members.values():
        member.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(lab.report_of(i)["engine"]["reloads"] > before[i] for i in lab.members):
            break
        time.sleep(0.05)
    digests = {lab.report_of(i)["engine"]["selection_digest"] for i in lab.members}
    assert len(digests) == 1, digests


@pytest.mark.parametrize("sync,engine", [(True, None), (False, None), (True, "afpacket")],
                         ids=["sync", "no-sync", "afpacket-sync"])
def test_connections_survive_a_server_added_then_a_dispatcher_killed(sync, engine):
    """*engine* None: ``encapfwd run``'s default (XDP in this lab); ``afpacket``: the flows live in the workers'
    Python tables (engines/flowsync_workers.py). Only the case with sync runs for afpacket (the lab's time)."""
    started = time.monotonic()
    with scaleout.ScaleOut(3, ("mac",), sync=sync, engine=engine) as lab:
        lab.cli_all("server", "add", f"{VIP}@{topology.PORT}@10.0.2.11")
        lab.add_mac_server("m2", "10.0.2.11")
        lab.start_all()
        assert lab.wait_nexthops(VIP, ALL, 20) is not None, (lab.nexthops(VIP), lab.bird_protocols())
        conns = Connections(lab, COUNT)
        try:
            assert len(conns.alive(1.0)) == COUNT, conns.errors
            # a third server, every dispatcher reloaded (the flow tables keep their entries)
            lab.cli_all("server", "add", f"{VIP}@{topology.PORT}@10.0.2.12")
            lab.add_mac_server("m3", "10.0.2.12")
            _reload_all(lab)
            assert len(conns.alive(0.5)) == COUNT, conns.errors
            # who carries what, from the dispatchers' own counters (``ip route get … sport`` on the router does
            # not give the path the kernel takes for the forwarded packets on every kernel): a connection sends
            # 10 requests a second, so each one's share of the packets is its dispatcher's
            per = _shares(lab, conns)
            victim = 1 + ALL.index(max(ALL, key=lambda a: per[a]))
            if sync:
                reports = {i: lab.report_of(i)["sync"] for i in lab.members}
                assert all(r["applied"] > 0 and not any(r["rejected"].values()) for r in reports.values()), reports
            if engine is not None:
                assert {lab.report_of(i)["engine"]["engine"] for i in lab.members} == {engine}
            lab.kill(victim, signal.SIGKILL)
            others = [a for a in ALL if a != ALL[victim - 1]]
            assert lab.wait_nexthops(VIP, others, scaleout.HOLD + 1) is not None
            alive = conns.alive(1.5)
            lost = sorted(set(range(COUNT)) - set(alive))
            print(f"\n{engine or 'default engine'}, {'with' if sync else 'without'} sync: ECMP spread (connections, "
                  f"from the packet counts) {per}; dispatcher {victim} SIGKILLed: its ~{per[ALL[victim - 1]]} connections shift, and "
                  f"the router's hash-threshold ECMP moves some of the others; {COUNT - len(lost)}/{COUNT} survive "
                  f"({len(lost)} lost: {sorted(set(map(str, conns.errors.values())))[:2]})")
            if not sync:
                assert lost, "without sync some shifted connections should land on the new server"
                assert all("reset" in str(conns.errors.get(i, "")).lower() for i in lost), conns.errors
                return
            assert lost == [], (lost, conns.errors)
            # the killed dispatcher comes back with the new configuration and an empty flow table: it asks
            # its peers for their flows before it announces, and the connections sent back to it survive
            lab.start(victim)
            assert lab.wait_nexthops(VIP, ALL, 15) is not None
            shares = _shares(lab, conns)
            back = shares[ALL[victim - 1]]
            lost = sorted(set(range(COUNT)) - set(conns.alive(1.0)))
            report = lab.report_of(victim)["sync"]
            log = lab.log_of(victim)
            log = log[log.rindex("sync: flows synchronised with"):]  # this start's lines (the file has all)
            print(f"dispatcher {victim} started again: catch-up {json.dumps(report['catchup'])}; ~{back} "
                  f"connections back on it; {COUNT - len(lost)}/{COUNT} survive")
            assert report["catchup"]["state"] == "done" and report["catchup"]["flows"] >= COUNT
            assert "sync: caught up before announcing" in log
            text = lab.cli_on(victim, "server", "report", "--control", lab.members[victim].control).stdout
            assert "catch-up at start: done" in text, text
            assert log.index("sync: caught up before announcing") < log.index("bgp:"), log
            assert back and lost == [], (back, lost, conns.errors)
            assert all(len(a) == 1 for a in conns.answers), conns.answers  # each on one server throughout
        finally:
            conns.close()
    print(f"lab run: {time.monotonic() - started:.1f} s")
