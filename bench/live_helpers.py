#!/usr/bin/env python3
"""Processes bench/live.py starts inside its network namespaces (``ip netns exec NS python this MODE …``).

Both speak one JSON object per line: a command on stdin, one answer on stdout (the first line, once ready,
is ``{"ready": true, …}``); an error is answered ``{"error": "…"}`` and ends the process.

``gen IF DSTMAC COUNTMAC FLOWS CPU SRCIP DSTIP DPORT [GENERATOR]`` — the traffic generator, in the
generator's namespace: loads bench/xdp_gen.bpf.c, attaches its counting program to IF (native XDP), pins
itself to CPU and sends 64-byte UDP frames SRCIP → DSTIP:DPORT to DSTMAC, FLOWS source ports, out of IF;
frames back to COUNTMAC count as forwarded. GENERATOR (default auto):

- ``live-frames``: the generating program run with BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES on IF
  (the frames reach the peer as XDP frames);
- ``trafgen``: trafgen (Debian netsniff-ng) sending the FLOWS frames round robin from a PACKET_MMAP TX ring
  on IF (the frames reach the peer as socket buffers). Inside a namespace trafgen cannot raise
  net.core.wmem_*, and with its default 208 KiB send buffer the TX ring flush fails with EAGAIN once that
  much waits in the peer's NAPI ring: bench/trafgen_shim.c, compiled here with gcc into a temporary folder
  and LD_PRELOADed, gives its packet sockets 64 MiB with SO_SNDBUFFORCE; the ring is 64 KiB (``-S``).
  trafgen pins its one worker (``-P 1``) to CPU 0 itself. It runs under ``timeout`` in a session of its
  own and is stopped by SIGINT to that process group (its worker ignores a SIGINT sent to its parent);
  generated = g0's tx_packets + tx_dropped (a veth counts the frames its peer took, and those the peer's
  full ring refused, as the sender's), read in the window;
- ``auto``: one live-frames test run of the generating program (paced to send nothing) decides; where the
  kernel refuses the flag (EPERM, EINVAL, EOPNOTSUPP: the answer is in ``"live_frames"``), trafgen.

The ready line says which ran: ``"generator"`` (``live-frames`` | ``trafgen``), ``"input"`` (what the
dispatcher receives: ``XDP frames`` | ``socket buffers``), ``"live_frames"`` (``allowed``, the kernel's
refusal, or ``not tried``) and ``"detail"``.

    {"cmd": "run", "seconds": 2}                        flat out for 2 s
    {"cmd": "run", "rate": 500000, "seconds": 2}        paced by the program itself (token bucket, "burst")
    {"cmd": "run", "rate": 500000, "until_stop": true}  until the next line on stdin (any), then answers
    -> {"generated": n, "back": n, "other": n, "idle_runs": n, "seconds": s, "busy_ns": {"1": ns},
        "steal_ns": {"1": ns}, "task_ns": ns}
    (also: "cpus": [1] CPUs whose busy time to measure, "pids": [..] processes whose threads' CPU time to sum)

With trafgen a paced run is ``trafgen -b RATEpps`` (``burst`` is ignored), the answer also has
``"ring_full"`` (g0's tx_dropped: frames the peer's full ring refused) and ``"trafgen"`` (its exit status
and the "packets outgoing" it printed, over its whole run, with g0's count over the same time as a
cross-check); a timed run's counts are read at the end of the window, an ``until_stop`` run's after the
stop and the drain (every frame it sent is then back or lost).

A live-frames run is one live-frames test run in a thread, ended by SIGUSR1 to that thread (the kernel
stops a test run between batches when a signal is pending): a test run's setup and teardown cost tens of
milliseconds here, so short calls cannot make a rate. The window opens when the first frames are counted.

``generated`` are the generating program's runs (trafgen: g0's tx_packets + tx_dropped), ``back`` the
frames that came back to IF with COUNTMAC as destination (forwarded by the dispatcher), ``other`` whatever
else came back; ``busy_ns`` the busy time (user + nice + system + irq + softirq, /proc/stat) of each CPU
named in ``"cpus"`` during the run, ``task_ns`` the on-CPU time (/proc/PID/task/*/schedstat) of the
threads of ``"pids"``.

``xdp IF CONFIG CPU`` — encapfwd's XDP data plane without ``encapfwd run``, in the dispatcher's namespace:
``compile_plan(config, get_plugin_manager())``, ``DataPlane.load(plan)``, ``attach(IF, "native")``; this
process (the control plane: reloads) pinned to CPU.

    {"cmd": "reloads", "configs": [A, B], "count": 20, "interval": 0.05}
        -> {"reloads": 20, "install_ms": [...]}     compile + DataPlane.install, alternating A and B
    {"cmd": "counters"} -> DataPlane.counters()
    {"cmd": "quit"}     -> detach, unload, exit
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "core" / "src"))

GEN_SOURCE = HERE / "xdp_gen.bpf.c"
SHIM_SOURCE = HERE / "trafgen_shim.c"
GENERATORS = ("auto", "live-frames", "trafgen", "xdp-redirect")
INPUT_KIND = {"live-frames": "XDP frames", "trafgen": "socket buffers",
              "xdp-redirect": "XDP frames (redirected)"}
#: the redirect stage's veth pair (--generator xdp-redirect): trafgen sends into STAGE_IN, xdp_stage on
#: STAGE_OUT redirects every frame to the generator's interface (g0), whose peer gets XDP frames
STAGE_IN, STAGE_OUT = "s0", "s1"
#: the kernel's ways of refusing BPF_F_TEST_XDP_LIVE_FRAMES (any other failure of the probe is an error)
LIVE_FRAMES_REFUSALS = (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP)
TRAFGEN_SNDBUF = 64 << 20  # SO_SNDBUFFORCE for trafgen's packet sockets (the shim)
TRAFGEN_RING = "64KiB"
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


def live_frames_refusal(prog_fd: int, frame: bytes, ifindex: int):
    """One live-frames test run of *prog_fd* on *ifindex* (the caller makes the program send nothing):
    None when the kernel runs it, else the kernel's refusal as one line. Any other failure is raised."""
    from encapfwd.xdp import BPFError
    from encapfwd.xdp.libbpf import live_frames

    try:
        live_frames(prog_fd, frame, 1, ifindex)
    except BPFError as exc:
        if exc.errno in LIVE_FRAMES_REFUSALS:
            return f"BPF_F_TEST_XDP_LIVE_FRAMES refused by this kernel: {errno.errorcode[exc.errno]} ({exc})"
        raise
    return None


def prog_info(prog_id: int) -> dict:
    """bpftool's description of a loaded program (its ``run_time_ns`` and ``run_cnt`` count while
    ``kernel.bpf_stats_enabled`` is 1)."""
    return json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True,
                                     text=True, check=True).stdout)


@contextlib.contextmanager
def bpf_stats():
    """``kernel.bpf_stats_enabled`` on meanwhile (the programs' run-time statistics), restored after."""
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    saved = stats.read_text().strip()
    stats.write_text("1")
    try:
        yield
    finally:
        stats.write_text(saved)


def build_c(source: Path, output: Path, *flags: str) -> Path:
    """*source* (a bench/ helper in C) compiled to *output* with the system's compiler; RuntimeError with the
    compiler's first line when it fails."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if not cc:
        raise RuntimeError(f"no C compiler for bench/{source.name} (Debian package gcc)")
    built = subprocess.run([cc, "-O2", "-o", str(output), str(source), *flags],
                           check=False, capture_output=True, text=True, timeout=60)
    if built.returncode != 0:
        first = (built.stderr.strip().splitlines() or ["?"])[0]
        raise RuntimeError(f"compiling bench/{source.name} with {cc} failed: {first}")
    return output


def build_shim(directory: Path) -> Path:
    """bench/trafgen_shim.c compiled into *directory* (the LD_PRELOAD that gives trafgen's packet sockets
    TRAFGEN_SNDBUF with SO_SNDBUFFORCE)."""
    return build_c(SHIM_SOURCE, directory / "trafgen_shim.so", "-shared", "-fPIC", "-ldl")


def stop_trafgen(proc, log: Path) -> dict:
    """SIGINT to trafgen's process group (its worker ignores one sent to its parent only), SIGKILL if it
    lingers; its exit status, the "packets outgoing" it printed and its last output line."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()
    text = log.read_text(errors="replace")
    sent = re.findall(r"(\d+) packets outgoing", text)
    return {"returncode": proc.returncode, "outgoing": int(sent[-1]) if sent else None,
            "tail": text.strip().splitlines()[-1:] if text.strip() else []}


class Trafgen:
    """trafgen (Debian netsniff-ng) sending *frames* round robin out of *ifname* from CPU 0 (its worker pins
    itself there: ``-P 1``), with bench/trafgen_shim.c preloaded (SO_SNDBUFFORCE) and a 64 KiB TX ring."""

    def __init__(self, ifname: str, frames):
        self.ifname = ifname
        self.binary = shutil.which("trafgen")
        if not self.binary:
            raise RuntimeError("trafgen is not installed (Debian package netsniff-ng)")
        self.timeout = shutil.which("timeout")
        if not self.timeout:
            raise RuntimeError("timeout is not installed (Debian package coreutils)")
        self.dir = Path(tempfile.mkdtemp(prefix="efwtrafgen"))
        self.proc = None
        try:
            self.shim = build_shim(self.dir)
            self.config = self.dir / "frames.cfg"
            self.config.write_text("".join("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n"
                                           for frame in frames))
            self.log = self.dir / "trafgen.log"
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def start(self, rate: float, bound: float) -> None:
        """Start sending (flat out, or ``-b RATEpps``); *bound*: seconds after which ``timeout`` stops it
        whatever happens here."""
        import ctypes

        argv = [self.timeout, "-s", "INT", "-k", "3", f"{bound:.0f}", self.binary, "--dev", self.ifname,
                "--conf", str(self.config), "--cpus", "1", "--ring-size", TRAFGEN_RING, "--no-sock-mem",
                "--notouch-irq"]
        if rate:
            argv += ["--rate", f"{int(rate)}pps"]
        env = dict(os.environ, LD_PRELOAD=str(self.shim), TRAFGEN_SHIM_SNDBUF=str(TRAFGEN_SNDBUF))

        def pdeathsig():  # timeout (the group's leader) gets SIGTERM when this helper dies, and passes it on
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)

        with open(self.log, "wb") as log:  # no other thread runs in this helper when trafgen is the generator
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True,
                                         preexec_fn=pdeathsig)  # noqa: PLW1509

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> dict:
        """SIGINT to trafgen's process group (its worker ignores one sent to its parent only), SIGKILL if it
        lingers; returns its exit status and the "packets outgoing" it printed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return {}
        result = stop_trafgen(proc, self.log)
        return {"returncode": result["returncode"], "outgoing": result["outgoing"]}

    def tail(self) -> str:
        """trafgen's last meaningful output line (for an error message)."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Generator:
    def __init__(self, ifname: str, dst_mac: str, count_mac: str, flows: int, src_ip: str, dst_ip: str,
                 dport: int, kind: str = "auto"):
        from encapfwd.xdp.build import build
        from encapfwd.xdp.libbpf import BPFObject, xdp_attach

        if kind not in GENERATORS:
            raise ValueError(f"generator {kind!r}: one of {', '.join(GENERATORS)}")
        self.ifname = ifname
        self.ifindex = socket.if_nametoindex(ifname)
        src_mac = _mac(Path(f"/sys/class/net/{ifname}/address").read_text().strip())
        self.trafgen = None
        self.attached = False
        self.stage_index = None  # the redirect stage's far end, while it exists
        self.obj = BPFObject.open(build(str(GEN_SOURCE)))
        self.gen_fd = self.obj.program("xdp_gen")
        self.count_fd = self.obj.program("xdp_count")
        self.counts = self.obj.map("counts")
        self.frame = udp_frame(_mac(dst_mac), src_mac, src_ip, dst_ip, dport)
        self.flows, self.count_mac = max(1, flows), _mac(count_mac)
        self.live_frames = "not tried"
        try:
            self._choose(kind, dst_mac, src_mac, src_ip, dst_ip, dport)
            xdp_attach(self.ifindex, self.count_fd, "native")
            self.attached = True
        except BaseException:
            self.close()
            raise

    def _choose(self, kind, dst_mac, src_mac, src_ip, dst_ip, dport) -> None:
        """Live frames where the kernel runs them (or where asked), else trafgen (see the module's doc)."""
        if kind in ("auto", "live-frames"):
            self.configure(rate=1)  # the probe sends nothing: 1 frame/s, none due yet (XDP_DROP)
            refused = live_frames_refusal(self.gen_fd, self.frame, self.ifindex)
            self.live_frames = refused or "allowed"
            if refused and kind == "live-frames":
                raise RuntimeError(f"{refused}; --generator trafgen or auto sends with trafgen instead")
            kind = "trafgen" if refused else "live-frames"
        self.kind = kind
        self.configure()
        if kind in ("trafgen", "xdp-redirect"):
            frames = [udp_frame(_mac(dst_mac), src_mac, src_ip, dst_ip, dport, BASE_PORT + i)
                      for i in range(min(self.flows, 65536 - BASE_PORT))]
            self.trafgen = Trafgen(self._stage() if kind == "xdp-redirect" else self.ifname, frames)
            self.detail = (f"trafgen --cpus 1 --ring-size {TRAFGEN_RING}, packet sockets given "
                           f"{TRAFGEN_SNDBUF >> 20} MiB by SO_SNDBUFFORCE (bench/trafgen_shim.c)")
            if kind == "xdp-redirect":
                self.detail += (f", into {STAGE_IN}; xdp_stage (native) on its peer {STAGE_OUT} redirects each "
                                f"frame to {self.ifname}, whose peer receives XDP frames")
        else:
            self.detail = "BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES of xdp_gen (bench/xdp_gen.bpf.c)"

    def _stage(self) -> str:
        """The redirect stage: a veth pair STAGE_IN/STAGE_OUT in this namespace, xdp_stage attached natively
        on STAGE_OUT with this generator's interface as its target; returns the interface trafgen sends into."""
        from encapfwd.xdp.libbpf import xdp_attach

        subprocess.run(["ip", "link", "add", STAGE_IN, "type", "veth", "peer", "name", STAGE_OUT], check=True)
        for dev in (STAGE_IN, STAGE_OUT):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
            subprocess.run(["ethtool", "-K", dev, "tx", "off", "gro", "off"], check=False,
                           capture_output=True)
        self.obj.map("stage_target").update(0, struct.pack("=I", self.ifindex))
        self.stage_index = socket.if_nametoindex(STAGE_OUT)
        xdp_attach(self.stage_index, self.obj.program("xdp_stage"), "native")
        return STAGE_IN

    def describe(self) -> dict:
        return {"generator": self.kind, "input": INPUT_KIND[self.kind], "live_frames": self.live_frames,
                "detail": self.detail}

    def close(self) -> None:
        from encapfwd.xdp.libbpf import xdp_detach

        if self.trafgen is not None:
            self.trafgen.close()
            self.trafgen = None
        if self.stage_index:
            subprocess.run(["ip", "link", "del", STAGE_IN], check=False, capture_output=True)
            self.stage_index = None
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

    def tx_counts(self) -> tuple:
        """(tx_packets, tx_dropped) of the generator's interface."""
        base = f"/sys/class/net/{self.ifname}/statistics/"
        return tuple(int(Path(base + name).read_text()) for name in ("tx_packets", "tx_dropped"))

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
            burst: int = 32, drain: float = 0.05, max_seconds: float = 600.0) -> dict:
        """Generate for *seconds* (or until a line arrives on stdin, at most *max_seconds*) at *rate*
        (0: flat out). A paced generator that loses the CPU for a while sends at most *burst* frames to catch
        up: what it offered is what it counted, never more than the rate."""
        if self.trafgen is not None:  # trafgen, alone or through the redirect stage
            return self._run_trafgen(seconds, rate, until_stop, cpus, pids, drain, max_seconds)
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

    def _run_trafgen(self, seconds, rate, until_stop, cpus, pids, drain, max_seconds) -> dict:
        """One trafgen run: the window opens when g0's counters move; generated = g0's tx_packets +
        tx_dropped."""
        tg = self.trafgen
        start_tx = self.tx_counts()
        bound = max_seconds if until_stop else seconds + 30
        tg.start(rate, bound)
        try:
            deadline = time.monotonic() + 10
            while self.tx_counts() == start_tx:
                if not tg.running() or time.monotonic() > deadline:
                    raise RuntimeError(f"trafgen sent nothing: {tg.tail() or 'no output'}")
                time.sleep(0.0005)
            c0, tx0 = self.read(), self.tx_counts()
            busy0, task0 = cpu_busy_ns(cpus), task_ns(pids)
            t0 = time.perf_counter()
            if until_stop:
                sys.stdin.readline()
            else:
                time.sleep(seconds)
            t1 = time.perf_counter()
            c1, tx1 = self.read(), self.tx_counts()
            busy1, task1 = cpu_busy_ns(cpus), task_ns(pids)
            died = not tg.running()
        finally:
            said = tg.stop()
        if died:
            raise RuntimeError(f"trafgen exited during the run (status {said.get('returncode')}): "
                               f"{tg.tail() or 'no output'}")
        time.sleep(drain)  # what is still in the veth rings comes back
        end_tx = self.tx_counts()
        if until_stop:  # every frame sent is back or lost by now
            c1, tx1 = self.read(), end_tx
        said["g0_tx"] = (end_tx[0] + end_tx[1]) - (start_tx[0] + start_tx[1])
        return {"generated": (tx1[0] + tx1[1]) - (tx0[0] + tx0[1]), "back": c1[1] - c0[1],
                "other": c1[2] - c0[2], "idle_runs": 0, "ring_full": tx1[1] - tx0[1], "seconds": t1 - t0,
                "busy_ns": {str(c): busy1[c][0] - busy0[c][0] for c in busy0},
                "steal_ns": {str(c): busy1[c][1] - busy0[c][1] for c in busy0}, "task_ns": task1 - task0,
                "trafgen": said}

    def _stop_thread(self, thread) -> None:
        self._stop = True
        while thread.is_alive():
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
            thread.join(0.05)


def gen_main(argv) -> int:
    ifname, dst_mac, count_mac, flows, cpu, src_ip, dst_ip, dport, *rest = argv
    os.sched_setaffinity(0, {int(cpu)})
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
    except OSError:
        pass
    gen = Generator(ifname, dst_mac, count_mac, int(flows), src_ip, dst_ip, int(dport),
                    rest[0] if rest else "auto")
    try:
        reply({"ready": True, "frame": gen.frame.hex(), "pid": os.getpid(), **gen.describe()})
        serve({
            "run": lambda cmd: gen.run(cmd.get("seconds", 0.0), cmd.get("rate", 0.0), cmd.get("until_stop", False),
                                       cmd.get("cpus", ()), cmd.get("pids", ()), cmd.get("burst", 32),
                                       max_seconds=cmd.get("max_seconds", 600.0)),
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
