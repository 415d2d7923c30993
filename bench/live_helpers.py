#!/usr/bin/env python3
"""Processes bench/live.py starts inside its network namespaces (``ip netns exec NS python this MODE …``).

Both speak one JSON object per line: a command on stdin, one answer on stdout (the first line, once ready,
is ``{"ready": true, …}``); an error is answered ``{"error": "…"}`` and ends the process.

``gen IF DSTMAC COUNTMAC FLOWS CPU SRCIP DSTIP DPORT`` — the traffic generator, in the generator's
namespace: loads bench/xdp_gen.bpf.c, attaches its counting program to IF (native XDP), pins itself to CPU
and runs the generating program with BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES on IF: 64-byte UDP
frames SRCIP → DSTIP:DPORT to DSTMAC, FLOWS source ports; frames back to COUNTMAC count as forwarded.

    {"cmd": "run", "seconds": 2}                        flat out for 2 s
    {"cmd": "run", "rate": 500000, "seconds": 2}        paced by the program itself (token bucket, "burst")
    {"cmd": "run", "rate": 500000, "until_stop": true}  until the next line on stdin (any), then answers
    -> {"generated": n, "back": n, "other": n, "idle_runs": n, "seconds": s, "busy_ns": {"1": ns},
        "steal_ns": {"1": ns}, "task_ns": ns}
    (also: "cpus": [1] CPUs whose busy time to measure, "pids": [..] processes whose threads' CPU time to sum)

A run is one live-frames test run in a thread, ended by SIGUSR1 to that thread (the kernel stops a test run
between batches when a signal is pending): a test run's setup and teardown cost tens of milliseconds here,
so short calls cannot make a rate. The window opens when the first frames are counted.

``generated`` are the generating program's runs, ``back`` the frames that came back to IF with COUNTMAC as
destination (forwarded by the dispatcher), ``other`` whatever else came back; ``busy_ns`` the busy time
(user + nice + system + irq + softirq, /proc/stat) of each CPU named in ``"cpus"`` during the run,
``task_ns`` the on-CPU time (/proc/PID/task/*/schedstat) of the threads of ``"pids"``.

``xdp IF CONFIG CPU`` — encapfwd's XDP data plane without ``encapfwd run``, in the dispatcher's namespace:
``compile_plan(config, get_plugin_manager())``, ``DataPlane.load(plan)``, ``attach(IF, "native")``; this
process (the control plane: reloads) pinned to CPU.

    {"cmd": "reloads", "configs": [A, B], "count": 20, "interval": 0.05}
        -> {"reloads": 20, "install_ms": [...]}     compile + DataPlane.install, alternating A and B
    {"cmd": "counters"} -> DataPlane.counters()
    {"cmd": "quit"}     -> detach, unload, exit
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "core" / "src"))

GEN_SOURCE = HERE / "xdp_gen.bpf.c"
FRAME_LEN = 64
BASE_PORT = 10000
#: runs per live-frames call: the call is ended by a signal long before (each call costs tens of ms of setup
#: and teardown on these VMs, so calls must be long)
REPEAT_MAX = (1 << 31) - 1


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def commands():
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


def serve(handlers) -> None:
    """Answer the commands on stdin with ``handlers[name](cmd)`` until ``quit``."""
    for cmd in commands():
        if cmd["cmd"] == "quit":
            reply({"bye": True})
            return
        handler = handlers.get(cmd["cmd"])
        reply(handler(cmd) if handler else {"error": f"unknown command {cmd['cmd']!r}"})


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
    """``{cpu: (busy, steal)}`` since boot, in ns: busy = user + nice + system + irq + softirq; steal = time
    the hypervisor ran something else on this virtual CPU."""
    tick = 1e9 / os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{c}": c for c in cpus}
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name = line.split(" ", 1)[0]
            if name in wanted:
                v = [int(x) for x in line.split()[1:]]
                out[wanted[name]] = ((v[0] + v[1] + v[2] + v[5] + v[6]) * tick, v[7] * tick)
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
        self.flows, self.count_mac = max(1, flows), _mac(count_mac)
        self.configure()
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
        """(generated, back, other, idle paced runs) summed over CPUs."""
        out = []
        for key in range(4):
            out.append(sum(struct.unpack("=Q", v)[0] for v in self.counts.lookup_percpu(key)))
        return tuple(out)

    def configure(self, rate: float = 0.0, burst: int = 32) -> None:
        """Pacing: *rate* frames/s from now on (0: flat out), catching up at most *burst* frames at once."""
        self.counts.update(4, struct.pack("=Q", 0))  # frames sent since the pacing started, every CPU
        self.config = self.frame + struct.pack("=IH6s4xQQQ", self.flows, BASE_PORT, self.count_mac,
                                               int(rate), time.monotonic_ns(), burst)
        self.obj.map("gen_config").update(0, self.config)

    def _generate(self) -> None:
        """The generating thread: one live-frames test run as long as the kernel allows (≈ 10 min flat out),
        ended by a signal (the kernel checks for one between batches: EINTR)."""
        from encapfwd.xdp import BPFError
        from encapfwd.xdp.libbpf import live_frames

        try:
            while not self._stop:
                live_frames(self.gen_fd, self.frame, REPEAT_MAX, self.ifindex, 64)
        except BPFError as exc:
            if exc.errno != errno.EINTR:
                self._error = str(exc)

    def run(self, seconds: float = 0.0, rate: float = 0.0, until_stop: bool = False, cpus=(), pids=(),
            burst: int = 32, drain: float = 0.05) -> dict:
        """Generate for *seconds* (or until a line arrives on stdin) at *rate* (0: flat out). A paced
        generator that loses the CPU for a while sends at most *burst* frames to catch up: what it offered is
        what it counted, never more than the rate."""
        self.configure(rate, burst)
        self._stop, self._error = False, None
        first = self.read()
        thread = threading.Thread(target=self._generate, name="live-frames", daemon=True)
        thread.start()
        # the window opens when frames flow (a test run's setup takes a moment)
        deadline = time.monotonic() + 10
        while self.read()[0] == first[0] and self.read()[3] == first[3]:
            if not thread.is_alive() or time.monotonic() > deadline:
                self._stop_thread(thread)
                raise RuntimeError(self._error or "the generator sent nothing")
            time.sleep(0.0005)
        c0 = self.read()
        busy0, task0 = cpu_busy_ns(cpus), task_ns(pids)
        t0 = time.perf_counter()
        if until_stop:
            sys.stdin.readline()
        else:
            time.sleep(seconds)
        t1 = time.perf_counter()
        busy1, task1 = cpu_busy_ns(cpus), task_ns(pids)
        self._stop_thread(thread)
        time.sleep(drain)  # what is still in the veth rings comes back
        c1 = self.read()
        if self._error:
            raise RuntimeError(self._error)
        return {"generated": c1[0] - c0[0], "back": c1[1] - c0[1], "other": c1[2] - c0[2],
                "idle_runs": c1[3] - c0[3], "seconds": t1 - t0,
                "busy_ns": {str(c): busy1[c][0] - busy0[c][0] for c in busy0},
                "steal_ns": {str(c): busy1[c][1] - busy0[c][1] for c in busy0}, "task_ns": task1 - task0}

    def _stop_thread(self, thread) -> None:
        self._stop = True
        while thread.is_alive():
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
            thread.join(0.05)


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
        serve({
            "run": lambda cmd: gen.run(cmd.get("seconds", 0.0), cmd.get("rate", 0.0), cmd.get("until_stop", False),
                                       cmd.get("cpus", ()), cmd.get("pids", ()), cmd.get("burst", 32)),
            "counts": lambda cmd: dict(zip(("generated", "back", "other"), gen.read())),
        })
    finally:
        gen.close()
    return 0


# --------------------------------------------------------------------------------- XDP data plane, direct


def xdp_main(argv) -> int:
    ifname, config_path, cpu = argv
    os.sched_setaffinity(0, {int(cpu)})
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

        def reloads(cmd):
            times = []
            configs = cmd["configs"]
            for i in range(cmd["count"]):
                t = time.perf_counter()
                dp.install(compile_plan(cfg.load(configs[i % len(configs)]), registry, sids))
                times.append((time.perf_counter() - t) * 1e3)
                time.sleep(cmd.get("interval", 0.0))
            return {"reloads": len(times), "install_ms": times}

        serve({"reloads": reloads, "counters": lambda cmd: dp.counters()})
    finally:
        dp.close()
    return 0


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks detach and unload
    signal.signal(signal.SIGUSR1, lambda *_: None)  # interrupts the generating thread's test run (EINTR)
    mode, *argv = sys.argv[1:]
    try:
        return {"gen": gen_main, "xdp": xdp_main}[mode](argv)
    except Exception as exc:  # noqa: BLE001 - one line to the bench, which shows it
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
