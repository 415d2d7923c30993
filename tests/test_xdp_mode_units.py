"""The XDP mode rule (``--xdp-mode auto``), the interface inspection it rests on, and the counting of frames
the driver could not send (encapfwd.runtime.link, encapfwd.runtime.xdp.choose)."""

from __future__ import annotations

import pytest
from encapfwd.runtime import link as L
from encapfwd.runtime.common import LiveError


def link(kind=None, driver=None, features=None, peer=None, peer_native=None, peer_error=None, name="eth0"):
    out = L.Link(name, 7)
    out.kind, out.driver, out.xdp_features = kind, driver, features
    out.peer, out.peer_native, out.peer_error = peer, peer_native, peer_error
    return out


@pytest.mark.parametrize("facts, mode, words", [
    (link("veth", "veth", 103, "lan-d", True), "native",
     "eth0 is a veth whose peer (lan-d) runs a native XDP program, so native XDP_TX frames reach it"),
    (link("veth", "veth", 103, "lan-d", False), "generic",
     "eth0 is a veth whose peer (lan-d) has no XDP program, so native XDP_TX frames would be lost"),
    (link("veth", "veth", 103, None, None, "NetlinkError: (19, 'No such device')"), "generic",
     ("eth0 is a veth whose peer could not be inspected (NetlinkError: (19, 'No such device')), so native "
      "XDP_TX frames would be lost")),
    (link(None, "ixgbe", 0x7F), "native", "eth0's driver (ixgbe) runs XDP natively"),
    (link("bridge", "bridge", 0), "generic", "eth0's driver (bridge) has no native XDP"),
    (link("macvlan", "macvlan", 0), "generic", "eth0's driver (macvlan) has no native XDP"),
    (link(None, "e1000", None), "native", "native XDP on eth0 (e1000; generic if the driver refuses it)"),
])
def test_auto_mode_is_native_only_where_xdp_tx_frames_arrive(facts, mode, words):
    assert L.choose_mode(facts, "auto") == (mode, words, None)


def test_a_mode_asked_for_is_kept_with_a_warning_when_it_loses_frames():
    bare = link("veth", "veth", 103, "lan-d", False)
    mode, words, warning = L.choose_mode(bare, "native")
    assert (mode, words) == ("native", "--xdp-mode native")
    assert warning == ("eth0 is a veth whose peer (lan-d) has no XDP program: frames the XDP program sends "
                       "(XDP_TX) in native mode will be lost; use --xdp-mode generic, or attach an XDP program "
                       "to the peer")
    assert L.choose_mode(bare, "generic") == ("generic", "--xdp-mode generic", None)
    assert L.choose_mode(link("veth", "veth", 103, "lan-d", True), "native")[2] is None
    assert L.choose_mode(link(None, "mlx5_core", 0x7F), "native")[2] is None
    assert L.choose_mode(None, "auto")[0] == "native"


def test_choose_names_engine_mode_and_reason(monkeypatch):
    from encapfwd.runtime import engine as E
    from encapfwd.xdp import libbpf

    afp = E.choose("afpacket", "eth0", "auto")
    assert afp.line() == "engine: afpacket — asked for with --engine afpacket" and afp.mode is None
    monkeypatch.setattr(libbpf, "available", lambda: (False, "BPF needs root (CAP_BPF and CAP_NET_ADMIN)"))
    assert E.choose("auto", "eth0").line() == ("engine: afpacket — auto: XDP is not available here (BPF needs "
                                               "root (CAP_BPF and CAP_NET_ADMIN))")
    with pytest.raises(LiveError, match="--engine xdp: BPF needs root"):
        E.choose("xdp", "eth0")
    monkeypatch.setattr(libbpf, "available", lambda: (True, ""))
    monkeypatch.setattr(E, "_inspect", lambda name: link("veth", "veth", 103, "lan-d", False, name=name))
    auto = E.choose("auto", "efw0")
    assert auto.line() == ("engine: xdp (generic) — auto: efw0 is a veth whose peer (lan-d) has no XDP program, "
                           "so native XDP_TX frames would be lost")
    assert not auto.may_fall_back and auto.warning is None
    asked = E.choose("xdp", "efw0", "native")
    assert asked.line() == "engine: xdp (native) — asked for with --engine xdp; --xdp-mode native asked for"
    assert "will be lost" in asked.warning
    assert E.choose("xdp", "efw0").line().startswith("engine: xdp (generic) — asked for with --engine xdp: efw0")
    monkeypatch.setattr(E, "_inspect", lambda name: link(None, "e1000", None, name=name))
    unknown = E.choose("auto", "eth0")
    assert unknown.mode == "native" and unknown.may_fall_back
    with pytest.raises(LiveError, match="--xdp-mode"):
        E.choose("xdp", "eth0", "turbo")


@pytest.mark.parametrize("name, lost", [
    ("rx_queue_0_xdp_tx_errors", True), ("tx_queue_3_xdp_xmit_errors", True), ("rx_xdp_tx_err", True),
    ("rx_xdp_tx_full", True), ("tx_xdp_err", True), ("tx_queue_0_xdp_tx_drops", True),
    ("rx_queue_0_xdp_drops", False), ("rx_queue_0_xdp_tx", False), ("rx_queue_0_xdp_packets", False),
    ("tx_queue_0_xdp_xmit", False), ("rx_xdp_drop", False), ("peer_ifindex", False),
])
def test_which_driver_counters_are_lost_frames(name, lost):
    assert bool(L._LOST_STAT.search(name)) == lost


class FakeWatch(L.TxLossWatch):
    def __init__(self, readings):
        super().__init__("eth0")
        self.readings = iter(readings)

    def _read(self):
        return next(self.readings)


def test_lost_frames_are_counted_once_from_the_baseline():
    veth = FakeWatch([
        {"rx_queue_0_xdp_tx_errors": 100, "tx_queue_0_xdp_xmit_errors": 0, "tx_dropped": 105},  # baseline
        {"rx_queue_0_xdp_tx_errors": 100, "tx_queue_0_xdp_xmit_errors": 0, "tx_dropped": 105},
        {"rx_queue_0_xdp_tx_errors": 400, "tx_queue_0_xdp_xmit_errors": 0, "tx_dropped": 405},  # both count it
        {"rx_queue_0_xdp_tx_errors": 400, "tx_queue_0_xdp_xmit_errors": 0, "tx_dropped": 410},  # 5 others
        {"rx_queue_0_xdp_tx_errors": 7, "tx_queue_0_xdp_xmit_errors": 0, "tx_dropped": 410},  # driver reset
    ])
    veth.start()
    assert veth.update() == 0 and veth.words() == "no counter grew"
    assert veth.update() == 300 and veth.words() == "rx_queue_0_xdp_tx_errors +300, tx_dropped +300"
    assert veth.update() == 305  # tx_dropped grew beyond: the larger of the two, never the sum
    assert veth.update() == 307  # after a reset the counter counts from zero again
    generic = FakeWatch([{"tx_dropped": 3}, {"tx_dropped": 53}])  # generic XDP: only tx_dropped says it
    generic.start()
    assert generic.update() == 50 and generic.counters == {"tx_dropped": 50}
    broken = FakeWatch([{"tx_dropped": 0}])
    broken.start()
    assert broken.update() == 0  # a reading that fails changes nothing


# ------------------------------------------------------------------------------- on real interfaces


def _need_lab():
    from encapfwd.lab.netns import lab_unavailable_reason

    reason = lab_unavailable_reason(("ip",))
    if reason:
        pytest.skip(reason)
    pytest.importorskip("pyroute2")


@pytest.fixture
def veth_in_two_namespaces():
    """``a0`` in one namespace, its peer ``b0`` in another (as a container's veth and its host side)."""
    _need_lab()
    from encapfwd.lab.netns import Namespace, veth_pair

    with Namespace("xa") as a, Namespace("xb") as b:
        veth_pair(a, "a0", b, "b0")
        yield a, b


def _inspect_in(ns, name):
    """:func:`xdp_link.inspect` run inside *ns* (a child process: netlink and ioctls follow the netns)."""
    code = ("import json, sys; from encapfwd.runtime import link as L; from encapfwd.runtime.netlink "
            "import open_ipr\nwith open_ipr() as ipr: l = L.inspect(ipr, sys.argv[1])\n"
            "print(json.dumps({**vars(l), 'mode': L.choose_mode(l, 'auto')[0]}))")
    import json
    import sys

    proc = ns.run([sys.executable, "-c", code, name], check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_inspect_finds_the_veth_peer_in_another_namespace_and_its_program(veth_in_two_namespaces):
    from encapfwd.xdp.libbpf import available

    a, b = veth_in_two_namespaces
    facts = _inspect_in(a, "a0")
    assert facts["kind"] == "veth" and facts["driver"] == "veth" and facts["peer"] == "b0", facts
    assert facts["peer_native"] is False and facts["peer_error"] is None and facts["mode"] == "generic"
    ok, why = available()
    if not ok:
        pytest.skip(why)
    from encapfwd.xdp.dataplane import pass_object_path

    b.ip("link", "set", "dev", "b0", "xdpgeneric", "obj", str(pass_object_path()), "sec", "xdp")
    facts = _inspect_in(a, "a0")
    assert facts["peer_native"] is False and facts["mode"] == "generic", facts  # generic on the peer: no use
    b.ip("link", "set", "dev", "b0", "xdpgeneric", "off")
    b.ip("link", "set", "dev", "b0", "xdpdrv", "obj", str(pass_object_path()), "sec", "xdp")
    facts = _inspect_in(a, "a0")
    assert facts["peer_native"] is True and facts["mode"] == "native", facts


def test_inspect_a_bridge_and_a_missing_interface(veth_in_two_namespaces):
    a, _ = veth_in_two_namespaces
    a.ip("link", "add", "br7", "type", "bridge")
    facts = _inspect_in(a, "br7")
    assert facts["kind"] == "bridge" and facts["mode"] == "generic", facts
    from encapfwd.runtime.netlink import open_ipr

    with open_ipr() as ipr, pytest.raises(LiveError, match="no such interface: nosuch9"):
        L.inspect(ipr, "nosuch9")


TX_BACK = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
/* frames of the local experimental ethertype 0x88b5 go back out (XDP_TX), everything else up */
SEC("xdp") int tx_back(struct xdp_md *ctx)
{
    unsigned char *p = (void *)(long)ctx->data;
    if ((void *)(p + 14) > (void *)(long)ctx->data_end || p[12] != 0x88 || p[13] != 0xb5)
        return XDP_PASS;
    return XDP_TX;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_ethtool_statistics_of_a_veth_count_lost_xdp_tx_frames(veth_in_two_namespaces, tmp_path):
    """Native XDP_TX on a veth whose peer runs no XDP program: every frame lost, and the watch says so."""
    from encapfwd.xdp.libbpf import available

    ok, why = available()
    if not ok:
        pytest.skip(why)
    from encapfwd.lab.netns import packet_socket

    a, b = veth_in_two_namespaces
    code = ("import sys, time, json; from encapfwd.runtime import link as L\n"
            "w = L.TxLossWatch('a0'); w.start(); print(json.dumps(sorted(w._last))); sys.stdout.flush()\n"
            "sys.stdin.readline(); w.update(); print(json.dumps([w.lost, w.counters]))")
    import json
    import subprocess
    import sys

    from encapfwd.xdp.build import build

    source = tmp_path / "tx_back.bpf.c"
    source.write_text(TX_BACK)
    a.ip("link", "set", "dev", "a0", "xdpdrv", "obj", str(build(source)), "sec", "xdp")
    watcher = subprocess.Popen(a.argv([sys.executable, "-c", code]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        names = json.loads(watcher.stdout.readline())
        assert "rx_queue_0_xdp_tx_errors" in names and "tx_dropped" in names, names
        tx = packet_socket(b, "b0")
        frame = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb5" + bytes(50)
        for _ in range(50):
            tx.send(frame)
        tx.close()
        out, _ = watcher.communicate("\n", timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    lost, counters = json.loads(out)
    assert lost == 50 and counters["rx_queue_0_xdp_tx_errors"] == 50, (lost, counters)
