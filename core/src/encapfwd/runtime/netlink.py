"""What the live engine asks the kernel over netlink (pyroute2, imported only when called): the
interface, local addresses, neighbour (ARP/ND) entries and routes."""

from __future__ import annotations

import ipaddress
import time
from typing import Dict, Optional

from encapfwd.errors import NoSuchInterface
from encapfwd.runtime.common import LiveError

NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT
NTF_USE = 0x01
RTN_UNICAST = 1


class Interface:
    def __init__(self, name: str, index: int, mac: str, mtu: int, networks: list):
        self.name, self.index, self.mac, self.mtu, self.networks = name, index, mac, mtu, networks


def open_ipr():
    """A pyroute2 ``IPRoute`` (a context manager), or LiveError naming what to install."""
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise LiveError("encapfwd run needs pyroute2: pip install 'encapfwd[live]'") from None
    return IPRoute()


def interface_info(ipr, name: str) -> Interface:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NoSuchInterface(f"no such interface: {name}")
    index = found[0]
    link = ipr.get_links(index)[0]
    mac = (link.get_attr("IFLA_ADDRESS") or "").lower()
    if len(mac) != 17:
        raise LiveError(f"interface {name} has no Ethernet address (only Ethernet interfaces are supported)")
    networks = []
    for msg in ipr.get_addr(index=index):
        address = msg.get_attr("IFA_ADDRESS")
        if address:
            networks.append(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"))
    return Interface(name, index, mac, link.get_attr("IFLA_MTU") or 1500, networks)


def local_addresses(ipr) -> Dict[ipaddress._BaseAddress, str]:
    """Every address configured in this network namespace, with its interface name."""
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    out = {}
    for msg in ipr.get_addr():
        for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
            value = msg.get_attr(attr)
            if value:
                out[ipaddress.ip_address(value.split("%")[0])] = names.get(msg["index"], "?")
    return out


def current_neighbour(ipr, address, ifindex: int) -> Optional[str]:
    """The MAC the kernel's neighbour table holds for *address* on *ifindex* (a valid entry), or None."""
    found = None
    for msg in ipr.get_neighbours(dst=str(address), ifindex=ifindex):
        lladdr = msg.get_attr("NDA_LLADDR")
        if lladdr and msg["state"] & NUD_VALID:
            found = lladdr.lower()
    return found


def neighbour_table(ipr, ifindex: int) -> Dict[str, str]:
    """``{address: MAC}`` of every valid entry of the kernel's neighbour table on *ifindex* (IPv4 and IPv6),
    in one dump: never waits for the network."""
    out: Dict[str, str] = {}
    for msg in ipr.get_neighbours(ifindex=ifindex):
        dst = msg.get_attr("NDA_DST")
        lladdr = msg.get_attr("NDA_LLADDR")
        if dst and lladdr and msg["state"] & NUD_VALID:
            try:
                key = str(ipaddress.ip_address(str(dst).split("%")[0]))
            except ValueError:
                continue
            out[key] = lladdr.lower()
    return out


def ask_neighbour(ipr, address, ifindex: int) -> None:
    """Ask the kernel to resolve *address* (NTF_USE, as ``ip neigh replace ADDR dev IF use``); failures
    are ignored (the caller asks again later)."""
    try:
        ipr.neigh("replace", dst=str(address), ifindex=ifindex, flags=NTF_USE, state=0)
    except Exception:  # noqa: BLE001, S110 - resolution is retried; failure is reported by the caller
        pass


def neighbour_mac(ipr, address, ifindex: int, timeout: float = 3.0) -> Optional[str]:
    """The MAC of *address* from the kernel's neighbour table; asks the kernel to resolve it (NTF_USE,
    as ``ip neigh replace ADDR dev IF use``) when missing, and waits up to *timeout* seconds."""
    address = str(address)
    deadline = time.monotonic() + timeout
    asked = False
    while True:
        for msg in ipr.get_neighbours(dst=address, ifindex=ifindex):
            lladdr = msg.get_attr("NDA_LLADDR")
            if lladdr and msg["state"] & NUD_VALID:
                return lladdr.lower()
        if time.monotonic() >= deadline:
            return None
        if not asked or time.monotonic() + 1.0 < deadline:
            ask_neighbour(ipr, address, ifindex)
            asked = True
        time.sleep(0.05)


def route_gateway(ipr, address) -> Optional[str]:
    try:
        routes = ipr.route("get", dst=str(address))
    except Exception:  # noqa: BLE001
        return None
    for route in routes:
        gateway = route.get_attr("RTA_GATEWAY")
        if gateway:
            return gateway
    return None


def has_unicast_route(ipr, address) -> bool:
    """True when this host's kernel would route *address* (an RTN_UNICAST route)."""
    try:
        routes = ipr.route("get", dst=str(address))
    except Exception:  # noqa: BLE001
        return False
    return any(route["type"] == RTN_UNICAST for route in routes)
