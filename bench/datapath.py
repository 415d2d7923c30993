#!/usr/bin/env python3
"""Data-path benchmark: packets/s per forwarding method, against a naive scapy implementation.

    .venv/bin/python bench/datapath.py [--seconds 1.0]

Every method is a template (``encapfwd_build_template``): mac, ipip, gre (with a key) and the GUE example
(docs/examples/encapfwd-gue: UDP, flow entropy). For each method and frame size (64 and 1400 bytes) it
prints the template (header bytes, fields) and Mpps for (a) the template's Python transform alone
(``encapfwd.datapath.templates.template_transform``, as ``resolve`` gives it), (b) the whole ``Dispatcher.process``
(classify, select, TTL, transform), (c) a naive scapy implementation of the same encapsulation, and the
ratio (a)/(c) — TCP frames with DF set, then the same with DF clear (tunnels then take a fresh IP
identification per packet); then replay throughput end to end (pcap in -> pcap out). Single-threaded: the
figures are per core. Targets: >= 2 Mpps for 64-byte frames on the transform, >= 1000x naive scapy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.datapath.templates import resolve
from encapfwd.replay.capture import PcapWriter, replay
from encapfwd.model import Cluster, Config, Executor, Port, Server
from encapfwd.plan import compile_plan
from encapfwd.plugins import get_plugin_manager

GUE_SRC = Path(__file__).resolve().parents[1] / "docs" / "examples" / "encapfwd-gue" / "src"

ME = "02:00:00:00:00:01"
GW = "02:00:00:00:00:fe"
VIP = "10.0.9.9"
SERVERS = {
    "mac": Server(address="10.0.2.10", mac="02:00:00:00:00:10"),
    "ipip": Server(address="10.0.3.10", encapforward=True, encaptype="ipip"),
    "gre": Server(address="10.0.4.10", encapforward=True, encaptype="gre", grekey=1234),
    "gue": Server(address="10.0.5.10", encapforward=True, encaptype="gue"),
}
GUE_PORT = 6080


def registry_of():
    """The project's three forwarders and the GUE example, hermetically (no other installed plugin)."""
    if str(GUE_SRC) not in sys.path:
        sys.path.insert(0, str(GUE_SRC))
    import encapfwd_gre
    import encapfwd_gue
    import encapfwd_ipip
    import encapfwd_mac

    return get_plugin_manager(load_entrypoints=False,
                              plugins=[encapfwd_mac, encapfwd_ipip, encapfwd_gre, encapfwd_gue])


def config(method: str) -> Config:
    return Config(
        executor=Executor(nfa="10.0.2.1", mac=ME, networks=["10.0.2.0/24"], gatewaymac=GW),
        clusters=[Cluster(address=VIP, ports=[Port(number=80, servers=[SERVERS[method]])])],
    )


def frames(size: int, count: int = 256, df: bool = True):
    """*count* different client frames of *size* bytes (Ethernet included), TCP to VIP:80.

    DF is set by default, as TCP stacks doing path-MTU discovery send it; ``df=False`` measures the
    identification-counter path of the tunnels.
    """
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    out = []
    for i in range(count):
        pkt = Ether(src="02:00:00:00:00:aa", dst=ME) / IP(src=f"198.51.{i // 250}.{i % 250 + 1}", dst=VIP,
                                                           ttl=64, flags="DF" if df else 0) / TCP(
            sport=10000 + i, dport=80, flags="A")
        pad = size - len(pkt)
        out.append(bytes(pkt / Raw(b"\x00" * max(pad, 0))))
    return out


def rate(fn, items, seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for item in items:
            fn(item)
        n += len(items)
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def naive_scapy(method: str):
    """The transform as one would write it with scapy: dissect, decrement, rebuild."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import GRE, Ether
    from scapy.packet import Raw

    server = SERVERS[method]

    def transform(frame: bytes) -> bytes:
        inner = Ether(frame)[IP]
        inner.ttl -= 1
        del inner.chksum
        if method == "mac":
            return bytes(Ether(src=ME, dst=server.mac) / inner)
        outer = IP(src="10.0.2.1", dst=str(server.address), tos=inner.tos, flags=inner.flags & 2, ttl=64)
        if method == "ipip":
            return bytes(Ether(src=ME, dst=GW) / outer / inner)
        if method == "gue":
            sport = 0xC000 | (zlib.crc32(bytes(inner)[12:20]) & 0x3FFF)
            return bytes(Ether(src=ME, dst=GW) / outer / UDP(sport=sport, dport=GUE_PORT, chksum=0)
                         / Raw(b"\x00\x04\x00\x00") / inner)
        return bytes(Ether(src=ME, dst=GW) / outer / GRE(key_present=1, key=server.grekey) / inner)

    return transform


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--replay-frames", type=int, default=200_000)
    args = parser.parse_args(argv)
    registry = registry_of()
    print(f"python {sys.version.split()[0]}, {args.seconds:g} s per figure, one core")
    for method in SERVERS:
        (server_plan,) = compile_plan(config(method), registry).servers
        template = server_plan.template
        print(f"template {method:<5} {len(template.header):>2} B header {template.header.hex() or '-'}"
              f"  fields {','.join(sorted(template.fields)) or '-'}  xdp {template.xdp_capable}")
    print(f"{'method':<6} {'frame':>6} {'transform Mpps':>15} {'process Mpps':>13} {'naive scapy kpps':>17} "
          f"{'ratio':>8}")
    for df in (True, False):
        if not df:
            print("DF clear:")
        for method in SERVERS:
            d = Dispatcher(config(method), registry)
            (server_plan,) = compile_plan(config(method), registry).servers
            template, transform = resolve(registry, method, SERVERS[method],
                                          server_plan.egress)
            assert template is not None, method
            naive = naive_scapy(method)
            for size in (64, 1400):
                fs = frames(size, df=df)
                outs = [d.process(f, 0.0) for f in fs]
                assert all(len(o) == 1 for o in outs), d.drops
                primes = [f[14:] for f in fs]  # the transform is timed on P' (TTL handling is the dispatcher's)
                if df:  # the same bytes as the dispatcher's, given the dispatcher's P' (TTL decremented)
                    assert [transform(o[0][-len(p):]) for o, p in zip(outs, primes)] == [o[0] for o in outs]
                t = rate(transform, primes, args.seconds)
                p = rate(d.process, fs, args.seconds)
                s = rate(naive, fs[:32], max(args.seconds / 2, 0.2))
                print(f"{method:<6} {size:>5}B {t / 1e6:>15.2f} {p / 1e6:>13.2f} {s / 1e3:>17.1f} "
                      f"{t / s:>7,.0f}x")
    # replay end to end
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.pcap")
        dst = os.path.join(tmp, "out.pcap")
        mixed = frames(64, 512) + frames(1400, 512)
        with PcapWriter(src) as writer:
            for i in range(args.replay_frames):
                writer.write(i * 1e-6, mixed[i % len(mixed)])
        cfg = Config(
            executor=Executor(nfa="10.0.2.1", mac=ME, networks=["10.0.2.0/24"], gatewaymac=GW),
            clusters=[Cluster(address=VIP, ports=[Port(number=80, servers=list(SERVERS.values()))])],
        )
        summary = replay(Dispatcher(cfg, registry), src, dst)
        size_mb = os.path.getsize(src) / 1e6
        print(f"replay end to end (pcap in -> pcap out, mac+ipip+gre+gue, 64/1400 B mix): "
              f"{summary['frames_in']:,} frames in {summary['seconds']:.2f} s = "
              f"{summary['frames_in'] / summary['seconds']:,.0f} frames/s ({size_mb / summary['seconds']:,.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
