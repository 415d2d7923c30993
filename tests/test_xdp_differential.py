"""The XDP program against the Python dispatcher, byte for byte, on the same forwarding plan.

Every frame goes through the loaded program with BPF_PROG_TEST_RUN and through the Python reference
(``Dispatcher.process``): the verdict class must agree (forwarded, or dropped with the same reason), a
forwarded frame must be the same bytes, and a frame the program hands up (XDP_PASS) must be one the slow
path is for (TTL expiry, too big, fragments, options, ICMP, not ours), or one not sent to the dispatcher's
MAC, which neither executor forwards (``not-for-us``). BPF_PROG_TEST_RUN frames carry no packet type, so
the destination MAC in the frame is all either executor can go by, as on a live interface. The outer identification of a
DF-clear encapsulated frame is each executor's own counter (the Template contract): exactly that field and
the header checksum are masked, and the program's checksum is then verified on its own.

The TC build of the same program (``encapfwd_tc.bpf.c``: frames as socket buffers, encapsulation with
bpf_skb_change_head, out with bpf_redirect) runs every test too (``lab`` is parametrized by kernel executor),
with nothing more masked: its verdicts are mapped TC_ACT_REDIRECT -> forwarded, TC_ACT_SHOT -> dropped,
TC_ACT_OK (not the slow path's) or a redirect to the interface's own ingress with the slow-path mark (the
slow path's) -> handed up. One TC-specific difference, which is the test harness's and not the program's: the
kernel's BPF_PROG_TEST_RUN refuses (EINVAL) a socket buffer whose IPv4 frame is shorter than Ethernet + 20
bytes or IPv6 one shorter than Ethernet + 40 (it reads the fixed header's addresses before the program runs);
those frames (about 1.4 % of the truncated ones) are counted as ``refused``, must be exactly the ones
``encapfwd.xdp.tc.test_run_refuses`` names, and must not be forwarded by Python either. No skb checksum
field shows in the output: the program writes the bytes itself (the outer header checksum included), as the
XDP program does.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct

import pytest

import xdp_support as X

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="BPF needs root (CAP_BPF and CAP_NET_ADMIN)")

FRAMES_PER_METHOD = int(os.environ.get("ENCAPFWD_DIFF_FRAMES", "100000"))
#: frames per method and executor of the pressure-on variant (docs/live.md, "Overload")
PRESSURE_FRAMES = int(os.environ.get("ENCAPFWD_DIFF_PRESSURE_FRAMES", "20000"))
XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
REFUSED = -1  # a frame BPF_PROG_TEST_RUN refuses as a socket buffer (TC only; see the module's docstring)
#: the TC program's verdicts as the XDP program's (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)
TC_AS_XDP = {0: XDP_PASS, 2: XDP_DROP, 7: XDP_TX}
#: pass reasons that are wrong for a frame the reference forwards as one plain frame
NEVER_FOR_FORWARDED = {"not-ours", "malformed", "new-flow", "no-template", "error", "ttl", "too-big"}


def _available():
    from encapfwd.xdp.libbpf import available

    return available()


def unlimited(config):
    """*config* with ``executor newflowlimit 0``: the kernel's per-CPU limit of new flow entries has no Python
    counterpart (docs/live.md, "Overload"), so the differential runs without it."""
    import attrs

    return attrs.evolve(config, executor=attrs.evolve(config.executor, newflowlimit=0))


def tcp_flags(frame: bytes, flags: int) -> bytes:
    """An IPv4 TCP *frame* (IHL 5) with other TCP flags (the TCP checksum is checked by nobody here)."""
    return frame[:47] + bytes((flags,)) + frame[48:]


def python_key(frame: bytes) -> bytes:
    """The dispatcher's flow key of an IPv4 TCP/UDP frame (IHL 5)."""
    return frame[26:34] + frame[23:24] + frame[34:38]


class AsXDP:
    """The TC data plane with the XDP program's verdicts (every other attribute is the TC one's). A frame
    for the slow path leaves the TC program as a redirect to the interface's own ingress with the slow-path
    mark (the workers' packet sockets take only those); one that is not the slow path's (not a cluster
    address, another host's MAC) as TC_ACT_OK, unmarked: both are checked here, then called XDP_PASS."""

    def __init__(self, dp, cpu):
        self.dp, self.cpu = dp, cpu

    def test_run(self, frame):
        from encapfwd.xdp import BPFError
        from encapfwd.xdp.tc import SLOW_MARK, TC_ACT_OK, TC_ACT_REDIRECT, skb_test_run, test_run_refuses

        try:
            verdict, out, mark = skb_test_run(self.dp.prog_fd, frame)
        except BPFError:
            assert test_run_refuses(frame), f"the test run refused {frame.hex()}"
            return REFUSED, b""
        assert not test_run_refuses(frame), f"the test run took {frame.hex()}"
        if verdict == TC_ACT_REDIRECT and mark == SLOW_MARK:
            assert out == frame and self.dp.last_reason(self.cpu) not in ("not-ours", "not-for-us")
            return XDP_PASS, out
        assert mark == 0, mark
        if verdict == TC_ACT_OK:
            assert out == frame and self.dp.last_reason(self.cpu) in ("not-ours", "not-for-us"), frame.hex()
        return TC_AS_XDP.get(verdict, 100 + verdict), out

    def __getattr__(self, name):
        return getattr(self.dp, name)


@pytest.fixture(scope="module", params=["xdp", "tc"])
def lab(request):
    ok, why = _available()
    if not ok:
        pytest.skip(why)
    with _loaded(request.param, unlimited(X.make_config())) as loaded:
        yield loaded


@contextlib.contextmanager
def _loaded(kind, config):
    """*config*'s plan loaded in the XDP or TC program (*kind*), on one CPU: (registry, plan, sids, data
    plane with XDP verdicts, cpu)."""
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.xdp.dataplane import DataPlane
    from encapfwd.xdp.tc import TCDataPlane

    with X.one_cpu() as cpu:  # test runs execute on this CPU: its per-CPU "last reason" is ours
        registry = X.registry_with_gue()
        sids = SidMap()
        plan = compile_plan(config, registry, sids)
        dp = (DataPlane if kind == "xdp" else TCDataPlane).load(plan)
        try:
            yield registry, plan, sids, dp if kind == "xdp" else AsXDP(dp, cpu), cpu
        finally:
            dp.close()


def _checksum_ok(header: bytes) -> bool:
    return sum(struct.unpack("!10H", header)) % 0xFFFF == 0


def _masked_equal(out: bytes, ref: bytes) -> bool:
    """Equal but for the outer identification (bytes 18-19) and header checksum (24-25) of a DF-clear
    encapsulated frame (outer IPv4 header at 14, DF clear)."""
    return (len(out) == len(ref) and len(out) >= 34 and out[12:14] == b"\x08\x00" and out[14] == 0x45
            and out[23] in (4, 47, 17) and not out[20] & 0x40
            and out[:18] == ref[:18] and out[20:24] == ref[20:24] and out[26:] == ref[26:])


def compare(dp, dispatcher, cpu, frames, now=0.0):
    """Run *frames* through both executors; returns (mismatch descriptions, verdict counts)."""
    bad = []
    counts = {"tx": 0, "drop": 0, "pass": 0, "other-host": 0, "group": 0, "not-for-us": 0, "refused": 0}
    own = bytes.fromhex(dp.plan.config.executor.mac.replace(":", ""))
    masked = any(s.template is not None and "ident" in s.template.fields for s in dp.plan.servers)
    for i, frame in enumerate(frames):
        verdict, out = dp.test_run(frame)
        before = dict(dispatcher.drops)
        replies = dispatcher.replies
        py = dispatcher.process(frame, now)
        if verdict == REFUSED:
            counts["refused"] += 1
            if py:
                bad.append((i, "python forwarded a frame too short for an IP header", frame.hex()))
            continue
        if len(frame) >= 14 and frame[:6] != own:
            counts["group" if frame[0] & 1 else "other-host"] += 1
            if verdict == XDP_TX or py:
                bad.append((i, f"a frame for {frame[:6].hex(':')} was forwarded: xdp {verdict}, python {len(py)}",
                            frame.hex()))
                continue
        if verdict == XDP_TX:
            counts["tx"] += 1
            if len(py) != 1 or dispatcher.replies != replies:
                bad.append((i, "xdp forwarded, python did not", frame.hex()))
                continue
            ref = py[0]
            if out != ref and masked and _masked_equal(out, ref):
                if not _checksum_ok(out[14:34]):
                    bad.append((i, "xdp outer checksum wrong", out.hex()))
                elif not out[18] & 0x80 or ref[18] & 0x80:
                    bad.append((i, "identification outside the executor's half", out.hex(), ref.hex()))
                continue
            if out != ref:
                bad.append((i, "bytes differ", frame.hex(), out.hex(), ref.hex()))
        elif verdict == XDP_DROP:
            counts["drop"] += 1
            reason = dp.last_reason(cpu)
            if py or dispatcher.drops.get(reason, 0) != before.get(reason, 0) + 1:
                bad.append((i, f"xdp dropped ({reason}), python: {py and 'forwarded'} "
                               f"{set(dispatcher.drops.items()) - set(before.items())}", frame.hex()))
        elif verdict == XDP_PASS:
            counts["pass"] += 1
            reason = dp.last_reason(cpu)
            grew = {k for k, v in dispatcher.drops.items() if v != before.get(k, 0)}
            if reason == "not-for-us" or "not-for-us" in grew:
                counts["not-for-us"] += 1
                if reason != "not-for-us" and len(frame) >= 14 and not frame[0] & 1:
                    bad.append((i, f"python: not-for-us, xdp passed up ({reason})", frame.hex()))
                elif reason == "not-for-us" and (py or grew != {"not-for-us"}):
                    bad.append((i, f"xdp: not-for-us, python: {grew or 'forwarded'}", frame.hex()))
            elif len(py) == 1 and not grew and dispatcher.replies == replies and reason in NEVER_FOR_FORWARDED:
                bad.append((i, f"xdp passed up ({reason}) a frame python forwards", frame.hex()))
            elif reason == "ttl" and "ttl-exceeded" not in grew:
                bad.append((i, f"xdp: ttl, python: {grew or 'forwarded'}", frame.hex()))
            elif reason == "too-big" and not ("frag-needed" in grew or len(py) > 1):
                bad.append((i, f"xdp: too big, python: {grew or len(py)}", frame.hex()))
        else:
            bad.append((i, f"verdict {verdict}", frame.hex()))
    return bad, counts


@pytest.mark.parametrize("method", list(X.METHODS))
def test_xdp_agrees_with_python_byte_for_byte(lab, method):
    from encapfwd.datapath.dispatcher import Dispatcher

    registry, plan, sids, dp, cpu = lab
    dispatcher = Dispatcher(plan, registry)
    bad, counts = compare(dp, dispatcher, cpu, X.frames(method, FRAMES_PER_METHOD, seed=7))
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"
    # the program must really do the work: most plain frames are forwarded in the kernel
    assert counts["tx"] > FRAMES_PER_METHOD * 0.3, counts
    assert counts["drop"] > 0 and counts["pass"] > 0, counts
    # frames for other hosts, broadcast and multicast ones were among them, and none was forwarded
    assert min(counts["other-host"], counts["group"]) > FRAMES_PER_METHOD * 0.02, counts
    assert counts["not-for-us"] > FRAMES_PER_METHOD * 0.04, counts


def test_a_template_one_byte_off_is_caught(lab):
    """The differential test has teeth: one byte of one server's header changed in the kernel's map."""
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.xdp import maps as M

    registry, plan, sids, dp, cpu = lab
    dispatcher = Dispatcher(plan, registry)
    servers = dp.maps["servers"]
    broken = []
    for server in plan.servers:
        if server.method == "gre":
            key = M.U32.pack(dp.gen * M.MAX_SERVERS + server.sid)
            raw = servers.lookup(key)
            broken.append((key, raw))
            tampered = bytearray(raw)
            tampered[M.HEADER_OFFSET + 8] ^= 0x01  # the outer TTL byte of the template header
            servers.update(key, bytes(tampered))
    try:
        bad, counts = compare(dp, dispatcher, cpu, X.frames("gre", 2000, seed=11))
    finally:
        for key, raw in broken:
            servers.update(key, raw)
    assert broken and counts["tx"] > 0
    assert len(bad) >= counts["tx"] * 0.9, (len(bad), counts)
    assert all(b[1] == "bytes differ" for b in bad)


def test_a_reload_keeps_flows_and_moves_only_the_downed_servers(lab):
    """A new plan (one server down) flips the generation; flows of other servers stay, the downed server's
    flows move, and both executors still agree frame by frame."""
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plan import compile_plan

    registry, plan, sids, dp, cpu = lab
    dispatcher = Dispatcher(plan, registry, sids=sids)
    rng = random.Random(3)
    flows = [X.ipv4_frame(rng, X.METHODS["ipip"][0]) for _ in range(3000)]
    # established flows only (no SYN/FIN/RST: closing-state handling is the slow path's business)
    flows = [f for f in flows if f[23] == 17 or (f[23] == 6 and not f[47] & 0x07)]
    # each TCP flow opened by a SYN first: only a SYN makes a flow entry (docs/live.md, "Overload")
    opened, counts = compare(dp, dispatcher, cpu, [tcp_flags(f, 0x02) for f in flows if f[23] == 6])
    assert not opened and counts["tx"] > 250
    before, counts = compare(dp, dispatcher, cpu, flows)
    assert not before and counts["tx"] > 500
    chosen = {}
    for f in flows:
        verdict, out = dp.test_run(f)
        if verdict == XDP_TX:
            chosen[f] = out[30:34]
    down = X.METHODS["ipip"][0] + "@80@10.0.3.22"
    new = compile_plan(cfg.server_status(plan.config, down, True), registry, sids)
    assert new.digest != plan.digest
    old_gen = dp.gen
    dp.install(new)
    dispatcher.reload(new)
    try:
        assert dp.gen != old_gen
        after, counts = compare(dp, dispatcher, cpu, flows)
        assert not after, after[:3]
        moved = kept = 0
        for f, server in chosen.items():
            verdict, out = dp.test_run(f)
            if verdict != XDP_TX:
                continue
            if server == bytes((10, 0, 3, 22)) and f[23] == 6:  # down on port 80 (TCP) only
                assert out[30:34] != server
                moved += 1
            else:
                assert out[30:34] == server, "a flow of a server that stayed up moved"
                kept += 1
        assert moved > 0 and kept > 0
    finally:
        dp.install(plan)


@pytest.mark.parametrize("kind", ["xdp", "tc"])
def test_the_slow_path_places_new_flows_of_a_table_less_port_in_the_kernel(kind):
    """A WRR port has no table in the kernel: a flow's first packet goes up, the Python selector places it
    and writes it into the kernel's flow table, and the flow's next packets are forwarded by the program
    to the same server."""
    ok, why = _available()
    if not ok:
        pytest.skip(why)
    from encapfwd import config as cfg
    from encapfwd.xdp.offline import XDPExecutor
    from encapfwd.xdp.tc import TCExecutor

    vip = X.METHODS["ipip"][0]
    config = cfg.port_set(X.make_config(("ipip",)), f"{vip}@80", ["selectionalgorithm", "wrr"])
    rng = random.Random(9)
    flows = []
    while len(flows) < 40:
        f = X.ipv4_frame(rng, vip)
        if f[23] == 6 and not f[47] & 0x07 and f[22] > 1 and len(f) < 1400:  # TCP, no SYN/FIN/RST, TTL > 1
            flows.append(f)
    with (XDPExecutor if kind == "xdp" else TCExecutor)(config, X.registry_with_gue()) as ex:
        first = [ex.process(f) for f in flows]
        assert ex.engines == {kind: 0, "python": len(flows)}, ex.engines
        again = [ex.process(f) for f in flows]
        assert ex.engines == {kind: len(flows), "python": len(flows)}, ex.engines
        servers = {out[0][30:34] for out in first}
        assert len(servers) == X.SERVERS_PER_PORT  # WRR spread the 40 flows over the five servers
        for a, b in zip(first, again):
            assert len(a) == len(b) == 1 and a[0][30:34] == b[0][30:34]  # the same server, now in the kernel


def test_the_dispatchers_mac_comes_with_the_plan(lab):
    """The MAC the program forwards frames for is the plan's (executor ``mac``): a plan with another MAC,
    installed like any reload, moves it in the kernel and in the Python dispatcher alike; a frame for the
    old MAC is then another host's (``not-for-us``), handed up untouched, and is not forwarded by Python
    either."""
    import attrs

    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plan import compile_plan

    registry, plan, sids, dp, cpu = lab
    rng = random.Random(5)
    plain = []
    while len(plain) < 200:
        f = X.ipv4_frame(rng, X.METHODS["mac"][0])
        if dp.test_run(f)[0] == XDP_TX:
            plain.append(f)
    new_mac = "02:00:00:00:00:77"
    config = plan.config
    moved = compile_plan(attrs.evolve(config, executor=attrs.evolve(config.executor, mac=new_mac)), registry, sids)
    dp.install(moved)
    try:
        dispatcher = Dispatcher(moved, registry, sids=sids)
        for f in plain:
            verdict, out = dp.test_run(f)
            assert verdict == XDP_PASS and dp.last_reason(cpu) == "not-for-us" and out == f
            assert dispatcher.process(f) == []
        assert dispatcher.drops == {"not-for-us": len(plain)}
        readdressed = [bytes.fromhex(new_mac.replace(":", "")) + f[6:] for f in plain]
        bad, counts = compare(dp, dispatcher, cpu, readdressed)
        assert not bad and counts["tx"] == len(plain), (bad[:3], counts)
    finally:
        dp.install(plan)
    assert all(dp.test_run(f)[0] == XDP_TX for f in plain)


def test_tcp_segments_that_cannot_open_a_connection_are_remembered_by_neither(lab):
    """A TCP segment of a table port that misses the flow table and is not a SYN (SYN set, ACK clear) is
    forwarded by the table in both executors and written into neither flow table; SYNs and UDP datagrams are.
    After a reload with a server down, both still agree: the segments never remembered follow the new table."""
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plan import compile_plan
    from encapfwd.xdp import maps as M

    registry, plan, sids, dp, cpu = lab
    dispatcher = Dispatcher(plan, registry, sids=sids)
    rng = random.Random(17)
    frames = []
    while len(frames) < 3000:
        f = X.ipv4_frame(rng, X.METHODS["ipip"][0])
        if dp.test_run(f)[0] == XDP_TX:  # plain frames the kernel forwards (a new flow each: random sources)
            frames.append(tcp_flags(f, rng.choice((0x02, 0x10, 0x18, 0x12, 0x11, 0x04))) if f[23] == 6 else f)
    events = dp.flow_events()
    kernel_keys = [M.flow_key(f[26:30], f[30:34], f[23], f[34:38]) for f in frames]
    for key in kernel_keys:
        dp.maps["flows"].delete(key)
    bad, counts = compare(dp, dispatcher, cpu, frames)
    assert not bad and counts["tx"] == len(frames), (bad[:3], counts)
    opening = [f[23] == 17 or f[47] & 0x12 == 0x02 for f in frames]
    assert 0 < sum(opening) < len(frames)
    in_kernel = [dp.maps["flows"].lookup(k) is not None for k in kernel_keys]
    in_python = [python_key(f) in dispatcher.scheduler.table.entries for f in frames]
    assert in_kernel == opening and in_python == opening
    not_syn = len(frames) - sum(opening)
    assert dp.flow_events()["not-syn"] - events["not-syn"] == not_syn
    assert dispatcher.report()["flows"]["not_remembered"] == {"not-syn": not_syn}
    down = X.METHODS["ipip"][0] + "@80@10.0.3.22"
    new = compile_plan(cfg.server_status(plan.config, down, True), registry, sids)
    dp.install(new)
    dispatcher.reload(new)
    try:
        after, counts = compare(dp, dispatcher, cpu, frames)
        assert not after and counts["tx"] == len(frames), (after[:3], counts)
    finally:
        dp.install(plan)


def _pressure_config():
    """The differential's configuration with every TCP port 80 round robin and every UDP port 53 least
    connections: ports whose new flows go up, unless under pressure."""
    from encapfwd import config as cfg

    c = X.make_config()
    for vip, _, _ in X.METHODS.values():
        c = cfg.port_set(c, f"{vip}@80", ["selectionalgorithm", "wrr"])
        c = cfg.port_set(c, f"{vip}@53", ["selectionalgorithm", "wlc"])
    return unlimited(c)


@pytest.fixture(scope="module", params=["xdp", "tc"])
def pressure_lab(request):
    ok, why = _available()
    if not ok:
        pytest.skip(why)
    with _loaded(request.param, _pressure_config()) as (registry, plan, _sids, dp, cpu):
        assert all(p.table is None and p.fallback is not None for p in plan.ports)
        yield registry, plan, dp, cpu


@pytest.mark.parametrize("method", list(X.METHODS))
def test_under_pressure_both_place_new_flows_of_wrr_and_wlc_ports_alike(pressure_lab, method):
    """Pressure on in both executors: new flows of wrr and wlc ports are placed by the ports' pressure table,
    by the kernel program and by the Python dispatcher alike, byte for byte; the flows they remembered stay on
    their server after the pressure ends, and new flows go up again."""
    from encapfwd.datapath.dispatcher import Dispatcher

    registry, plan, dp, cpu = pressure_lab
    dispatcher = Dispatcher(plan, registry)
    placed = dp.counters()["pressure_placed"]
    dp.set_pressure(True)
    dispatcher.set_pressure(True)
    try:
        frames = list(X.frames(method, PRESSURE_FRAMES, seed=23))
        bad, counts = compare(dp, dispatcher, cpu, frames)
        assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"
        assert counts["tx"] > PRESSURE_FRAMES * 0.3, counts
        assert dp.counters()["pressure_placed"] - placed >= counts["tx"] * 0.9, (dp.counters(), counts)
        assert dispatcher.report()["flows"]["pressure_placed"] > 0
    finally:
        dp.set_pressure(False)
        dispatcher.set_pressure(False)
    assert not dp.counters()["pressure"] and not dispatcher.pressure
    # the flows remembered (UDP, TCP SYN) keep their server in both executors; the others go up again
    sent = [f for f in frames if dp.test_run(f)[0] == XDP_TX]
    assert sent and all(_opens(f) for f in sent)
    bad, counts = compare(dp, dispatcher, cpu, sent)
    assert not bad and counts["tx"] == len(sent), (bad[:3], counts)
    assert len(sent) > PRESSURE_FRAMES * 0.1
    rng = random.Random(29)
    vip = X.METHODS[method][0]
    for _ in range(50):
        f = X.ipv6_frame(rng, vip) if ":" in vip else X.ipv4_frame(rng, vip)
        while len(f) > 1200:
            f = X.ipv6_frame(rng, vip) if ":" in vip else X.ipv4_frame(rng, vip)
        verdict, _ = dp.test_run(f)
        assert verdict == XDP_PASS and dp.last_reason(cpu) == "new-flow", f.hex()


def _opens(frame: bytes) -> bool:
    """Whether a TCP/UDP *frame* (IPv4 with IHL 5, or IPv6 without extension headers) may make a flow entry:
    UDP, or TCP with SYN set and ACK clear."""
    proto, l4 = (frame[20], 54) if frame[12:14] == b"\x86\xdd" else (frame[23], 34)
    return proto == 17 or (proto == 6 and frame[l4 + 13] & 0x12 == 0x02)
