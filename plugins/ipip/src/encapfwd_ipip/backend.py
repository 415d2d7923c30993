"""IPIP back-end setup generators: ``script(os, target, undo) -> str``.

- Linux: ``modprobe ipip``; the module's fallback device ``tunl0`` (it accepts IPIP from any source to any
  local address) up; the cluster address ``scope host`` on ``tunl0``; ARP sysctls; reverse-path filtering
  off for ``tunl0`` and ``all``. Proven on a real kernel by tests/test_backend_uml.py.
- Solaris: the seed's ``ip.tun0`` recipe, corrected (see docs/backend-setup.md); not run on a Solaris kernel.
- AIX: refused: the seed's AIX recipe is a GRE interface, which does not decapsulate IPIP.
- Windows: refused, as the seed says.
"""

from __future__ import annotations

from encapfwd import backend_setup as S
from encapfwd.errors import SetupRefused

NAME = "ipip"

LINUX = S.LinuxPlan(method=NAME, device="tunl0", module="ipip", module_kinds=("ipip",), rp_filter=True)


def script(os, target, undo) -> str:
    S.check_os(os)
    S.check_target(target)
    S.refuse_persistent(os, target)
    if os == "linux":
        S.need_ipv4_target(os, NAME, target)
        return S.linux_script(LINUX, target, undo)
    if os == "windows":
        S.refuse_windows_tunnel()
    S.need_ipv4_target(os, NAME, target)
    if os == "aix":
        raise SetupRefused(
            "no IPIP recipe for AIX: the AIX recipe decapsulates through a GRE interface (gre0), which does not "
            "accept IPIP; set encaptype gre for this server"
        )
    return solaris(target, undo)


def solaris(target, undo) -> str:
    vip = S.ipv4(target.cluster, "cluster address")
    server = S.ipv4(target.server.address, "server address")
    dispatcher = S.need_dispatcher("solaris", target)
    local = S.need_option("solaris", target, "tunnel_address",
                          "a free IPv4 address for this end of ip.tun0 (the seed: 'some free IP address on this subnet')")
    peer = S.need_option("solaris", target, "tunnel_peer",
                         "a free IPv4 address for the far end of ip.tun0 (point-to-point)")
    if local == peer:
        raise SetupRefused("--tunnel-address and --tunnel-peer must differ (the two ends of ip.tun0)")
    q = S.quote
    head = [
        "encapfwd back-end " + ("undo" if undo else "setup") + " for Solaris (10, or 11 with legacy ifconfig tunnels)",
        S.describe(NAME, target),
        "From the IBM recipe, corrected (docs/backend-setup.md): its third line was two commands run together;",
        "the tunnel source (tsrc) is this server and the destination (tdst) the dispatcher; the cluster",
        "address gets netmask 255.255.255.255 (the seed's 255.0.0.0 would put a whole /8 on the loopback).",
        "Not run on a Solaris kernel by encapfwd's tests.",
        "Lasts until reboot.",
    ]
    if undo:
        lines = [
            "/sbin/ifconfig lo0:1 unplumb",
            "/sbin/ifconfig ip.tun0 unplumb",
        ]
    else:
        lines = [
            f"/sbin/ifconfig ip.tun0 plumb {q(local)} netmask 255.255.255.255 up",
            f"/sbin/ifconfig ip.tun0 {q(local)} {q(peer)} up",
            f"/sbin/ifconfig ip.tun0 tsrc {q(server)} tdst {q(dispatcher)} up",
            "### loopback: the cluster address",
            f"/sbin/ifconfig lo0:1 plumb {q(vip)} netmask 255.255.255.255 up",
        ]
    return "#!/bin/sh\n" + S.comment_block(head) + "\n".join(lines) + "\n"
