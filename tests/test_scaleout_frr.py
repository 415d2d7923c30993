"""The scale-out picture with FRR as the router instead of BIRD (docs/scale-out.md shows both): three
dispatchers announce over BGP, FRR's zebra installs one ECMP route, a SIGKILLed dispatcher's routes go and
no connection is reset, and it is taken again when it comes back. MAC forwarding only (the user-mode-linux
back-ends are exercised with BIRD in test_scaleout_e2e.py)."""

from __future__ import annotations

import signal
import time

import pytest

pytestmark = pytest.mark.slow

scaleout = pytest.importorskip("encapfwd.lab.scaleout")
topology = pytest.importorskip("encapfwd.lab.topology")

REASON = scaleout.scaleout_unavailable(("mac",), router="frr")
if REASON:
    pytest.skip(f"the FRR scale-out test needs: {REASON}", allow_module_level=True)

VIP = topology.SERVERS["mac"][0]
VIP6 = topology.SERVERS["mac6"][0]


def test_frr_spreads_flows_and_drops_a_killed_dispatcher_without_resets():
    with scaleout.ScaleOut(3, ("mac",), router="frr", ipv6=True) as lab:
        lab.start_all()
        everyone = lab.next_hops_of(VIP)
        assert lab.wait_nexthops(VIP, everyone, 20) is not None, (lab.nexthops(VIP), lab.bird_protocols())
        assert lab.wait_nexthops(VIP6, lab.next_hops_of(VIP6), 5) is not None, lab.nexthops(VIP6)
        conns = []
        for _ in range(24):
            sock = lab.connect("mac", timeout=5.0)
            conns.append((sock, lab.carrier(VIP, sock.getsockname()[1])))
            assert lab.http_get(sock).startswith("server=mac")
        spread = {a: sum(1 for _, c in conns if c == a) for a in everyone}
        print(f"\nFRR: 24 connections spread {spread}")
        assert all(spread.values()), spread

        lab.kill(2)
        gone = lab.wait_nexthops(VIP, lab.next_hops_of(VIP, but=2), scaleout.HOLD + 1)
        print(f"FRR: SIGKILL of dispatcher 2: its route left after {gone:.3f} s")
        assert gone is not None, lab.nexthops(VIP)
        assert lab.wait_nexthops(VIP6, lab.next_hops_of(VIP6, but=2), 2) is not None, lab.nexthops(VIP6)
        assert all(a.startswith("server=mac") for a in lab.curl("mac6", 2))
        for sock, _ in conns:  # every connection, those dispatcher 2 carried included
            assert lab.http_get(sock).startswith("server=mac")
        assert all(a.startswith("server=mac") for a in lab.curl("mac", 3))

        lab.start(2)
        back = lab.wait_nexthops(VIP, everyone, 15)
        print(f"FRR: dispatcher 2 announced again after {back:.3f} s")
        assert back is not None
        time.sleep(0.5)
        for sock, _ in conns:
            assert lab.http_get(sock).startswith("server=mac")
            sock.close()
        lab.kill(2, signal.SIGTERM)
        withdrawn = lab.wait_nexthops(VIP, lab.next_hops_of(VIP, but=2), 5)
        assert withdrawn is not None
        procs = list(lab.router_procs)
        name = lab.ns["router"].name
    assert all(p.poll() is not None for p in procs)
    assert not (scaleout.Path("/var/run/frr") / name).exists()
