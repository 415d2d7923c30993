"""Server selection benchmark: Maglev table build, per-packet pick cost, memory under a SYN flood.

    .venv/bin/python bench/selection.py                 # everything (the flood: 10 million SYN keys)
    .venv/bin/python bench/selection.py --flood 1000000 # a shorter flood
    .venv/bin/python bench/selection.py --json          # one JSON object instead of text

Figures are wall-clock on a shared machine: each is the best of --repeat runs (noise only adds time).
``measure()`` returns the per-packet figures as a dict, for the data-path benchmark to print alongside.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time


def _config(n_servers=10, algorithm="maglev", maxflows=1_000_000, stickytime=0):
    from encapfwd.model import Cluster, Config, Executor, Port, Server

    servers = [Server(address=str(ipaddress.ip_address(0x0A000200 + 10 + i)), weight=1 + i % 5)
               for i in range(n_servers)]
    port = Port(number=80, selectionalgorithm=algorithm, stickytime=stickytime, servers=servers)
    return Config(executor=Executor(maxflows=maxflows),
                  clusters=[Cluster(address="10.0.9.9", ports=[port])])


def _registry():
    from encapfwd.plugins import get_plugin_manager

    return get_plugin_manager(load_entrypoints=False)


def _keys(n, seed=1):
    rnd = random.Random(seed)
    vip = bytes((10, 0, 9, 9))
    return [rnd.randbytes(4) + vip + b"\x06" + rnd.randrange(1024, 65536).to_bytes(2, "big") + b"\x00\x50"
            for _ in range(n)]


def bench_build(repeat: int) -> dict:
    from encapfwd.selection.maglev import DEFAULT_SIZE, build_table, permutation

    servers = [ipaddress.ip_address(0x0A000000 + i) for i in range(1000)]
    permutation(b"warm-up")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        build_table(servers)
        times.append(time.perf_counter() - start)
    weighted = []
    for _ in range(repeat):
        start = time.perf_counter()
        build_table(servers, [1 + i % 5 for i in range(1000)])
        weighted.append(time.perf_counter() - start)
    return {"servers": 1000, "slots": DEFAULT_SIZE, "build_s": min(times),
            "build_s_median": sorted(times)[len(times) // 2], "build_weighted_s": min(weighted)}


def _per_packet(pick, keys, flags, now, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for k in keys:
            pick(k, k, flags, now)
        best = min(best, time.perf_counter() - start)
    return best / len(keys)


def _loop_overhead(keys, repeat):
    def nop(key, client, flags, now):
        return 0

    return _per_packet(nop, keys, 0x10, 1.0, repeat)


def measure(n_keys: int = 200_000, repeat: int = 5) -> dict:
    """Per-packet pick cost in ns (the empty loop's cost subtracted; it is printed too)."""
    from encapfwd.selection.scheduler import Scheduler

    reg = _registry()
    keys = _keys(n_keys)
    out = {"loop_ns": _loop_overhead(keys, repeat) * 1e9}

    def net(seconds):
        return max(seconds * 1e9 - out["loop_ns"], 0.0)

    # without the flow table: hash + Maglev lookup
    s = Scheduler(reg, 0)
    s.configure(_config())
    out["maglev_stateless_ns"] = net(_per_packet(s.picker(ipaddress.ip_address("10.0.9.9"), 80), keys,
                                                 0x10, 1.0, repeat))
    for algorithm in ("maglev", "wrr", "wlc"):
        # new flows (SYN) into an empty table, then the same flows established (ACK, same second)
        best_new = float("inf")
        for _ in range(max(2, repeat // 2)):
            s = Scheduler(reg, 1_000_000)
            s.configure(_config(algorithm=algorithm))
            pick = s.picker(ipaddress.ip_address("10.0.9.9"), 80)
            best_new = min(best_new, _per_packet(pick, keys, 0x02, 1.0, 1))
        out[f"{algorithm}_new_flow_ns"] = net(best_new)
        out[f"{algorithm}_established_ns"] = net(_per_packet(pick, keys, 0x10, 1.5, repeat))
    # established, few flows (the table stays in the CPU caches)
    hot = keys[:1000] * (len(keys) // 1000)
    s = Scheduler(reg, 1_000_000)
    s.configure(_config())
    pick = s.picker(ipaddress.ip_address("10.0.9.9"), 80)
    for k in keys[:1000]:
        pick(k, k, 0x02, 1.0)
    out["maglev_established_hot_ns"] = net(_per_packet(pick, hot, 0x10, 1.5, repeat))
    # new flows into a full table (every SYN evicts the least recently used)
    s = Scheduler(reg, 10_000)
    s.configure(_config())
    pick = s.picker(ipaddress.ip_address("10.0.9.9"), 80)
    for k in _keys(10_000, seed=2):
        pick(k, k, 0x02, 1.0)
    out["maglev_new_flow_full_table_ns"] = net(_per_packet(pick, keys, 0x02, 2.0, 1))
    # affinity (stickytime): established flow + affinity record
    s = Scheduler(reg, 1_000_000)
    s.configure(_config(stickytime=60))
    pick = s.picker(ipaddress.ip_address("10.0.9.9"), 80)
    sticky = [(k, k[:4]) for k in keys]
    for k, c in sticky:
        pick(k, c, 0x02, 1.0)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for k, c in sticky:
            pick(k, c, 0x10, 1.5)
        best = min(best, time.perf_counter() - start)
    out["maglev_sticky_established_ns"] = net(best / len(keys))
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's peak on Linux,
    which carries it across fork+exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def flood_child(n: int, maxflows: int) -> dict:
    """Push *n* distinct SYN keys through one Scheduler; report table size and peak RSS."""
    from encapfwd.selection.scheduler import Scheduler

    rss_start = peak_rss_mib()
    s = Scheduler(_registry(), maxflows)
    s.configure(_config(maxflows=maxflows))
    pick = s.picker(ipaddress.ip_address("10.0.9.9"), 80)
    vip_proto = bytes((10, 0, 9, 9, 6))
    pack = struct.Struct("!I").pack
    tail = b"\x00\x50"
    start = time.perf_counter()
    max_entries = 0
    step = 1_000_000
    for base in range(0, n, step):
        now = base / 1_000_000  # a million new flows a second (no flow idles out: staletimeout 300)
        for i in range(base, min(n, base + step)):
            # distinct keys: client address and port from the counter
            k = pack(0xC0000000 | (i >> 14)) + vip_proto + pack((0x400 + (i & 0x3FFF)) << 16)[:2] + tail
            pick(k, k, 0x02, now)
        max_entries = max(max_entries, len(s.table.entries))
    elapsed = time.perf_counter() - start
    stats = s.stats()
    stats.pop("connections")
    return {"syn_keys": n, "seconds": elapsed, "ns_per_syn": elapsed / n * 1e9, "stats": stats,
            "max_entries_seen": max_entries,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss_start, "rss_end_mib": rss_mib()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keys", type=int, default=200_000, help="distinct flows for the per-packet loops")
    parser.add_argument("--flood", type=int, default=10_000_000,
                        help="SYN keys for the memory test (0: skip)")
    parser.add_argument("--maxflows", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--flood-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.flood_child:
        print(json.dumps(flood_child(*args.flood_child)))
        return 0

    result = {"python": sys.version.split()[0], "build": bench_build(args.repeat),
              "per_packet": measure(args.keys, args.repeat)}
    if args.flood:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--flood-child", str(args.flood),
                               str(args.maxflows)], capture_output=True, text=True, check=True)
        result["flood"] = json.loads(proc.stdout)

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    b = result["build"]
    print(f"Python {result['python']}")
    print(f"maglev build, {b['servers']} servers x {b['slots']} slots: {b['build_s'] * 1000:.1f} ms best "
          f"({b['build_s_median'] * 1000:.1f} ms median; weights 1..5: {b['build_weighted_s'] * 1000:.1f} ms)"
          f"  target < 200 ms")
    p = result["per_packet"]
    print(f"per-packet pick (net of the {p['loop_ns']:.0f} ns loop+call baseline; best of {args.repeat}):")
    rows = [("maglev, no flow table (hash + table)", "maglev_stateless_ns"),
            ("maglev, flow table, established, 1,000 flows", "maglev_established_hot_ns")]
    for algorithm in ("maglev", "wrr", "wlc"):
        rows.append((f"{algorithm}, flow table, established, {args.keys:,} flows",
                     f"{algorithm}_established_ns"))
        rows.append((f"{algorithm}, flow table, new flow (SYN)", f"{algorithm}_new_flow_ns"))
    rows.append(("maglev, new flow into a full table (evicts)", "maglev_new_flow_full_table_ns"))
    rows.append(("maglev + stickytime, established flow", "maglev_sticky_established_ns"))
    for label, name in rows:
        ns = p[name]
        gross = ns + p["loop_ns"]
        print(f"  {label:<48} {ns:7.0f} ns  ({1e9 / gross / 1e6:5.2f} M picks/s incl. call)")
    if "flood" in result:
        f = result["flood"]
        st = f["stats"]
        print(f"flood: {f['syn_keys']:,} distinct SYN keys through the Scheduler "
              f"(maxflows {st['maxflows']:,}) "
              f"in {f['seconds']:.1f} s ({f['ns_per_syn']:.0f} ns each)")
        print(f"  table: {st['flows']:,} flows (max seen {f['max_entries_seen']:,}), "
              f"{st['evictions']:,} evictions; peak RSS {f['peak_rss_mib']:.0f} MiB "
              f"(at the end {f['rss_end_mib']:.0f} MiB; before the flood {f['rss_before_mib']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
