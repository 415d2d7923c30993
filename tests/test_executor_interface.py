"""The executor interface (encapfwd.executor): every executor of a plan provides it, receives only the plan,
and the executors of one kind are interchangeable — judged by running them, not by reading them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from encapfwd import config as cfg
from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.executor import FrameExecutor, LiveExecutor
from encapfwd.plan import compile_plan
from encapfwd.plugins import get_plugin_manager
from encapfwd.runtime.afpacket.pool import WorkerPool
from encapfwd.runtime.netlink import Interface
from encapfwd.runtime.tc import TCProgram
from encapfwd.runtime.xdp import XDPProgram

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "encapfwd.toml"
SAMPLE = ROOT / "examples" / "sample.pcap"


@pytest.fixture(scope="module")
def plan_and_registry():
    registry = get_plugin_manager()
    config = cfg.load(str(CONFIG))
    return compile_plan(config, registry), registry


def _frames(plan, limit=400):
    """The sample capture's first frames, sent to the plan's MAC (as ``replay --any-mac``)."""
    from encapfwd.datapath.packet import mac_bytes
    from encapfwd.replay.capture import CaptureReader, readdress

    local = mac_bytes(plan.config.executor.mac)
    with CaptureReader(str(SAMPLE), local) as reader:
        return [readdress(frame, local) for _n, (_ts, frame) in zip(range(limit), reader)]


def _kernel_executors(plan, registry):
    if os.geteuid() != 0:
        pytest.skip("BPF needs root (CAP_BPF and CAP_NET_ADMIN)")
    from encapfwd.xdp.libbpf import available
    from encapfwd.xdp.offline import XDPExecutor
    from encapfwd.xdp.tc import TCExecutor

    ok, why = available()
    if not ok:
        pytest.skip(why)
    return [XDPExecutor(plan, registry), TCExecutor(plan, registry)]


def test_live_executors_provide_the_interface():
    iface = Interface("eth0", 2, "02:00:00:00:00:01", 1500, [])
    for executor in (WorkerPool(iface, 1, 0x4E01), XDPProgram(iface), TCProgram(iface, attach="tcx")):
        assert isinstance(executor, LiveExecutor), type(executor).__name__
        assert executor.kind in ("afpacket", "xdp", "tc") and len(executor) == 0  # nothing started


def test_a_dispatcher_is_a_frame_executor_of_the_plan_it_is_given(plan_and_registry):
    plan, registry = plan_and_registry
    dispatcher = Dispatcher(plan, registry)
    assert isinstance(dispatcher, FrameExecutor)
    assert dispatcher.plan.digest == plan.digest  # the plan it was given, not one compiled again
    dispatcher.close()


def test_frame_executors_are_interchangeable(plan_and_registry):
    """Every frame executor, built from the same plan, forwards the same frames to the same servers (the
    kernel programs number outer IPv4 identifications themselves: compared per server, by count)."""
    plan, registry = plan_and_registry
    executors = [Dispatcher(plan, registry)] + _kernel_executors(plan, registry)
    frames = _frames(plan)
    try:
        reports = []
        for executor in executors:
            assert isinstance(executor, FrameExecutor), type(executor).__name__
            sent = sum(len(executor.process(frame, 1.0)) for frame in frames)
            executor.flush()
            report = executor.report()
            reports.append((sent, {n: s["packets"] for n, s in report["servers"].items()}, report["dropped"]))
            assert sent > 0
        assert all(r == reports[0] for r in reports[1:]), reports
    finally:
        for executor in executors:
            executor.close()


def test_install_switches_every_executor_to_the_new_plan(plan_and_registry):
    """``install(plan)``: a plan without one server; no executor sends to it afterwards."""
    import attrs

    plan, registry = plan_and_registry
    config = plan.config
    cluster = config.clusters[0]
    port = cluster.ports[0]
    gone = port.servers[0]
    smaller = attrs.evolve(config, clusters=[attrs.evolve(cluster, ports=[
        attrs.evolve(port, servers=[s for s in port.servers if s is not gone]), *cluster.ports[1:]]),
        *config.clusters[1:]])
    new_plan = compile_plan(smaller, registry)
    assert new_plan.digest != plan.digest
    name = next(s.name for s in plan.servers if s.address == str(gone.address) and s.port == port.number
                and s.cluster == str(cluster.address))
    executors = [Dispatcher(plan, registry)] + _kernel_executors(plan, registry)
    frames = _frames(plan)
    try:
        for executor in executors:
            # what the frames sent to the server taken out look like: (Ethernet destination, IPv4 destination)
            theirs = set()
            for frame in frames:
                before = executor.report()["servers"][name]["packets"]
                out = executor.process(frame, 1.0)
                if executor.report()["servers"][name]["packets"] > before:
                    theirs.update((o[:6], o[30:34]) for o in out)
            assert theirs, type(executor).__name__  # the old plan sends some flows to it
            executor.install(new_plan)
            assert executor.plan.digest == new_plan.digest
            sent = [o for frame in frames for o in executor.process(frame, 2.0)]
            assert sent and not theirs & {(o[:6], o[30:34]) for o in sent}, type(executor).__name__
    finally:
        for executor in executors:
            executor.close()
