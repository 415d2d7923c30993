"""The scale-out lab: N dispatchers announce the VIPs over BGP to a router running BIRD 2, which spreads the
client's flows over them by ECMP (L4 hash); the back-ends are the lab's MAC namespace and user-mode-linux
IPIP/GRE servers (:mod:`.topology`).

::

    client ns ── router ns (BIRD, AS 65000, ECMP, fib_multipath_hash_policy=1)
                   │ lan0 10.0.2.254                          far0 10.0.3.254
                   ├── dispatcher 1 10.0.2.1 ┐                 ├── IPIP server (UML)
                   ├── dispatcher 2 10.0.2.2 ├ AS 65001, each  └── GRE server (UML)
                   ├── dispatcher 3 10.0.2.3 ┘ announces 10.0.9.x/32 via ExaBGP (encapfwd run)
                   └── MAC server 10.0.2.10

Each dispatcher has its own configuration file: the same clusters, ports and servers, its own ``nfa``
(next hop and router ID). Everything lives in namespaces this module creates; :meth:`ScaleOut.close`
removes it all.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from encapfwd.errors import one_line
from encapfwd.lab.netns import LabUnavailable, Namespace, veth_pair
from encapfwd.lab.topology import (
    CLIENT,
    DISPATCHER,
    DISPATCHER6,
    PORT,
    ROUTER_LAN,
    ROUTER_LAN6,
    SERVERS,
    VIP6_NET,
    VIP_NET,
    LabError,
    Topology,
    _tail,
    _xdp_peer,
    stop_process,
    unavailable_reason,
)

ROUTER_ASN = 65000
DISPATCHER_ASN = 65001
#: the lab's BGP hold time (the shortest BGP allows; keepalives every second)
HOLD = 3
MAX_DISPATCHERS = 9


def address_of(index: int) -> str:
    """Dispatcher *index* (1-based) on lan0: 10.0.2.1, 10.0.2.2 …"""
    return f"10.0.2.{index}"


def address6_of(index: int) -> str:
    """Dispatcher *index*'s IPv6 address on lan0: fd00:2::1, fd00:2::2 …"""
    return f"fd00:2::{index}"


def bird_config(count: int, log_path: str, hold: int = HOLD, ipv6: bool = False) -> str:
    """BIRD 2 for the router: one passive eBGP session per dispatcher, the cluster /32s (and /128s over the
    same IPv4 session) imported, and the kernel protocols merging equal routes into one multipath (ECMP)
    route."""
    kernel6 = """
protocol kernel {
    ipv6 { import none; export where source = RTS_BGP; };
    merge paths on limit 16;
}
""" if ipv6 else ""
    channel6 = f"""    ipv6 {{
        import where net ~ [ {VIP6_NET}{{128,128}} ];
        export none;
    }};
""" if ipv6 else ""
    sessions = "".join(
        f"protocol bgp d{i} from dispatchers {{ neighbor {address_of(i)} as {DISPATCHER_ASN}; }}\n"
        for i in range(1, count + 1)
    )
    return f"""\
log "{log_path}" all;
router id {ROUTER_LAN};

protocol device {{ scan time 10; }}

# the BGP routes into the kernel; equal ones from several dispatchers become one ECMP route
protocol kernel {{
    ipv4 {{ import none; export where source = RTS_BGP; }};
    merge paths on limit 16;
}}
{kernel6}
template bgp dispatchers {{
    local {ROUTER_LAN} as {ROUTER_ASN};
    direct;
    passive on;              # the dispatchers connect
    # a silent dispatcher is dropped after the hold time
    hold time {hold};
    keepalive time 1;
    error wait time 1, 5;    # a dispatcher that comes back is taken again at once
    graceful restart off;    # a dead dispatcher's routes go at once, never kept
    ipv4 {{
        import where net ~ [ {VIP_NET}{{32,32}} ];
        export none;
    }};
{channel6}}}

{sessions}"""


def frr_config(count: int, log_path: str, hold: int = HOLD, ipv6: bool = False) -> str:
    """FRR's bgpd for the router: the same sessions, filters and ECMP as :func:`bird_config`."""
    neighbours = "".join(f" neighbor {address_of(i)} peer-group DISPATCHERS\n" for i in range(1, count + 1))
    six = (
        " address-family ipv6 unicast\n"
        "  neighbor DISPATCHERS activate\n"
        "  neighbor DISPATCHERS prefix-list VIPS6 in\n"
        "  maximum-paths 16\n"
        " exit-address-family\n"
    ) if ipv6 else ""
    return f"""\
frr defaults datacenter
hostname router
log file {log_path}
!
ip prefix-list VIPS seq 5 permit {VIP_NET} ge 32 le 32
ipv6 prefix-list VIPS6 seq 5 permit {VIP6_NET} ge 128 le 128
!
router bgp {ROUTER_ASN}
 bgp router-id {ROUTER_LAN}
 no bgp ebgp-requires-policy
 no bgp graceful-restart
 neighbor DISPATCHERS peer-group
 neighbor DISPATCHERS remote-as {DISPATCHER_ASN}
 neighbor DISPATCHERS passive
 neighbor DISPATCHERS timers 1 {hold}
 neighbor DISPATCHERS timers connect 1
{neighbours} !
 address-family ipv4 unicast
  neighbor DISPATCHERS prefix-list VIPS in
  maximum-paths 16
 exit-address-family
{six}!
"""


ROUTERS = ("bird", "frr")
FRR_DIR = Path("/usr/lib/frr")


def router_unavailable(router: str = "bird") -> Optional[str]:
    if router == "frr":
        if not (FRR_DIR / "bgpd").exists():
            return "FRR is not installed (Debian package frr; ./dev installs it)"
    elif shutil.which("bird") is None and not Path("/usr/sbin/bird").exists():
        return "BIRD is not installed (Debian package bird2; ./dev installs it)"
    from encapfwd.bgp.speaker import exabgp_path

    if exabgp_path() is None:
        return "ExaBGP is not installed (pip install 'encapfwd[bgp]'; ./dev installs it)"
    return None


def scaleout_unavailable(methods=("mac", "ipip", "gre"), router: str = "bird") -> Optional[str]:
    return unavailable_reason(methods) or router_unavailable(router)


class Member:
    """One dispatcher of the group."""

    def __init__(self, index: int, ns: Namespace, config: Path, control: str, log: Path):
        self.index, self.ns, self.config, self.control, self.log = index, ns, config, control, log
        self.address = address_of(index)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ScaleOut(Topology):
    """:class:`Topology` with *dispatchers* dispatchers behind a BIRD router (see the module's text)."""

    def __init__(self, dispatchers: int = 3, methods=("mac", "ipip", "gre"), router: str = "bird",
                 sync: bool = False, **kwargs):
        #: flow synchronisation between the dispatchers (executor syncpeers/synckey; docs/scale-out.md)
        self.sync = sync
        if not 1 <= dispatchers <= MAX_DISPATCHERS:
            raise LabError(f"--dispatchers must be between 1 and {MAX_DISPATCHERS}")
        if router not in ROUTERS:
            raise LabError(f"the router runs one of {', '.join(ROUTERS)}, not {router!r}")
        super().__init__(methods, **kwargs)
        self.router = router
        self.router_procs: List[subprocess.Popen] = []
        self.count = dispatchers
        self.members: Dict[int, Member] = {}
        self.bird: Optional[subprocess.Popen] = None
        self.bird_socket = str(self.workdir / "bird.ctl")

    # -- build

    def build(self) -> "ScaleOut":
        reason = router_unavailable(self.router)
        if reason:
            raise LabUnavailable(reason)
        super().build()
        r = self.ns["router"]
        r.ip("route", "del", VIP_NET, "via", DISPATCHER)  # BGP decides from now on
        r.sysctl("net.ipv4.fib_multipath_hash_policy", 1)  # ECMP on the L4 hash (addresses and ports)
        bgp = ["executor", "set", "bgppeer", ROUTER_LAN, "bgpasn", str(DISPATCHER_ASN), "bgppeerasn",
               str(ROUTER_ASN), "bgpholdtime", str(HOLD)]
        if self.ipv6:
            r.ip("-6", "route", "del", VIP6_NET, "via", DISPATCHER6)
            r.sysctl("net.ipv6.fib_multipath_hash_policy", 1)
            bgp += ["bgpnexthop6", DISPATCHER6]
        self.cli(*bgp)
        self.config_commands.append(bgp)
        self.members[1] = Member(1, self.ns["dispatcher"], self.config_path, self.control_path, self.log_path)
        for i in range(2, self.count + 1):
            d = self.ns[f"dispatcher{i}"] = Namespace(f"disp{i}").create()
            peer = f"lan-d{i}"
            veth_pair(d, "eth0", r, peer)
            r.ip("link", "set", peer, "master", "lan0")
            _xdp_peer(r, peer)
            r.ethtool_offload(peer, tx=False)
            d.ip("addr", "add", f"{address_of(i)}/24", "dev", "eth0")
            d.ip("route", "add", "default", "via", ROUTER_LAN)
            d.ip("route", "add", "blackhole", VIP_NET)
            if self.ipv6:
                d.ip("-6", "addr", "add", f"{address6_of(i)}/64", "dev", "eth0", "nodad")
                d.ip("-6", "route", "add", "default", "via", ROUTER_LAN6)
                d.ip("-6", "route", "add", "blackhole", VIP6_NET)
            d.ethtool_offload("eth0", tx=False, gro=False)
            for key in ("all", "default", "eth0"):
                d.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
            config = self.workdir / f"dispatcher{i}.toml"
            shutil.copyfile(self.config_path, config)
            self.members[i] = Member(i, d, config, str(self.workdir / f"control{i}.sock"),
                                     self.workdir / f"dispatcher{i}.log")
            self.cli_on(i, "executor", "set", "nfa", address_of(i),
                        *(["bgpnexthop6", address6_of(i)] if self.ipv6 else []))
        if self.sync:
            self.enable_sync()
        if self.router == "frr":
            frr = self.workdir / "frr"
            frr.mkdir()
            self.workdir.chmod(0o711)  # FRR's daemons run as the frr user
            shutil.chown(frr, "frr", "frr")
            conf = frr / "bgpd.conf"
            conf.write_text(frr_config(self.count, str(frr / "bgpd.log"), ipv6=self.ipv6))
            shutil.chown(conf, "frr", "frr")
        else:
            (self.workdir / "bird.conf").write_text(
                bird_config(self.count, str(self.workdir / "bird.log"), ipv6=self.ipv6))
        self.start_router()
        return self

    def enable_sync(self) -> None:
        """Flow synchronisation: one key file (mode 0600) for the group, each dispatcher's peers = the others."""
        import os

        key = self.workdir / "sync.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(os.urandom(32).hex() + "\n")
        for i in self.members:
            peers = ",".join(address_of(j) for j in self.members if j != i)
            if peers:
                self.cli_on(i, "executor", "set", "syncpeers", peers, "synckey", str(key))

    def _frr_argv(self, daemon: str, conf: str) -> List[str]:
        frr = self.workdir / "frr"
        return [str(FRR_DIR / daemon), "-N", self.ns["router"].name, "-u", "frr", "-g", "frr", "-f", conf,
                "-i", str(frr / f"{daemon}.pid"), "-z", str(frr / "zserv.api"), "--vty_socket", str(frr),
                "-A", "127.0.0.1"]

    def _start_frr(self) -> None:
        """zebra (installs the routes in the kernel) and bgpd, in the router namespace, with their files in the
        lab's folder; ``-N`` keeps them apart from any other FRR."""
        r, frr = self.ns["router"], self.workdir / "frr"
        zebra = r.popen(self._frr_argv("zebra", "/dev/null"), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.router_procs.append(zebra)
        self.procs.append(zebra)
        deadline = time.monotonic() + 10
        while not (frr / "zserv.api").exists():
            if zebra.poll() is not None or time.monotonic() > deadline:
                raise LabError("FRR's zebra did not start")
            time.sleep(0.05)
        bgpd = r.popen(self._frr_argv("bgpd", str(frr / "bgpd.conf")), stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT)
        self.router_procs.append(bgpd)
        self.procs.append(bgpd)
        while not (frr / "bgpd.pid").exists():
            if bgpd.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"FRR's bgpd did not start: {_tail(frr / 'bgpd.log')}")
            time.sleep(0.05)

    def start_router(self) -> None:
        """The routing daemon in the router namespace, in the foreground (the lab's children), with its own
        sockets and pid files."""
        if self.router == "frr":
            self._start_frr()
            return
        Path(self.bird_socket).unlink(missing_ok=True)
        self.bird = self.ns["router"].popen(
            ["bird", "-f", "-c", str(self.workdir / "bird.conf"), "-s", self.bird_socket,
             "-P", str(self.workdir / "bird.pid")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.procs.append(self.bird)
        deadline = time.monotonic() + 10
        while not Path(self.bird_socket).exists():
            if self.bird.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"BIRD did not start: {_tail(self.workdir / 'bird.log')}")
            time.sleep(0.05)

    def stop_router(self, sig: int = signal.SIGTERM) -> None:
        procs = list(reversed(self.router_procs)) if self.router == "frr" else [self.bird]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                proc.wait(10)
        self.router_procs.clear()
        if self.router == "frr":
            for leftover in ("bgpd.pid", "zebra.pid", "zserv.api"):
                (self.workdir / "frr" / leftover).unlink(missing_ok=True)

    # -- configuration of every member

    def cli_on(self, index: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli(*args, check=check, config=self.members[index].config)

    def cli_all(self, *args: str) -> None:
        """The same configuration command on every dispatcher (as an operator's tooling would)."""
        for index in self.members:
            self.cli_on(index, *args)

    # -- dispatchers

    def start(self, index: int, extra: List[str] = (), env: Optional[dict] = None) -> Member:
        member = self.members[index]
        member.proc = self._launch(member.ns, member.config, member.control, member.log, extra=extra, env=env)
        if index == 1:
            self.dispatcher = member.proc
        return member

    def start_all(self, env: Optional[dict] = None) -> None:
        for index in self.members:
            self.start(index, env=env)

    def kill(self, index: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> Optional[int]:
        member = self.members[index]
        proc, member.proc = member.proc, None
        if index == 1:
            self.dispatcher = None
        return stop_process(proc, sig, timeout)

    def report_of(self, index: int) -> dict:
        from encapfwd.control import query_control

        return query_control(self.members[index].control)

    def log_of(self, index: int) -> str:
        return _tail(self.members[index].log)

    # -- the router's view

    def nexthops(self, vip: str) -> List[str]:
        """The router's next hops for *vip* (its kernel FIB, as BIRD installed it), sorted."""
        family = ["-6"] if ":" in vip else []
        out = self.ns["router"].ip(*family, "-j", "route", "show", vip, check=False).stdout or "[]"
        hops = []
        for route in json.loads(out):
            if "nexthops" in route:
                hops += [n.get("gateway") for n in route["nexthops"]]
            elif route.get("gateway"):
                hops.append(route["gateway"])
        return sorted(h for h in hops if h)

    def carrier(self, vip: str, sport: int, proto: str = "tcp") -> Optional[str]:
        """The dispatcher the router sends the client's flow (CLIENT:*sport* → *vip*:PORT) to."""
        out = self.ns["router"].ip("-j", "route", "get", vip, "from", CLIENT, "iif", "cli0", "ipproto", proto,
                                   "sport", str(sport), "dport", str(PORT), check=False).stdout or "[]"
        routes = json.loads(out)
        return routes[0].get("gateway") if routes else None

    def bird_protocols(self) -> str:
        """The routing daemon's sessions (for messages)."""
        if self.router == "frr":
            return self.ns["router"].run(["vtysh", "--vty_socket", str(self.workdir / "frr"), "-c",
                                          "show bgp summary"], check=False).stdout
        return self.ns["router"].run(["birdc", "-s", self.bird_socket, "show", "protocols"], check=False).stdout

    def wait_nexthops(self, vip: str, wanted: List[str], timeout: float) -> Optional[float]:
        """Seconds until the router's next hops for *vip* are *wanted*, or None."""
        started = time.monotonic()
        wanted = sorted(wanted)
        while True:
            if self.nexthops(vip) == wanted:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.01)

    def next_hops_of(self, vip: str, but: Optional[int] = None) -> List[str]:
        """The next hops the router should hold for *vip* with every dispatcher but *but* announcing."""
        of = address6_of if ":" in vip else address_of
        return sorted(of(i) for i in self.members if i != but)

    def vip_list(self) -> List[str]:
        return [SERVERS[m][0] for m in self.methods + (["mac6"] if self.ipv6 else [])]

    # -- teardown

    def close(self) -> None:
        for index in list(self.members):
            try:
                self.kill(index, signal.SIGTERM)
            except Exception:  # noqa: BLE001 - tear down the rest anyway
                pass
        router = self.ns.get("router")
        super().close()
        if self.router == "frr" and router is not None:  # FRR's -N makes /var/run/frr/NAME even so
            shutil.rmtree(Path("/var/run/frr") / router.name, ignore_errors=True)


__all__ = ["ScaleOut", "address_of", "bird_config", "scaleout_unavailable"]


# ------------------------------------------------------------------------------ encapfwd lab --dispatchers


def _routes_text(lab: ScaleOut) -> List[str]:
    return [f"    {vip:<10} → {', '.join(lab.nexthops(vip)) or 'no route'}" for vip in lab.vip_list()]


def run_scaleout_lab(dispatchers: int, methods=("mac", "ipip", "gre"), requests: int = 6,
                     kill: Optional[int] = None, echo=print, router: str = "bird") -> dict:
    """``encapfwd lab --dispatchers N [--kill K]``: the ECMP picture, which dispatcher carried which flows,
    one dispatcher killed on request with the router's routes before and after; torn down at the end."""
    started = time.monotonic()
    result: dict = {"ok": False, "dispatchers": dispatchers}
    reason = scaleout_unavailable(methods, router)
    if reason:
        raise LabUnavailable(f"encapfwd lab --dispatchers cannot run here: {reason}")
    if kill is not None and not 1 <= kill <= dispatchers:
        raise LabError(f"--kill must name one of the dispatchers 1-{dispatchers}")
    echo(f"Building the scale-out lab: {dispatchers} dispatcher(s), a {router.upper()} router, back-ends "
         f"{', '.join(methods)} …")
    try:
        _show(dispatchers, methods, requests, kill, echo, result, router)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise LabError(one_line(f"the scale-out lab failed: {type(exc).__name__}: {exc}", None, first=True)) from None
    echo(f"\nLab torn down ({time.monotonic() - started:.1f} s). Result: {'OK' if result['ok'] else 'FAILED'}.")
    return result


def _show(dispatchers, methods, requests, kill, echo, result, router) -> None:
    with ScaleOut(dispatchers, methods, echo=echo, ipv6="mac" in methods, router=router) as lab:
        echo(__doc__.split("::", 1)[1].split("Each dispatcher", 1)[0].rstrip().replace(
            "dispatcher 3 10.0.2.3", f"dispatcher {dispatchers} 10.0.2.{dispatchers}"))
        echo("")
        echo("Configuration (every dispatcher; each then sets its own nfa):")
        for command in lab.config_commands:
            echo("  encapfwd " + " ".join(command))
        conf = lab.workdir / ("frr/bgpd.conf" if router == "frr" else "bird.conf")
        echo(f"Router: {'FRR' if router == 'frr' else 'BIRD 2'} with {conf} (docs/scale-out.md shows it)")
        lab.start_all()
        for vip in lab.vip_list():
            lab.wait_nexthops(vip, lab.next_hops_of(vip), 20)
        echo(f"\nThe router's routes (its kernel FIB, from {'FRR' if router == 'frr' else 'BIRD'}):")
        for line in _routes_text(lab):
            echo(line)
        result["routes_before"] = {vip: lab.nexthops(vip) for vip in lab.vip_list()}
        conns = []
        for method in methods:
            for _ in range(requests):
                sock = lab.connect(method)
                answer = lab.http_get(sock).split()[0]
                conns.append((method, sock, sock.getsockname()[1], answer))
        carried: Dict[str, Dict[str, int]] = {}
        for method, _sock, sport, _answer in conns:
            via = lab.carrier(SERVERS[method][0], sport) or "?"
            carried.setdefault(via, {}).setdefault(method, 0)
            carried[via][method] += 1
        echo(f"\n{len(conns)} connections ({requests} per method), spread by the router's L4 hash:")
        for i in lab.members:
            row = carried.get(address_of(i), {})
            echo(f"  dispatcher {i} ({address_of(i)}): "
                 + (", ".join(f"{n} {m}" for m, n in sorted(row.items())) or "none"))
        result["carried"] = carried
        ok = all(answer == f"server={method}" for method, _s, _p, answer in conns)
        digests = {i: lab.report_of(i)["engine"].get("selection_digest") for i in lab.members}
        echo(f"  selection digest on every dispatcher: "
             f"{'the same, ' + next(iter(digests.values()))[:16] if len(set(digests.values())) == 1 else digests}")
        if kill is not None:
            echo(f"\nSIGKILL of dispatcher {kill} …")
            t0 = time.monotonic()
            lab.kill(kill)
            gone = max((lab.wait_nexthops(vip, lab.next_hops_of(vip, but=kill), HOLD + 2) or float("inf"))
                       for vip in lab.vip_list())
            echo(f"  its routes left the router after {gone:.3f} s (hold time {HOLD} s):")
            for line in _routes_text(lab):
                echo(line)
            result["routes_after"] = {vip: lab.nexthops(vip) for vip in lab.vip_list()}
            survived = 0
            for method, sock, _sport, answer in conns:
                try:
                    survived += lab.http_get(sock).split()[0] == answer
                except OSError:
                    pass
            echo(f"  {survived}/{len(conns)} open connections still answered by the same server "
                 f"({time.monotonic() - t0:.1f} s after the kill)")
            result["survived"] = survived
            ok = ok and survived == len(conns) and gone != float("inf")
        for _m, sock, _p, _a in conns:
            sock.close()
        result["ok"] = ok
