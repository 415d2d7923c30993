#!/usr/bin/env python3
"""Live forwarding speed per method: kernel IP forwarding vs encapfwd run's AF_PACKET and XDP engines.

MAC, IPIP and GRE; the three cases on the same veth path, the same CPU placement and the same generator.
Root, Linux, 2 CPUs, clang + libbpf-dev; where the kernel refuses live frames also trafgen (Debian
netsniff-ng) and gcc.

Topology (one-armed, as a dispatcher is)::

    gen ns   g0 ──veth── f0   fwd ns
    generator on CPU 0: 64-byte UDP frames         (a) kernel IP forwarding: ip_forward=1, VIP via 10.1.0.3
      → VIP:9, --flows source ports, out of g0     (b) encapfwd run --engine afpacket --cpus 1
      into f0 (live frames: XDP_TX of xdp_gen;     (c) the XDP engine (encapfwd run --engine xdp when that
      trafgen: a TX ring, socket buffers)              exists, else DataPlane.load(plan).attach(f0, native)
    xdp_count on g0: counts the frames that come       in a helper process inside the fwd namespace)
      back to 10.1.0.3's MAC (NOBODY_MAC, owned     all three send the frame back out of f0 to NOBODY_MAC
      by nobody), drops everything                  (MAC forwarding, or IPIP / GRE to 10.1.0.3 on-link)
                                                   (d) encapfwd run --engine tc, (e) --engine auto (its
                                                       choice printed: TC, as on every veth)

Generator (--generator auto | live-frames | trafgen | xdp-redirect; bench/live_helpers.py in the gen namespace):

- live frames: xdp_gen (bench/xdp_gen.bpf.c) run with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES in
  a thread: one test run per trial, stopped by a signal (a test run costs tens of milliseconds of setup and
  teardown on these VMs, so many short calls cannot make a rate); a paced run is paced by the program
  itself (token bucket: it sends only when behind the rate, else XDP_DROP). f0 receives XDP frames.
- trafgen: where the kernel refuses live frames (some kernels answer EPERM even to root), trafgen sends the
  --flows frames round robin from a 64 KiB TX ring, its packet sockets given a 64 MiB send buffer by
  SO_SNDBUFFORCE (bench/trafgen_shim.c, LD_PRELOAD, compiled at bench time: inside a namespace trafgen
  cannot raise net.core.wmem_*, and with 208 KiB waiting in f0's NAPI ring its flush dies with EAGAIN);
  paced: ``trafgen -b RATEpps``. f0 receives socket buffers: before its native XDP program runs, the veth
  copies each into a page of its own (and frees the skb), so the XDP engine gains much less over the
  kernel than with XDP frames. trafgen offers ≈ 0.45–0.75 Mpps from CPU 0 here (its worker pins itself to
  CPU 0, ``-P 1``), more than any case forwards from socket buffers; compare the ns per forwarded frame.
- xdp-redirect: trafgen into a second veth pair (s0 → s1) in the gen namespace, whose far end's XDP program
  (xdp_stage) redirects every frame to g0: f0 receives XDP frames where the kernel refuses live frames.
- auto (the default): one live-frames test run of xdp_gen (paced to send nothing) decides; the kernel's
  refusal (EPERM, EINVAL, EOPNOTSUPP) is printed and trafgen runs.

Placement: the generator pinned to CPU 0; f0's receive work on CPU 1: f0 has GRO on (a veth has a NAPI
ring only with GRO or an XDP program; writing ``threaded`` fails with EIO without one), NAPI threaded
(``/sys/class/net/f0/threaded``) and its ``napi/f0-*`` kthread pinned to CPU 1 at normal priority; the
kernel forwards in that thread, the XDP program runs in it, and ``encapfwd run --cpus 1`` puts the workers
there too. g0's NAPI thread (the counting program) is pinned to CPU 0 at SCHED_FIFO 50: else, on a busy
CPU 0, g0's 256-frame ring overflows and forwarded frames go uncounted. RPS is off on both ends.

Figures per trial: forwarded = frames back at g0 / seconds; offered = frames generated / seconds (live
frames: xdp_gen's runs; trafgen: g0's tx_packets + tx_dropped, i.e. taken by f0 or refused by its full
ring; the generator is the limit when forwarded ≥ 95 % of offered); CPU1 ns/pkt = CPU 1's busy time
(/proc/stat user + nice + system + irq + softirq, every task) / frames forwarded; threads ns/pkt = on-CPU time
(schedstat) of f0's NAPI thread and the dispatcher's processes / frames forwarded (the same work without
other jobs sharing CPU 1); for XDP also the program's own ns per packet (kernel.bpf_stats_enabled=1,
run_time_ns / run_cnt, restored after, in a separate shorter trial so that the statistics' cost does not
touch the rate). f0's own counters (ip -s link, ethtool -S) are kept per trial as a cross-check. The
kernel's forwarding is the same whatever the method: measured once per round, it heads every table.

Reload under load (XDP): paced at half the XDP median rate, f0's NAPI thread at SCHED_FIFO (so that other
jobs cannot hold it off CPU 1 longer than f0's 256-frame ring lasts), a run during which the plan is
replaced --reloads times (alternately with one more server: ``encapfwd run``'s control ``reload``, or
DataPlane.install from a helper pinned to CPU 1), then a run as long without; lost = generated − back,
split into f0's ring overflowing (the frame never reached the program: f0's rx_dropped for XDP frames, g0's
tx_dropped for socket buffers), the program not sending it, and the way back.

Replaced by this version: the AF_PACKET TX-ring generator (≈ 0.6–0.7 Mpps, about what the kernel forwards),
RPS placement, f0's tx_packets as the forwarded count, the "generator alone" row, the loss-free binary
search, --worker-cost, --rx-on-generator-cpu and --workers (a second worker would share the generator's CPU).

Run: ``sudo .venv/bin/python bench/live.py [--seconds 3] [--rounds 3] [--flows 256] [--generator auto]
[--json]``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from live_helpers import prog_info  # bench/ beside this file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core" / "src"))

GEN_CPU = 0
FWD_CPU = 1
GEN_IP = "10.1.0.2"
FWD_IP = "10.1.0.1"
SERVER_IP = "10.1.0.3"
SERVER2_IP = "10.1.0.4"  # the server the reload check adds and removes
VIP = "10.1.9.1"
NOBODY_MAC = "02:00:00:00:00:33"
UDP_PORT = 9
GENERATOR_BOUND = 0.95
COUNTER_FIFO = 50  # SCHED_FIFO priority of g0's NAPI thread (the counting program)
PACED_FIFO = 40  # of f0's NAPI thread during the reload check
HELPERS = Path(__file__).resolve().parent / "live_helpers.py"
ENCAPFWD = Path(sys.executable).parent / "encapfwd"


def sh(*argv, check=True, **kw):
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def napi_threads(dev: str) -> set:
    """pids of the threaded-NAPI kthreads of interfaces called *dev* (any namespace): ``napi/DEV-ID``."""
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(f"napi/{dev}-"):
                pids.add(int(pid))
    return pids


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the bench dies, even by SIGKILL (PR_SET_PDEATHSIG survives the
    exec of ``ip netns exec``, ``nice`` and the command)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def run_help() -> str:
    proc = subprocess.run([str(ENCAPFWD), "run", "--help"], capture_output=True, text=True)
    return proc.stdout


class Helper:
    """A bench/live_helpers.py process inside a namespace: one JSON command per line, one answer back."""

    def __init__(self, ns, *argv, timeout: float = 60):
        self.log = tempfile.TemporaryFile()
        self.proc = ns.popen([sys.executable, str(HELPERS), *argv], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=self.log, text=True, preexec_fn=die_with_parent)
        try:
            self.ready = self.answer(timeout)
        except BaseException:
            self.close()
            raise

    def answer(self, timeout: float = 600) -> dict:
        import select

        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"helper {self.proc.args[-1]}: no answer within {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"helper exited: {self.log.read().decode(errors='replace').strip()[-2000:]}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"helper: {out['error']}")
        return out

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ask(self, **cmd) -> dict:
        self.send(**cmd)
        return self.answer()

    def close(self) -> None:
        """Ask it to quit (it detaches and unloads its programs), else SIGTERM (same), else SIGKILL."""
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.stdin.close()  # a helper in the middle of a run takes "quit" as "stop": EOF ends it
                self.proc.wait(10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.log.close()


class Bench:
    def __init__(self, args):
        from encapfwd.lab.netns import Namespace

        self.args = args
        self.helpers = []
        self.procs = []
        self.bpf_stats_saved = None
        # NAPI threads of interfaces of the same names elsewhere (another lab) are not ours to move
        self.foreign_napi = napi_threads("f0") | napi_threads("g0")
        self.workdir = Path(tempfile.mkdtemp(prefix="efwbench"))
        self.gen = Namespace("bgen")
        self.fwd = Namespace("bfwd")
        try:
            self._setup(args)
        except BaseException:
            self.close()
            raise

    def _setup(self, args):
        from encapfwd.lab.netns import veth_pair

        self.gen.create()
        self.fwd.create()
        for ns in (self.gen, self.fwd):
            for key in ("all", "default"):
                ns.sysctl(f"net.ipv6.conf.{key}.disable_ipv6", 1)  # no router solicitations, MLD, …
        veth_pair(self.gen, "g0", self.fwd, "f0")
        self.gen.ip("addr", "add", f"{GEN_IP}/24", "dev", "g0")
        self.fwd.ip("addr", "add", f"{FWD_IP}/24", "dev", "f0")
        for ns, dev in ((self.gen, "g0"), (self.fwd, "f0")):
            ns.ethtool_offload(dev, tx=False, gro=False)
            for key in ("all", "default", dev):
                ns.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
                ns.sysctl(f"net.ipv4.conf.{key}.send_redirects", 0)
            ns.run(["sh", "-c", f"echo 0 > /sys/class/net/{dev}/queues/rx-0/rps_cpus"])
        for server in (SERVER_IP, SERVER2_IP):
            self.fwd.ip("neigh", "replace", server, "lladdr", NOBODY_MAC, "dev", "f0", "nud", "permanent")
        self.fwd.ip("route", "add", f"{VIP}/32", "via", SERVER_IP)
        # f0's NAPI ring for every case: GRO on (the XDP engine's program keeps it as well)
        self.fwd.ethtool_offload("f0", gro=True)
        self.f0_mac = self.fwd.mac("f0")
        self.generator = self.helper(self.gen, "gen", "g0", self.f0_mac, NOBODY_MAC, str(args.flows),
                                     str(GEN_CPU), GEN_IP, VIP, str(UDP_PORT), args.generator)
        self.generator_info = {k: self.generator.ready.get(k) for k in ("generator", "input", "live_frames",
                                                                         "detail")}
        self.place()

    def helper(self, ns, *argv) -> Helper:
        h = Helper(ns, *argv)
        self.helpers.append(h)
        return h

    def close(self):
        self.restore_bpf_stats()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for h in reversed(self.helpers):
            h.close()
        self.helpers = []
        self.fwd.delete()
        self.gen.delete()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- placement

    def pin_napi(self, ns, dev: str, cpu: int, fifo: int = 0) -> list:
        """Make *dev*'s NAPI threaded and pin its kthread(s) to *cpu* (SCHED_FIFO at *fifo*, else normal)."""
        proc = ns.run(["sh", "-c", f"echo 1 > /sys/class/net/{dev}/threaded"], check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{dev}: threaded NAPI refused ({proc.stderr.strip()}): the veth has no NAPI "
                               "ring (neither GRO nor an XDP program)")
        pids = sorted(napi_threads(dev) - self.foreign_napi)
        if not pids:
            raise RuntimeError(f"{dev}: no napi/{dev}-* kthread found after enabling threaded NAPI")
        for pid in pids:
            os.sched_setaffinity(pid, {cpu})
            if fifo:
                os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(fifo))
            else:
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
        return pids

    def place(self, f0_fifo: int = 0):
        """f0's NAPI thread on CPU 1 (normal priority: it shares CPU 1 with the AF_PACKET worker as a NIC's
        receive work would, unless *f0_fifo*); g0's (the counting program) on CPU 0 at SCHED_FIFO 50, so that
        what comes back is counted however busy CPU 0 is (else g0's ring overflows and forwarded frames go
        uncounted)."""
        self.napi = {"f0": self.pin_napi(self.fwd, "f0", FWD_CPU, f0_fifo),
                     "g0": self.pin_napi(self.gen, "g0", GEN_CPU, COUNTER_FIFO)}

    # -- counters of f0 (cross-check of what the generator helper counts)

    def f0_stats(self) -> dict:
        link = json.loads(self.fwd.run(["ip", "-s", "-j", "link", "show", "f0"]).stdout)[0]
        out = {f"{d}_{k}": link["stats64"][d][k] for d in ("rx", "tx") for k in ("packets", "dropped")}
        proc = self.fwd.run(["ethtool", "-S", "f0"], check=False)
        for line in proc.stdout.splitlines()[1:]:
            name, _, value = line.strip().partition(":")
            if value.strip().isdigit():
                out[name.strip()] = int(value)
        return out

    # -- one trial

    def run_command(self, seconds: float, rate: float = 0.0, pids=(), **extra) -> dict:
        return dict(cmd="run", seconds=seconds, rate=rate, cpus=[FWD_CPU],
                    pids=sorted(set(self.napi["f0"]) | set(pids)), **extra)

    def trial(self, seconds: float, rate: float = 0.0, pids=()) -> dict:
        """One generator run; *pids*: the dispatcher's processes (their threads' CPU time is counted with
        f0's NAPI thread)."""
        before = self.f0_stats()
        out = self.generator.ask(**self.run_command(seconds, rate, pids))
        after = self.f0_stats()
        return self.summarise(out, before, after)

    @staticmethod
    def summarise(out: dict, before: dict, after: dict) -> dict:
        seconds = out["seconds"]
        out["f0"] = f0 = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        out["fwd_pps"] = out["back"] / seconds
        out["offered_pps"] = out["generated"] / seconds
        out["cpu1_ns_per_pkt"] = out["busy_ns"][str(FWD_CPU)] / max(1, out["back"])
        out["threads_ns_per_pkt"] = out["task_ns"] / max(1, out["back"])
        out["generator_bound"] = out["back"] >= GENERATOR_BOUND * out["generated"]
        # forwarded by f0 but lost before g0's counter (g0's ring full): the count would understate
        out["return_lost"] = f0.get("tx_dropped", 0) + f0.get("rx_queue_0_xdp_tx_errors", 0)
        return out

    # -- cases

    def kernel(self, seconds):
        self.fwd.sysctl("net.ipv4.ip_forward", 1)
        try:
            self.place()
            return self.trial(seconds)
        finally:
            self.fwd.sysctl("net.ipv4.ip_forward", 0)

    def write_config(self, method: str, servers=(SERVER_IP,), name: str = "", mac: bool = False) -> Path:
        path = self.workdir / f"{name or method}.toml"
        lines = [
            "[executor]",
            f'nfa = "{FWD_IP}"',
            'interface = "f0"',
            'networks = ["10.1.0.0/24"]',
            "maxflows = 65536",
        ]
        if mac:  # the direct XDP path has no `encapfwd run` to read it from the interface
            lines.append(f'mac = "{self.f0_mac}"')
        lines += ["", "[[clusters]]", f'address = "{VIP}"', "", "[[clusters.ports]]", f"number = {UDP_PORT}"]
        for address in servers:
            server = {"address": address, "mac": NOBODY_MAC}
            if method != "mac":
                server.update(encapforward=True, encaptype=method, encapcond="always")
            lines += ["", "[[clusters.ports.servers]]"]
            lines += [f"{key} = {json.dumps(value)}" for key, value in server.items()]
        text = "\n".join(lines) + "\n"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def start_run(self, engine: str, config: Path, control: str) -> subprocess.Popen:
        """``encapfwd run`` (engine *engine* when it has --engine) in the fwd namespace, pinned to CPU 1;
        returns once its control socket answers."""
        from encapfwd.control import query_control

        help_text = run_help()
        argv = ["nice", "-n", "-20", str(ENCAPFWD), "--config", str(config), "run", "--interface", "f0",
                "--workers", "1", "--control", control, "--cpus", str(FWD_CPU)]
        if "--engine" in help_text:
            argv += ["--engine", engine]
        elif engine != "afpacket":
            raise RuntimeError("encapfwd run has no --engine")
        if engine == "xdp" and "--xdp-mode" in help_text:
            argv += ["--xdp-mode", "native"]
        if self.args.qdisc_bypass and engine == "afpacket":
            argv.append("--qdisc-bypass")
        log_path = self.run_log(engine)
        with open(log_path, "wb") as log:
            proc = self.fwd.popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                query_control(control, "ping", timeout=1)
                return proc
            except (OSError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop_run(proc)
                    tail = log_path.read_text()[-2000:]
                    raise RuntimeError(f"encapfwd run --engine {engine}: {tail}") from None
                time.sleep(0.05)

    def run_log(self, engine: str) -> Path:
        return self.workdir / f"run-{engine}.log"

    def stop_run(self, proc) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def afpacket(self, method: str, seconds, engine: str = "afpacket", stats_seconds: float = 0):
        """A trial of ``encapfwd run --engine ENGINE``; for a kernel program (tc, auto) also its own ns per
        packet under bpf_stats in an extra *stats_seconds* trial, as for the XDP engine."""
        from encapfwd.control import query_control

        control = str(self.workdir / "control.sock")
        proc = self.start_run(engine, self.write_config(method), control)
        try:
            self.place()
            result = self.trial(seconds, pids=run_pids(proc, control))
            prog = kernel_prog(self.fwd, "f0") if engine != "afpacket" and stats_seconds else None
            if prog is not None:
                with self.bpf_stats():
                    s0 = prog_stats(prog)
                    result["stats_trial"] = self.trial(stats_seconds, pids=run_pids(proc, control))
                    s1 = prog_stats(prog)
                runs = s1[1] - s0[1]
                result["prog_ns_per_pkt"] = (s1[0] - s0[0]) / runs if runs else None
                result["prog_runs"] = runs
            report = query_control(control)
            result["kernel_drops"] = report["engine"].get("kernel_drops")
            result["dispatcher_forwarded"] = report.get("forwarded")
            chosen = report["engine"].get("engine")
            mode = report["engine"].get("xdp_mode")
            result["chosen"] = f"{chosen} {mode}" if chosen in ("xdp", "tc") and mode else chosen
            return result
        finally:
            self.stop_run(proc)

    # -- XDP

    def xdp_engine(self, method: str):
        if "--engine" in run_help() and not self.args.xdp_direct:
            return XDPRun(self, method)
        return XDPDirect(self, method)

    def xdp(self, method: str, seconds: float, stats_seconds: float) -> dict:
        engine = self.xdp_engine(method)
        try:
            pid, mode = attached_prog(self.fwd, "f0")
            self.place()
            result = self.trial(seconds, pids=engine.pids())
            result["engine"] = engine.how
            result["engine_says"] = engine.says()
            result["xdp_mode"] = mode
            if stats_seconds:
                with self.bpf_stats():
                    s0 = prog_stats(pid)
                    stats_trial = self.trial(stats_seconds, pids=engine.pids())
                    s1 = prog_stats(pid)
                runs = s1[1] - s0[1]
                result["prog_ns_per_pkt"] = (s1[0] - s0[0]) / runs if runs else None
                result["prog_runs"] = runs
                result["stats_trial"] = stats_trial
            return result
        finally:
            engine.close()

    def reload_check(self, method: str, rate: float, seconds: float, reloads: int) -> dict:
        """Paced at *rate*: a run during which the plan changes *reloads* times, then one as long without."""
        engine = self.xdp_engine(method)
        try:
            # f0's NAPI thread at SCHED_FIFO: other jobs on a shared machine must not hold it off CPU 1 for
            # longer than f0's ring (256 frames) lasts, or their delay would count as the reload's loss
            self.place(f0_fifo=PACED_FIFO)
            before = self.f0_stats()
            self.generator.send(**self.run_command(0.0, rate, engine.pids(), until_stop=True))
            time.sleep(0.2)
            t = time.perf_counter()
            done = engine.reload(reloads, interval=max(0.0, seconds / reloads - 0.02))
            reload_seconds = time.perf_counter() - t
            time.sleep(0.2)
            self.generator.send(cmd="stop")
            loaded = self.summarise(self.generator.answer(), before, self.f0_stats())
            loaded.update(done)
            loaded["reload_seconds"] = reload_seconds
            steady = self.trial(loaded["seconds"], rate, pids=engine.pids())
            for run in (loaded, steady):
                f0 = run["f0"]
                run["lost"] = run["generated"] - run["back"]
                # never reached the program: f0's ring full (XDP frames: f0's rx_dropped; socket buffers:
                # the veth refuses them at g0's transmit, g0's tx_dropped)
                run["lost_f0_ring"] = f0.get("rx_dropped", 0) + run.get("ring_full", 0)
                run["lost_program"] = (f0.get("rx_queue_0_xdp_packets", 0) - f0.get("rx_queue_0_xdp_tx", 0)
                                       - f0.get("rx_queue_0_xdp_tx_errors", 0))
                run["lost_return"] = f0.get("rx_queue_0_xdp_tx_errors", 0)
            return {"rate": rate, "engine": engine.how, "reloading": loaded, "steady": steady}
        finally:
            engine.close()
            self.place()

    # -- BPF run-time statistics (global sysctl; restored even on failure)

    def bpf_stats(self):
        bench = self

        class _Stats:
            def __enter__(self):
                if bench.bpf_stats_saved is None:
                    bench.bpf_stats_saved = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
                Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")

            def __exit__(self, *exc):
                bench.restore_bpf_stats()

        return _Stats()

    def restore_bpf_stats(self):
        if self.bpf_stats_saved is not None:
            Path("/proc/sys/kernel/bpf_stats_enabled").write_text(self.bpf_stats_saved)
            self.bpf_stats_saved = None


def run_pids(proc, control: str) -> list:
    """``encapfwd run``'s controller and workers."""
    from encapfwd.control import query_control

    return [proc.pid] + [w["pid"] for w in query_control(control).get("workers", []) if w.get("pid")]


XDP_ATTACHED_MODES = {1: "native", 2: "generic", 3: "offload", 4: "multi"}  # linux/if_link.h XDP_ATTACHED_*


def attached_prog(ns, dev: str) -> tuple:
    """``(program id, "native" | "generic" | …)`` of the XDP program on *dev*; RuntimeError when none."""
    link = json.loads(ns.run(["ip", "-j", "link", "show", dev]).stdout)[0]
    xdp = link.get("xdp") or {}
    prog = xdp.get("prog") or {}
    if not prog.get("id"):
        raise RuntimeError(f"no XDP program on {dev}: {xdp}")
    return int(prog["id"]), XDP_ATTACHED_MODES.get(xdp.get("mode"), str(xdp.get("mode")))


def kernel_prog(ns, dev: str):
    """The id of encapfwd's kernel program on *dev*: its XDP program, else its TC program (tcx or cls_bpf);
    None when there is none."""
    try:
        return attached_prog(ns, dev)[0]
    except RuntimeError:
        pass
    # encapfwd's own query: tcx links and cls_bpf filters alike (Debian 12's bpftool 7.1 lists no tcx)
    code = ("import socket\nfrom encapfwd.xdp import tc\n"
            f"print(' '.join(str(o[2]) for o in tc.attached_owners(socket.if_nametoindex({dev!r}))))")
    proc = ns.run([sys.executable, "-c", code], check=False)
    ids = proc.stdout.split() if proc.returncode == 0 else []
    return int(ids[0]) if ids else None


def prog_stats(prog_id: int) -> tuple:
    """``(run_time_ns, run_cnt)`` of a loaded program (bpftool; counted while bpf_stats_enabled=1)."""
    info = prog_info(prog_id)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


class XDPRun:
    """``encapfwd run --engine xdp``; reloads through the control socket (``reload``)."""

    how = "encapfwd run --engine xdp"

    def __init__(self, bench: Bench, method: str):
        self.bench, self.method = bench, method
        self.control = str(bench.workdir / "control.sock")
        self.config = bench.write_config(method, name=f"{method}-xdp")
        self.proc = bench.start_run("xdp", self.config, self.control)

    def pids(self) -> list:
        return run_pids(self.proc, self.control)

    def says(self) -> str:
        """The first line ``encapfwd run`` logged (which engine, and why)."""
        text = self.bench.run_log("xdp").read_text(errors="replace").strip()
        return text.splitlines()[0] if text else ""

    def reload(self, count: int, interval: float) -> dict:
        from encapfwd.control import query_control

        times, errors = [], []
        for i in range(count):
            servers = (SERVER_IP, SERVER2_IP) if i % 2 == 0 else (SERVER_IP,)
            self.bench.write_config(self.method, servers, name=f"{self.method}-xdp")
            t = time.perf_counter()
            answer = query_control(self.control, "reload", timeout=30)
            times.append((time.perf_counter() - t) * 1e3)
            if answer.get("error"):
                errors.append(answer["error"])
            time.sleep(interval)
        return {"reloads": count - len(errors), "reload_errors": errors, "install_ms": times}

    def close(self):
        self.bench.stop_run(self.proc)


class XDPDirect:
    """The data plane without ``encapfwd run``: compile_plan + DataPlane.load + attach(f0, native) in a helper
    process inside the fwd namespace; reloads are DataPlane.install of a freshly compiled plan."""

    how = "DataPlane.load + attach(f0, native) in a helper, no encapfwd run"

    def __init__(self, bench: Bench, method: str):
        self.bench = bench
        two = bench.write_config(method, (SERVER_IP, SERVER2_IP), name=f"{method}-2", mac=True)
        self.configs = [str(two), str(bench.write_config(method, name=f"{method}-1", mac=True))]
        self.helper = bench.helper(bench.fwd, "xdp", "f0", self.configs[1], str(FWD_CPU))

    def pids(self) -> list:
        return [self.helper.ready["pid"]]

    def says(self) -> str:
        return self.how

    def reload(self, count: int, interval: float) -> dict:
        out = self.helper.ask(cmd="reloads", configs=self.configs, count=count, interval=interval)
        out["reload_errors"] = []
        return out

    def close(self):
        self.helper.close()
        if self.helper in self.bench.helpers:
            self.bench.helpers.remove(self.helper)


# ----------------------------------------------------------------------------------------------- report


#: encapfwd run's engines the bench measures (--engines)
ENGINES = ("afpacket", "xdp", "tc", "auto")


def spread(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return None
    return min(values), statistics.median(values), max(values)


def print_tables(results: dict, methods, args) -> None:
    says = {r.get("engine_says") for m in methods for r in results["xdp"][m]} - {None, ""}
    if says:
        print("\nXDP engine: " + " | ".join(sorted(says)))
    gen = results["generator"]
    fed = f"{gen['input']} ({gen['generator'].replace('-', ' ')})"
    kernel = results["kernel"]
    k_med = spread(kernel, "fwd_pps")[1]
    for method in methods:
        print(f"\n{method.upper()}, input {fed}: forwarded kpps (min / median / max of {args.rounds} rounds "
              f"of {args.seconds:g} s), offered kpps and ns per forwarded packet on CPU {FWD_CPU} (medians)")
        print(f"   {'case':<28} {'forwarded kpps':>21} {'× kernel':>8} {'offered kpps':>12} "
              f"{'CPU1 ns/pkt':>11} {'threads ns/pkt':>14} {'prog ns/pkt':>11}")
        rows = [("kernel IP forwarding", kernel)]
        for engine in results["engines"]:
            data = results[engine].get(method)
            if data:
                chosen = sorted({r["chosen"] for r in data if r.get("chosen")})
                name = f"auto → {'/'.join(chosen)}" if engine == "auto" and chosen else engine
                rows.append((f"encapfwd {name}", data))
        for name, data in rows:
            lo, med, hi = spread(data, "fwd_pps")
            offered = spread(data, "offered_pps")[1]
            cpu = spread(data, "cpu1_ns_per_pkt")[1]
            threads = spread(data, "threads_ns_per_pkt")[1]
            prog = spread(data, "prog_ns_per_pkt")
            notes = []
            modes = {r["xdp_mode"] for r in data if r.get("xdp_mode")} - {"native"}
            if modes:
                notes.append(f"XDP attached {'/'.join(sorted(modes))}, not native")
            bound = sum(r["generator_bound"] for r in data)
            if bound:
                notes.append(f"generator-bound in {bound}/{len(data)}")
            lost = sum(r["return_lost"] for r in data)
            if lost > 0.005 * sum(r["back"] for r in data):
                notes.append(f"{lost:,} forwarded frames lost before the counter")
            print(f"   {name:<28} {f'{lo / 1e3:,.0f} / {med / 1e3:,.0f} / {hi / 1e3:,.0f}':>21} "
                  f"{med / k_med:8.2f} {offered / 1e3:12,.0f} {cpu:11,.0f} {threads:14,.0f} "
                  f"{'' if prog is None else f'{prog[1]:,.0f}':>11}"
                  f"{'  ' + '; '.join(notes) if notes else ''}")
    if results.get("reload"):
        print(f"\nXDP reload under load: paced at half the XDP median rate, f0's NAPI thread at SCHED_FIFO; "
              f"{args.reloads} plan changes (alternately one more server) during the first run, none "
              "during the second (as long); lost = generated − back, split by where: f0's ring full "
              "(never reached the program) / the program did not send it / the way back")
        print(f"   {'method':<7} {'kpps target/offered':>19} {'run':<10} {'seconds':>7} {'generated':>11} "
              f"{'back':>11} {'lost':>7} {'ring/prog/back':>15} {'steal ms':>8} {'reloads':>7} "
              f"{'reload ms (median / max)':>25}")
        for method, r in results["reload"].items():
            for label, t in (("reloading", r["reloading"]), ("steady", r["steady"])):
                ms = t.get("install_ms") or []
                times = f"{statistics.median(ms):,.0f} / {max(ms):,.0f}" if ms else ""
                where = f"{t['lost_f0_ring']}/{t['lost_program']}/{t['lost_return']}"
                steal = t["steal_ns"][str(FWD_CPU)] / 1e6
                rates = f"{r['rate'] / 1e3:,.0f} / {t['offered_pps'] / 1e3:,.0f}"
                print(f"   {method:<7} {rates:>19} {label:<10} {t['seconds']:7.1f} {t['generated']:11,} "
                      f"{t['back']:11,} {t['lost']:7,} {where:>15} {steal:8,.0f} {t.get('reloads', ''):>7} "
                      f"{times:>25}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each trial")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flows", type=int, default=256, help="distinct UDP source ports")
    parser.add_argument("--methods", default="mac,ipip,gre")
    parser.add_argument("--generator", choices=("auto", "live-frames", "trafgen", "xdp-redirect"), default="auto",
                        help="live-frames: BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES (f0 receives XDP "
                             "frames); trafgen: Debian netsniff-ng's trafgen (f0 receives socket buffers); "
                             "xdp-redirect: trafgen into a second veth pair whose far end's XDP program "
                             "redirects each frame to g0 (f0 receives XDP frames where live frames are "
                             "refused); auto: live frames where the kernel runs them, else trafgen")
    parser.add_argument("--stats-seconds", type=float, default=1.0,
                        help="length of the extra XDP trial with kernel.bpf_stats_enabled=1 (0: skip)")
    parser.add_argument("--reloads", type=int, default=20, help="plan changes in the reload check (0: skip)")
    parser.add_argument("--qdisc-bypass", action="store_true",
                        help="run the AF_PACKET engine with --qdisc-bypass")
    parser.add_argument("--xdp-direct", action="store_true",
                        help="load the XDP data plane from a helper (DataPlane.load + attach) even when "
                             "encapfwd run has --engine")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="which of encapfwd run's engines to measure beside the kernel: afpacket, xdp (native), "
                             "tc, auto (encapfwd run --engine auto: its own choice, printed)")
    parser.add_argument("--json", action="store_true", help="also print every trial as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/live.py needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    if os.cpu_count() < 2:
        print("bench/live.py needs 2 CPUs (generator and forwarder on their own cores)", file=sys.stderr)
        return 1
    methods = [m for m in args.methods.split(",") if m]
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        print(f"bench/live.py: --engines: unknown {', '.join(sorted(unknown))} (one of {', '.join(ENGINES)})",
              file=sys.stderr)
        return 2
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    has_engine = "--engine" in run_help()
    engine_note = ("encapfwd run --engine xdp" if has_engine and not args.xdp_direct
                   else "DataPlane.load + attach(f0, native) in a helper in the fwd namespace "
                        + ("(--xdp-direct)" if has_engine else "(encapfwd run has no --engine)"))
    print(f"Live forwarding, 64-byte UDP frames, {args.flows} flows, {args.seconds:g} s per trial, "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs, kernel {os.uname().release}, "
          f"load average {' '.join(load)}", flush=True)

    results = {"generator": {}, "kernel": [], "engines": engines, "reload": {}}
    results.update({engine: {m: [] for m in methods} for engine in ENGINES})
    bench = None

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)

    def cleanup():
        if bench is not None:
            bench.close()

    atexit.register(cleanup)
    from encapfwd.errors import EncapfwdError

    try:
        bench = Bench(args)
        gen = results["generator"] = bench.generator_info
        if gen["live_frames"] not in ("allowed", "not tried"):
            print(f"Live frames: {gen['live_frames']}")
        print(f"Generator: {gen['generator']} on CPU {GEN_CPU} ({gen['detail']}); input to the dispatcher: "
              f"{gen['input']} ({gen['generator'].replace('-', ' ')}).")
        print(f"f0's NAPI thread on CPU {FWD_CPU} (threaded, GRO on); encapfwd run --cpus {FWD_CPU}; XDP "
              f"engine: {engine_note}.", flush=True)
        for r in range(args.rounds):
            results["kernel"].append(bench.kernel(args.seconds))
            for method in methods:
                for engine in engines:
                    if engine == "xdp":
                        trial = bench.xdp(method, args.seconds, min(args.stats_seconds, args.seconds))
                    else:  # afpacket; tc, the same program at tc ingress; auto, encapfwd run's own choice
                        trial = bench.afpacket(method, args.seconds, engine=engine,
                                               stats_seconds=min(args.stats_seconds, args.seconds))
                    results[engine][method].append(trial)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        if args.reloads and "xdp" in engines:
            for method in methods:
                rate = spread(results["xdp"][method], "fwd_pps")[1] / 2
                results["reload"][method] = bench.reload_check(method, rate, args.seconds, args.reloads)
    except (RuntimeError, EncapfwdError) as exc:  # an expected condition: one line, no traceback
        print(f"bench/live.py: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # let the clean-up finish
        b, bench = bench, None
        if b is not None:
            b.close()

    print_tables(results, methods, args)
    print(f"\nforwarded = frames back at g0 (to {NOBODY_MAC}) / s; offered = frames the generator made / s; "
          f"'generator-bound': forwarded ≥ {GENERATOR_BOUND:.0%} of offered (the dispatcher was not the "
          "limit).")
    print(f"CPU1 ns/pkt: CPU {FWD_CPU}'s busy time (user+nice+system+irq+softirq, every task, other jobs "
          "included) / forwarded; threads ns/pkt: on-CPU time of f0's NAPI thread + the dispatcher's "
          "processes (schedstat) / forwarded; prog ns/pkt: the kernel program's (XDP or TC) run_time_ns / run_cnt "
          f"(bpf_stats, in a separate {args.stats_seconds:g} s trial). The kernel's forwarding does not "
          "depend on the method: the same measurements head every table.")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
