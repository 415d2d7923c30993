"""The hand-up gap (datapath/dispatcher.py ``_adopting`` with runtime/xdp.py ``KernelFlows.lookup``; docs/live.md,
"Overload"), against a real kernel map.

Under pressure the XDP program places new flows of a wrr port by its pressure table and keeps them in its
``flows`` map only. A later frame of such a flow handed up to an AF_PACKET worker (here: an ACK, as one too
big for the MTU would come up) misses the worker's Python flow table: without adoption the exact wrr
selector may choose another server; with it the worker follows the kernel's live entry — but not for a new
connection (a SYN), not for an entry older than the port's ``staletimeout``, not to a server now down.
"""

from __future__ import annotations

import random
import time

import pytest

import test_overload_kernel as K
import xdp_support as X


class _Sink:
    """A flow sink that only records what the dispatcher places (no lookup: the dispatcher adopts nothing)."""

    def __init__(self):
        self.written = []

    def __call__(self, key, sid):
        self.written.append((key, sid))


def _kernel_sink(dataplane):
    """The controller's ``KernelFlows`` on *dataplane*, recording what it is told to write instead."""
    from encapfwd.runtime.xdp import KernelFlows

    class Recording(KernelFlows):
        def __call__(self, key, sid):
            self.written.append((key, sid))

    sink = Recording()
    sink.dataplane, sink.written = dataplane, []
    return sink


@pytest.fixture
def kernel():
    ok, why = K._available()
    if not ok:
        pytest.skip(why)
    with X.one_cpu():
        yield


def _server(out: bytes) -> bytes:
    return out[30:34]  # the IPIP packet's outer destination


def test_a_handed_up_frame_follows_the_kernels_flow(kernel):
    from encapfwd.datapath.dispatcher import Dispatcher

    config = K._config(**{"80": ["selectionalgorithm", "wrr"]})
    registry, _sids, plan, dp = K._load("xdp", config)
    names = {s.sid: bytes(map(int, s.address.split("."))) for s in plan.servers}
    rng = random.Random(21)
    with dp:
        dp.set_pressure(True)
        flows = []
        for _ in range(40):
            syn = K.tcp(rng, K.SYN)
            verdict, out = dp.test_run(syn)
            assert K._forwarded("xdp", verdict)
            flows.append((syn, dp.flow(K.kernel_key(syn))))
        dp.set_pressure(False)
        now = time.monotonic()

        def ack_of(syn):
            return syn[:47] + bytes((K.ACK,)) + syn[48:]

        # without adoption: the exact wrr selector places the handed-up ACKs itself, some elsewhere
        plain = Dispatcher(plan, registry, flow_sink=_Sink())
        moved = sum(_server(plain.process(ack_of(syn), now)[0]) != names[sid] for syn, sid in flows)
        assert moved > 0
        # with it: every one on the kernel's server, nothing written back, nothing in the Python table
        sink = _kernel_sink(dp)
        adopting = Dispatcher(plan, registry, flow_sink=sink)
        for syn, sid in flows:
            assert _server(adopting.process(ack_of(syn), now)[0]) == names[sid]
        assert sink.adopted == len(flows) and sink.lookup_errors == 0
        assert sink.written == []
        # a reload compiles the adoption in again
        adopting.reload(plan)
        assert _server(adopting.process(ack_of(flows[2][0]), now)[0]) == names[flows[2][1]]
        assert sink.adopted == len(flows) + 1
        # a new connection (a SYN reusing the 5-tuple) is the dispatcher's to place: no lookup
        syn0, sid0 = flows[0]
        adopting.process(syn0, now)
        assert sink.adopted == len(flows) + 1
        # an entry older than the port's staletimeout is not followed
        from encapfwd.xdp import maps as M

        syn1, sid1 = flows[1]
        stale = time.monotonic_ns() - (300 + 5) * 1_000_000_000
        dp.maps["flows"].update(K.kernel_key(syn1), M.FLOW_VALUE.pack(sid1, 0, stale))
        adopting.process(ack_of(syn1), now)
        assert sink.adopted == len(flows) + 1


def test_a_server_down_is_not_adopted(kernel):
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plan import compile_plan

    config = K._config(**{"80": ["selectionalgorithm", "wrr"]})
    registry, sids, plan, dp = K._load("xdp", config)
    rng = random.Random(5)
    with dp:
        dp.set_pressure(True)
        syn = K.tcp(rng, K.SYN)
        assert K._forwarded("xdp", dp.test_run(syn)[0])
        sid = dp.flow(K.kernel_key(syn))
        server = next(s for s in plan.servers if s.sid == sid)
        down = compile_plan(cfg.server_status(config, f"{K.VIP}@80@{server.address}", True), registry, sids)
        sink = _kernel_sink(dp)
        dispatcher = Dispatcher(down, registry, flow_sink=sink)
        out = dispatcher.process(syn[:47] + bytes((K.ACK,)) + syn[48:], time.monotonic())
        assert out and _server(out[0]) != bytes(map(int, server.address.split(".")))
        assert sink.adopted == 0


def test_a_kernel_sink_without_a_program_adopts_nothing():
    """Before the program is loaded the kernel's sink has no data plane: the dispatcher places the flow itself."""
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.runtime.xdp import KernelFlows

    config = K._config(**{"80": ["selectionalgorithm", "wrr"]})
    sink = KernelFlows()
    dispatcher = Dispatcher(config, X.registry_with_gue(), flow_sink=sink)
    out = dispatcher.process(K.tcp(random.Random(3), K.ACK), time.monotonic())
    assert out and sink.adopted == 0 and sink.lookup_errors == 0
