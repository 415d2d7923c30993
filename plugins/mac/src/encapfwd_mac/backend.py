"""MAC forwarding back-end setup generators: ``script(os, target, undo) -> str``.

The dispatcher hands the client's packet, still addressed to the cluster address (VIP), to the server's
MAC; the server must accept the VIP as a local address without answering ARP for it.

- Linux: the VIP ``scope host`` on ``lo`` (``/32``, or ``/128`` for IPv6), ``arp_ignore=3`` (no ARP reply
  for scope-host addresses) and ``arp_announce=2``; reverse-path filtering is left alone (packets arrive on
  the interface that routes back to the client). Proven in a namespace's kernel by
  tests/test_backend_mac_netns.py.
- AIX and Solaris: the loopback lines of the seed's recipes (Solaris with netmask 255.255.255.255).
- Windows: the loopback-adapter steps (instructions and ``netsh`` commands for ``cmd.exe``).
"""

from __future__ import annotations

import ipaddress

from encapfwd import backend_setup as S

NAME = "mac"

LINUX = S.LinuxPlan(method=NAME, device="lo", module=None, rp_filter=False)


def script(os, target, undo) -> str:
    S.check_os(os)
    S.check_target(target)
    S.refuse_persistent(os, target)
    if os == "linux":
        return S.linux_script(LINUX, target, undo)
    if os == "windows":
        return windows(target, undo)
    S.need_ipv4_target(os, NAME, target)
    return aix(target, undo) if os == "aix" else solaris(target, undo)


def _head(os_label, target, undo, extra=()):
    return [f"encapfwd back-end {'undo' if undo else 'setup'} for {os_label}", S.describe(NAME, target), *extra]


def aix(target, undo) -> str:
    vip = S.quote(S.ipv4(target.cluster, "cluster address"))
    head = _head("AIX", target, undo, ["The loopback line of the IBM recipe. Not run on an AIX kernel by encapfwd's tests.",
                                       "Lasts until reboot."])
    line = f"ifconfig lo0 delete {vip}" if undo else f"ifconfig lo0 alias {vip} netmask 255.255.255.255"
    return "#!/bin/sh\n" + S.comment_block(head) + line + "\n"


def solaris(target, undo) -> str:
    vip = S.quote(S.ipv4(target.cluster, "cluster address"))
    head = _head("Solaris", target, undo, [
        "The loopback line of the IBM recipe, with netmask 255.255.255.255 (the seed's 255.0.0.0 would put",
        "a whole /8 on the loopback). Not run on a Solaris kernel by encapfwd's tests. Lasts until reboot."])
    line = "/sbin/ifconfig lo0:1 unplumb" if undo else f"/sbin/ifconfig lo0:1 plumb {vip} netmask 255.255.255.255 up"
    return "#!/bin/sh\n" + S.comment_block(head) + line + "\n"


def windows(target, undo) -> str:
    vip = S.ip(target.cluster, "cluster address")
    v6 = ipaddress.ip_address(vip).version == 6
    family = "ipv6" if v6 else "ipv4"
    adapter = S.windows_name(target.options.get("loopback_adapter") or "Loopback", "loopback adapter name")
    nic = target.options.get("nic")
    nic = S.windows_name(nic, "nic") if nic else None
    head = _head("Windows (cmd.exe, as Administrator)", target, undo)
    out = [S.comment_block(head, prefix="rem").rstrip("\n")]
    if undo:
        if v6:
            out.append(f'netsh interface ipv6 delete address "{adapter}" {vip}')
        else:
            out.append(f'netsh interface ipv4 delete address "{adapter}" {vip}')
        out.append(f'netsh interface {family} set interface "{adapter}" weakhostreceive=disabled weakhostsend=disabled')
        if nic:
            out.append(f'netsh interface {family} set interface "{nic}" weakhostreceive=disabled')
        out.append("rem The loopback adapter itself stays: remove it in Device Manager if nothing else uses it.")
        return "\r\n".join(out) + "\r\n"
    out += [
        "rem 1. Add a loopback adapter once: run hdwwiz.exe, choose 'Install the hardware that I manually select',",
        "rem    Network adapters, Microsoft, 'Microsoft KM-TEST Loopback Adapter'. Then name it (Control Panel,",
        f'rem    Network Connections, Rename) "{adapter}", or pass its name with --loopback-adapter.',
        "rem 2. Give it the cluster address with a host mask, so it answers no ARP and adds no subnet route:",
    ]
    if v6:
        out.append(f'netsh interface ipv6 add address "{adapter}" {vip}/128')
    else:
        out.append(f'netsh interface ipv4 add address "{adapter}" {vip} 255.255.255.255')
    out += [
        "rem 3. Let the server accept the cluster address on its network adapter and answer from it (weak host):",
        f'netsh interface {family} set interface "{adapter}" weakhostreceive=enabled weakhostsend=enabled',
    ]
    if nic:
        out.append(f'netsh interface {family} set interface "{nic}" weakhostreceive=enabled')
    else:
        out.append('rem    and, with the name of the adapter the dispatcher sends to (or pass --nic NAME):')
        out.append(f'rem    netsh interface {family} set interface "<adapter>" weakhostreceive=enabled')
    return "\r\n".join(out) + "\r\n"
