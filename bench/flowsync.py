#!/usr/bin/env python3
"""Flow synchronisation cost: new flows replicated per second between two dispatchers on this machine.

    .venv/bin/python bench/flowsync.py                 # 100,000 flows
    .venv/bin/python bench/flowsync.py --flows 300000 --json
    .venv/bin/python bench/flowsync.py --forwarding [--rate 100000] [--table 131072] [--seconds 6] [--rounds 3]
                                                    [--controller-cpu 1]

Run as root, the bench moves itself into a network namespace of its own (loopback only): its datagrams never
leave it. Two parts by default:

- **codec**: encode as the controller does (one pass per datagram body, then header + HMAC-SHA256) → authenticate, replay-check and decode, in one process, no
  socket, no kernel: the Python cost per entry.
- **two dispatchers** (root, BPF): two loaded data planes (the real XDP program's maps) with different
  server ids; A's kernel flow table holds FLOWS new flows (written as the program writes them, pad 0).
  Timed from A's first sweep until B has inserted the last one: sweep (batched map read + marks written
  back) → name the servers → batch → HMAC → UDP over the loopback → B authenticates, checks replay, maps
  names to its ids and inserts into its kernel table (BPF_NOEXIST). Both ends run in this one process,
  alternating (so the figure is what one CPU does for both sides). The rate limit (RATE datagrams/s per
  peer) is lifted for the measurement and its own ceiling printed.

``--forwarding``: what replication costs forwarding, on 2 CPUs. CPU 1 forwards: the real XDP program on one
data plane (A), run by BPF_PROG_TEST_RUN on 256 established flows' frames in a loop that never waits (a
CPU-bound forwarder; the figure is frames/s through the ``bpf()`` call, about 7–10 µs of Python and syscall
per frame around a ~0.4 µs program, so compare ratios, not the absolute rate with bench/live.py's). CPU 0
writes RATE new flows/s into A's kernel flow table (an LRU map of --table entries, full of published flows
at start) as the program writes them (pad 0), in every condition. Four conditions, interleaved (round 2 in
the reverse order, and so on), each trial a fresh set of processes, 1 s of warm-up, then --seconds timed:

- ``off``: no flow synchronisation;
- ``live peer``: A's FlowSync run by the controller's loop (select on its socket with its own timeout,
  on_readable, poll: sweep at its self-regulated interval, flush) in a process on --controller-cpu (default
  1: the forwarding CPU), sending over UDP on the namespace's loopback to a peer B (its own data plane,
  different server ids) in a process on CPU 0 that verifies and inserts into B's kernel table;
- ``peer not reading``: the peer's port is a socket with a 4 KiB receive buffer that is never read (full);
- ``no listener``: the peer's address has nothing bound (the kernel answers ICMP port unreachable).

Printed per condition (medians of the rounds): frames/s forwarded on CPU 1 and the slowdown against that
round's own ``off`` trial (the median of the per-round ratios: the fair pairing on a shared machine), the
forwarder's own CPU per frame (scheduling share taken out: what is left is cache and map contention), the
program's own ns per run (the kernel's BPF_PROG_TEST_RUN duration, preemption excluded), CPU 1's other busy
time, the controller's CPU (schedstat), the rates it published and sent, its sweep interval, and with the
live peer the flows the peer applied per second (the replication rate achieved).
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import os
import random
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from live_helpers import build_c  # noqa: E402

from encapfwd.flowsync import service as FS  # noqa: E402

HERE = Path(__file__).resolve().parent

KEY = os.urandom(32)


def codec(flows: int) -> dict:
    rng = random.Random(1)
    dst = ipaddress.ip_address("10.0.9.1").packed
    entries = [FS.Entry(rng.randbytes(4) + dst + b"\x06" + rng.randbytes(2) + b"\x00\x50",
                        f"10.0.9.1@80@10.0.3.{10 + i % 6}", rng.randrange(1000)) for i in range(flows)]
    receiver = FS.Receiver(KEY)
    started = time.perf_counter()
    datagrams = 0
    got = 0
    queue = collections.deque(entries)  # as the controller sends: one body per datagram, then sealed
    while queue:
        count, body = FS.take_body(queue)
        datagrams += 1
        data = FS.seal(KEY, FS.FLOWS, 1, 2, datagrams, count, body)
        got += len(receiver.accept(data, ("10.0.2.2", 7900))[3])
    took = time.perf_counter() - started
    assert got == flows
    return {"flows": flows, "datagrams": datagrams, "seconds": round(took, 3), "per_second": round(flows / took)}


def two_dispatchers(flows: int) -> dict:

    import test_scaleout_consistency as C
    from encapfwd.flowsync.sweep import KernelTable
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.xdp import maps as M
    from encapfwd.xdp.dataplane import DataPlane

    reg = C.registry()
    sids_b = SidMap()
    compile_plan(C.make_config(C.HOST_B, servers=C.simple_servers(1, extra="10.0.3.200")), reg, sids_b)
    plan_a = compile_plan(C.make_config(C.HOST_A, servers=C.simple_servers(6)), reg, SidMap())
    plan_b = compile_plan(C.make_config(C.HOST_B, servers=C.simple_servers(6), reverse=True), reg, sids_b)
    rng = random.Random(2)
    dst = ipaddress.ip_address(C.VIP1).packed
    sids = [s.sid for s in plan_a.servers]
    now = time.monotonic_ns()
    keys, values = bytearray(), bytearray()
    for i in range(flows):
        keys += M.flow_key(rng.randbytes(4), dst, 6, rng.randbytes(2) + b"\x00\x50")
        values += M.FLOW_VALUE.pack(sids[i % len(sids)], 0, now)
    saved_rate = FS.RATE
    FS.RATE = 10**9
    port = 7990
    try:
        with DataPlane.load(plan_a) as dp_a, DataPlane.load(plan_b) as dp_b:
            dp_a.maps["flows"].update_batch(bytes(keys), bytes(values), flows)
            ta, tb = KernelTable(dp_a.maps["flows"]), KernelTable(dp_b.maps["flows"])
            ex_a = types.SimpleNamespace(syncpeers=(ipaddress.ip_address("127.0.0.2"),), syncport=port, synckey=None)
            ex_b = types.SimpleNamespace(syncpeers=(ipaddress.ip_address("127.0.0.1"),), syncport=port, synckey=None)
            a = FS.FlowSync(ex_a, lambda: plan_a, lambda: ta, key=KEY, bind="127.0.0.1")
            b = FS.FlowSync(ex_b, lambda: plan_b, lambda: tb, key=KEY, bind="127.0.0.2")
            try:
                started = time.perf_counter()
                a.sweep(time.monotonic())
                swept = time.perf_counter() - started
                sender, receiver = swept, 0.0
                deadline = time.monotonic() + 60
                clock = time.perf_counter
                while b.stats["applied"] < flows and time.monotonic() < deadline:
                    t0 = clock()
                    a.flush(time.monotonic())
                    t1 = clock()
                    b.on_readable()
                    sender += t1 - t0
                    receiver += clock() - t1
                took = time.perf_counter() - started
                # B's kernel table, checked by name
                names_a = {s.sid: s.name for s in plan_a.servers}
                names_b = {s.sid: s.name for s in plan_b.servers}
                wrong = 0
                for i in range(0, flows, max(1, flows // 1000)):
                    k = bytes(keys[i * 40:(i + 1) * 40])
                    sid_a = M.FLOW_VALUE.unpack(values[i * 16:(i + 1) * 16])[0]
                    got = tb.get(k)
                    wrong += got is None or names_b[got[0]] != names_a[sid_a]
                out = {"flows": flows, "applied": b.stats["applied"], "seconds": round(took, 3),
                       "per_second": round(b.stats["applied"] / took), "sweep_seconds": round(swept, 3),
                       "sender_seconds": round(sender, 3), "receiver_seconds": round(receiver, 3),
                       "sender_per_second": round(flows / sender), "receiver_per_second": round(flows / receiver),
                       "datagrams": a.stats["sent_datagrams"], "rejected": sum(b.receiver.rejected.values()),
                       "sampled_wrong_server": wrong,
                       "rate_ceiling_per_peer": saved_rate * (FS.MAX_DATAGRAM - FS.HEADER.size - FS.MAC_SIZE) // 19}
            finally:
                a.close()
                b.close()
    finally:
        FS.RATE = saved_rate
    return out


# -- forwarding while replicating (--forwarding) -------------------------------------------------------------
def _netns() -> None:
    """This process (and its children) into a network namespace of its own, loopback up: the bench's
    datagrams never leave it."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _cpu_ns(pid: int) -> int:
    """On-CPU time of *pid* (all its threads), ns (/proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _cpu_busy(cpu: int) -> float:
    """CPU *cpu*'s busy seconds so far (/proc/stat: user + nice + system + irq + softirq + steal, every task)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            f = [int(x) for x in line.split()[1:9]]
            return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _child(cpu: int, body) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.sched_setaffinity(0, {cpu})
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            body()
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _loop(sync, shared, slot) -> None:
    """The controller's loop as far as flow synchronisation goes: wait on the socket with the sync's own
    timeout, read what came, sweep / flush. Its counters go to *shared* at every round."""
    sock = sync.sock
    debug_at = 0.0
    while True:
        now = time.monotonic()
        ready, _, _ = select.select([sock], [], [], sync.timeout_ms(now) / 1000)
        if ready:
            sync.on_readable()
        sync.poll()
        s = sync.stats
        if DEBUG and now >= debug_at:
            debug_at = now + 1
            print(slot, {k: v for k, v in s.items() if v}, dict(sync.receiver.rejected), file=sys.stderr, flush=True)
        COUNTERS.pack_into(shared, slot * COUNTERS.size, s["published"], s["sent_entries"], s["send_errors"],
                           s["applied"], s["queue_dropped"], int(sync.sweep_interval * 1e6))


DEBUG = bool(os.environ.get("FLOWSYNC_BENCH_DEBUG"))
COUNTERS = struct.Struct("<6Q")  # published, sent_entries, send_errors, applied, queue_dropped, sweep µs


def forwarding(rate: int, seconds: float, rounds: int, table: int, controller_cpu: int = 1, port: int = 7990,
               ring: bool = True) -> dict:
    """Forwarding on CPU 1 (the XDP program under BPF_PROG_TEST_RUN, a CPU-bound loop) while new flows
    arrive at *rate*/s in the kernel flow table, with flow synchronisation off, on with a live peer, on with
    a peer that does not read, on with a peer address where nothing listens; rounds interleaved."""
    import mmap

    import test_scaleout_consistency as C
    from encapfwd.flowsync.sweep import mark_of
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.xdp import maps as M
    from encapfwd.xdp.dataplane import DataPlane
    from encapfwd.xdp.libbpf import test_run

    host_a = dict(C.HOST_A, maxflows=table)
    host_b = dict(C.HOST_B, maxflows=table)
    reg = C.registry()
    sids_b = SidMap()
    compile_plan(C.make_config(host_b, servers=C.simple_servers(1, extra="10.0.3.200")), reg, sids_b)
    plan_a = compile_plan(C.make_config(host_a, servers=C.simple_servers(6)), reg, SidMap())
    plan_b = compile_plan(C.make_config(host_b, servers=C.simple_servers(6), reverse=True), reg, sids_b)
    sids = [s.sid for s in plan_a.servers]
    dst = ipaddress.ip_address(C.VIP1).packed
    frames = [C.to_host(host_a, C.frame(f)) for f in C.flows(256, 5, 10, ports=[(C.VIP1, 80, 6)])]
    counters_fd = os.memfd_create("flowsync-bench")  # the children's counters (the placer's too, after exec)
    os.ftruncate(counters_fd, 4096)
    shared = mmap.mmap(counters_fd, 4096)
    FWD, GEN = 1, 0

    placer_dir = tempfile.TemporaryDirectory(prefix="flowsync-bench-")
    placer = build_c(HERE / "flow_placer.c", Path(placer_dir.name) / "flow_placer")
    syn = C.to_host(host_a, C.frame(C.flows(1, 6, 10, ports=[(C.VIP1, 80, 6)])[0], C._SYN)).hex()

    def inject(prog_fd):
        """The data plane's new flows: the program itself on *rate* SYNs/s of random clients
        (bench/flow_placer.c): it writes each flow's entry, and with sync on its ring record."""
        os.set_inheritable(prog_fd, True)
        os.set_inheritable(counters_fd, True)
        os.execv(str(placer), [str(placer), str(prog_fd), str(rate), syn, str(counters_fd)])

    def controller(dp, peer):
        ta = KernelTable(dp.maps["flows"], dp.maps["new_flows"] if ring else None)
        ex = types.SimpleNamespace(syncpeers=(ipaddress.ip_address(peer),), syncport=port, synckey=None)
        _loop(FS.FlowSync(ex, lambda: plan_a, lambda: ta, key=KEY, bind="127.0.0.1"), shared, 0)

    def live_peer(dp):
        tb = KernelTable(dp.maps["flows"])
        ex = types.SimpleNamespace(syncpeers=(ipaddress.ip_address("127.0.0.1"),), syncport=port, synckey=None)
        _loop(FS.FlowSync(ex, lambda: plan_b, lambda: tb, key=KEY, bind="127.0.0.2"), shared, 1)

    from encapfwd.flowsync.sweep import KernelTable

    conditions = ["off", "live peer", "peer not reading", "no listener"]
    trials = {c: [] for c in conditions}
    with DataPlane.load(plan_a) as dp_a, DataPlane.load(plan_b) as dp_b:
        # A's table full to start with, every entry already published (the steady state of a busy table)
        now = time.monotonic_ns()
        rng = random.Random(3)
        keys = b"".join(M.flow_key(rng.randbytes(4), dst, 6, rng.randbytes(2) + b"\x00\x50") for _ in range(table))
        dp_a.maps["flows"].update_batch(keys, b"".join(M.FLOW_VALUE.pack(sids[i % 6], mark_of(now), now)
                                                       for i in range(table)), table)
        verdicts = {test_run(dp_a.prog_fd, f).retval for f in frames}
        assert verdicts == {C.XDP_TX}, f"the program does not forward the bench's frames: verdicts {verdicts}"
        os.sched_setaffinity(0, {FWD})
        for rnd in range(rounds):
            for cond in (conditions if rnd % 2 == 0 else conditions[::-1]):
                shared[:] = bytes(4096)
                pids, slow = {}, None
                dp_a.set_publish(ring and cond != "off")
                pids["injector"] = _child(GEN, lambda: inject(dp_a.prog_fd))
                if cond == "live peer":
                    pids["peer"] = _child(GEN, lambda: live_peer(dp_b))
                elif cond == "peer not reading":
                    slow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    slow.bind(("127.0.0.2", port))
                if cond != "off":
                    peer = "127.0.0.3" if cond == "no listener" else "127.0.0.2"
                    pids["controller"] = _child(controller_cpu, lambda peer=peer: controller(dp_a, peer))
                time.sleep(1.0)  # warm-up: the controller's first sweeps, the peer's socket, the injector's pace
                c0 = {n: _cpu_ns(p) for n, p in pids.items()}
                s0 = [COUNTERS.unpack_from(shared, i * COUNTERS.size) for i in range(4)]
                me0 = _cpu_ns(os.getpid())
                busy0 = _cpu_busy(FWD)
                runs, kernel_ns, i = 0, 0, 0
                t0 = time.perf_counter()
                end = t0 + seconds
                while True:
                    for _ in range(64):
                        r = test_run(dp_a.prog_fd, frames[i & 255])
                        kernel_ns += r.duration
                        i += 1
                    runs += 64
                    if time.perf_counter() >= end:
                        break
                took = time.perf_counter() - t0
                me = _cpu_ns(os.getpid()) - me0
                busy = _cpu_busy(FWD) - busy0
                c1 = {n: _cpu_ns(p) for n, p in pids.items()}
                s1 = [COUNTERS.unpack_from(shared, i * COUNTERS.size) for i in range(4)]
                for p in pids.values():
                    os.kill(p, signal.SIGTERM)
                for p in pids.values():
                    os.waitpid(p, 0)
                if slow is not None:
                    slow.close()
                d = [[b - a for a, b in zip(x, y)] for x, y in zip(s0, s1)]
                trials[cond].append({
                    "forwarded_per_second": runs / took,
                    "kernel_ns_per_frame": kernel_ns / runs,
                    "forwarder_cpu_share": me / 1e9 / took,
                    "forwarder_cpu_ns_per_frame": me / runs,
                    "new_flows_per_second": d[3][0] / took,
                    "published_per_second": d[0][0] / took,
                    "sent_per_second": d[0][1] / took,
                    "send_errors": d[0][2],
                    "queue_dropped": d[0][4],
                    "sweep_interval_s": s1[0][5] / 1e6,
                    "replicated_per_second": d[1][3] / took,
                    "controller_cpu": (c1.get("controller", 0) - c0.get("controller", 0)) / 1e9 / took,
                    "peer_cpu": (c1.get("peer", 0) - c0.get("peer", 0)) / 1e9 / took,
                    "injector_cpu": (c1["injector"] - c0["injector"]) / 1e9 / took,
                    # CPU 1's busy time not spent by the forwarder nor (when it is there) the controller:
                    # softirqs, the kernel's own threads, the machine's other jobs
                    "cpu1_others": (busy - me / 1e9 - (c1.get("controller", 0) - c0.get("controller", 0)) / 1e9
                                    * (controller_cpu == FWD)) / took,
                })
                print(f"  round {rnd + 1} {cond:>16}: {runs / took:,.0f} frames/s, "
                      f"{trials[cond][-1]['controller_cpu']:.0%} controller CPU", file=sys.stderr, flush=True)
    placer_dir.cleanup()
    out = {"ring": ring, "controller_cpu_index": controller_cpu, "rate": rate, "seconds": seconds, "rounds": rounds, "table": table, "trials": trials, "median": {}}
    for cond, ts in trials.items():
        out["median"][cond] = {k: statistics.median(t[k] for t in ts) for k in ts[0]}
    off = out["median"]["off"]["forwarded_per_second"]
    for cond in conditions:
        m = out["median"][cond]
        # per round, against that round's own "off" (interleaved, the fair pairing); the median of those
        m["slowdown_per_round"] = [1 - t["forwarded_per_second"] / o["forwarded_per_second"]
                                   for t, o in zip(trials[cond], trials["off"])]
        m["slowdown"] = statistics.median(m["slowdown_per_round"])
        m["slowdown_of_medians"] = 1 - m["forwarded_per_second"] / off
        # the forwarder's own CPU per frame (scheduling share taken out: cache and map contention only)
        m["cost_per_frame_rise_per_round"] = [t["forwarder_cpu_ns_per_frame"] / o["forwarder_cpu_ns_per_frame"] - 1
                                              for t, o in zip(trials[cond], trials["off"])]
    return out


def print_forwarding(r: dict) -> None:
    placed = r["median"]["off"]["new_flows_per_second"]
    how = ("the program publishes new flows in its ring, the controller sweeps for the rest" if r["ring"]
           else "sweep only (the program's ring unused)")
    print(f"forwarding on CPU 1 (XDP program, BPF_PROG_TEST_RUN loop) while the program places {r['rate']:,} new "
          f"flows/s (achieved {placed:,.0f}/s) on CPU 0 in a {r['table']:,}-entry flow table; {how}; "
          f"{r['rounds']} interleaved rounds of {r['seconds']} s, medians:")
    off = r["median"]["off"]
    for cond, m in r["median"].items():
        per = ", ".join(f"{s:+.1%}" for s in m["slowdown_per_round"])
        line = (f"  sync {cond:>16}: forwarded {m['forwarded_per_second']:,.0f} frames/s "
                f"({1e9 / m['forwarded_per_second']:,.0f} ns of CPU 1 per frame, {m['forwarder_cpu_ns_per_frame']:,.0f} ns of the "
                f"forwarder's own CPU, program {m['kernel_ns_per_frame']:.0f} ns), "
                f"slowdown {m['slowdown']:+.1%} (median of the rounds' {per}; own CPU per frame "
                f"{', '.join(f'{x:+.1%}' for x in m['cost_per_frame_rise_per_round'])}); forwarder {m['forwarder_cpu_share']:.0%} of CPU 1, "
                f"other work on CPU 1 {m['cpu1_others']:.0%}")
        if cond != "off":
            line += (f"; controller CPU {m['controller_cpu']:.0%} of CPU {r['controller_cpu_index']} "
                     f"({m['controller_cpu'] * 1e9 / max(1, m['published_per_second']):,.0f} ns per published flow), "
                     f"published {m['published_per_second']:,.0f}/s, sent {m['sent_per_second']:,.0f}/s, "
                     f"send errors {m['send_errors']:,.0f}, queue dropped {m['queue_dropped']:,.0f}, sweep every "
                     f"{m['sweep_interval_s']:.2f} s")
        if cond == "live peer":
            line += f"; replicated (applied by the peer, CPU 0) {m['replicated_per_second']:,.0f} flows/s, peer CPU {m['peer_cpu']:.0%}"
        print(line)
    print(f"  new flows written {off['new_flows_per_second']:,.0f}/s (injector on CPU 0: {off['injector_cpu']:.0%})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--forwarding", action="store_true",
                        help="forwarding rate on CPU 1 with sync off / on (live, non-reading, absent peer)")
    parser.add_argument("--rate", type=int, default=100_000, help="--forwarding: new flows/s (default 100,000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="--forwarding: seconds per trial")
    parser.add_argument("--rounds", type=int, default=3, help="--forwarding: interleaved rounds")
    parser.add_argument("--controller-cpu", type=int, default=1, choices=(0, 1),
                        help="--forwarding: the controller's CPU (1: the forwarding CPU, the default; 0: the other)")
    parser.add_argument("--table", type=int, default=131_072, help="--forwarding: the flow table's size")
    parser.add_argument("--no-ring", action="store_true",
                        help="--forwarding: the program does not publish new flows in its ring; the controller "
                             "finds them by sweeping the table only (the way before the ring)")
    args = parser.parse_args()
    if os.geteuid() == 0:
        _netns()  # the loopback datagrams stay in a namespace of the bench's own
    if args.forwarding:
        from encapfwd.xdp.libbpf import available

        ok, why = available() if os.geteuid() == 0 else (False, "not root")
        if not ok:
            print(f"--forwarding: skipped ({why})")
            return 1
        r = forwarding(args.rate, args.seconds, args.rounds, args.table, args.controller_cpu, ring=not args.no_ring)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print_forwarding(r)
        return 0
    result = {"codec": codec(args.flows)}
    from encapfwd.xdp.libbpf import available

    ok, why = available() if os.geteuid() == 0 else (False, "not root")
    result["two_dispatchers"] = two_dispatchers(args.flows) if ok else {"skipped": why}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    c = result["codec"]
    print(f"codec: {c['flows']:,} entries in {c['datagrams']:,} datagrams: {c['seconds']} s, "
          f"{c['per_second']:,} entries/s (encode + HMAC + verify + decode)")
    t = result["two_dispatchers"]
    if "skipped" in t:
        print(f"two dispatchers: skipped ({t['skipped']})")
    else:
        print(f"two dispatchers: {t['applied']:,} of {t['flows']:,} new flows replicated in {t['seconds']} s = "
              f"{t['per_second']:,} flows/s with both ends on one CPU; per end: sender {t['sender_per_second']:,}/s "
              f"(sweep, batch, HMAC, send), receiver {t['receiver_per_second']:,}/s (verify, decode, insert) (sweep {t['sweep_seconds']} s, {t['datagrams']:,} datagrams, "
              f"{t['rejected']} rejected, {t['sampled_wrong_server']} sampled on a wrong server); rate limit "
              f"ceiling {t['rate_ceiling_per_peer']:,} IPv4 entries/s per peer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
