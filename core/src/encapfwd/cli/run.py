"""``encapfwd run`` (live forwarding, Linux, root) and ``encapfwd lab`` (a namespace lab, end to end).

Nothing here imports scapy or pyroute2 at import time.
"""

from __future__ import annotations

import json
import sys

import click

from encapfwd.errors import EncapfwdError


def _cpus(text):
    if not text:
        return None
    cpus = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


@click.command("run")
@click.option(
    "--interface",
    "-i",
    metavar="IF",
    default=None,
    help="Interface to listen and send on (default: executor interface).",
)
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Forwarding processes sharing the traffic by flow hash (PACKET_FANOUT).",
)
@click.option(
    "--control",
    metavar="PATH",
    default=None,
    help="Control socket for 'server report' (default $ENCAPFWD_CONTROL, else "
    "/run/encapfwd/netns-INODE.sock, one per network namespace). Only a stale socket there is replaced.",
)
@click.option(
    "--cpus",
    metavar="LIST",
    default=None,
    help="Pin worker i to the i-th CPU of LIST (e.g. 1 or 0,1 or 2-5).",
)
@click.option(
    "--answer-arp",
    is_flag=True,
    help="Answer ARP requests for the IPv4 cluster addresses with this interface's MAC (and announce "
    "them with gratuitous ARP), for upstreams that ARP for the VIP instead of routing it here.",
)
@click.option(
    "--qdisc-bypass",
    is_flag=True,
    help="Send frames straight to the driver (PACKET_QDISC_BYPASS), skipping the interface's queueing "
    "discipline (may save time per frame on a NIC; nothing measurable on a veth), but tcpdump on the "
    "interface no longer sees what is sent and no traffic shaping applies.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "xdp", "tc", "afpacket"]),
    default="auto",
    show_default=True,
    help="xdp: the XDP program forwards in the kernel, the AF_PACKET workers are its slow path; tc: the same "
    "program at tc ingress (tcx, else clsact), for frames that arrive as socket buffers (veth, containers); "
    "afpacket: the workers forward everything; auto: native XDP where the driver runs it and the frames it "
    "sends arrive (a NIC), tc on every veth and other virtual interfaces, afpacket where BPF is unavailable "
    "(the first line says which engine, and why).",
)
@click.option(
    "--xdp-mode",
    type=click.Choice(["auto", "native", "generic"]),
    default="auto",
    show_default=True,
    help="native: in the driver (fast); generic: after the kernel built an skb (every driver); auto: native "
    "only where the frames the program sends arrive (a NIC whose driver runs XDP, a veth whose peer runs an "
    "XDP program), else generic.",
)
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    default=None,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST:PORT, [IPV6]:PORT, or :PORT for "
    "127.0.0.1; 0.0.0.0 or [::] for every address). Needs prometheus_client ('encapfwd[live]').",
)
@click.pass_context
def run_command(ctx, interface, workers, control, cpus, answer_arp, qdisc_bypass, engine, xdp_mode, metrics):
    """Forward live traffic for the configured clusters (Linux, root).

    \b
    Upstream must send cluster traffic to this host: either a route for the
    VIP via this host's address, or this host answering ARP for the VIP
    (--answer-arp).
    This host's kernel must not answer or route it: do not configure the VIP
    here; with ip_forward on, add 'ip route add blackhole VIP/32'.
    SIGHUP reloads the configuration (established flows keep their server);
    SIGTERM or Ctrl-C stops.
    """
    from encapfwd.plugins import get_plugin_manager
    from encapfwd.runtime import controller as live

    try:
        cpu_list = _cpus(cpus)
    except ValueError:
        raise EncapfwdError(f"--cpus: expected a list like 0,1 or 2-5, got {cpus!r}") from None
    if metrics is not None:  # a bad value is refused before anything starts (a port in use: at start)
        from encapfwd.runtime.metrics import check_available, parse_address

        parse_address(metrics)
        check_available()
    live.check_platform()
    registry = get_plugin_manager()
    code = live.run(
        ctx.obj["config_path"],
        registry,
        interface=interface,
        workers=workers,
        control_path=control,
        cpus=cpu_list,
        answer_arp=answer_arp,
        qdisc_bypass=qdisc_bypass,
        engine=engine,
        xdp_mode=xdp_mode,
        metrics=metrics,
    )
    ctx.exit(code)


@click.command("lab")
@click.option(
    "--requests",
    "-n",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="HTTP requests per forwarding method.",
)
@click.option(
    "--methods",
    default="mac,ipip,gre",
    show_default=True,
    help="Forwarding methods to show (comma-separated).",
)
@click.option("--keep", is_flag=True, help="Keep the lab running until Enter is pressed (to explore it).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON at the end.")
@click.option("--failover", is_flag=True,
              help="Also show health checking: two more MAC servers and a connect advisor; one server's "
                   "httpd is stopped (it goes down, requests keep succeeding) and started again (it comes back).")
@click.option("--dispatchers", type=click.IntRange(1, 9), default=None,
              help="Scale-out: this many dispatchers announce the VIPs over BGP (ExaBGP) to a BIRD router that "
                   "spreads flows by ECMP; shows which dispatcher carried which flows.")
@click.option("--kill", "kill", type=click.IntRange(1, 9), default=None,
              help="With --dispatchers: SIGKILL this dispatcher and show the routes and connections after.")
@click.option("--router", type=click.Choice(["bird", "frr"]), default="bird", show_default=True,
              help="With --dispatchers: the routing daemon on the router.")
def lab_command(requests, methods, keep, as_json, failover, dispatchers, kill, router):
    """Build a namespace lab, send HTTP requests through 'encapfwd run', show counters, tear it down.

    \b
    client ─ router ─┬─ dispatcher (encapfwd run)
                     ├─ MAC server (namespace, VIP on lo)
                     └─ IPIP and GRE servers (user-mode-linux kernels)
    Needs root, iproute2, ethtool; user-mode-linux for IPIP/GRE when the
    host kernel has no ipip/ip_gre modules.
    """
    from encapfwd.lab.demo import run_lab

    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in wanted if m not in ("mac", "ipip", "gre")]
    if bad:
        raise EncapfwdError(f"--methods: unknown method(s) {', '.join(bad)} (mac, ipip, gre)")
    if failover and "mac" not in wanted:
        raise EncapfwdError("--failover needs the mac method (its extra servers are MAC-forwarded)")
    if (kill is not None or router != "bird") and dispatchers is None:
        raise EncapfwdError("--kill and --router need --dispatchers")
    if dispatchers is not None:
        if failover or keep:
            raise EncapfwdError("--dispatchers does not combine with --failover or --keep")
        from encapfwd.lab.scaleout import run_scaleout_lab

        result = run_scaleout_lab(dispatchers, wanted, requests=requests, kill=kill, echo=click.echo,
                                  router=router)
        if as_json:
            click.echo(json.dumps(result, indent=2, default=str))
        sys.exit(0 if result.get("ok") else 1)
    result = run_lab(methods=wanted, requests=requests, keep=keep, echo=click.echo, failover=failover)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    if not result.get("ok"):
        sys.exit(1)
