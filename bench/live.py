#!/usr/bin/env python3
"""Live forwarding speed: the kernel's own IP forwarding against ``encapfwd run`` (MAC, IPIP, GRE; 1 and 2
workers), small UDP packets, on the same veth path and the same CPU placement. Root, Linux.

Topology (one-armed, as a dispatcher is)::

    gen ns  g0 ──veth── f0  fwd ns
    generator (TX ring,          kernel IP forwarding  (ip_forward=1, route VIP via 10.1.0.3), or
    pinned to CPU 0)             encapfwd run          (VIP blackholed, process pinned)
                                 both send back out of f0 towards 10.1.0.3's MAC, a MAC nobody owns:
                                 the frames are counted as f0's tx_packets and dropped by gen's kernel
                                 as "other host" on CPU 0.

Placement: the generator on CPU 0; everything the forwarder does on CPU 1 — the kernel's forwarding
through RPS on f0 (rps_cpus = CPU 1), ours pinned with ``--cpus 1`` (and the kernel's receive work for it
also on CPU 1 through the same RPS setting). With 2 workers they are pinned to CPUs 0 and 1: the second
worker shares CPU 0 with the generator on this 2-core machine (say so when reading those figures).

Run: ``sudo .venv/bin/python bench/live.py [--seconds 3] [--rounds 3] [--flows 256]``.

``--worker-cost RATE`` adds, per method with one worker, the worker's own CPU time per forwarded frame at a
fixed, loss-free offered rate with f0's receive work on the generator's CPU (the steadiest figure on a
shared machine); ``--qdisc-bypass`` runs ``encapfwd run --qdisc-bypass``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GEN_CPU = 0
FWD_CPU = 1
GEN_IP = "10.1.0.2"
FWD_IP = "10.1.0.1"
SERVER_IP = "10.1.0.3"
VIP = "10.1.9.1"
NOBODY_MAC = "02:00:00:00:00:33"
UDP_PORT = 9


# ------------------------------------------------------------------------------------------ generator


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_frames(dst_mac: bytes, src_mac: bytes, flows: int, payload: int = 18) -> list:
    """Small UDP frames (64 bytes on the wire without FCS: 14 + 20 + 8 + 18), one per flow (source port)."""
    frames = []
    for i in range(flows):
        udp_len = 8 + payload
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + udp_len,
            i & 0xFFFF,
            0,
            64,
            17,
            0,
            socket.inet_aton(GEN_IP),
            socket.inet_aton(VIP),
        )
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        udp = struct.pack("!HHHH", 10000 + i, UDP_PORT, udp_len, 0) + bytes(payload)
        frames.append(dst_mac + src_mac + b"\x08\x00" + ip + udp)
    return frames


def generator(ifname: str, dst_mac: str, seconds: float, flows: int, rate: float = 0.0) -> dict:
    """Send as fast as a TX ring allows (or at *rate* packets/s) for *seconds*; print and return the count."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core" / "src"))
    from encapfwd.engines.afpacket import TX_DATA_OFFSET, TxRing

    src_mac = bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip().replace(":", ""))
    frames = build_frames(bytes.fromhex(dst_mac.replace(":", "")), src_mac, flows)
    tx = TxRing(ifname, frame_size=256, frame_nr=4096, qdisc_bypass=True)
    m = tx.map
    for slot in range(tx.frame_nr):
        frame = frames[slot % len(frames)]
        base = slot * tx.frame_size
        m[base + TX_DATA_OFFSET : base + TX_DATA_OFFSET + len(frame)] = frame
        struct.pack_into("<I", m, base + 4, len(frame))
    bases = [slot * tx.frame_size for slot in range(tx.frame_nr)]
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    sock = tx.sock
    if rate:
        batch = 32
        index = 0
        nslots = len(bases)
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            if sent >= (now - start) * rate:
                continue  # busy-wait: the generator has its own CPU
            for base in bases[index : index + batch]:
                m[base] = 1
            sock.send(b"")
            sent += batch
            index = (index + batch) % nslots
    while not rate and time.perf_counter() < deadline:
        for base in bases:
            m[base] = 1
        sock.send(b"")  # blocking: returns when every marked slot was handed to the device
        sent += len(bases)
    elapsed = time.perf_counter() - start
    out = {"sent": sent, "seconds": elapsed, "pps": sent / elapsed}
    print(json.dumps(out), flush=True)
    return out


# --------------------------------------------------------------------------------------- the bench


def sh(*argv, check=True, **kw):
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


class Bench:
    def __init__(self, args):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core" / "src"))
        from encapfwd.lab.netns import Namespace, veth_pair

        self.args = args
        self.gen = Namespace("bgen").create()
        self.fwd = Namespace("bfwd").create()
        veth_pair(self.gen, "g0", self.fwd, "f0")
        self.gen.ip("addr", "add", f"{GEN_IP}/24", "dev", "g0")
        self.fwd.ip("addr", "add", f"{FWD_IP}/24", "dev", "f0")
        for ns, dev in ((self.gen, "g0"), (self.fwd, "f0")):
            ns.ethtool_offload(dev, tx=False, gro=False)
            for key in ("all", "default", dev):
                ns.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
                ns.sysctl(f"net.ipv4.conf.{key}.send_redirects", 0)
        # forwarding work of f0 on CPU 1, the returning frames' (dropped) receive work of g0 on CPU 0
        self.fwd.run(["sh", "-c", f"echo {1 << FWD_CPU:x} > /sys/class/net/f0/queues/rx-0/rps_cpus"])
        self.gen.run(["sh", "-c", f"echo {1 << GEN_CPU:x} > /sys/class/net/g0/queues/rx-0/rps_cpus"])
        self.fwd.ip("neigh", "replace", SERVER_IP, "lladdr", NOBODY_MAC, "dev", "f0", "nud", "permanent")
        self.fwd.ip("route", "add", f"{VIP}/32", "via", SERVER_IP)
        self.f0_mac = self.fwd.mac("f0")
        self.workdir = Path(tempfile.mkdtemp(prefix="efwbench"))

    def close(self):
        self.fwd.delete()
        self.gen.delete()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)

    def tx_packets(self) -> int:
        return int(self.fwd.run(["cat", "/sys/class/net/f0/statistics/tx_packets"]).stdout)

    @staticmethod
    def cpu_busy(cpu: int) -> float:
        """Seconds CPU *cpu* spent busy (user, nice, system, irq, softirq, steal) since boot."""
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{cpu} "):
                    v = [int(x) for x in line.split()[1:]]
                    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
        return 0.0

    @staticmethod
    def proc_cpu(pids) -> float:
        """user + system seconds of processes *pids* (includes softirq work that interrupted them)."""
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def softirq(cpu: int) -> float:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{cpu} "):
                    return int(line.split()[7]) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def generate(self, seconds: float, rate: float = 0.0) -> dict:
        argv = self.gen.argv(
            [
                "nice",
                "-n",
                "-20",
                "taskset",
                "-c",
                str(GEN_CPU),
                sys.executable,
                __file__,
                "--generator",
                "g0",
                self.f0_mac,
                str(seconds),
                str(self.args.flows),
                str(rate),
            ]
        )
        before = self.tx_packets()
        busy = self.cpu_busy(FWD_CPU)
        soft = self.softirq(FWD_CPU)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        busy = self.cpu_busy(FWD_CPU) - busy
        soft = self.softirq(FWD_CPU) - soft
        after = self.tx_packets()
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["forwarded"] = after - before
        result["fwd_pps"] = (after - before) / result["seconds"]
        # CPU 1's busy time per forwarded packet (includes the kernel's receive work for dropped packets and
        # anything else the shared machine ran there)
        result["cpu_us_per_fwd"] = busy * 1e6 / max(1, after - before)
        result["softirq_us_per_fwd"] = soft * 1e6 / max(1, after - before)
        return result

    def loss_free(self, seconds: float, hi: float) -> dict:
        """RFC 2544-style throughput: the highest offered rate (binary search, 6 steps) at which at least
        99.5 % of the packets are forwarded."""
        lo, best = 0.0, None
        top = hi
        for _ in range(6):
            rate = (lo + top) / 2 if best is not None or lo else top / 2
            result = self.generate(seconds, rate)
            if result["forwarded"] >= 0.995 * result["sent"]:
                lo, best = rate, result
            else:
                top = rate
        if best is None:
            best = {
                "sent": 0,
                "seconds": seconds,
                "pps": 0.0,
                "forwarded": 0,
                "fwd_pps": 0.0,
                "cpu_us_per_fwd": 0.0,
                "softirq_us_per_fwd": 0.0,
            }
        best = dict(best)
        best["loss_free_pps"] = best["fwd_pps"]
        return best

    # -- cases

    def generator_alone(self, seconds):
        self.fwd.sysctl("net.ipv4.ip_forward", 0)
        return self.generate(seconds)

    def kernel(self, seconds, search: float = 0.0):
        self.fwd.sysctl("net.ipv4.ip_forward", 1)
        try:
            return self.loss_free(seconds, search) if search else self.generate(seconds)
        finally:
            self.fwd.sysctl("net.ipv4.ip_forward", 0)

    def write_config(self, method: str) -> Path:
        path = self.workdir / f"{method}.toml"
        server = {"address": SERVER_IP, "mac": NOBODY_MAC}
        if method != "mac":
            server.update(encapforward=True, encaptype=method, encapcond="always")
        lines = [
            "[executor]",
            f'nfa = "{FWD_IP}"',
            'interface = "f0"',
            'networks = ["10.1.0.0/24"]',
            "",
            "[[clusters]]",
            f'address = "{VIP}"',
            "",
            "[[clusters.ports]]",
            f"number = {UDP_PORT}",
            "",
            "[[clusters.ports.servers]]",
        ]
        for key, value in server.items():
            lines.append(f"{key} = {json.dumps(value)}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def rps(self, cpu: int) -> None:
        self.fwd.run(["sh", "-c", f"echo {1 << cpu:x} > /sys/class/net/f0/queues/rx-0/rps_cpus"])

    def encapfwd(
        self, method: str, workers: int, seconds, rx_cpu: int = FWD_CPU, search: float = 0.0, rate: float = 0.0
    ):
        self.rps(rx_cpu)
        try:
            return self._encapfwd(method, workers, seconds, search, rate)
        finally:
            self.rps(FWD_CPU)

    def _encapfwd(self, method: str, workers: int, seconds, search: float = 0.0, rate: float = 0.0):
        config = self.write_config(method)
        control = str(self.workdir / "control.sock")
        cpus = str(FWD_CPU) if workers == 1 else ",".join(str(c) for c in (FWD_CPU, GEN_CPU)[:workers])
        exe = Path(sys.executable).parent / "encapfwd"
        argv = self.fwd.argv(
            [
                "nice",
                "-n",
                "-20",
                str(exe),
                "--config",
                str(config),
                "run",
                "--interface",
                "f0",
                "--workers",
                str(workers),
                "--control",
                control,
                "--cpus",
                cpus,
            ]
            + (["--qdisc-bypass"] if getattr(self.args, "qdisc_bypass", False) else [])
        )
        log = open(self.workdir / "run.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            from encapfwd.engines.live import query_control

            deadline = time.monotonic() + 20
            while True:
                try:
                    query_control(control, "ping", timeout=1)
                    break
                except (OSError, ValueError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((self.workdir / "run.log").read_text()) from None
                    time.sleep(0.05)
            pids = [w["pid"] for w in query_control(control)["workers"]]
            cpu = self.proc_cpu(pids)
            if search:
                result = self.loss_free(seconds, search)
                cpu = self.proc_cpu(pids) - cpu
                result["worker_us_per_fwd"] = 0.0
            else:
                result = self.generate(seconds, rate)
                cpu = self.proc_cpu(pids) - cpu
                result["worker_us_per_fwd"] = cpu * 1e6 / max(1, result["forwarded"])
            report = query_control(control)
            result["kernel_drops"] = report["engine"].get("kernel_drops")
            result["dispatcher_forwarded"] = report.get("forwarded")
            return result
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each trial")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flows", type=int, default=256)
    parser.add_argument("--methods", default="mac,ipip,gre")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--no-search", action="store_true", help="skip the loss-free throughput search")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--rx-on-generator-cpu",
        action="store_true",
        help="also run each 1-worker case with f0's receive softirq (RPS) on the generator's CPU",
    )
    parser.add_argument(
        "--worker-cost",
        type=float,
        default=0.0,
        metavar="PPS",
        help="also measure each 1-worker method's CPU time per frame at this fixed rate (receive work on the "
        "generator's CPU)",
    )
    parser.add_argument("--qdisc-bypass", action="store_true", help="run encapfwd with --qdisc-bypass")
    parser.add_argument(
        "--generator", nargs=5, metavar=("IF", "DSTMAC", "SECONDS", "FLOWS", "RATE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.generator:
        ifname, mac, seconds, flows, rate = args.generator
        generator(ifname, mac, float(seconds), int(flows), float(rate))
        return 0
    if os.geteuid() != 0:
        print("bench/live.py needs root (network namespaces, AF_PACKET)", file=sys.stderr)
        return 1
    if os.cpu_count() < 2:
        print("bench/live.py needs 2 CPUs (generator and forwarder on their own cores)", file=sys.stderr)
        return 1
    methods = [m for m in args.methods.split(",") if m]
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(
        f"Live forwarding, 64-byte UDP frames, {args.flows} flows, {args.seconds:g} s per trial, "
        f"{args.rounds} rounds; {os.cpu_count()} CPUs, kernel {os.uname().release}, "
        f"load average {' '.join(load)}"
    )
    print(
        f"Placement: generator pinned to CPU {GEN_CPU}; forwarding on CPU {FWD_CPU} (kernel: RPS on f0; "
        f"encapfwd: worker pinned with --cpus {FWD_CPU}, the kernel's receive work for it also on "
        f"CPU {FWD_CPU} "
        f"via RPS). With 2 workers: --cpus {FWD_CPU},{GEN_CPU}, so the 2nd worker shares CPU {GEN_CPU} with "
        f"the generator."
    )
    print(
        "The generator and encapfwd run at nice -20 so that other jobs on this shared machine take little of "
        "their CPUs (the kernel's forwarding runs in softirq, ahead of every process anyway)."
    )
    print("Shared machine: other jobs may run; figures are medians over rounds, min–max in brackets.")
    if args.qdisc_bypass:
        print("encapfwd runs with --qdisc-bypass (PACKET_QDISC_BYPASS).")
    print()

    cases = [("kernel IP forwarding", lambda b, s, q=0.0: b.kernel(s, q))]
    for workers in worker_counts:
        for method in methods:
            cases.append(
                (
                    f"encapfwd {method} {workers}w",
                    lambda b, s, q=0.0, m=method, w=workers: b.encapfwd(m, w, s, search=q),
                )
            )
            if args.rx_on_generator_cpu and workers == 1:
                cases.append(
                    (
                        f"encapfwd {method} {workers}w rx@cpu{GEN_CPU}",
                        lambda b, s, q=0.0, m=method, w=workers: b.encapfwd(
                            m, w, s, rx_cpu=GEN_CPU, search=q
                        ),
                    )
                )
    flat = {name: [] for name, _ in cases}
    flat["generator alone"] = []
    free = {name: [] for name, _ in cases}
    cost = {m: [] for m in methods} if args.worker_cost else {}
    bench = Bench(args)
    try:
        for _ in range(args.rounds):
            for method in cost:
                cost[method].append(
                    bench.encapfwd(method, 1, args.seconds, rx_cpu=GEN_CPU, rate=args.worker_cost)
                )
            alone = bench.generator_alone(args.seconds)
            flat["generator alone"].append(alone)
            for name, case in cases:
                flat[name].append(case(bench, args.seconds))
            if not args.no_search:
                for name, case in cases:
                    free[name].append(case(bench, args.seconds, alone["pps"]))
    finally:
        bench.close()

    def med(table, name, key):
        values = [r.get(key, 0.0) for r in table[name]]
        return statistics.median(values), min(values), max(values)

    print(
        "1. Generator flat out (offered load above what the forwarder takes; dropped packets still cost the "
        "forwarding CPU their receive work):"
    )
    kernel = med(flat, "kernel IP forwarding", "fwd_pps")[0]
    print(
        f"   {'case':<28} {'forwarded pps':>14} {'(min–max)':>22} {'× kernel':>9} {'offered pps':>12} "
        f"{'CPU1 µs/fwd':>12}"
    )
    for name in ["generator alone"] + [n for n, _ in cases]:
        key = "pps" if name == "generator alone" else "fwd_pps"
        m, lo, hi = med(flat, name, key)
        offered = med(flat, name, "pps")[0]
        ratio = "" if name == "generator alone" else f"{m / kernel:9.2f}"
        cpu = "" if name == "generator alone" else f"{med(flat, name, 'cpu_us_per_fwd')[0]:12.2f}"
        print(f"   {name:<28} {m:>14,.0f} {f'({lo:,.0f}–{hi:,.0f})':>22} {ratio:>9} {offered:>12,.0f} {cpu}")
    if not args.no_search:
        print(
            "\n2. Loss-free throughput (RFC 2544 style: highest offered rate with ≥ 99.5 % forwarded; binary "
            "search up to the generator's own rate):"
        )
        kernel = med(free, "kernel IP forwarding", "loss_free_pps")[0] or 1.0
        print(f"   {'case':<28} {'loss-free pps':>14} {'(min–max)':>22} {'× kernel':>9}")
        for name, _ in cases:
            m, lo, hi = med(free, name, "loss_free_pps")
            print(f"   {name:<28} {m:>14,.0f} {f'({lo:,.0f}–{hi:,.0f})':>22} {m / kernel:9.2f}")
    if cost:
        print(
            f"\n3. Worker CPU time per forwarded frame at a fixed {args.worker_cost:,.0f} pps, one worker, f0's "
            f"receive work on CPU {GEN_CPU} (user + system time of the worker process):"
        )
        print(f"   {'case':<28} {'µs/frame':>9} {'(min–max)':>16} {'forwarded/sent':>15}")
        for method, results in cost.items():
            m, lo, hi = med(cost, method, "worker_us_per_fwd")
            share = statistics.median(r["forwarded"] / max(1, r["sent"]) for r in results)
            print(f"   {'encapfwd ' + method + ' 1w':<28} {m:9.2f} {f'({lo:.2f}–{hi:.2f})':>16} {share:15.3f}")
    alone = med(flat, "generator alone", "pps")[0]
    print(
        f"\nThe generator alone sends {alone:,.0f} pps; when the kernel forwards about that much, "
        "the kernel's "
        f"figure is a lower bound (the generator is the limit), and its ratio flatters nobody but the kernel."
    )
    print(
        "CPU1 µs/fwd: CPU 1's busy time (all tasks and softirq) per forwarded packet — inflated by "
        "other jobs."
    )
    print("Target: encapfwd with one worker ≥ 0.9 × kernel IP forwarding.")
    if args.json:
        print(json.dumps({"flat_out": flat, "loss_free": free, "worker_cost": cost}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
