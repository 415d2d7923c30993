#!/usr/bin/env python3
"""Processes bench/live.py starts inside its network namespaces (``ip netns exec NS python this MODE …``).

Both speak one JSON object per line: a command on stdin, one answer on stdout (the first line, once ready,
is ``{"ready": true, …}``); an error is answered ``{"error": "…"}`` and ends the process.

``gen IF DSTMAC COUNTMAC FLOWS CPU`` — the traffic generator, in the generator's namespace: loads
bench/xdp_gen.bpf.c, attaches its counting program to IF (native XDP), pins itself to CPU and runs the
generating program with BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES on IF.

    {"cmd": "run", "seconds": 2}                        flat out for 2 s
    {"cmd": "run", "rate": 500000, "seconds": 2}        paced: batches of "batch" frames (default 64), sleeping
    {"cmd": "run", "rate": 500000, "until_stop": true}  paced until the next line on stdin (any), then answers
    -> {"generated": n, "back": n, "other": n, "seconds": s, "busy_ns": {"1": ns}, "task_ns": ns, "calls": n}
    (also: "cpus": [1] CPUs whose busy time to measure, "pids": [..] processes whose threads' CPU time to sum,
    "fifo": 40 run SCHED_FIFO at that priority for this run — a paced run must not wait for the CPU)

``generated`` are the generating program's runs, ``back`` the frames that came back to IF with COUNTMAC as
destination (forwarded by the dispatcher), ``other`` whatever else came back; ``busy_ns`` the busy time
(user + nice + system + irq + softirq, /proc/stat) of each CPU named in ``"cpus"`` during the run,
``task_ns`` the on-CPU time (/proc/PID/task/*/schedstat) of the threads of ``"pids"``.

``xdp IF CONFIG`` — encapfwd's XDP data plane without ``encapfwd run``, in the dispatcher's namespace:
``compile_plan(config, get_plugin_manager())``, ``DataPlane.load(plan)``, ``attach(IF, "native")``.

    {"cmd": "reloads", "configs": [A, B], "count": 20, "interval": 0.05}
        -> {"reloads": 20, "install_ms": [...]}     compile + DataPlane.install, alternating A and B
    {"cmd": "counters"} -> DataPlane.counters()
    {"cmd": "quit"}     -> detach, unload, exit
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "core" / "src"))

GEN_SOURCE = HERE / "xdp_gen.bpf.c"
FRAME_LEN = 64
BASE_PORT = 10000
#: frames per live-frames call when flat out (about 10 ms at 3.5 Mpps: the deadline is checked between calls)
FLAT_CHUNK = 1 << 15


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def commands():
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, dport: int, sport: int = BASE_PORT,
              length: int = FRAME_LEN) -> bytes:
    """An IPv4/UDP frame of *length* bytes (without FCS), IPv4 checksum filled in, UDP checksum 0."""
    udp_len = length - 14 - 20
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, socket.inet_aton(src_ip),
                     socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + bytes(udp_len - 8)
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def cpu_busy_ns(cpus) -> dict:
    """Busy time of each CPU in *cpus* since boot (user + nice + system + irq + softirq), in ns."""
    tick = 1e9 / os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{c}": c for c in cpus}
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name = line.split(" ", 1)[0]
            if name in wanted:
                v = [int(x) for x in line.split()[1:]]
                out[wanted[name]] = (v[0] + v[1] + v[2] + v[5] + v[6]) * tick
    return out


def task_ns(pids) -> int:
    """Time on CPU (ns, the scheduler's own clock) of every thread of the processes *pids*."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# -------------------------------------------------------------------------------------------- generator


class Generator:
    def __init__(self, ifname: str, dst_mac: str, count_mac: str, flows: int, src_ip: str, dst_ip: str,
                 dport: int):
        from encapfwd.xdp.build import build
        from encapfwd.xdp.libbpf import BPFObject, xdp_attach

        self.ifname = ifname
        self.ifindex = socket.if_nametoindex(ifname)
        src_mac = _mac(Path(f"/sys/class/net/{ifname}/address").read_text().strip())
        self.obj = BPFObject.open(build(str(GEN_SOURCE)))
        self.gen_fd = self.obj.program("xdp_gen")
        self.count_fd = self.obj.program("xdp_count")
        self.counts = self.obj.map("counts")
        self.frame = udp_frame(_mac(dst_mac), src_mac, src_ip, dst_ip, dport)
        config = self.frame + struct.pack("=IH6s", max(1, flows), BASE_PORT, _mac(count_mac))
        self.obj.map("gen_config").update(0, config)
        self.attached = False
        xdp_attach(self.ifindex, self.count_fd, "native")
        self.attached = True

    def close(self) -> None:
        from encapfwd.xdp.libbpf import xdp_detach

        if self.attached:
            self.attached = False
            try:
                xdp_detach(self.ifindex, "native")
            except Exception:  # noqa: BLE001 - the namespace going away removes it anyway
                pass
        self.obj.close()

    def read(self) -> tuple:
        out = []
        for key in range(3):
            out.append(sum(struct.unpack("=Q", v)[0] for v in self.counts.lookup_percpu(key)))
        return tuple(out)

    def run(self, seconds: float = 0.0, rate: float = 0.0, batch: int = 64, until_stop: bool = False,
            cpus=(), pids=(), fifo: int = 0, drain: float = 0.05) -> dict:
        from encapfwd.xdp.libbpf import live_frames

        frame, fd, ifindex = self.frame, self.gen_fd, self.ifindex
        if fifo:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo))
        try:
            return self._run(live_frames, frame, fd, ifindex, seconds, rate, batch, until_stop, cpus, pids,
                             drain)
        finally:
            if fifo:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

    def _run(self, live_frames, frame, fd, ifindex, seconds, rate, batch, until_stop, cpus, pids, drain):
        g0, b0, o0 = self.read()
        busy0 = cpu_busy_ns(cpus)
        task0 = task_ns(pids)
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds if seconds else float("inf")
        if not rate:
            while time.perf_counter() < deadline:
                live_frames(fd, frame, FLAT_CHUNK, ifindex, 64)
                calls += 1
        else:
            sent = 0
            check = 0
            while True:
                now = time.perf_counter()
                if now >= deadline:
                    break
                if until_stop:
                    check += 1
                    if check % 16 == 0 and select.select([sys.stdin], [], [], 0)[0]:
                        sys.stdin.readline()
                        break
                due = (now - start) * rate
                if sent < due:
                    live_frames(fd, frame, batch, ifindex, batch)
                    sent += batch
                    calls += 1
                else:
                    time.sleep((sent - due) / rate)
        elapsed = time.perf_counter() - start
        busy1 = cpu_busy_ns(cpus)
        task1 = task_ns(pids)
        time.sleep(drain)  # frames still in the veth rings come back
        g1, b1, o1 = self.read()
        return {"generated": g1 - g0, "back": b1 - b0, "other": o1 - o0, "seconds": elapsed, "calls": calls,
                "busy_ns": {str(c): busy1[c] - busy0[c] for c in busy0}, "task_ns": task1 - task0}


def gen_main(argv) -> int:
    ifname, dst_mac, count_mac, flows, cpu, src_ip, dst_ip, dport = argv
    os.sched_setaffinity(0, {int(cpu)})
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
    except OSError:
        pass
    gen = Generator(ifname, dst_mac, count_mac, int(flows), src_ip, dst_ip, int(dport))
    try:
        reply({"ready": True, "frame": gen.frame.hex(), "pid": os.getpid()})
        for cmd in commands():
            if cmd["cmd"] == "run":
                reply(gen.run(cmd.get("seconds", 0.0), cmd.get("rate", 0.0), cmd.get("batch", 64),
                              cmd.get("until_stop", False), cmd.get("cpus", ()), cmd.get("pids", ()),
                              cmd.get("fifo", 0)))
            elif cmd["cmd"] == "counts":
                reply(dict(zip(("generated", "back", "other"), gen.read())))
            elif cmd["cmd"] == "quit":
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
    finally:
        gen.close()
    return 0


# --------------------------------------------------------------------------------- XDP data plane, direct


def xdp_main(argv) -> int:
    ifname, config_path = argv
    from encapfwd import config as cfg
    from encapfwd.plan import SidMap, compile_plan
    from encapfwd.plugins import get_plugin_manager
    from encapfwd.xdp.dataplane import DataPlane
    from encapfwd.xdp.libbpf import prog_id

    registry = get_plugin_manager()
    sids = SidMap()
    plan = compile_plan(cfg.load(config_path), registry, sids)
    dp = DataPlane.load(plan)
    try:
        dp.attach(socket.if_nametoindex(ifname), "native")
        reply({"ready": True, "prog_id": prog_id(dp.prog_fd), "pid": os.getpid()})
        for cmd in commands():
            if cmd["cmd"] == "reloads":
                times = []
                configs = cmd["configs"]
                for i in range(cmd["count"]):
                    t = time.perf_counter()
                    dp.install(compile_plan(cfg.load(configs[i % len(configs)]), registry, sids))
                    times.append((time.perf_counter() - t) * 1e3)
                    time.sleep(cmd.get("interval", 0.0))
                reply({"reloads": len(times), "install_ms": times})
            elif cmd["cmd"] == "counters":
                reply(dp.counters())
            elif cmd["cmd"] == "quit":
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
    finally:
        dp.close()
    return 0


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks detach and unload
    mode, *argv = sys.argv[1:]
    try:
        return {"gen": gen_main, "xdp": xdp_main}[mode](argv)
    except Exception as exc:  # noqa: BLE001 - one line to the bench, which shows it
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
