"""The TC engine's rules and attachment (encapfwd.runtime.tc, encapfwd.xdp.tc): which engine
``--engine auto`` picks where, and on a real kernel (a veth in a namespace of its own) tcx attach, a second
run refused, a program left by a run that is gone taken over, and nothing left after a stop."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from encapfwd.runtime import engine as E
from encapfwd.runtime import link as L
from encapfwd.runtime.common import LiveError

TESTS = Path(__file__).resolve().parent


def link(kind=None, driver=None, features=None, peer=None, peer_native=None, name="eth0"):
    out = L.Link(name, 7)
    out.kind, out.driver, out.xdp_features = kind, driver, features
    out.peer, out.peer_native, out.peer_error = peer, peer_native, None
    return out


@pytest.fixture
def facts(monkeypatch):
    """Pretend BPF works and the interface is *what the test sets*; tcx as on Linux 6.6+."""
    from encapfwd.runtime import engine as T
    from encapfwd.xdp import libbpf

    monkeypatch.setattr(libbpf, "available", lambda: (True, ""))
    monkeypatch.setenv(T.ENV_TC_ATTACH, "tcx")
    state = {}
    monkeypatch.setattr(E, "_inspect", lambda name: state["link"])
    return state


@pytest.mark.parametrize("facts_of, engine, mode, words", [
    (link("veth", "veth", 103, "lan-d", False), "tc", "tcx",
     "auto: eth0 is a veth whose peer (lan-d) has no XDP program, so native XDP_TX frames would be lost; "
     "frames arrive there as socket buffers: the TC program runs at tc ingress (generic XDP would cost more)"),
    (link("bridge", "bridge", 0), "tc", "tcx",
     "auto: eth0's driver (bridge) has no native XDP; frames arrive there as socket buffers: the TC program "
     "runs at tc ingress (generic XDP would cost more)"),
    (link("veth", "veth", 103, "lan-d", True), "tc", "tcx",
     "auto: eth0 is a veth: frames arrive there as socket buffers, and those of senders on this host carry "
     "TCP/UDP checksums left to offload (CHECKSUM_PARTIAL, a veth's default: XDP never sees that the checksum is "
     "unfinished), which native XDP would forward unfinished: the TC program runs at tc ingress"),
    (link(None, "ixgbe", 0x7F), "xdp", "native", "auto: eth0's driver (ixgbe) runs XDP natively"),
])
def test_auto_picks_native_xdp_or_tc(facts, facts_of, engine, mode, words):
    from encapfwd.runtime.engine import choose_engine

    facts["link"] = facts_of
    choice = choose_engine("auto", "eth0")
    assert (choice.engine, choice.mode, choice.reason) == (engine, mode, words)
    assert choice.line() == f"engine: {engine} ({mode}) — {words}"


def test_asked_for_engines_and_modes_are_kept(facts, monkeypatch):
    from encapfwd.runtime.engine import choose_engine
    from encapfwd.xdp import libbpf

    facts["link"] = link("veth", "veth", 103, "lan-d", False)
    assert choose_engine("tc", "eth0").line() == "engine: tc (tcx) — asked for with --engine tc"
    assert choose_engine("xdp", "eth0").line().startswith("engine: xdp (generic) — asked for with --engine xdp")
    # an XDP mode asked for keeps XDP under auto
    assert choose_engine("auto", "eth0", "generic").line() == (
        "engine: xdp (generic) — auto: BPF is available; --xdp-mode generic asked for")
    assert choose_engine("afpacket", "eth0").engine == "afpacket"
    # native XDP asked for on a veth whose peer runs XDP: kept, with the reason it loses local senders' frames
    facts["link"] = link("veth", "veth", 103, "lan-d", True)
    native = choose_engine("xdp", "eth0")
    assert (native.engine, native.mode) == ("xdp", "native")
    assert native.warning.startswith("native XDP on a veth (eth0): frames of senders on this host carry TCP/UDP "
                                     "checksums left to offload") and "--engine tc" in native.warning
    monkeypatch.setattr(libbpf, "available", lambda: (False, "BPF needs root (CAP_BPF and CAP_NET_ADMIN)"))
    with pytest.raises(LiveError, match=r"^--engine tc: BPF needs root"):
        choose_engine("tc", "eth0")
    assert choose_engine("auto", "eth0").engine == "afpacket"


def test_the_workers_filter_takes_cluster_frames_only_with_the_mark():
    """The classic BPF program: the mark test comes right after the packet-type test, for IP frames only
    (ARP requests for a cluster address are answered whatever the engine)."""
    from encapfwd.runtime.afpacket.rings import SKF_AD_MARK, SKF_AD_OFF, cluster_filter
    from encapfwd.xdp.tc import SLOW_MARK

    plain = cluster_filter(["10.0.9.1"], arp=True)
    marked = cluster_filter(["10.0.9.1"], arp=True, mark=SLOW_MARK)
    assert len(marked) == len(plain) + 3
    load = (0x20, 0, 0, (SKF_AD_OFF + SKF_AD_MARK) & 0xFFFFFFFF)
    i = marked.index(load)
    assert marked[i + 1] == (0x15, 1, 0, SLOW_MARK) and marked[i + 2] == (0x06, 0, 0, 0)
    assert marked[i - 3][3] == (SKF_AD_OFF + 4) & 0xFFFFFFFF  # after the PACKET_HOST test, after ARP


def test_the_workers_socket_takes_one_protocol_where_it_can():
    """IPv4 alone (or IPv6 alone) when every cluster address is of that family: such a socket is given frames
    only after tc ingress. Every protocol where ARP is answered, families are mixed, or the socket is in a
    fanout group (whose sockets must all share one protocol and can never be bound again)."""
    from encapfwd.runtime.afpacket.rings import ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, listen_protocol

    assert listen_protocol(["10.0.9.1", "10.0.9.2"]) == ETH_P_IP
    assert listen_protocol(["2001:db8::1"]) == ETH_P_IPV6
    assert listen_protocol(["10.0.9.1", "2001:db8::1"]) == ETH_P_ALL
    assert listen_protocol(["10.0.9.1"], arp=True) == ETH_P_ALL
    assert listen_protocol(["10.0.9.1"], fanout=True) == ETH_P_ALL


SCRIPT = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    sys.path.insert(0, TESTS)
    import xdp_support as X
    from encapfwd.runtime.common import LiveError
    from encapfwd.runtime.tc import TCProgram
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.xdp import maps as M, tc
    from encapfwd.xdp.libbpf import prog_by_id

    class Iface:
        name, index = "t0", socket.if_nametoindex("t0")

    def programs():
        out = []
        for prog, link in tc.tcx_query(Iface.index):
            name, maps = prog_by_id(prog)
            [m.close() for m in maps]
            out.append(name)
        return out

    plan = compile_plan(X.make_config(("mac",)), X.registry_with_gue(), SidMap())
    result = {}
    # a run that is gone: its program still attached (here: its link still held), its owner pid dead
    left = tc.TCDataPlane.load(plan)
    left.attach(Iface.index, "tcx")
    dead = subprocess.Popen(["true"]); dead.wait()
    left.maps["control"].update(0, M.CONTROL.pack(left.gen, dead.pid))
    result["before"] = programs()
    first = TCProgram(Iface, attach="tcx")
    first.load(plan)
    result["took_over"] = programs()
    # a run that is alive: another encapfwd process owns the program now attached
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "encapfwd"])
    for _ in range(500):  # until its command line shows (it is empty for a moment after the exec)
        with open(f"/proc/{alive.pid}/cmdline", "rb") as f:
            if b"encapfwd" in f.read():
                break
        __import__("time").sleep(0.01)
    first.dataplane.maps["control"].update(0, M.CONTROL.pack(first.dataplane.gen, alive.pid))
    try:
        TCProgram(Iface, attach="tcx").load(plan)
        result["second"] = "started"
    except LiveError as exc:
        result["second"] = str(exc)
    alive.kill(); alive.wait()
    result["while_running"] = programs()
    first.close()
    result["after_stop"] = programs()
    left.close()
    print(json.dumps(result))
""")


def test_tcx_attach_takeover_refusal_and_stop():
    if os.geteuid() != 0:
        pytest.skip("BPF and namespaces need root")
    from encapfwd.xdp.libbpf import available
    from encapfwd.xdp.tc import tcx_available

    ok, why = available()
    if not ok:
        pytest.skip(why)
    if not tcx_available():
        pytest.skip("this kernel has no tcx (Linux 6.6+)")
    ns = f"efwtc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "add", "t0", "type", "veth", "peer", "name", "t1"], ["link", "set", "t0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                               f"TESTS = {str(TESTS)!r}\n" + SCRIPT], capture_output=True, text=True, timeout=120,
                              check=False)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["before"] == ["encapfwd_tc"]
    assert result["took_over"] == ["encapfwd_tc"], result  # the one left behind detached, ours attached
    assert "took over from the TC program left by encapfwd run" in proc.stderr
    assert result["second"].startswith("t0 already has encapfwd's TC program: encapfwd run (pid "), result
    assert result["while_running"] == ["encapfwd_tc"]
    assert result["after_stop"] == []
