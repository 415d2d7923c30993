"""SYN flood through the real dispatcher: the flow table stays at its bound, memory stays flat.

    .venv/bin/python bench/flood.py                     # 10 million distinct SYNs, maxflows 1,000,000
    .venv/bin/python bench/flood.py --syns 2000000 --maxflows 100000 --algorithm wlc

Frames are Ethernet/IPv4/TCP SYNs to one VIP:80 from distinct (client address, port) pairs, built from a
template (IP header checksum updated per frame); MAC forwarding to 10 servers. Prints the rate, the flow
table's size and evictions, the per-server shares and the process's peak RSS (VmHWM) every --every frames.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time


def rss(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syns", type=int, default=10_000_000)
    parser.add_argument("--maxflows", type=int, default=1_000_000)
    parser.add_argument("--algorithm", default="maglev")
    parser.add_argument("--servers", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1_000_000, help="simulated SYNs per second of `now`")
    parser.add_argument("--every", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import encapfwd_mac
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.model import Cluster, Config, Executor, Port, Server
    from encapfwd.plugins import get_plugin_manager

    servers = [Server(address=f"10.0.2.{10 + i}", mac=f"02:00:00:00:01:{10 + i:02x}", weight=1 + i % 5)
               for i in range(args.servers)]
    config = Config(
        executor=Executor(mac="02:00:00:00:00:01", networks=["10.0.2.0/24"], maxflows=args.maxflows),
        clusters=[Cluster(address="10.0.9.9", ports=[Port(number=80, selectionalgorithm=args.algorithm,
                                                          servers=servers)])],
    )
    d = Dispatcher(config, get_plugin_manager(load_entrypoints=False, plugins=[encapfwd_mac]))

    eth = bytes.fromhex("020000000001" "0200000000fe" "0800")
    # IPv4 header: version/IHL, TOS, total length 40, id, DF, TTL 64, TCP, checksum, src, dst 10.0.9.9
    head = struct.pack("!BBHHHBB", 0x45, 0, 40, 1, 0x4000, 64, 6)
    dst = bytes((10, 0, 9, 9))
    fixed = sum(struct.unpack("!5H", head)) + 0x0A00 + 0x0909
    tcp_tail = struct.pack("!HIIBBHHH", 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    pack_h = struct.Struct("!H").pack

    rss_before = rss("VmRSS")
    start = time.perf_counter()
    lines = []
    process = d.process
    for i in range(args.syns):
        hi = 0x0B00 | ((i >> 30) & 0xFF)
        lo = (i >> 14) & 0xFFFF
        total = fixed + hi + lo
        total = (total & 0xFFFF) + (total >> 16)
        total = (total & 0xFFFF) + (total >> 16)
        frame = (eth + head + pack_h(~total & 0xFFFF) + pack_h(hi) + pack_h(lo) + dst
                 + pack_h(1024 + (i & 0x3FFF)) + tcp_tail)
        process(frame, i / args.rate)
        if (i + 1) % args.every == 0 or i + 1 == args.syns:
            flows = d.scheduler.stats()
            elapsed = time.perf_counter() - start
            line = (f"{i + 1:>11,} SYNs  {elapsed:6.1f} s  {(i + 1) / elapsed:9,.0f} frames/s  "
                    f"table {flows['flows']:>9,} / {flows['maxflows']:,}  "
                    f"evictions {flows['evictions']:>10,}  "
                    f"RSS {rss('VmRSS'):5.0f} MiB  peak {rss('VmHWM'):5.0f} MiB")
            lines.append(line)
            if not args.json:
                print(line, flush=True)
    elapsed = time.perf_counter() - start
    report = d.report()
    report["flows"].pop("connections", None)
    result = {
        "syns": args.syns,
        "seconds": elapsed,
        "frames_per_s": args.syns / elapsed,
        "us_per_frame": elapsed / args.syns * 1e6,
        "forwarded": report["forwarded"],
        "drops": report["drops"],
        "flows": report["flows"],
        "shares": {name: round(s["packets"] / max(report["forwarded"], 1), 4)
                   for name, s in report["servers"].items()},
        "rss_before_mib": rss_before,
        "peak_rss_mib": rss("VmHWM"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"forwarded {result['forwarded']:,}, drops {result['drops']}, "
              f"{result['us_per_frame']:.2f} us/frame (frame building included)")
        print("shares: " + "  ".join(f"{k.split('@')[-1]} {v:.4f}" for k, v in result["shares"].items()))
        print(f"peak RSS {result['peak_rss_mib']:.0f} MiB (before the flood {rss_before:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
