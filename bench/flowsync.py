#!/usr/bin/env python3
"""Flow synchronisation cost: new flows replicated per second between two dispatchers on this machine.

    .venv/bin/python bench/flowsync.py                 # 100,000 flows
    .venv/bin/python bench/flowsync.py --flows 300000 --json

Two parts:

- **codec**: encode (batch + HMAC-SHA256) → authenticate, replay-check and decode, in one process, no
  socket, no kernel: the Python cost per entry.
- **two dispatchers** (root, BPF): two loaded data planes (the real XDP program's maps) with different
  server ids; A's kernel flow table holds FLOWS new flows (written as the program writes them, pad 0).
  Timed from A's first sweep until B has inserted the last one: sweep (batched map read + marks written
  back) → name the servers → batch → HMAC → UDP over the loopback → B authenticates, checks replay, maps
  names to its ids and inserts into its kernel table (BPF_NOEXIST). Both ends run in this one process,
  alternating (so the figure is what one CPU does for both sides). The rate limit (RATE datagrams/s per
  peer) is lifted for the measurement and its own ceiling printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from encapfwd.engines import flowsync as FS  # noqa: E402

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
    for seq, batch in enumerate(FS.Batcher().batches(entries), 1):
        data = FS.encode(KEY, FS.FLOWS, 1, 2, seq, batch)
        got += len(receiver.accept(data, ("10.0.2.2", 7900))[3])
        datagrams += 1
    took = time.perf_counter() - started
    assert got == flows
    return {"flows": flows, "datagrams": datagrams, "seconds": round(took, 3), "per_second": round(flows / took)}


def two_dispatchers(flows: int) -> dict:

    import test_scaleout_consistency as C
    from encapfwd.engines.flowsweep import KernelTable
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
