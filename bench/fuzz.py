#!/usr/bin/env python3
"""Throw random and mutated frames at ``Dispatcher.process``; print the count per drop reason.

    .venv/bin/python bench/fuzz.py [--frames 1000000] [--seed 1]

Exits non-zero if ``process`` raised, returned something that is not a list of frames, counted a frame
under ``internal-error`` (an exception it caught), or lost count of a frame (forwarded + dropped must
equal the frames sent once the fragment table is flushed).
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time

from encapfwd.datapath.dispatcher import Dispatcher
from encapfwd.plugins import get_plugin_manager
from encapfwd.testing import fuzz_config, seed_frames

CONFIG = fuzz_config(mtu=1000)


def mutate(rnd: random.Random, frame: bytes) -> bytes:
    f = bytearray(frame)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.randrange(10)
        n = len(f)
        if op == 0 and n:
            del f[rnd.randrange(n):]
        elif op == 1 and n:
            f[rnd.randrange(n)] = rnd.randrange(256)
        elif op == 2 and n > 14:
            f[14] = (f[14] & 0xF0) | rnd.randrange(16)
        elif op == 3 and n > 17:
            f[16:18] = struct.pack("!H", rnd.randrange(65536))
        elif op == 4 and n > 22:
            f[22] = rnd.choice((0, 1, 2, 255))
        elif op == 5 and n > 21:
            f[20:22] = struct.pack("!H", rnd.randrange(65536))
        elif op == 6 and n > 13:
            f[12:14] = rnd.choice((b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00", b"\xff\xff"))
        elif op == 7 and n > 12:
            f[12:12] = b"\x81\x00\x00\x05"
        elif op == 8:
            f += rnd.randbytes(rnd.randrange(40))
        elif op == 9 and n > 19:
            f[18:20] = struct.pack("!H", rnd.randrange(65536))
    return bytes(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rnd = random.Random(args.seed)
    base = seed_frames(mtu=1000)
    d = Dispatcher(CONFIG, get_plugin_manager())
    process = d.process
    raised = 0
    bad_output = 0
    sent = 0
    start = time.perf_counter()
    for i in range(args.frames):
        r = rnd.random()
        if r < 0.15:
            frame = rnd.randbytes(rnd.randrange(120))
        elif r < 0.25:
            frame = base[rnd.randrange(len(base))]
        else:
            frame = mutate(rnd, base[rnd.randrange(len(base))])
        try:
            out = process(frame, i * 1e-4)
        except BaseException as exc:  # noqa: BLE001 - that is what we are looking for
            raised += 1
            if raised <= 5:
                print(f"RAISED on frame {i}: {type(exc).__name__}: {exc}: {frame.hex()}", file=sys.stderr)
            continue
        if not isinstance(out, list) or any(not isinstance(o, bytes) or len(o) < 14 for o in out):
            bad_output += 1
        sent += len(out)
    d.flush()
    seconds = time.perf_counter() - start
    report = d.report()
    print(f"{args.frames:,} frames in {seconds:.1f} s ({args.frames / seconds:,.0f} frames/s incl. mutation), "
          f"{report['forwarded']:,} forwarded, {sent:,} frames sent, {report['icmp_sent']:,} ICMP errors")
    print(f"{'drop reason':<20} {'frames':>10}")
    for reason, count in sorted(report["drops"].items(), key=lambda kv: -kv[1]):
        print(f"{reason:<20} {count:>10,}")
    lost = args.frames - raised - report["forwarded"] - report["dropped"]
    internal = report["drops"].get("internal-error", 0)
    print(f"raised: {raised}, caught internally: {internal}, bad output: {bad_output}, unaccounted: {lost}")
    return 1 if raised or internal or bad_output or lost else 0


if __name__ == "__main__":
    sys.exit(main())
