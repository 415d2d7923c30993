#!/usr/bin/env python3
"""Program-only cost of the kernel data plane, per method and program (XDP and TC), without live traffic.

    sudo .venv/bin/python bench/program_cost.py                     # every method, both programs
    sudo .venv/bin/python bench/program_cost.py --runs 50000 --rounds 5 --methods mac,ipip
    sudo .venv/bin/python bench/program_cost.py --source /tmp/variant   # an edited copy of the sources

Loads the real program (``DataPlane.load`` / ``TCDataPlane.load``) with the differential test's plan
(``tests/xdp_support.make_config``: one cluster per method, TCP 80 and UDP 53, five maglev servers each;
newflowlimit 0), pins this process to one CPU and runs BPF_PROG_TEST_RUN with repeat=1 (repeat > 1 would
rerun the program on the frame it already rewrote) over many frames:

- **est**: established flows. ``--flows`` flows (half TCP to port 80, half UDP to 53), each opened first (a
  SYN, or a first UDP datagram), then ``--runs`` frames round robin over them (TCP with ACK set): a flow
  table hit, the template, the counters; the common case on a live dispatcher.
- **new**: a new flow per frame (UDP, and TCP SYNs, from fresh source ports and addresses): flow table miss,
  the selection hash (crc32 of the flow key, as the Python dispatcher computes it), the table slot, a new LRU
  entry. The entries are deleted after each round, so that every round starts from the same table (once a
  CPU's share of the LRU table is full, each new entry evicts one: a different, higher cost).
- **warm** (MAC methods only): one established flow's frame run ``--repeat`` times in one test run, with the
  dispatcher's MAC check turned off meanwhile (the forwarded frame carries the server's MAC and TTL - 1; with
  the check off and TTL 255 the program forwards it again each time): back to back, warm caches, closer to a
  NAPI loop than est, where the system call between frames cools the caches (est is 60-100 ns above warm).

Frames are 64 bytes (Ethernet + IPv4 + UDP/TCP + payload; IPv6 for mac6), TTL 64, DF set, valid checksum.
Each (program, method, case) prints, as the median over ``--rounds`` rounds:

- **prog ns**: ``run_time_ns / run_cnt`` from ``kernel.bpf_stats_enabled=1`` (restored after): what issue
  #21 measures. The statistics themselves add a clock read on each side of the run (part of the figure:
  an empty program measures 46-74 ns on the 2-vCPU VM, where sched_clock is kvm-clock).
- **test-run ns**: the mean of BPF_PROG_TEST_RUN's own ``duration`` (ns of one run measured by the kernel
  around the program; for repeat=1 it includes one clock read and the loop's own overhead).
- the verdict the program gave (all frames must get the forwarding verdict: XDP_TX / TC_ACT_REDIRECT).

No timed assertions: it prints figures. Root, clang, libbpf. With ``--define NAME[=VALUE]`` (repeatable)
both programs are built with the extra define; with ``--source DIR`` from an edited copy of
``core/src/encapfwd/xdp/`` (ablation: a copy without the checksum, the template copy, a lookup … shows what
that part costs; such a copy forwards wrong bytes, only its time means something).
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import random
import statistics
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the differential test's plan (xdp_support)

from live_helpers import bpf_stats, prog_info  # noqa: E402 - bench/ beside this file
from xdp_support import one_cpu  # noqa: E402

from encapfwd.datapath.packet import checksum  # noqa: E402

XDP_TX, TC_ACT_REDIRECT = 3, 7
FRAME_LEN = 64


def frame(vip: str, src: bytes, sport: int, proto: int, flags: int = 0x10) -> bytes:
    """A 64-byte Ethernet frame from *src*:*sport* to *vip* (TCP 80 with *flags*, or UDP 53)."""
    import xdp_support as X

    dport = 80 if proto == 6 else 53
    six = ":" in vip
    head = 14 + (40 if six else 20)
    l4len = 20 if proto == 6 else 8
    payload = bytes(max(0, FRAME_LEN - head - l4len))
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 0x50, flags, 65535, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    dst = ipaddress.ip_address(vip).packed
    if six:
        header = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst)
        return X.DISPATCHER_MAC_B + X.CLIENT_MAC + b"\x86\xdd" + header + l4
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, src, dst)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return X.DISPATCHER_MAC_B + X.CLIENT_MAC + b"\x08\x00" + header + l4


def client_address(rng: random.Random, six: bool) -> bytes:
    if six:
        return b"\xfd\x00\x00\x07" + rng.randbytes(12)
    return bytes((rng.choice((172, 192, 198)), rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)))


class Runner:
    """BPF_PROG_TEST_RUN with buffers prepared once per frame (no output copied back: the verdict only)."""

    def __init__(self, prog_fd: int):
        from encapfwd.xdp import libbpf as L

        self.L, self.fd, self.lib = L, prog_fd, L._lib()
        self.opts = L._opts(L._TestRunOpts)

    def prepare(self, frames):
        return [(self.L._buffer(f), len(f)) for f in frames]

    def repeat(self, frame_bytes: bytes, repeat: int):
        """One test run of *frame_bytes* repeated *repeat* times: (the kernel's mean ns per run, verdict)."""
        buf = self.L._buffer(frame_bytes)
        opts = self.opts
        opts.data_in, opts.data_size_in = ctypes.cast(buf, ctypes.c_void_p), len(frame_bytes)
        opts.data_out, opts.data_size_out = None, 0
        opts.repeat = repeat
        if self.lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"test run failed: {os.strerror(err)}")
        return opts.duration, opts.retval

    def run(self, prepared):
        """Run every prepared frame once; returns (sum of durations, verdict counts)."""
        opts, lib, fd = self.opts, self.lib, self.fd
        run = lib.bpf_prog_test_run_opts
        ref = ctypes.byref(opts)
        total, verdicts = 0, {}
        for buf, n in prepared:
            opts.data_in, opts.data_size_in = ctypes.cast(buf, ctypes.c_void_p), n
            opts.data_out, opts.data_size_out = None, 0
            opts.repeat = 1
            if run(fd, ref) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"test run failed: {os.strerror(err)}")
            total += opts.duration
            verdicts[opts.retval] = verdicts.get(opts.retval, 0) + 1
        return total, verdicts


def prog_stats(prog_fd: int):
    """``(run_time_ns, run_cnt, xlated bytes, jited bytes)`` of the program (bpftool)."""
    from encapfwd.xdp.libbpf import prog_id

    info = prog_info(prog_id(prog_fd))
    return (info.get("run_time_ns", 0), info.get("run_cnt", 0), info.get("bytes_xlated"),
            info.get("bytes_jited"))


def load(kind: str, plan, defines, folder=None):
    """The XDP or TC data plane for *plan*, built with the extra *defines* (from the sources in *folder*, a
    copy of encapfwd/xdp/, if given)."""
    from encapfwd.xdp import maps as M
    from encapfwd.xdp import tc
    from encapfwd.xdp.build import build
    from encapfwd.xdp.dataplane import DataPlane
    from encapfwd.xdp.libbpf import possible_cpus

    base = DataPlane if kind == "xdp" else tc.TCDataPlane
    source = "encapfwd.bpf.c" if kind == "xdp" else tc.SOURCE
    if folder:
        source = str(Path(folder).resolve() / source)
    wanted = {"MAX_SERVERS": M.MAX_SERVERS, "MAX_PORTS": M.MAX_PORTS, "NCPUS": possible_cpus(), **defines}

    class Variant(base):
        @staticmethod
        def object_path():
            return build(source, wanted)

    return Variant.load(plan)


def measure(kind, method, case, dp, runner, rng, args):
    """One round: (prog ns, test-run ns, verdicts)."""
    import xdp_support as X

    vip = X.METHODS[method][0]
    six = ":" in vip
    if case == "warm":
        return measure_warm(method, dp, runner, rng, args)
    if case == "est":
        flows = [(client_address(rng, six), rng.randrange(1024, 65536), 6 if i % 2 == 0 else 17)
                 for i in range(args.flows)]
        opening = runner.prepare([frame(vip, s, p, proto, 0x02) for s, p, proto in flows])
        runner.run(opening)
        pool = [frame(vip, s, p, proto, 0x10) for s, p, proto in flows]
        frames = [pool[i % len(pool)] for i in range(args.runs)]
    else:
        frames = [frame(vip, client_address(rng, six), rng.randrange(1024, 65536), 6 if i % 2 == 0 else 17,
                        0x02) for i in range(args.runs)]
    prepared = runner.prepare(frames)
    with bpf_stats():
        t0, c0, *_ = prog_stats(dp.prog_fd)
        duration, verdicts = runner.run(prepared)
        t1, c1, *_ = prog_stats(dp.prog_fd)
    if case == "new":
        forget(dp, frames)  # every round (and method) starts from the same flow table: no evictions
    runs = c1 - c0
    return (t1 - t0) / runs if runs else float("nan"), duration / len(prepared), verdicts


def forget(dp, frames):
    """Delete the flow entries *frames* made (a full LRU table would make new flows evict: another cost)."""
    from encapfwd.xdp import maps as M

    flows = dp.maps["flows"]
    for f in frames:
        if f[12:14] == b"\x86\xdd":
            key = M.flow_key(f[22:38], f[38:54], f[20], f[54:58])
        else:
            key = M.flow_key(f[26:30], f[30:34], f[23], f[34:38])
        flows.delete(key)


def measure_warm(method, dp, runner, rng, args):
    """MAC forwarding only: one established flow's frame run --repeat times in one test run, with the
    dispatcher's MAC check off (the program leaves the frame with the server's MAC, TTL - 1: with the check
    off and TTL 255, each repeat forwards it again), so the program runs back to back with warm caches and
    branch predictors, closer to a NAPI loop than one test run per frame."""
    import xdp_support as X
    from encapfwd.xdp import maps as M

    if X.METHODS[method][1].split()[1] != "no":
        return float("nan"), float("nan"), {}
    vip = X.METHODS[method][0]
    six = ":" in vip
    f = frame(vip, client_address(rng, six), rng.randrange(1024, 65536), 17)
    ttl = 21 if six else 22
    f = f[:ttl] + b"\xff" + f[ttl + 1:]
    if not six:
        f = f[:24] + b"\0\0" + f[26:]
        f = f[:24] + struct.pack("!H", checksum(f[14:34])) + f[26:]
    host = dp.maps["host"]
    saved = host.lookup(dp.gen)
    host.update(dp.gen, M.HOST_ENTRY.pack(bytes(6), 0))
    try:
        runner.run(runner.prepare([f]))  # the flow's first frame: a flow entry
        repeat = min(args.repeat, 250)
        with bpf_stats():
            t0, c0, *_ = prog_stats(dp.prog_fd)
            durations, verdicts = [], {}
            for _ in range(max(1, args.runs // repeat)):
                d, v = runner.repeat(f, repeat)
                durations.append(d)
                verdicts[v] = verdicts.get(v, 0) + repeat
            t1, c1, *_ = prog_stats(dp.prog_fd)
    finally:
        host.update(dp.gen, saved)
    runs = c1 - c0
    return (t1 - t0) / runs if runs else float("nan"), statistics.mean(durations), verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20000, help="test runs per round, method and case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flows", type=int, default=256, help="established flows (round robin)")
    parser.add_argument("--methods", default="mac,ipip,gre,gre-key,gue,mac6")
    parser.add_argument("--programs", default="xdp,tc")
    parser.add_argument("--cases", default="est,new,warm",
                        help="est: established flows, new: a new flow per frame, warm: MAC methods only, one "
                             "frame --repeat times per test run (see measure_warm)")
    parser.add_argument("--repeat", type=int, default=200, help="runs per test run of the warm case (<= 250)")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to run on (default: the last one)")
    parser.add_argument("--define", action="append", default=[], metavar="NAME[=VALUE]",
                        help="build both programs with -DNAME[=VALUE] as well (a variant, for ablation)")
    parser.add_argument("--source", default=None, metavar="DIR",
                        help="build DIR/encapfwd.bpf.c and DIR/encapfwd_tc.bpf.c (a copy of encapfwd/xdp/ "
                             "with its headers, edited: a variant) instead of the shipped sources")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/program_cost.py needs root (BPF, kernel.bpf_stats_enabled)", file=sys.stderr)
        return 1
    import attrs
    import xdp_support as X
    from encapfwd.plan import SidMap, compile_plan

    defines = {}
    for d in args.define:
        name, _, value = d.partition("=")
        defines[name] = value or None
    methods = [m for m in args.methods.split(",") if m]
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    config = X.make_config()
    config = attrs.evolve(config, executor=attrs.evolve(config.executor, newflowlimit=0))
    registry = X.registry_with_gue()
    plan = compile_plan(config, registry, SidMap())
    with open("/proc/loadavg") as f:
        load_avg = " ".join(f.read().split()[:3])
    print(f"Program-only cost, BPF_PROG_TEST_RUN repeat=1, {args.runs:,} runs x {args.rounds} rounds per "
          "case, "
          f"{FRAME_LEN}-byte frames, {args.flows} established flows; CPU {cpu}, kernel {os.uname().release}, "
          f"load average {load_avg}" + (f"; defines {defines}" if defines else "")
          + (f"; sources from {args.source}" if args.source else ""), flush=True)
    results = {}
    with one_cpu(cpu):
        for kind in [p for p in args.programs.split(",") if p]:
            dp = load(kind, plan, defines, args.source)
            try:
                _, _, xlated, jited = prog_stats(dp.prog_fd)
                print(f"\n{kind}: {xlated} bytes xlated, {jited} bytes jited")
                print(f"   {'method':<8} {'case':<4} {'prog ns (median; rounds)':<34} {'test-run ns':>11}  "
                      "verdicts")
                runner = Runner(dp.prog_fd)
                forward = XDP_TX if kind == "xdp" else TC_ACT_REDIRECT
                for method in methods:
                    for case in [c for c in args.cases.split(",") if c]:
                        if case == "warm" and X.METHODS[method][1].split()[1] != "no":
                            continue  # an encapsulated frame cannot be forwarded again: MAC methods only
                        rng = random.Random(f"{method}-{case}")
                        rows = [measure(kind, method, case, dp, runner, rng, args)
                                for _ in range(args.rounds)]
                        prog = [r[0] for r in rows]
                        dur = [r[1] for r in rows]
                        verdicts = {}
                        for r in rows:
                            for v, n in r[2].items():
                                verdicts[v] = verdicts.get(v, 0) + n
                        note = "" if set(verdicts) == {forward} else f"  NOT ALL FORWARDED: {verdicts}"
                        rounds = ", ".join(f"{p:.0f}" for p in prog)
                        print(f"   {method:<8} {case:<4} {statistics.median(prog):6.1f} ({rounds})"
                              f"{'':<{max(0, 25 - len(rounds))}} {statistics.median(dur):11.1f}  "
                              f"{sum(verdicts.values()):,} fwd{note}", flush=True)
                        results.setdefault(kind, {}).setdefault(method, {})[case] = {
                            "prog_ns": statistics.median(prog), "prog_ns_rounds": prog,
                            "test_run_ns": statistics.median(dur), "verdicts": verdicts}
                results.setdefault(kind, {})["_size"] = {"xlated": xlated, "jited": jited}
            finally:
                dp.close()
    if args.json:
        print(json.dumps({"defines": defines, "cpu": cpu, "load": load_avg, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
