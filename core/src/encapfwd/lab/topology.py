"""The end-to-end lab: a client, a router, the dispatcher and one back-end per forwarding method.

::

      client ns                    router ns                          dispatcher ns
    ┌────────────┐          ┌──────────────────────┐ lan0 (bridge)  ┌──────────────────────┐
    │ eth0       ├──────────┤ cli0        lan0     ├────────────────┤ eth0 10.0.2.1        │
    │ 10.0.1.2   │          │ 10.0.1.1  10.0.2.254 │                │ encapfwd run         │
    └────────────┘          │ 10.0.9.0/24 via      │                │ blackhole 10.0.9.0/24│
                            │   10.0.2.1           │                └──────────────────────┘
                            │                      │ lan0           ┌──────────────────────┐
                            │                      ├────────────────┤ MAC server 10.0.2.10 │
                            │            far0      │                │ VIP 10.0.9.1 on lo   │
                            │        10.0.3.254    │                └──────────────────────┘
                            └─────────┬────────────┘
                               far0 (bridge, TAPs)
                     ┌────────────────┴─────────────────┐
             IPIP server 10.0.3.11              GRE server 10.0.3.12
             (guest kernel, tunl0,             (guest kernel, gre0,
              VIP 10.0.9.2)                     VIP 10.0.9.3)

- Upstream (the router) reaches the VIPs by a route via the dispatcher's address (``ip route add
  10.0.9.0/24 via 10.0.2.1``). The alternative — the router treats the VIPs as on-link and ARPs for them,
  and the dispatcher answers (``encapfwd run --answer-arp``) — is :meth:`Topology.upstream` ``("arp")``;
  see docs/live.md.
- The dispatcher's kernel neither answers nor routes the VIPs: they are not local there, and a blackhole
  route catches them should IP forwarding be on. rp_filter is off where replies with the VIP as source
  arrive on an unexpected interface (the router).
- Every back-end is configured with the project's own generated Linux script
  (``encapfwd backend-setup C@P@S --os linux``), run verbatim in its kernel; IPIP and GRE back-ends are
  guest kernels (user-mode-linux, or QEMU where it cannot boot: :mod:`encapfwd.lab.kernels`) unless the host
  kernel has ipip/ip_gre (then plain namespaces).
- Replies go from the servers through the router to the client directly: the dispatcher's interface sees
  only client→VIP packets (:class:`Sniffer` shows it).

Every address is inside namespaces (and guests) this module creates; :meth:`Topology.close` removes all of
it, stopping every process it started by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from encapfwd.errors import LabError, one_line  # LabError: importable from here too
from encapfwd.lab.netns import LabUnavailable, Namespace, lab_unavailable_reason, veth_pair

HERE = Path(__file__).resolve().parent
HTTPD = HERE / "httpd.py"

CLIENT = "10.0.1.2"
ROUTER_CLIENT = "10.0.1.1"
DISPATCHER = "10.0.2.1"
ROUTER_LAN = "10.0.2.254"
ROUTER_FAR = "10.0.3.254"
ROUTER_LAN_MAC = "02:0e:0f:00:02:fe"
ROUTER_FAR_MAC = "02:0e:0f:00:03:fe"
VIP_NET = "10.0.9.0/24"
PORT = 80

#: IPv6 (MAC forwarding only): client, router, dispatcher, router on lan0, MAC server, VIP
CLIENT6 = "fd00:1::2"
ROUTER_CLIENT6 = "fd00:1::1"
DISPATCHER6 = "fd00:2::1"
ROUTER_LAN6 = "fd00:2::fe"
MAC_SERVER6 = "fd00:2::a"
VIP6 = "fd00:9::1"
VIP6_NET = "fd00:9::/64"

#: method -> (VIP, server address, server MAC); "mac6" is the IPv6 cluster of the MAC server
SERVERS = {
    "mac": ("10.0.9.1", "10.0.2.10", "02:0e:0f:00:02:0a"),
    "ipip": ("10.0.9.2", "10.0.3.11", "02:0e:0f:00:03:0b"),
    "gre": ("10.0.9.3", "10.0.3.12", "02:0e:0f:00:03:0c"),
    "mac6": (VIP6, MAC_SERVER6, "02:0e:0f:00:02:0a"),
}


def stop_process(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
    """Send *sig* to *proc*, wait *timeout* seconds (then SIGKILL); its exit status (None without one)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _tail(path, size: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-size:]
    except OSError:
        return ""


def _xdp_peer(ns: Namespace, ifname: str) -> Optional[str]:
    """Attach a pass-everything XDP program to *ifname* (the dispatcher's veth peer), so that frames the
    dispatcher's XDP program sends with XDP_TX arrive; returns why not when BPF is unavailable here (the
    dispatcher's ``--engine auto`` then picks AF_PACKET too)."""
    try:
        from encapfwd.xdp.dataplane import pass_object_path
        from encapfwd.xdp.libbpf import available

        ok, why = available()
        if not ok:
            return why
        ns.ip("link", "set", "dev", ifname, "xdpdrv", "obj", str(pass_object_path()), "sec", "xdp")
    except Exception as exc:  # noqa: BLE001 - the lab still runs, with the AF_PACKET engine
        return one_line(f"{type(exc).__name__}: {exc}", None, first=True)
    return None


def encapfwd_argv() -> List[str]:
    """The installed console script next to this interpreter (or ``python -m`` as a fallback)."""
    script = Path(sys.executable).parent / "encapfwd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from encapfwd.cli import main; sys.exit(main())"]


def host_has_tunnels() -> bool:
    """True when this kernel can do ipip and ip_gre itself (then back-ends can be plain namespaces)."""
    for module in ("ipip", "ip_gre"):
        if os.path.exists(f"/sys/module/{module}"):
            continue
        if shutil.which("modprobe") is None:
            return False
        if subprocess.run(["modprobe", "-q", module], capture_output=True).returncode != 0:
            return False
    return True


def unavailable_reason(methods=("mac", "ipip", "gre")) -> Optional[str]:
    reason = lab_unavailable_reason(("ip", "ethtool", "curl"))
    if reason:
        return reason
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "the live engine needs pyroute2 (pip install 'encapfwd[live]')"
    if any(m in methods for m in ("ipip", "gre")) and not host_has_tunnels():
        from encapfwd.lab import kernels

        # decided by a real boot (once per process): a binary that is present may still not boot here
        try:
            kernels.select()
        except LabUnavailable as exc:
            return f"IPIP/GRE back-ends need ipip/ip_gre in this kernel or a real kernel to boot: {exc}"
    return None


class LongLived:
    """Long-lived connections from the client to the VIPs of *methods* (*per_method* each), each sending one
    keep-alive request every *tick* seconds in a thread of its own: what the scale-out labs count when
    dispatchers die, come back or change their configuration."""

    def __init__(self, lab: "Topology", methods, per_method: int, timeout: float = 5.0, tick: float = 0.1):
        self.lab = lab
        self.tick = tick
        self.conns = []  # (method, sock, client port)
        for method in methods:
            for _ in range(per_method):
                sock = lab.connect(method, timeout=timeout)
                self.conns.append((method, sock, sock.getsockname()[1]))
        self.ok = [0] * len(self.conns)
        self.errors: Dict[int, str] = {}  # index -> first error
        self.answers = [set() for _ in self.conns]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(self.conns))]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        method, sock, _ = self.conns[i]
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.answers[i].add(self.lab.http_get(sock).split()[0])
                self.ok[i] += 1
            except Exception as exc:  # noqa: BLE001 - what the labs count
                self.errors.setdefault(i, f"{method} {type(exc).__name__}: {exc}")
                return
            self.stop.wait(max(0.0, self.tick - (time.monotonic() - started)))

    def counts(self) -> List[int]:
        return list(self.ok)

    def flowing(self, seconds: float) -> List[int]:
        """Indices of the connections that completed no request within *seconds*."""
        before = self.counts()
        time.sleep(seconds)
        return [i for i, (a, b) in enumerate(zip(before, self.counts())) if b <= a]

    def alive(self, seconds: float) -> List[int]:
        """Indices of the connections that completed a request within *seconds* and never failed."""
        stalled = set(self.flowing(seconds))
        return [i for i in range(len(self.conns)) if i not in stalled and i not in self.errors]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for _, sock, _ in self.conns:
            sock.close()


class Sniffer:
    """Records IPv4 and IPv6 frames on an interface in a namespace (an AF_PACKET socket read in a thread)."""

    def __init__(self, ns: Namespace, ifname: str, mirror: bool = False):
        #: recording at the far end of a veth: what leaves it arrives at our end and the other way round
        self.mirror = mirror
        self.sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.frames: List[tuple] = []  # (pkttype, src, dst, proto, sport, dport)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(data) >= 54 and data[12:14] == b"\x86\xdd":
                ihl, proto = 40, data[20]
                src = socket.inet_ntop(socket.AF_INET6, data[22:38])
                dst = socket.inet_ntop(socket.AF_INET6, data[38:54])
            elif len(data) >= 34 and data[12:14] == b"\x08\x00":
                ihl = (data[14] & 0x0F) * 4
                proto = data[23]
                src, dst = socket.inet_ntoa(data[26:30]), socket.inet_ntoa(data[30:34])
            else:
                continue
            sport = dport = 0
            if proto in (6, 17) and len(data) >= 14 + ihl + 4:
                sport = int.from_bytes(data[14 + ihl : 16 + ihl], "big")
                dport = int.from_bytes(data[16 + ihl : 18 + ihl], "big")
            kind = addr[2]
            if self.mirror:
                kind = socket.PACKET_HOST if kind == socket.PACKET_OUTGOING else socket.PACKET_OUTGOING
            self.frames.append((kind, src, dst, proto, sport, dport))

    def stop(self) -> List[tuple]:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return self.frames

    def summary(self, vips) -> dict:
        """Incoming frames client→VIP, incoming frames VIP→anyone (replies), outgoing frames we sent."""
        vips = set(vips)
        incoming = [f for f in self.frames if f[0] != 4]
        return {
            "in_to_vip": sum(1 for f in incoming if f[2] in vips),
            "in_from_vip": sum(1 for f in incoming if f[1] in vips),
            "out": sum(1 for f in self.frames if f[0] == 4),
            "in_total": len(incoming),
        }


class LabServer:
    """The httpd of a lab back-end namespace, to stop (a server failing) and start again."""

    def __init__(self, ns: Namespace, name: str, procs: List[subprocess.Popen]):
        self.ns, self.name, self.procs = ns, name, procs
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.proc = self.ns.popen([sys.executable, str(HTTPD), "--name", self.name, "--port", str(PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(self.proc)
        deadline = time.monotonic() + 10
        while self.ns.run(["ss", "-Hltn", f"sport = :{PORT}"], check=False).stdout.strip() == "":
            if time.monotonic() > deadline:
                raise LabError(f"the httpd of {self.name} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


class Topology:
    """Build with :meth:`build` (or ``with``); :meth:`close` always tears everything down."""

    def __init__(
        self,
        methods=("mac", "ipip", "gre"),
        *,
        workdir: Optional[str] = None,
        echo: Callable[[str], None] = lambda s: None,
        use_uml: Optional[bool] = None,
        ipv6: bool = False,
        engine: Optional[str] = None,
    ):
        self.methods = [m for m in ("mac", "ipip", "gre") if m in methods]
        #: ``encapfwd run --engine`` for every start (None: run's default, auto)
        self.engine = engine
        #: why the dispatcher's veth peer has no pass-through XDP program (None: it has one)
        self.xdp_peer: Optional[str] = None
        self.ipv6 = ipv6 and "mac" in self.methods
        self.echo = echo
        self.own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="efwlab"))
        self.config_path = self.workdir / "encapfwd.toml"
        self.control_path = str(self.workdir / "control.sock")
        self.log_path = self.workdir / "dispatcher.log"
        self.use_uml = use_uml
        self.ns: Dict[str, Namespace] = {}
        self.procs: List[subprocess.Popen] = []
        self.guests: Dict[str, object] = {}
        self.dispatcher: Optional[subprocess.Popen] = None
        self.config_commands: List[List[str]] = []
        self.setup_scripts: Dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ build

    def __enter__(self) -> Topology:
        try:
            return self.build()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def vips(self) -> Dict[str, str]:
        vips = {m: SERVERS[m][0] for m in self.methods}
        if self.ipv6:
            vips["mac6"] = VIP6
        return vips

    def build(self) -> Topology:
        reason = unavailable_reason(self.methods)
        if reason:
            raise LabUnavailable(reason)
        if self.use_uml is None:
            self.use_uml = not host_has_tunnels()
        c = self.ns["client"] = Namespace("client").create()
        r = self.ns["router"] = Namespace("router").create()
        d = self.ns["dispatcher"] = Namespace("disp").create()
        tunnels = [m for m in ("ipip", "gre") if m in self.methods]
        booted = None
        if tunnels:
            # the far segment first: guest kernels boot (seconds under QEMU) while the rest is set up
            r.ip("link", "add", "far0", "address", ROUTER_FAR_MAC, "type", "bridge")
            r.ip("link", "set", "far0", "up")
            r.ip("addr", "add", f"{ROUTER_FAR}/24", "dev", "far0")
            r.sysctl("net.ipv4.conf.far0.rp_filter", 0)
            if self.use_uml:
                booted = self._boot_guests(tunnels)

        # client <-> router
        veth_pair(c, "eth0", r, "cli0")
        c.ip("addr", "add", f"{CLIENT}/24", "dev", "eth0")
        r.ip("addr", "add", f"{ROUTER_CLIENT}/24", "dev", "cli0")
        c.ip("route", "add", "default", "via", ROUTER_CLIENT)
        # the client computes its own checksums and sends no TSO super-frames (as a real NIC would)
        c.ethtool_offload("eth0", tx=False)

        # the dispatcher's segment: a bridge in the router namespace
        # a bridge without its own address takes its lowest port's, and changes it when a port with a lower
        # one joins: the servers' ARP caches would then point at a MAC nobody has any more
        r.ip("link", "add", "lan0", "address", ROUTER_LAN_MAC, "type", "bridge")
        r.ip("link", "set", "lan0", "up")
        r.ip("addr", "add", f"{ROUTER_LAN}/24", "dev", "lan0")
        veth_pair(d, "eth0", r, "lan-d")
        r.ip("link", "set", "lan-d", "master", "lan0")
        self.xdp_peer = _xdp_peer(r, "lan-d")
        d.ip("addr", "add", f"{DISPATCHER}/24", "dev", "eth0")
        d.ip("route", "add", "default", "via", ROUTER_LAN)
        d.ip("route", "add", "blackhole", VIP_NET)
        d.ethtool_offload("eth0", tx=False, gro=False)
        for key in (
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
        ):
            d.sysctl(key, 0)

        # the router: forwards, routes the VIPs via the dispatcher, lets replies from VIPs through
        r.sysctl("net.ipv4.ip_forward", 1)
        for key in ("all", "default", "cli0", "lan0"):
            r.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        r.ip("route", "add", VIP_NET, "via", DISPATCHER)
        r.ethtool_offload("cli0", tx=False)
        r.ethtool_offload("lan-d", tx=False)
        if self.ipv6:
            # a link flap must not cost the dispatcher its IPv6 address (the kernel flushes it by default):
            # without it, it cannot resolve its IPv6 servers' MACs any more
            d.sysctl("net.ipv6.conf.eth0.keep_addr_on_down", 1)
            for ns, dev, address in (
                (c, "eth0", f"{CLIENT6}/64"),
                (r, "cli0", f"{ROUTER_CLIENT6}/64"),
                (r, "lan0", f"{ROUTER_LAN6}/64"),
                (d, "eth0", f"{DISPATCHER6}/64"),
            ):
                ns.ip("-6", "addr", "add", address, "dev", dev, "nodad")
            c.ip("-6", "route", "add", "default", "via", ROUTER_CLIENT6)
            d.ip("-6", "route", "add", "default", "via", ROUTER_LAN6)
            d.ip("-6", "route", "add", "blackhole", VIP6_NET)
            r.sysctl("net.ipv6.conf.all.forwarding", 1)
            r.ip("-6", "route", "add", VIP6_NET, "via", DISPATCHER6)

        self._write_config()
        if "mac" in self.methods:
            self._mac_server()
        if booted is not None:
            booted()
        for method in tunnels:
            self._tunnel_server(method)
        self._wait_servers()
        return self

    def cli(self, *args: str, check: bool = True, config=None) -> subprocess.CompletedProcess:
        """``encapfwd --config CONFIG ARGS`` (CONFIG: the lab's own file unless given)."""
        argv = encapfwd_argv() + ["--config", str(config or self.config_path), *args]
        env = {k: v for k, v in os.environ.items() if k != "ENCAPFWD_CONFIG"}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        if check and proc.returncode != 0:
            raise LabError(f"encapfwd {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
        return proc

    def _write_config(self) -> None:
        """Configure the dispatcher with the documented CLI (the commands are kept for the lab's output)."""
        networks = "10.0.2.0/24,fd00:2::/64" if self.ipv6 else "10.0.2.0/24"
        commands = [
            [
                "executor",
                "set",
                "interface",
                "eth0",
                "nfa",
                DISPATCHER,
                "networks",
                networks,
                "gateway",
                ROUTER_LAN,
            ]
        ]
        for method in self.methods:
            vip, server, _mac = SERVERS[method]
            commands.append(["cluster", "add", vip])
            commands.append(["port", "add", f"{vip}@{PORT}"])
            words = (
                [] if method == "mac" else ["encapforward", "yes", "encaptype", method, "encapcond", "always"]
            )
            commands.append(["server", "add", f"{vip}@{PORT}@{server}", *words])
        if self.ipv6:
            commands += [
                ["cluster", "add", VIP6],
                ["port", "add", f"{VIP6}@{PORT}"],
                ["server", "add", f"{VIP6}@{PORT}@{MAC_SERVER6}"],
            ]
        for command in commands:
            self.cli(*command)
        self.config_commands = commands

    def setup_script(self, method: str, undo: bool = False) -> str:
        """The project's own generated Linux script for the back-end of *method*."""
        vip, server, _mac = SERVERS[method]
        args = ["backend-setup", f"{vip}@{PORT}@{server}", "--os", "linux"] + (["--undo"] if undo else [])
        proc = self.cli(*args, check=False)
        if proc.returncode != 0:
            raise LabError(f"encapfwd {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
        self.setup_scripts[method] = proc.stdout
        return proc.stdout

    def _script_env(self, method: str) -> dict:
        """A namespace shares the host's files: keep the script's undo records in the lab's folder."""
        return dict(os.environ, ENCAPFWD_STATE_DIR=str(self.workdir / f"state-{method}"))

    def _mac_server(self) -> None:
        r = self.ns["router"]
        vip, address, mac = SERVERS["mac"]
        m = self.ns["mac"] = Namespace("macsrv").create()
        veth_pair(m, "eth0", r, "lan-m")
        r.ip("link", "set", "lan-m", "master", "lan0")
        m.ip("link", "set", "eth0", "address", mac)
        m.ip("addr", "add", f"{address}/24", "dev", "eth0")
        m.ip("route", "add", "default", "via", ROUTER_LAN)
        m.ethtool_offload("eth0", tx=False)
        if self.ipv6:
            m.ip("-6", "addr", "add", f"{MAC_SERVER6}/64", "dev", "eth0", "nodad")
            m.ip("-6", "route", "add", "default", "via", ROUTER_LAN6)
        for method in ("mac", "mac6") if self.ipv6 else ("mac",):
            script = self.setup_script(method)
            proc = m.run(["sh", "-e"], input=script, check=False, env=self._script_env("mac"))
            if proc.returncode != 0:
                raise LabError(f"the generated MAC back-end script failed in {m.name}: {proc.stderr.strip()}")
        self.procs.append(
            m.popen(
                [sys.executable, str(HTTPD), "--name", "mac", "--port", str(PORT)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def add_mac_server(self, name: str, address: str) -> "LabServer":
        """Another MAC-forwarded back-end on lan0 for *address*, already in the configuration (``server add
        VIP@80@ADDRESS``): its own namespace, set up with the generated Linux script, and an httpd
        answering ``server=<name>`` that :class:`LabServer` can stop and start (advisor tests)."""
        r = self.ns["router"]
        vip = SERVERS["mac"][0]
        ns = self.ns[name] = Namespace(f"{name}srv").create()
        peer = f"lan-{name}"[:15]
        veth_pair(ns, "eth0", r, peer)
        r.ip("link", "set", peer, "master", "lan0")
        ns.ip("addr", "add", f"{address}/24", "dev", "eth0")
        ns.ip("route", "add", "default", "via", ROUTER_LAN)
        ns.ethtool_offload("eth0", tx=False)
        script = self.cli("backend-setup", f"{vip}@{PORT}@{address}", "--os", "linux").stdout
        proc = ns.run(["sh", "-e"], input=script, check=False, env=self._script_env(name))
        if proc.returncode != 0:
            raise LabError(f"the generated MAC back-end script failed in {ns.name}: {proc.stderr.strip()}")
        server = LabServer(ns, name, self.procs)
        server.start()
        return server

    def _guest(self, method: str):
        from encapfwd.lab import kernels

        r = self.ns["router"]
        _vip, address, mac = SERVERS[method]
        tap = r.tap(f"tap-{method}")
        r.ip("link", "set", tap, "master", "far0")
        guest = kernels.guest(r, tap, mac=mac, address=f"{address}/24", gateway=ROUTER_FAR,
                              hostname=f"{method}-server")
        self.guests[method] = guest
        return guest

    def _boot_guests(self, methods) -> Callable[[], None]:
        """Start booting the guest back-ends side by side (user-mode-linux: 1.5-3 s each; QEMU+TCG: 6-10 s);
        returns the call that waits for them and raises the first failure."""
        guests = [self._guest(m) for m in methods]
        errors = []

        def boot(guest):
            try:
                guest.start()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(g,), daemon=True) for g in guests]
        for t in threads:
            t.start()

        def wait() -> None:
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            for guest in guests:
                self.echo(f"  {guest.label} back-end booted in {guest.boot_seconds:.1f} s")

        return wait

    def _tunnel_server(self, method: str) -> None:
        r = self.ns["router"]
        vip, address, mac = SERVERS[method]
        script = self.setup_script(method)
        httpd = f"nohup {sys.executable} {HTTPD} --name {method} --port {PORT} > /tmp/httpd.log 2>&1 &"
        if self.use_uml:
            guest = self.guests.get(method)
            if guest is None:
                guest = self._guest(method)
                guest.start()
            result = guest.run(script)
            if not result.ok:
                raise LabError(
                    f"the generated {method} back-end script failed in {guest.label}: {result.output}"
                )
            guest.run(httpd)
        else:
            s = self.ns[method] = Namespace(f"{method}srv").create()
            veth_pair(s, "eth0", r, f"far-{method}")
            r.ip("link", "set", f"far-{method}", "master", "far0")
            s.ip("link", "set", "eth0", "address", mac)
            s.ip("addr", "add", f"{address}/24", "dev", "eth0")
            s.ip("route", "add", "default", "via", ROUTER_FAR)
            proc = s.run(["sh", "-e"], input=script, check=False, env=self._script_env(method))
            if proc.returncode != 0:
                raise LabError(
                    f"the generated {method} back-end script failed in {s.name}: {proc.stderr.strip()}"
                )
            self.procs.append(
                s.popen(
                    [sys.executable, str(HTTPD), "--name", method, "--port", str(PORT)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def _wait_servers(self, timeout: float = 20.0) -> None:
        """Each back-end's HTTP server answers on its own address (from the router)."""
        r = self.ns["router"]
        for method in self.methods:
            address = SERVERS[method][1]
            deadline = time.monotonic() + timeout
            while True:
                proc = r.run(["curl", "-s", "-m", "2", f"http://{address}:{PORT}/"], check=False)
                if proc.returncode == 0 and f"server={method}" in proc.stdout:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"the {method} back-end's HTTP server does not answer on {address}")
                time.sleep(0.2)

    # ----------------------------------------------------------------------------------- dispatcher

    def start_dispatcher(
        self, workers: int = 1, extra: List[str] = (), timeout: float = 20.0, env: Optional[dict] = None
    ) -> subprocess.Popen:
        self.dispatcher = self._launch(self.ns["dispatcher"], self.config_path, self.control_path, self.log_path,
                                       workers, extra, timeout, env)
        return self.dispatcher

    def _launch(self, d: Namespace, config_path, control_path: str, log_path, workers: int = 1,
                extra: List[str] = (), timeout: float = 20.0, env: Optional[dict] = None) -> subprocess.Popen:
        """``encapfwd run`` in namespace *d*; returns once its control socket answers."""
        from encapfwd.control import query_control

        argv = encapfwd_argv() + [
            "--config",
            str(config_path),
            "run",
            "--interface",
            "eth0",
            "--workers",
            str(workers),
            "--control",
            control_path,
            *(["--engine", self.engine] if self.engine and "--engine" not in extra else []),
            *extra,
        ]
        log = open(log_path, "ab")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
        full_env.update(env or {})
        proc = d.popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=full_env)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LabError(f"encapfwd run exited ({proc.returncode}): {_tail(log_path)}")
            try:
                query_control(control_path, "ping", timeout=1.0)
                return proc
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise LabError(f"encapfwd run did not come up: {_tail(log_path)}")
            time.sleep(0.05)

    def dispatcher_log(self) -> str:
        return _tail(self.log_path)

    def stop_dispatcher(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
        proc, self.dispatcher = self.dispatcher, None
        return stop_process(proc, sig, timeout)

    def upstream(self, mode: str) -> None:
        """How the router reaches the VIPs: ``route`` (via the dispatcher's address, the default) or ``arp``
        (the VIP network on-link on lan0: the router ARPs for each VIP and ``encapfwd run --answer-arp``
        answers with the dispatcher's MAC)."""
        r = self.ns["router"]
        if mode == "route":
            r.ip("route", "replace", VIP_NET, "via", DISPATCHER)
        elif mode == "arp":
            r.ip("route", "replace", VIP_NET, "dev", "lan0")
        else:
            raise ValueError(mode)
        for vip in self.vips.values():
            r.ip("neigh", "del", vip, "dev", "lan0", check=False)

    def router_neighbour(self, address: str) -> str:
        return self.ns["router"].ip("neigh", "show", address, "dev", "lan0").stdout.strip()

    def report(self) -> dict:
        from encapfwd.control import query_control

        return query_control(self.control_path)

    # -------------------------------------------------------------------------------------- clients

    def curl(self, method: str, count: int = 1, path: str = "/", timeout: float = 5.0) -> List[str]:
        """*count* HTTP GETs (one connection each) from the client namespace with curl; the answers
        (``FAIL`` for a failed request)."""
        vip = SERVERS[method][0]
        host = f"[{vip}]" if ":" in vip else vip
        script = 'for i in $(seq "$1"); do curl -g -s -S -m "$3" "http://$2$4" || echo FAIL; done'
        proc = self.ns["client"].run(
            ["sh", "-c", script, "sh", str(count), f"{host}:{PORT}", str(timeout), path],
            check=False,
            timeout=count * (timeout + 1) + 10,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith(("server=", "FAIL"))]
        lines += ["FAIL"] * (count - len(lines))
        return lines

    def upload(self, method: str, path, timeout: float = 20.0) -> str:
        """POST the file *path* to the VIP of *method* with curl from the client namespace; the server's
        answer (``... got=<bytes> sha256=<hex>``) or ``FAIL: <curl's error>``."""
        vip = SERVERS[method][0]
        host = f"[{vip}]" if ":" in vip else vip
        proc = self.ns["client"].run(
            ["curl", "-g", "-s", "-S", "-m", str(timeout), "-H", "Expect:", "--data-binary", f"@{path}",
             f"http://{host}:{PORT}/upload"],
            check=False, timeout=timeout + 10,
        )
        return proc.stdout.strip() if proc.returncode == 0 else f"FAIL: {proc.stderr.strip()}"

    def segmentation_offload(self, on: bool) -> None:
        """The client's TSO and the router's forwarding of GSO buffers on (or off, the lab's default): the
        client's TCP then sends buffers of up to 64 KiB, which cross the veths whole and reach the
        dispatcher as GSO socket buffers — what a container's veth receives when its host's NIC merges a
        client's segments (GRO) and its bridge forwards the result."""
        self.ns["client"].ethtool_offload("eth0", tx=on, tso=on, gso=on)
        for dev in ("cli0", "lan-d"):
            self.ns["router"].ethtool_offload(dev, tx=on, tso=on, gso=on)

    def connect(self, method: str, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from the client namespace to the VIP of *method* (kept open by the caller)."""
        vip = SERVERS[method][0]
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        sock = self.ns["client"].socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect((SERVERS[method][0], PORT))
        return sock

    @staticmethod
    def http_get(sock: socket.socket) -> str:
        """One keep-alive GET on an open connection; the body."""
        sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            body += chunk
        return body.decode()

    def sniff_dispatcher(self) -> Sniffer:
        """What arrives at and leaves the dispatcher's eth0, recorded at its veth peer in the router: frames
        the XDP program forwards never reach a packet socket on eth0 itself."""
        return Sniffer(self.ns["router"], "lan-d", mirror=True)

    # ------------------------------------------------------------------------------------- teardown

    def close(self) -> None:
        try:
            self.stop_dispatcher()
        except Exception:  # noqa: BLE001 - tear down the rest anyway
            pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(3)
        self.procs.clear()
        for guest in self.guests.values():
            try:
                guest.stop()
            except Exception:  # noqa: BLE001
                pass
        self.guests.clear()
        for ns in reversed(list(self.ns.values())):
            ns.delete()
        self.ns.clear()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kernel_label(self) -> str:
        """What the IPIP/GRE back-ends run on: ``UML 6.1.176``, ``QEMU+TCG 6.1.0-57-amd64`` or ``namespace``."""
        if not self.use_uml:
            return "namespace"
        return kernels_label()


def kernels_label() -> str:
    from encapfwd.lab import kernels

    try:
        return kernels.select().label
    except LabUnavailable:
        return "no guest kernel"


__all__ = ["SERVERS", "LabServer", "LongLived", "Sniffer", "Topology", "host_has_tunnels", "kernels_label",
           "unavailable_reason"]
