"""``encapfwd lab``: the narrated demonstration on the lab's topology (:mod:`encapfwd.lab.topology` builds it).

It builds the namespaces (and guest kernels for the IPIP/GRE back-ends where the host has no tunnel
modules), draws them, configures the dispatcher with the documented CLI, sends requests through each method,
optionally shows a failover by an advisor, prints the counters, and tears everything down.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

from encapfwd.lab.netns import LabUnavailable
from encapfwd.lab.topology import (
    CLIENT,
    CLIENT6,
    DISPATCHER,
    DISPATCHER6,
    MAC_SERVER6,
    PORT,
    ROUTER_CLIENT,
    ROUTER_FAR,
    ROUTER_LAN,
    SERVERS,
    VIP6,
    VIP_NET,
    LabServer,
    Topology,
    host_has_tunnels,
    kernels_label,
    unavailable_reason,
)


def picture(lab: Topology) -> str:
    """The lab drawn in text: namespaces, addresses, links, where each server runs."""
    def box(title, lines, width):
        out = [title.ljust(width + 2), "┌" + "─" * width + "┐"]
        out += ["│" + (" " + line).ljust(width) + "│" for line in lines]
        out.append("└" + "─" * width + "┘")
        return out

    client = box("client ns", [f"eth0 {CLIENT}", "curl"], 17)
    router = box(
        "router ns",
        [
            f"cli0 {ROUTER_CLIENT}",
            f"lan0 {ROUTER_LAN} (bridge)",
            f"far0 {ROUTER_FAR} (bridge)",
            f"route {VIP_NET}",
            f"  via {DISPATCHER}",
        ],
        28,
    )
    disp = box("dispatcher ns", [f"eth0 {DISPATCHER}", "encapfwd run", f"blackhole {VIP_NET}"], 24)
    height = max(len(client), len(router), len(disp))
    rows = []
    for i in range(height):
        a = client[i] if i < len(client) else " " * 19
        b = router[i] if i < len(router) else " " * 30
        c = disp[i] if i < len(disp) else ""
        link1 = "──" if i == 2 else "  "
        link2 = "──" if i == 3 else "  "
        rows.append(f"  {a}{link1}{b}{link2}{c}".rstrip())
    kind = lab.kernel_label() if lab.use_uml else "namespace"
    if "mac" in lab.methods:
        vip, address, _ = SERVERS["mac"]
        rows.append(f"  on lan0 (the dispatcher's segment): MAC server ns {address}, VIP {vip} on lo")
        if lab.ipv6:
            rows.append(
                f"  IPv6 (MAC forwarding): client {CLIENT6} → VIP {VIP6} routed via dispatcher "
                f"{DISPATCHER6} → MAC server {MAC_SERVER6}"
            )
    for method in ("ipip", "gre"):
        if method in lab.methods:
            vip, address, _ = SERVERS[method]
            dev = "tunl0" if method == "ipip" else "gre0"
            rows.append(
                f"  behind the router on far0:        {method.upper():<4} server {address} ({kind}), "
                f"VIP {vip} on {dev}"
            )
    rows.append("  requests: client → router → dispatcher → server    replies: server → router → client")
    return "\n".join(rows)


#: the advisor ``encapfwd lab --failover`` configures: (interval, timeout, fall, rise)
FAILOVER_ADVISOR = (1.0, 0.5, 2, 2)
FAILOVER_SERVERS = (("m2", "10.0.2.11"), ("m3", "10.0.2.12"))


def _wait_health(lab: "Topology", name: str, state: str, timeout: float) -> Optional[float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if ((lab.report().get("health") or {}).get(name) or {}).get("state") == state:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def _failover(lab: "Topology", servers: Dict[str, "LabServer"], echo, requests: int) -> dict:
    """Stop one server's httpd, watch the advisor take it out, keep requesting, start it, watch it return."""
    interval, timeout, fall, rise = FAILOVER_ADVISOR
    vip = SERVERS["mac"][0]
    name = f"{vip}@{PORT}@{FAILOVER_SERVERS[0][1]}"
    _wait_health(lab, name, "up", 5)
    echo("")
    echo(f"Failover: connect advisor on port {PORT} (interval {interval:g} s, timeout {timeout:g} s, fall {fall}, "
         f"rise {rise}) over three MAC servers.")
    servers["m2"].stop()
    echo(f"  stopped the httpd of m2 ({FAILOVER_SERVERS[0][1]}) …")
    down = _wait_health(lab, name, "down", fall * interval + timeout + 5)
    echo(f"  m2 marked down after {down:.2f} s" if down is not None else "  m2 was NOT marked down")
    answers = lab.curl("mac", requests)
    ok_down = sum(1 for a in answers if a.startswith("server="))
    echo(f"  {ok_down}/{requests} requests answered while m2 is down, by "
         f"{', '.join(sorted({a.split()[0][7:] for a in answers if a.startswith('server=')}))}")
    servers["m2"].start()
    echo("  started the httpd of m2 again …")
    up = _wait_health(lab, name, "up", rise * interval + 5)
    echo(f"  m2 back up after {up:.2f} s" if up is not None else "  m2 did NOT come back")
    return {"down_after": down, "up_after": up, "ok_while_down": ok_down, "requests": requests,
            "ok": down is not None and up is not None and ok_down == requests}


def run_lab(
    methods=("mac", "ipip", "gre"), requests: int = 5, keep: bool = False, echo: Callable[[str], None] = print,
    failover: bool = False,
) -> dict:
    """``encapfwd lab``: build, show, send requests through each method, show counters, tear down."""
    started = time.monotonic()
    result: dict = {"ok": False, "methods": {}}
    methods = list(methods)
    reason = unavailable_reason(methods)
    if reason and "mac" in methods and set(methods) & {"ipip", "gre"} and not unavailable_reason(["mac"]):
        # no ipip/ip_gre in this kernel and no guest kernel boots: show what can be shown
        echo(f"note: {reason}; showing MAC forwarding only")
        methods = ["mac"]
        result["skipped"] = reason
        reason = None
    if reason:
        raise LabUnavailable(f"encapfwd lab cannot run here: {reason}")
    echo(
        "Building the lab (namespaces"
        + (f", {kernels_label()} back-ends" if set(methods) & {"ipip", "gre"} and not host_has_tunnels() else "")
        + ") …"
    )
    with Topology(methods, echo=echo, ipv6="mac" in methods) as lab:
        result["kernel"] = lab.kernel_label() if set(methods) & {"ipip", "gre"} else None
        echo(picture(lab))
        echo("")
        echo("Dispatcher configuration (documented CLI):")
        for command in lab.config_commands:
            echo("  encapfwd " + " ".join(command))
        echo("")
        extra_servers: Dict[str, LabServer] = {}
        if failover:
            vip = SERVERS["mac"][0]
            for name, address in FAILOVER_SERVERS:
                lab.cli("server", "add", f"{vip}@{PORT}@{address}")
                extra_servers[name] = lab.add_mac_server(name, address)
            interval, timeout, fall, rise = FAILOVER_ADVISOR
            command = ["advisor", "start", "connect", str(PORT), "interval", f"{interval:g}", "timeout",
                       f"{timeout:g}", "fall", str(fall), "rise", str(rise)]
            lab.cli(*command)
            echo("  encapfwd " + " ".join(command))
            echo("")
        lab.start_dispatcher()
        engine = (lab.report().get("engine") or {})
        result["engine"] = engine.get("engine", "afpacket")
        echo(f"Engine: {result['engine']} ({engine.get('engine_reason', '')})")
        echo("")
        sniffer = lab.sniff_dispatcher()
        try:
            for method in lab.methods + (["mac6"] if lab.ipv6 else []):
                answers = lab.curl(method, requests)
                names = {method.rstrip("6")} | ({n for n, _ in FAILOVER_SERVERS} if failover and method == "mac" else set())
                ok = sum(1 for a in answers if a.split(" ")[0][len("server="):] in names)
                result["methods"][method] = {
                    "vip": SERVERS[method][0],
                    "requests": requests,
                    "ok": ok,
                    "sample": answers[0] if answers else "",
                }
                echo(
                    f"{method:>5}: {ok}/{requests} HTTP requests to {SERVERS[method][0]} answered by the "
                    f"{'/'.join(sorted(names))} server{'s' if len(names) > 1 else ''}   e.g. {answers[0] if answers else '-'}"
                )
        finally:
            time.sleep(0.2)
            sniffer.stop()
        if failover:
            result["failover"] = _failover(lab, extra_servers, echo, requests)
        report = lab.report()
        seen = sniffer.summary(lab.vips.values())
        echo("")
        echo(
            "Per-server counters (from the running dispatcher's control socket, as 'encapfwd server report'):"
        )
        for name, counters in sorted((report.get("servers") or {}).items()):
            echo(
                f"  {name:<24} {counters.get('method', ''):<5} packets {counters.get('packets', 0):>6}   "
                f"bytes {counters.get('bytes', 0):>8}"
            )
        drops = report.get("drops") or {}
        if drops:
            echo("  drops: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
        echo("")
        echo(
            f"On the dispatcher's eth0: {seen['in_to_vip']} frames client→VIP came in, {seen['in_from_vip']} "
            f"frames from a VIP (replies) — replies bypass the dispatcher."
        )
        result["servers"] = report.get("servers")
        result["dispatcher_saw"] = seen
        if keep:
            echo(
                f"\nThe lab is running (namespaces: {', '.join(ns.name for ns in lab.ns.values())}). "
                f"Press Enter to tear it down."
            )
            try:
                input()
            except EOFError:
                pass
        code = lab.stop_dispatcher()
        result["dispatcher_exit"] = code
        result["ok"] = (
            (not failover or result["failover"]["ok"])
            and all(m["ok"] == m["requests"] for m in result["methods"].values())
            and seen["in_from_vip"] == 0
            and code == 0
        )
    echo(
        f"\nLab torn down ({time.monotonic() - started:.1f} s). Result: "
        f"{'every request succeeded' if result['ok'] else 'FAILED'}."
    )
    return result


__all__ = ["FAILOVER_ADVISOR", "FAILOVER_SERVERS", "picture", "run_lab"]
