#!/usr/bin/env python3
"""Overload: a random-source TCP SYN flood to one port of ``encapfwd run`` while every port is asked.

The lab is encapfwd.lab.topology's (client ns → router ns → dispatcher ns, a MAC-forwarded back-end on the
dispatcher's segment) with three ports on the MAC cluster's VIP 10.0.9.1, all to the same back-end:

- ``flooded``: port 80, ``wrr`` (the slow path decides every new flow: the case of issue #21);
- ``wrr``: port 8081, ``wrr``;
- ``maglev``: port 8082, ``maglev`` (a table the kernel program runs itself).

The flood: trafgen (Debian netsniff-ng) in the router namespace, on ``lan-d`` (the bridge port whose veth
peer is the dispatcher's ``eth0``: no bridge lookup per frame) to the dispatcher's MAC, 54-byte TCP SYNs to 10.0.9.1:80 from random sources in 10.200.0.0/16 with random source
ports, sequence numbers and IP ids (``drnd``), checksums computed per frame (``csumip``/``csumtcp``); flat out
(trafgen's worker pinned to CPU 0) unless ``--rate`` paces it (trafgen's slow mode). Its packet sockets get
a 64 MiB send buffer (bench/trafgen_shim.c, LD_PRELOAD: see bench/live_helpers.py). The back-end discards
the flood's sources before TCP (a blackhole route for 10.200.0.0/16 and rp_filter=1 in its namespace): what
is measured is the dispatcher, not the back-end's SYN cookies.

The clients: one new TCP connection and one HTTP GET per request from the client namespace (Python sockets
created there), ``--rps`` requests per second to every port (10), each answered within ``--timeout`` (1 s:
connect, request and whole answer) or failed. ``encapfwd run --workers 1 --cpus 1`` (the worker on CPU 1,
trafgen on CPU 0).

Per engine (``--engines afpacket,xdp,xdp-generic,tc``; ``xdp`` runs in the mode ``--engine xdp`` chooses on
the veth — native, since the lab gives its peer a pass program —, ``xdp-generic`` with ``--xdp-mode generic``,
as issue #21 measured): the share of requests started during the flood answered within the timeout, per
port; the flood rate achieved (frames that left the router for the dispatcher / s); the worker's ring drops
and the new connections it shed (per port); whether and when the overload control engaged and ended (the
report's ``overload`` and the log lines). Targets (issue #21): every other port ≥ 99 %, the flooded port
≥ 90 %.

``--fresh-client``: the flooded port is asked from a second client address (``FRESH_CLIENT``) that asks
nothing else and starts 1 s into the flood: a client the dispatcher first sees during the flood (with the
AF_PACKET engine it is not a known client yet: docs/live.md, "Overload").

``--kind ack``: the flood is TCP ACKs of no connection (random acknowledgement numbers) instead of SYNs;
``--target wrr|maglev``: flood port 8081 or 8082 instead of 80 (the targets then apply to that port).

Run: ``sudo .venv/bin/python bench/flood_live.py [--seconds 15] [--engines afpacket,xdp,xdp-generic,tc]
[--fresh-client] [--kind syn|ack] [--target flooded|wrr|maglev] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "core" / "src"))
sys.path.insert(0, str(HERE))
from live_helpers import TRAFGEN_SNDBUF, build_shim, stop_trafgen  # noqa: E402 - bench/ beside this file

#: name -> (port, selection algorithm); the first is flooded
PORTS = {"flooded": (80, "wrr"), "wrr": (8081, "wrr"), "maglev": (8082, "maglev")}
FLOODED = "flooded"
FLOOD_NET = (10, 200)  # the flood's sources: 10.200.0.0/16
#: with --fresh-client: the source of the flooded port's requests, a second address of the client namespace
#: that talks to nothing before the flood (a client the dispatcher first sees during it)
FRESH_CLIENT = "10.0.1.3"
GEN_CPU = 0
FWD_CPU = 1


def unavailable_reason() -> Optional[str]:
    """Why this lab cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "root is needed (network namespaces)"
    for tool in ("trafgen", "timeout"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed" + (" (Debian package netsniff-ng)" if tool == "trafgen" else "")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
        return "no C compiler for bench/trafgen_shim.c (Debian package gcc)"
    from encapfwd.lab.topology import unavailable_reason as lab_reason

    return lab_reason(("mac",))


def _mac_bytes(mac: str) -> List[int]:
    return [int(x, 16) for x in mac.split(":")]


#: --kind: the flood's TCP flags
KINDS = {"syn": 0x02, "ack": 0x10}


def syn_flood_config(dst_mac: str, src_mac: str, vip: str, port: int, kind: str = "syn") -> str:
    """trafgen's configuration: one 54-byte TCP segment (*kind*: a SYN, or an ACK of no connection with a
    random acknowledgement number), source address (in 10.200.0.0/16), source port, sequence number and IP
    id random per frame, checksums computed per frame."""
    head = ", ".join(f"0x{b:02x}" for b in _mac_bytes(dst_mac) + _mac_bytes(src_mac))
    a, b, c, d = (int(x) for x in vip.split("."))
    ack = "0x00, 0x00, 0x00, 0x00" if kind == "syn" else "drnd(4)"
    return (
        "{\n"
        f"  {head}, 0x08, 0x00,\n"
        "  0x45, 0x00, 0x00, 0x28, drnd(2), 0x40, 0x00, 0x40, 0x06, csumip(14, 33),\n"
        f"  {FLOOD_NET[0]}, {FLOOD_NET[1]}, drnd(2), {a}, {b}, {c}, {d},\n"
        f"  drnd(2), 0x{port >> 8:02x}, 0x{port & 0xFF:02x}, drnd(4), {ack},\n"
        f"  0x50, 0x{KINDS[kind]:02x}, 0xff, 0xff, csumtcp(14, 34), 0x00, 0x00,\n"
        "}\n"
    )


class Flooder:
    """trafgen in namespace *ns* on *dev*, flat out or ``--rate``, stopped by SIGINT to its group."""

    def __init__(self, ns, dev: str, config_text: str):
        self.ns, self.dev = ns, dev
        self.dir = Path(tempfile.mkdtemp(prefix="efwflood"))
        self.proc = None
        self.shim = build_shim(self.dir)
        self.config = self.dir / "syn.cfg"
        self.config.write_text(config_text)
        self.log = self.dir / "trafgen.log"

    def start(self, seconds: float, rate: float = 0.0) -> None:
        argv = ["env", f"LD_PRELOAD={self.shim}", f"TRAFGEN_SHIM_SNDBUF={TRAFGEN_SNDBUF}",
                "timeout", "-s", "INT", "-k", "3", f"{seconds + 5:.0f}", "trafgen", "--dev", self.dev,
                "--conf", str(self.config), "--cpus", "1", "--ring-size", "64KiB", "--no-sock-mem",
                "--notouch-irq"]
        if rate:
            argv += ["--rate", f"{int(rate)}pps"]
        with open(self.log, "wb") as log:
            self.proc = self.ns.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def stop(self) -> dict:
        proc, self.proc = self.proc, None
        return {} if proc is None else stop_trafgen(proc, self.log)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Prober:
    """*rps* requests per second to every port of *ports* ({name: port}) on *vip* from namespace *ns*: a new
    TCP connection and one HTTP GET each, answered within *timeout* seconds or failed."""

    def __init__(self, ns, vip: str, ports: Dict[str, int], rps: float = 10.0, timeout: float = 1.0,
                 sources: Optional[Dict[str, str]] = None):
        self.ns, self.vip, self.ports = ns, vip, ports
        self.rps, self.timeout = rps, timeout
        self.sources = sources or {}  # name -> the source address its requests are bound to
        self.results: Dict[str, List[tuple]] = {name: [] for name in ports}  # (started, ok, seconds, error)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads: List[threading.Thread] = []

    def start(self, names=None) -> None:
        for name in self.ports if names is None else names:
            thread = threading.Thread(target=self._pace, args=(name,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pace(self, name: str) -> None:
        period = 1.0 / self.rps
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            threading.Thread(target=self._one, args=(name,), daemon=True).start()
            next_at += period * random.uniform(0.5, 1.5)  # not in step with anything of the dispatcher's
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def _one(self, name: str) -> None:
        started = time.monotonic()
        deadline = started + self.timeout
        ok, error = False, ""
        sock = None
        try:
            sock = self.ns.socket(socket.AF_INET, socket.SOCK_STREAM)
            if name in self.sources:
                sock.bind((self.sources[name], 0))
            sock.settimeout(self.timeout)
            sock.connect((self.vip, self.ports[name]))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("no whole answer in time")
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                if b"\r\n\r\n" in data and b"server=" in body and body.endswith(b"\n"):
                    break
            ok = b"server=" in data and time.monotonic() - started <= self.timeout
            if not ok:
                error = "incomplete answer"
        except Exception as exc:  # noqa: BLE001 - what is measured
            error = type(exc).__name__
        finally:
            if sock is not None:
                sock.close()
        with self.lock:
            self.results[name].append((started, ok, time.monotonic() - started, error))

    def close(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(2)
        time.sleep(self.timeout + 0.2)  # the last requests finish (or time out)

    def share(self, name: str, start: float, end: float) -> tuple:
        """(answered, asked, errors {kind: n}) of the requests to *name* started in [start, end)."""
        with self.lock:
            rows = [r for r in self.results[name] if start <= r[0] < end]
        errors: Dict[str, int] = {}
        for r in rows:
            if not r[1]:
                errors[r[3]] = errors.get(r[3], 0) + 1
        return sum(1 for r in rows if r[1]), len(rows), errors


class FloodLab:
    """The topology with the three ports (see the module's docstring); :meth:`run` one engine's trial."""

    def __init__(self, echo=lambda s: None, target: str = FLOODED, kind: str = "syn"):
        from encapfwd.lab.topology import Topology

        self.echo = echo
        self.target, self.kind = target, kind  # the port flooded (a PORTS name), with SYNs or ACKs
        self.lab = Topology(("mac",), echo=echo)
        self.flooder: Optional[Flooder] = None

    def __enter__(self) -> "FloodLab":
        try:
            return self.build()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> "FloodLab":
        from encapfwd.lab.topology import HTTPD, ROUTER_LAN_MAC, SERVERS

        lab = self.lab
        lab.build()
        vip, server, _mac = SERVERS["mac"]
        self.vip = vip
        for name, (port, algorithm) in PORTS.items():
            if port == 80:
                lab.cli("port", "set", f"{vip}@{port}", "selectionalgorithm", algorithm)
            else:
                lab.cli("port", "add", f"{vip}@{port}", "selectionalgorithm", algorithm)
                lab.cli("server", "add", f"{vip}@{port}@{server}")
        lab.ns["client"].ip("addr", "add", f"{FRESH_CLIENT}/24", "dev", "eth0")
        m = lab.ns["mac"]
        for name, (port, _algorithm) in PORTS.items():
            if port != 80:
                lab.procs.append(m.popen([sys.executable, str(HTTPD), "--name", "mac", "--port", str(port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # the back-end drops the flood's sources at routing (no SYN-ACK storm; the dispatcher is measured)
        m.ip("route", "add", "blackhole", f"{FLOOD_NET[0]}.{FLOOD_NET[1]}.0.0/16")
        m.sysctl("net.ipv4.conf.all.rp_filter", 1)
        d_mac = lab.ns["dispatcher"].mac("eth0")
        self.flooder = Flooder(lab.ns["router"], "lan-d",
                               syn_flood_config(d_mac, ROUTER_LAN_MAC, vip, PORTS[self.target][0], self.kind))
        deadline = time.monotonic() + 10
        while any(m.run(["ss", "-Hltn", f"sport = :{p}"], check=False).stdout.strip() == ""
                  for p, _ in PORTS.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the back-end's extra HTTP servers did not start")
            time.sleep(0.05)
        return self

    def close(self) -> None:
        if self.flooder is not None:
            self.flooder.close()
            self.flooder = None
        self.lab.close()

    def lan_tx(self) -> tuple:
        """``tx_packets`` and ``tx_dropped`` of the router's port towards the dispatcher: every frame offered
        (equal to trafgen's count), and the frames lost between the two ends of the veth pair — refused by the
        dispatcher's full receive queue, or, with native XDP, sent back by the program (``XDP_TX``) into the
        router end's full queue (the report's ``xdp_tx_lost`` counts those)."""
        link = json.loads(self.lab.ns["router"].run(["ip", "-s", "-j", "link", "show", "lan-d"]).stdout)[0]
        return link["stats64"]["tx"]["packets"], link["stats64"]["tx"]["dropped"]

    def egress_dropped(self) -> int:
        """``tx_dropped`` of the dispatcher's interface: frames it forwarded that its veth could not hand to
        the router's end (with a native-XDP peer, that end's NAPI ring full)."""
        link = json.loads(self.lab.ns["dispatcher"].run(["ip", "-s", "-j", "link", "show", "eth0"]).stdout)[0]
        return link["stats64"]["tx"]["dropped"]

    def start(self, engine: str) -> None:
        """``encapfwd run`` with *engine* (``xdp-generic``: ``--engine xdp --xdp-mode generic``)."""
        from encapfwd.lab.topology import _xdp_peer

        lab = self.lab
        if lab.dispatcher is not None:
            lab.stop_dispatcher()
        # the router's end of the dispatcher's veth runs a pass-everything XDP program only for native XDP,
        # whose XDP_TX needs it; otherwise it runs none, as a container's or a bridge's peer (the TC engine's
        # case): with one, every frame the dispatcher sends goes through that end's 256-frame NAPI ring, which a
        # forwarded flood overflows (the dispatcher's tx_dropped), client frames with it
        router = lab.ns["router"]
        if engine == "xdp":
            _xdp_peer(router, "lan-d")
        else:
            router.ip("link", "set", "dev", "lan-d", "xdp", "off")
        extra = ["--cpus", str(FWD_CPU)] if os.cpu_count() > 1 else []
        if engine.startswith("xdp-"):
            engine, mode = engine.split("-", 1)
            extra += ["--xdp-mode", mode]
        lab.engine = engine
        lab.log_path.write_text("")
        lab.start_dispatcher(extra=extra)
        # every port answers before the flood (MACs resolved, servers up)
        ports = {name: port for name, (port, _) in PORTS.items()}
        deadline = time.monotonic() + 15
        for name, port in ports.items():
            while True:
                probe = Prober(lab.ns["client"], self.vip, {name: port}, timeout=2.0)
                probe._one(name)
                if probe.results[name][0][1]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {name} ({port}) does not answer before the flood: "
                                       f"{lab.dispatcher_log()[-1500:]}")
                time.sleep(0.2)

    def trial(self, engine: str, seconds: float, rate: float = 0.0, rps: float = 10.0, timeout: float = 1.0,
              after: float = 0.0, wait_end: float = 0.0, fresh: bool = False) -> dict:
        """One engine: the dispatcher started, the clients asking, *seconds* of flood, then *after* seconds
        of clients without flood (and up to *wait_end* more seconds for the overload episode to end). With
        *fresh*, the flooded port's requests come from :data:`FRESH_CLIENT`, which asks nothing else and
        only once the flood has begun."""
        lab = self.lab
        self.start(engine)
        ports = {name: port for name, (port, _) in PORTS.items()}
        sources = {self.target: FRESH_CLIENT} if fresh else {}
        prober = Prober(lab.ns["client"], self.vip, ports, rps=rps, timeout=timeout, sources=sources)
        report0 = lab.report()
        samples = []
        prober.start([name for name in ports if name not in sources])
        time.sleep(0.5)
        tx0, refused0 = self.lan_tx()
        egress0 = self.egress_dropped()
        t0 = time.monotonic()
        self.flooder.start(seconds, rate)
        if sources:  # the fresh client starts asking once the flood is on (and the worker sheds)
            time.sleep(1.0)
            prober.start(list(sources))
        try:
            while time.monotonic() < t0 + seconds:
                time.sleep(0.5)
                try:
                    r = lab.report()
                    samples.append((time.monotonic() - t0, r.get("overload") or {}))
                except (OSError, ValueError):
                    samples.append((time.monotonic() - t0, {"error": "no report"}))
        finally:
            trafgen = self.flooder.stop()
        t1 = time.monotonic()
        tx1, refused1 = self.lan_tx()
        egress1 = self.egress_dropped()
        report1 = lab.report()
        ended_at = None
        deadline = t1 + after + wait_end
        while time.monotonic() < deadline:
            r = lab.report()
            if not (r.get("overload") or {}).get("engaged"):
                ended_at = ended_at or time.monotonic() - t1
                if time.monotonic() >= t1 + after:
                    break
            else:
                ended_at = None
            time.sleep(0.25)
        t2 = time.monotonic()
        prober.close()
        final = lab.report()
        log = lab.log_path.read_text(errors="replace")
        lab.stop_dispatcher()
        e0, e1 = report0.get("engine") or {}, report1.get("engine") or {}
        result = {
            "engine": engine,
            "target": self.target,
            "kind": self.kind,
            "xdp_mode": (final.get("engine") or {}).get("xdp_mode"),
            "seconds": t1 - t0,
            "flood_pps": (tx1 - tx0) / (t1 - t0),
            "veth_refused": refused1 - refused0,
            "egress_dropped": egress1 - egress0,
            "xdp_tx_lost": (e1.get("xdp_tx_lost") or 0) - (e0.get("xdp_tx_lost") or 0),
            "worker_tx": (e1.get("tx") or 0) - (e0.get("tx") or 0),
            "worker_tx_ring_full": (e1.get("tx_ring_full") or 0) - (e0.get("tx_ring_full") or 0),
            "trafgen": trafgen,
            "ports": {},
            "after": {},
            "kernel_drops": (e1.get("kernel_drops") or 0) - (e0.get("kernel_drops") or 0),
            "worker_rx": (e1.get("rx") or 0) - (e0.get("rx") or 0),
            "overload_dropped": e1.get("overload_dropped") or {},
            "overload_orphans_dropped": e1.get("overload_orphans_dropped") or {},
            "overload_admitted": e1.get("overload_admitted"),
            "overload_known_admitted": e1.get("overload_known_admitted"),
            "overload_filter_dropped": e1.get("overload_filter_dropped") or {},
            "known_clients": e1.get("known_clients"),
            "admission_attaches": e1.get("admission_attaches"),
            "admission_error": e1.get("admission_error"),
            "overload_admit_rate": e1.get("overload_admit_rate"),
            "overload_capacity": e1.get("overload_capacity"),
            "xdp_passed": (e1.get("xdp_passed") or 0) - (e0.get("xdp_passed") or 0),
            "xdp_pressure_placed": e1.get("xdp_pressure_placed"),
            "xdp_handup_placed": e1.get("xdp_handup_placed"),
            "overload": final.get("overload"),
            "engaged_during_flood": any(s.get("engaged") for _, s in samples),
            "modes": sorted({s.get("mode") for _, s in samples if s.get("mode")}),
            "first_engaged_s": next((t for t, s in samples if s.get("engaged")), None),
            "ended_after_flood_s": ended_at,
            "log": [line for line in log.splitlines() if "overload" in line][-8:],
        }
        for name in ports:
            answered, asked, errors = prober.share(name, t0, t1)
            with prober.lock:
                failed_at = [round(r[0] - t0, 2) for r in prober.results[name] if t0 <= r[0] < t1 and not r[1]]
            result["ports"][name] = {"answered": answered, "asked": asked, "errors": errors,
                                     "share": answered / asked if asked else None, "failed_at": failed_at}
            a2, n2, _ = prober.share(name, t1 + 0.5, t2)
            result["after"][name] = {"answered": a2, "asked": n2}
        return result


def print_result(r: dict) -> None:
    mode = f" ({r['xdp_mode']})" if r.get("xdp_mode") else ""
    print(f"\nengine {r['engine']}{mode}: flood {r['flood_pps'] / 1e3:,.0f} kpps for {r['seconds']:.1f} s "
          f"(trafgen: {r['trafgen'].get('outgoing')} frames); dropped on the veth pair (the router end's "
          f"tx_dropped: either direction, before or after the program): {r['veth_refused']:,}; by the "
          f"dispatcher's interface (its tx_dropped): {r.get('egress_dropped', 0):,}")
    for name, row in r["ports"].items():
        port, algorithm = PORTS[name]
        share = "-" if row["share"] is None else f"{row['share']:.1%}"
        target = 0.90 if name == r.get("target", FLOODED) else 0.99
        verdict = "" if row["share"] is None else ("  meets" if row["share"] >= target else "  below") + \
            f" the target {target:.0%}"
        errs = f"  failures {row['errors']} at {row.get('failed_at')} s" if row["errors"] else ""
        after = r["after"].get(name) or {}
        print(f"  {name:<8} :{port:<5} {algorithm:<6} answered within 1 s: {row['answered']:>4}/{row['asked']:<4} "
              f"{share:>6}{verdict}{errs}; after the flood {after.get('answered')}/{after.get('asked')}")
    print(f"  worker: {r['worker_rx']:,} frames received, {r['kernel_drops']:,} dropped at its RX ring, "
          f"{r['worker_tx']:,} sent ({r['worker_tx_ring_full']:,} not: TX ring full), "
          f"new connections shed {r['overload_dropped'] or {}} (admitted {r['overload_admitted']}), "
          f"ACKs of no connection shed {r['overload_orphans_dropped'] or {}}")
    if r.get("admission_attaches") is not None:
        print(f"  admission filter (kernel): attached {r['admission_attaches']} times, unknown SYNs dropped by it "
              f"(estimate) {r['overload_filter_dropped'] or {}}, SYNs of known clients admitted "
              f"{r['overload_known_admitted']}, known clients {r['known_clients']}; admit rate "
              f"{r['overload_admit_rate']}/s, capacity {r['overload_capacity']} frames/s"
              f"{'; error: ' + r['admission_error'] if r.get('admission_error') else ''}")
    if r["engine"] != "afpacket":
        print(f"  kernel program: {r['xdp_passed']:,} frames handed up to the worker; flows placed under "
              f"pressure: {r['xdp_pressure_placed']}, beyond executor handuplimit (before pressure was on): "
              f"{r['xdp_handup_placed']}")
    ov = r.get("overload") or {}
    print(f"  overload control: engaged during the flood: {r['engaged_during_flood']} "
          f"(mode {', '.join(r['modes']) or '-'}, first seen {r['first_engaged_s']} s after the flood began); "
          f"ended {r['ended_after_flood_s']} s after the flood; episodes {ov.get('episodes')}"
          f"{'; kernel: ' + ov['kernel_error'] if ov.get('kernel_error') else ''}")
    for line in r["log"]:
        print(f"    log: {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="flood length")
    parser.add_argument("--engines", default="afpacket,xdp,xdp-generic,tc")
    parser.add_argument("--rate", type=float, default=0.0, help="pace the flood (pps; 0: flat out)")
    parser.add_argument("--rps", type=float, default=10.0, help="requests per second to every port")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds a request may take")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of clients after the flood")
    parser.add_argument("--fresh-client", action="store_true",
                        help=f"the flooded port asked from {FRESH_CLIENT} only, from 1 s into the flood on")
    parser.add_argument("--kind", choices=sorted(KINDS), default="syn",
                        help="the flood: TCP SYNs, or ACKs of no connection (random acknowledgement numbers)")
    parser.add_argument("--target", choices=list(PORTS), default=FLOODED,
                        help="the port flooded: 'flooded' (:80, wrr), 'wrr' (:8081) or 'maglev' (:8082)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"bench/flood_live.py: {reason}", file=sys.stderr)
        return 1
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    port, algorithm = PORTS[args.target]
    print(f"{args.kind.upper()} flood to 10.0.9.1:{port} ({algorithm}) from random sources, {args.seconds:g} s per engine, "
          f"{args.rps:g} requests/s to every port with a {args.timeout:g} s timeout"
          f"{f' (the flooded port from {FRESH_CLIENT}, first seen 1 s into the flood)' if args.fresh_client else ''}"
          f"; {os.cpu_count()} CPUs, "
          f"kernel {os.uname().release}, load average {load}", flush=True)
    results = []
    with FloodLab(target=args.target, kind=args.kind) as lab:
        for engine in [e for e in args.engines.split(",") if e]:
            try:
                r = lab.trial(engine, args.seconds, args.rate, args.rps, args.timeout, after=args.after,
                              wait_end=35.0, fresh=args.fresh_client)
            except Exception as exc:  # noqa: BLE001 - the next engine still runs
                print(f"\nengine {engine}: failed: {type(exc).__name__}: {exc}")
                continue
            results.append(r)
            print_result(r)
            sys.stdout.flush()
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
