#!/usr/bin/env python3
"""Disruption benchmark: which flows change server when a server is added or removed, on one dispatcher
and when ECMP shifts traffic to another dispatcher (flow tables are local).

    .venv/bin/python bench/disruption.py                   # N = 3, 5, 10 servers, 100,000 flows
    .venv/bin/python bench/disruption.py --flows 20000 --servers 3,5,10,20
    .venv/bin/python bench/disruption.py --json            # one JSON object instead of text

N equal-weight IPIP servers on one Maglev port (M = 65,537 slots). Figures are counts, not times (no
timed assertion anywhere); tests/test_scaleout_consistency.py asserts the same quantities.

- remove one / add one: Maglev's own disruption, from the plans' tables (exact, over all M slots; the
  remove figure is the worst over removing each server in turn) and from FLOWS random flows through the
  Python dispatcher.
- shift after add: dispatcher A holds FLOWS established flows under P1 (N servers); both A and B get P2
  (one more server). A keeps every established flow on its server (its flow table wins); the same flows
  shifted by ECMP to B (another flow table) land where P2's table says: those on another server would be
  reset. About 1/(N+1) of them, plus the churn.
- shift after remove: P1 to P3 (one server removed). The removed server's flows are lost anyway (A and B
  place them again, alike); the other flows stay on A, and on B but for the churn.
- restart: B restarted (empty flow table), no configuration change: 0 moved.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import struct
import sys
import time
import zlib

from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.model import Cluster, Config, Executor, Port, Server
from encapfwd.plan import compile_plan
from encapfwd.plugins import get_plugin_manager
from encapfwd.selection.algorithms import MAGLEV_SIZE

VIP = "10.0.9.1"
NEW = "10.0.3.200"
HOST_A = {"nfa": "10.0.2.1", "mac": "02:00:00:00:00:0a"}
HOST_B = {"nfa": "10.0.2.2", "mac": "02:00:00:00:00:0b"}
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_WORDS = struct.Struct("!10H")
_SYN, _PSH_ACK = 0x02, 0x18


def addresses(n, extra=None, without=None):
    out = [f"10.0.3.{10 + i}" for i in range(n)]
    if without is not None:
        out.remove(without)
    if extra is not None:
        out.append(extra)
    return out


def config(host, servers, maxflows) -> Config:
    port = Port(number=80, porttype="tcp",
                servers=[Server(address=a, encapforward=True, encaptype="ipip") for a in servers])
    ex = Executor(nfa=host["nfa"], mac=host["mac"], networks="10.0.2.0/24", gatewaymac="02:00:00:00:00:fe",
                  maxflows=maxflows)
    return Config(executor=ex, clusters=[Cluster(address=VIP, ports=[port])])


def table(registry, servers):
    """The port's Maglev table as packed server addresses, slot by slot."""
    plan = compile_plan(config(HOST_A, servers, 1000), registry)
    names = {s.sid: ipaddress.ip_address(s.address).packed for s in plan.servers}
    return [names[sid] for sid in plan.ports[0].table]


def flows(count, seed=1):
    rng = random.Random(seed)
    vip = ipaddress.ip_address(VIP).packed
    seen = set()
    while len(seen) < count:
        seen.add((b"\x64" + rng.randbytes(3), rng.randrange(1024, 65536)))
    return [(src, vip, sport) for src, sport in sorted(seen)]


def frame(flow, flags: int) -> bytes:
    src, dst, sport = flow
    l4 = _TCP.pack(sport, 80, 1000, 0 if flags == _SYN else 2000, 0x50, flags, 65535, 0, 0)
    header = _IP.pack(0x45, 0, 20 + len(l4), 0, 0x4000, 64, 6, 0, src, dst)
    s = sum(_WORDS.unpack(header))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return (b"\x02\x00\x00\x00\x00\xf0\x02\x00\x00\x00\x00\x01\x08\x00" + header[:10]
            + (~s & 0xFFFF).to_bytes(2, "big") + header[12:] + l4)


def servers_of(dispatcher, frames, now, host):
    """The server (outer destination) each frame goes to, sent to *host*'s MAC (ECMP picked it)."""
    process = dispatcher.process
    mac = bytes.fromhex(host["mac"].replace(":", ""))
    return [process(mac + f[6:], now)[0][30:34] for f in frames]


def measure(n: int, count: int, registry) -> dict:
    maxflows = 2 * count + 1024
    gone = f"10.0.3.{10 + n // 2}"
    new_b, gone_b = ipaddress.ip_address(NEW).packed, ipaddress.ip_address(gone).packed
    p1 = table(registry, addresses(n))
    p2 = table(registry, addresses(n, extra=NEW))

    # Maglev's own disruption, slot by slot (exact)
    worst = 0.0
    for address in addresses(n):
        packed = ipaddress.ip_address(address).packed
        after = table(registry, addresses(n, without=address))
        others = [(x, y) for x, y in zip(p1, after) if x != packed]
        worst = max(worst, sum(x != y for x, y in others) / len(others))
    slots_new = sum(y == new_b for y in p2) / MAGLEV_SIZE
    slots_churn = sum(x != y and y != new_b for x, y in zip(p1, p2)) / MAGLEV_SIZE

    flow_list = flows(count)
    syn = [frame(f, _SYN) for f in flow_list]
    data = [frame(f, _PSH_ACK) for f in flow_list]

    def established():
        d = Dispatcher(config(HOST_A, addresses(n), maxflows), registry)
        return d, servers_of(d, syn, 0.0, HOST_A)

    # a server added
    a, old = established()
    a.reload(config(HOST_A, addresses(n, extra=NEW), maxflows))
    b = Dispatcher(config(HOST_B, addresses(n, extra=NEW), maxflows), registry)
    at_a, at_b = servers_of(a, data, 30.0, HOST_A), servers_of(b, data, 30.0, HOST_B)
    add_moved = sum(x != y for x, y in zip(old, at_b))
    add_new = at_b.count(new_b)
    expected = [p2[zlib.crc32(f[0] + f[1] + b"\x06" + f[2].to_bytes(2, "big") + b"\x00\x50") % MAGLEV_SIZE]
                for f in flow_list]
    add = {
        "kept_on_a": sum(x == y for x, y in zip(old, at_a)) / count,
        "moved_on_b": add_moved / count,
        "to_new": add_new / count,
        "between_old": (add_moved - add_new) / count,
        "b_as_table": at_b == expected,
    }

    # a server removed
    a, old = established()
    a.reload(config(HOST_A, addresses(n, without=gone), maxflows))
    b = Dispatcher(config(HOST_B, addresses(n, without=gone), maxflows), registry)
    at_a, at_b = servers_of(a, data, 30.0, HOST_A), servers_of(b, data, 30.0, HOST_B)
    orphans = [i for i, s in enumerate(old) if s == gone_b]
    others = [i for i, s in enumerate(old) if s != gone_b]
    remove = {
        "orphaned": len(orphans) / count,
        "orphans_alike_on_a_and_b": all(at_a[i] == at_b[i] for i in orphans),
        "others_kept_on_a": sum(at_a[i] == old[i] for i in others) / len(others),
        "others_moved_on_b": sum(at_b[i] != old[i] for i in others) / len(others),
    }

    # restarted, no change
    b = Dispatcher(config(HOST_B, addresses(n), maxflows), registry)
    restart_moved = sum(x != y for x, y in zip(old, servers_of(b, data, 30.0, HOST_B)))

    return {
        "servers": n, "flows": count, "slots": MAGLEV_SIZE,
        "remove_slots_others_moved_worst": worst,
        "add_slots_to_new": slots_new, "add_slots_between_old": slots_churn, "ideal_new_share": 1 / (n + 1),
        "shift_after_add": add, "shift_after_remove": remove, "restart_moved": restart_moved,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000, help="established flows per scenario")
    parser.add_argument("--servers", default="3,5,10", help="comma-separated N")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    registry = get_plugin_manager()
    start = time.perf_counter()
    results = [measure(int(n), args.flows, registry) for n in args.servers.split(",")]
    if args.json:
        print(json.dumps({"results": results, "seconds": time.perf_counter() - start}, indent=2))
        return 0

    def pct(x):
        return f"{100 * x:6.2f} %"

    print(f"Python {sys.version.split()[0]}; Maglev M = {MAGLEV_SIZE:,} slots; {args.flows:,} flows per "
          "scenario (equal weights, IPIP)")
    print()
    print("Maglev's disruption (the tables, exact):")
    print(f"  {'N':>3}  {'remove one: others moved (worst)':>33}  {'add one: new takes':>18}  "
          f"{'ideal 1/(N+1)':>13}  {'between old':>11}")
    for r in results:
        print(f"  {r['servers']:>3}  {pct(r['remove_slots_others_moved_worst']):>33}  "
              f"{pct(r['add_slots_to_new']):>18}  {pct(r['ideal_new_share']):>13}  "
              f"{pct(r['add_slots_between_old']):>11}")
    print()
    print("Established flows when ECMP shifts them from A (its flow table) to B (another flow table):")
    print(f"  {'N':>3}  {'add: kept on A':>14}  {'moved on B':>10}  {'(to new':>8}  {'between old)':>12}  "
          f"{'remove: orphaned':>16}  {'others kept on A':>16}  {'others moved on B':>17}  {'restart':>7}")
    for r in results:
        a, m = r["shift_after_add"], r["shift_after_remove"]
        print(f"  {r['servers']:>3}  {pct(a['kept_on_a']):>14}  {pct(a['moved_on_b']):>10}  "
              f"{pct(a['to_new']):>8}  {pct(a['between_old']):>12}  {pct(m['orphaned']):>16}  "
              f"{pct(m['others_kept_on_a']):>16}  {pct(m['others_moved_on_b']):>17}  {r['restart_moved']:>7}")
    print()
    ok = all(r["shift_after_add"]["b_as_table"] and r["shift_after_remove"]["orphans_alike_on_a_and_b"]
             for r in results)
    print("B placed every shifted flow as the new plan's table says, and A and B placed the removed "
          f"server's flows alike: {'yes' if ok else 'NO'}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
