"""GRE back-end setup generators: ``script(os, target, undo) -> str``.

- Linux: ``modprobe ip_gre`` (the seed's ``ipgre`` is not a Linux module name); the module's fallback device
  ``gre0`` (it accepts GRE from any source to any local address, with or without a key) up; the cluster
  address ``scope host`` on ``gre0``; ARP sysctls; reverse-path filtering off for ``gre0`` and ``all``.
  Proven on a real kernel by tests/test_backend_uml.py.
- AIX: the seed's ``gre0`` recipe with the real addresses; not run on an AIX kernel.
- Solaris: refused: Solaris tunnels (ip.tun, dladm iptun) are IP-in-IP only, there is no GRE recipe.
- Windows: refused, as the seed says.
"""

from __future__ import annotations

from encapfwd import backend_setup as S
from encapfwd.errors import SetupRefused

NAME = "gre"

LINUX = S.LinuxPlan(method=NAME, device="gre0", module="ip_gre", module_kinds=("gre", "gretap", "erspan"),
                    rp_filter=True)


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
    if os == "solaris":
        raise SetupRefused(
            "no GRE recipe for Solaris: Solaris tunnels (ip.tun, dladm iptun) carry IP-in-IP only; "
            "set encaptype ipip for this server"
        )
    if target.server.grekey is not None:
        raise SetupRefused(
            f"the AIX recipe has no GRE key: remove grekey from server {target.server.address} or use Linux"
        )
    return aix(target, undo)


def aix(target, undo) -> str:
    vip = S.ipv4(target.cluster, "cluster address")
    server = S.ipv4(target.server.address, "server address")
    dispatcher = S.need_dispatcher("aix", target)
    local = S.need_option("aix", target, "tunnel_address",
                          "a free IPv4 address for gre0 (the seed: 'some IP address on this subnet')")
    q = S.quote
    head = [
        "encapfwd back-end " + ("undo" if undo else "setup") + " for AIX",
        S.describe(NAME, target),
        "The IBM recipe with the real addresses: gre0's tunnel runs from this server to the dispatcher.",
        "Not run on an AIX kernel by encapfwd's tests. Lasts until reboot.",
    ]
    if undo:
        lines = [
            f"ifconfig lo0 delete {q(vip)}",
            "ifconfig gre0 down",
            "ifconfig gre0 detach",
        ]
    else:
        lines = [
            f"ifconfig gre0 tunnel {q(server)} {q(dispatcher)}",
            f"ifconfig gre0 inet {q(local)}",
            "### loopback: the cluster address",
            f"ifconfig lo0 alias {q(vip)} netmask 255.255.255.255",
        ]
    return "#!/bin/sh\n" + S.comment_block(head) + "\n".join(lines) + "\n"
