"""Configuration value objects (attrs, frozen).

These are built when configuration is loaded or changed, never per packet. The dispatcher compiles them
into plain callables and byte templates (see ``dispatcher.py``).

Keyword names follow IBM ``dscontrol`` where IBM has one (``nfa``, ``weight``, ``stickytime``,
``staletimeout``, ``porttype``, ``encapforward``, ``encaptype``, ``encapcond``, ``mapport`` is not
supported); ``docs/configuration.md`` lists every keyword.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional, Tuple, Union

import attrs
from attrs import field, frozen

from encapfwd.errors import ConfigError, shown

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

ENCAPCONDS = ("auto", "always")
#: How an advisor reaches a server: its own address, or the cluster address through the forwarding method.
ADVISOR_VIAS = ("address", "forwarding")
PORTTYPES = ("tcp", "udp", "both")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


_PLAIN_ADDRESS = re.compile(r"^[0-9A-Fa-f.:]{2,45}$")


_shown = shown  # the old name, still imported by encapfwd.config


def parse_ip(value) -> IPAddress:
    """A plain IPv4 or IPv6 address: no zone ID (``fe80::1%eth0``), no prefix, no surrounding junk.

    The one place every address of the configuration and the command line is parsed: what passes is made
    of hex digits, dots and colons only, so it is safe in a shell script, a file name or a log line.
    """
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        if getattr(value, "scope_id", None):
            raise ConfigError(f"invalid IP address: {shown(value)} (zone IDs are not accepted)")
        return value
    text = value.strip() if isinstance(value, str) else None
    if text is None or not _PLAIN_ADDRESS.match(text):
        if text is not None and "%" in text:
            raise ConfigError(f"invalid IP address: {shown(value)} (zone IDs are not accepted)")
        raise ConfigError(f"invalid IP address: {shown(value)}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"invalid IP address: {shown(value)}") from None


def parse_ipv4(value) -> ipaddress.IPv4Address:
    addr = parse_ip(value)
    if addr.version != 4:
        raise ConfigError(f"not an IPv4 address: {value!r}")
    return addr


def parse_ipv6(value) -> ipaddress.IPv6Address:
    addr = parse_ip(value)
    if addr.version != 6:
        raise ConfigError(f"not an IPv6 address: {value!r}")
    return addr


def _unset(value) -> bool:
    """``none`` (or empty) on the command line clears an optional keyword."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def parse_optional_ipv6(value) -> Optional[ipaddress.IPv6Address]:
    return None if _unset(value) else parse_ipv6(value)


def parse_optional_ip(value) -> Optional[IPAddress]:
    return None if _unset(value) else parse_ip(value)


def parse_optional_ipv4(value) -> Optional[ipaddress.IPv4Address]:
    return None if _unset(value) else parse_ipv4(value)


def parse_mac(value) -> Optional[str]:
    if _unset(value):
        return None
    text = str(value).strip().lower().replace("-", ":")
    if not MAC_RE.match(text):
        raise ConfigError(f"invalid MAC address: {value!r} (expected six hex pairs, e.g. 02:00:00:00:00:01)")
    return text


def parse_network(value) -> Union[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ConfigError(f"invalid network: {value!r} (expected e.g. 10.0.2.0/24)") from None


def parse_networks(value) -> Tuple:
    if _unset(value):
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return tuple(parse_network(v) for v in value)


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise ConfigError(f"expected yes or no, got {value!r}")


_DECIMAL = re.compile(r"[0-9]{1,20}")


def parse_int(value, lo: int, hi: int, what: str) -> int:
    """A whole number in ``lo..hi``: an ``int`` (TOML) or plain ASCII decimal digits (command line).

    The one place every number of the configuration and the command line is parsed. Refused: ``bool``
    (``true`` is not 1), signs, ``0x10``, ``1_0``, spaces, other scripts' digits (``"١٢"``), floats.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        raise ConfigError(f"{what} must be between {lo} and {hi}, got {shown(value)}")
    else:
        raise ConfigError(f"{what} must be a whole number (digits 0-9), got {shown(value)}")
    if not lo <= number <= hi:
        raise ConfigError(f"{what} must be between {lo} and {hi}, got {number}")
    return number


_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")


def parse_seconds(value, lo: float, hi: float, what: str) -> float:
    """A duration in seconds in ``lo..hi``: a number (TOML integer or float) or plain ASCII decimal digits
    with an optional fraction (command line): ``5``, ``0.5``, ``2.25``.

    Refused like :func:`parse_int`: ``bool``, signs, exponents (``1e3``), ``.5``, ``5.``, spaces, other
    scripts' digits, ``nan`` and ``inf``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{what} must be a number of seconds, got {value}")
    elif isinstance(value, str) and _SECONDS.fullmatch(value):
        number = float(value)
    else:
        raise ConfigError(
            f"{what} must be a number of seconds (digits 0-9, e.g. 5 or 0.5), got {shown(value)}"
        )
    if not lo <= number <= hi:
        raise ConfigError(f"{what} must be between {lo:g} and {hi:g} seconds, got {number:g}")
    return number


def _int_in(lo: int, hi: int, what: str):
    def convert(value) -> int:
        return parse_int(value, lo, hi, what)

    return convert


def _optional(convert):
    def wrapped(value):
        return None if _unset(value) else convert(value)

    return wrapped


def _one_of(choices, what: str):
    def convert(value) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ConfigError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
        return text

    return convert


def _name(what: str):
    pattern = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")

    def convert(value) -> str:
        text = str(value).strip().lower()
        if not pattern.match(text):
            raise ConfigError(f"invalid {what}: {value!r}")
        return text

    return convert


def _interface(value):
    if _unset(value):
        return None
    text = str(value)
    if not re.match(r"^[A-Za-z0-9_.@-]{1,15}$", text) or text in (".", ".."):
        raise ConfigError(f"invalid interface name: {value!r}")
    return text


@frozen
class Server:
    """One back-end server of a port (``cluster@port@server``)."""

    address: IPAddress = field(converter=parse_ip)
    weight: int = field(default=1, converter=_int_in(0, 100, "weight"))
    mac: Optional[str] = field(default=None, converter=parse_mac)
    encapforward: bool = field(default=False, converter=parse_bool)
    encaptype: str = field(default="ipip", converter=_name("encaptype"))
    encapcond: str = field(default="always", converter=_one_of(ENCAPCONDS, "encapcond"))
    # outer source address for this server's tunnel; default: the executor's nfa
    encapsource: Optional[ipaddress.IPv4Address] = field(default=None, converter=parse_optional_ipv4)
    # RFC 2890 GRE key (32 bits); only meaningful with encaptype gre
    grekey: Optional[int] = field(default=None, converter=_optional(_int_in(0, 2**32 - 1, "grekey")))
    # "down" (IBM: server down): no traffic at all; weight 0 (quiesce): existing flows only
    down: bool = field(default=False, converter=parse_bool)

    # Rules across fields and objects (encapforward needs IPv4, grekey needs gre, the plugins exist) are
    # checked once, by ``config.check``, on every change and every load.


@frozen
class Port:
    number: int = field(converter=_int_in(0, 65535, "port"))
    porttype: str = field(default="both", converter=_one_of(PORTTYPES, "porttype"))
    selectionalgorithm: str = field(default="maglev", converter=_name("selectionalgorithm"))
    stickytime: int = field(default=0, converter=_int_in(0, 2**31 - 1, "stickytime"))
    staletimeout: int = field(default=300, converter=_int_in(1, 2**31 - 1, "staletimeout"))
    servers: Tuple[Server, ...] = field(default=(), converter=tuple)

    def server(self, address) -> Optional[Server]:
        address = parse_ip(address)
        for server in self.servers:
            if server.address == address:
                return server
        return None


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def vip_problem(address: IPAddress) -> Optional[str]:
    """Why *address* cannot be a cluster address (VIP), or None: it must be a unicast address clients reach."""
    candidates = [address]
    if getattr(address, "ipv4_mapped", None) is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        candidates.append(address.ipv4_mapped)
    for addr in candidates:
        if addr.is_unspecified:
            return "the unspecified address"
        if addr == _BROADCAST:
            return "the broadcast address"
        if addr.is_multicast:
            return "a multicast address"
        if addr.is_loopback:
            return "a loopback address"
        if addr.is_link_local:
            return "a link-local address"
    return None


def _check_vip(instance, attribute, address) -> None:
    problem = vip_problem(address)
    if problem:
        raise ConfigError(
            f"cluster address {address} is {problem}: a cluster address (VIP) must be a unicast address "
            "that clients can reach"
        )


@frozen
class Cluster:
    address: IPAddress = field(converter=parse_ip, validator=_check_vip)
    ports: Tuple[Port, ...] = field(default=(), converter=tuple)

    def port(self, number: int) -> Optional[Port]:
        for port in self.ports:
            if port.number == number:
                return port
        return None


#: AS numbers that are not an AS: AS_TRANS (RFC 6793) and the last ones of each range (RFC 7300)
RESERVED_ASNS = {23456: "AS_TRANS, reserved by RFC 6793", 65535: "reserved by RFC 7300",
                 4294967295: "reserved by RFC 7300"}


def _asn(what: str):
    def convert(value) -> int:
        number = parse_int(value, 1, 2**32 - 1, what)
        if number in RESERVED_ASNS:
            raise ConfigError(f"{what} {number} is {RESERVED_ASNS[number]}: not an AS number a speaker may use")
        return number

    return convert


def _unicast(what: str):
    """A BGP peer or next hop: a unicast address a router can reach (not unspecified, broadcast,
    multicast, loopback or link-local)."""

    def check(instance, attribute, address) -> None:
        if address is None:
            return
        problem = vip_problem(address)
        if problem:
            raise ConfigError(f"{what} {address} is {problem}: expected a unicast address the router reaches")

    return check


def _check_router_id(instance, attribute, address) -> None:
    if address is not None and int(address) == 0:
        raise ConfigError(f"bgprouterid {address} is not a valid BGP identifier: it must not be 0 (RFC 6286)")


def parse_syncpeers(value) -> Tuple:
    """``syncpeers``: comma-separated unicast addresses of the other dispatchers (``none``: no sync)."""
    if _unset(value):
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    peers = []
    for item in value:
        address = parse_ip(item.strip() if isinstance(item, str) else item)
        problem = vip_problem(address)
        if problem:
            raise ConfigError(f"syncpeers {address} is {problem}: expected the unicast address of a dispatcher")
        if address in peers:
            raise ConfigError(f"syncpeers {address} is listed twice")
        peers.append(address)
    if len(peers) > 64:
        raise ConfigError(f"syncpeers: at most 64 peers, got {len(peers)}")
    return tuple(peers)


def parse_synckey(value) -> Optional[str]:
    """``synckey``: the absolute path of the file holding the group's HMAC key (``none``: unset)."""
    if _unset(value):
        return None
    text = str(value).strip()
    if not text.startswith("/") or not text.isprintable() or len(text) > 4096:
        raise ConfigError(f"synckey {text!r}: expected the absolute path of the key file")
    return text


#: Default of ``executor newflowlimit``: new kernel flow entries per CPU per second.
NEWFLOWLIMIT_DEFAULT = 125_000
#: Default of ``executor handuplimit``: new flows of wrr/wlc ports the kernel program hands up to the slow path
#: per CPU per second (a worker serves 50-70 k frames/s: docs/live.md, "Overload").
HANDUPLIMIT_DEFAULT = 20_000


@frozen
class Executor:
    """The dispatcher itself (IBM: ``executor``)."""

    # non-forwarding address: the dispatcher's own address, default outer source of tunnels
    nfa: Optional[ipaddress.IPv4Address] = field(default=None, converter=parse_optional_ipv4)
    # the dispatcher's own MAC (source of every frame it sends); live mode reads it from the interface
    mac: Optional[str] = field(default=None, converter=parse_mac)
    # the interface live mode listens and sends on
    interface: Optional[str] = field(default=None, converter=_interface)
    # networks the dispatcher is directly attached to (decides "on-link" for MAC forwarding/encapcond auto)
    networks: Tuple = field(default=(), converter=parse_networks)
    # next hop for servers that are not on an attached network (live mode resolves its MAC)
    gateway: Optional[IPAddress] = field(default=None, converter=parse_optional_ip)
    # the gateway's MAC, for offline (replay) use or to pin it
    gatewaymac: Optional[str] = field(default=None, converter=parse_mac)
    mtu: int = field(default=1500, converter=_int_in(576, 65535, "mtu"))
    encapttl: int = field(default=64, converter=_int_in(1, 255, "encapttl"))
    # bound of the connection (flow) table; least-recently-used entries are evicted beyond it
    maxflows: int = field(default=1_000_000, converter=_int_in(1, 2**31 - 1, "maxflows"))
    # new flow entries the kernel program (XDP, TC) makes per CPU per second at most (Katran's MAX_CONN_RATE);
    # beyond them a new flow is forwarded by its port's table but not remembered; 0: no limit
    newflowlimit: int = field(default=NEWFLOWLIMIT_DEFAULT, converter=_int_in(0, 2**32 - 1, "newflowlimit"))
    # new flows of wrr/wlc ports the kernel program (XDP, TC) hands up to the slow path per CPU per second at
    # most; beyond them it places them itself by the port's pressure table, as under pressure; 0: no limit
    handuplimit: int = field(default=HANDUPLIMIT_DEFAULT, converter=_int_in(0, 2**32 - 1, "handuplimit"))
    # scale-out (docs/scale-out.md): the BGP peer (router) the cluster addresses are announced to, the
    # ASNs, this speaker's router ID (default nfa), the next hop announced (default nfa) and the hold time
    bgppeer: Optional[IPAddress] = field(default=None, converter=parse_optional_ip, validator=_unicast("bgppeer"))
    bgpasn: Optional[int] = field(default=None, converter=_optional(_asn("bgpasn")))
    bgppeerasn: Optional[int] = field(default=None, converter=_optional(_asn("bgppeerasn")))
    bgprouterid: Optional[ipaddress.IPv4Address] = field(default=None, converter=parse_optional_ipv4,
                                                         validator=_check_router_id)
    bgpnexthop: Optional[ipaddress.IPv4Address] = field(default=None, converter=parse_optional_ipv4,
                                                        validator=_unicast("bgpnexthop"))
    bgpnexthop6: Optional[ipaddress.IPv6Address] = field(default=None, converter=parse_optional_ipv6,
                                                         validator=_unicast("bgpnexthop6"))
    bgpholdtime: int = field(default=9, converter=_int_in(3, 65535, "bgpholdtime"))
    # flow synchronisation between the dispatchers of a group (docs/scale-out.md): the peers' addresses,
    # the UDP port (ours and theirs) and the file of the shared HMAC key (mode 0600)
    syncpeers: Tuple = field(default=(), converter=lambda v: parse_syncpeers(v))
    syncport: int = field(default=7900, converter=_int_in(1, 65535, "syncport"))
    synckey: Optional[str] = field(default=None, converter=lambda v: parse_synckey(v))

    def attached(self, address) -> bool:
        address = parse_ip(address)
        return any(address in net for net in self.networks if net.version == address.version)


#: Shortest and longest advisor interval and timeout (seconds).
ADVISOR_MIN_SECONDS = 0.001
ADVISOR_MAX_SECONDS = 86400.0
#: Default least time between two state changes of one server (flap damping; docs/advisors.md).
ADVISOR_DEFAULT_HOLD = 2.0
#: Longest value of an advisor option (characters).
ADVISOR_MAX_OPTION = 1024

_OPTION_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def _seconds(what: str):
    def convert(value) -> float:
        return parse_seconds(value, ADVISOR_MIN_SECONDS, ADVISOR_MAX_SECONDS, what)

    return convert


def _hold(value) -> float:
    return parse_seconds(value, 0.0, ADVISOR_MAX_SECONDS, "hold")


def advisor_option_key(key) -> str:
    """An advisor option's key: a lower-case word (``path``, ``status``, ``send``)."""
    text = key.strip().lower() if isinstance(key, str) else None
    if text is None or not _OPTION_KEY.match(text):
        raise ConfigError(f"invalid advisor option name: {shown(key)}")
    return text


def advisor_option_value(key: str, value) -> str:
    """An advisor option's value: a string of at most ADVISOR_MAX_OPTION printable characters (one line,
    safe in a log line or a report); what a value means is the advisor's to check."""
    if not isinstance(value, str):
        raise ConfigError(f"advisor option {key!r} must be a string, got {type(value).__name__}")
    if not value.isprintable():
        raise ConfigError(f"advisor option {key!r}: {shown(value)} (control characters are not accepted)")
    if len(value) > ADVISOR_MAX_OPTION:
        raise ConfigError(f"advisor option {key!r} is longer than {ADVISOR_MAX_OPTION} characters")
    return value


def _options(value) -> Tuple[Tuple[str, str], ...]:
    """An advisor's options as sorted ``(key, value)`` pairs, from a mapping or from pairs."""
    if value is None:
        return ()
    items = value.items() if hasattr(value, "items") else value
    if isinstance(items, (str, bytes)):
        raise ConfigError("advisor options must be a table of key = \"value\"")
    out = {}
    try:
        pairs = [tuple(pair) for pair in items]
    except TypeError:
        raise ConfigError("advisor options must be a table of key = \"value\"") from None
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError("advisor options must be a table of key = \"value\"")
        key = advisor_option_key(pair[0])
        if key in out:
            raise ConfigError(f"advisor option {key!r} given twice")
        out[key] = advisor_option_value(key, pair[1])
    return tuple(sorted(out.items()))


@frozen
class Advisor:
    """A health check (IBM: ``advisor start NAME PORT``): the advisor *name* probes every server of every
    cluster's port *port*, every *interval* seconds, each probe bounded by *timeout*; a server is marked
    down after *fall* failed probes in a row and up after *rise* good ones. *via* ``address`` probes the
    server's own address, ``forwarding`` the cluster address carried by the server's forwarding method.
    Two state changes of one server are at least *hold* seconds apart (flap damping; 0: none).
    *options* are the advisor's own keys (``path``, ``status`` …) as sorted pairs.

    Rules across fields and objects (timeout ≤ interval, the port has servers, the advisor is installed and
    knows its keys) are checked by ``config.check``.
    """

    name: str = field(converter=_name("advisor name"))
    port: int = field(converter=_int_in(1, 65535, "advisor port"))
    interval: float = field(default=5.0, converter=_seconds("interval"))
    timeout: float = field(default=3.0, converter=_seconds("timeout"))
    rise: int = field(default=2, converter=_int_in(1, 1000, "rise"))
    fall: int = field(default=3, converter=_int_in(1, 1000, "fall"))
    via: str = field(default="address", converter=_one_of(ADVISOR_VIAS, "via"))
    hold: float = field(default=ADVISOR_DEFAULT_HOLD, converter=_hold)
    options: Tuple[Tuple[str, str], ...] = field(default=(), converter=_options)

    @property
    def label(self) -> str:
        """``NAME PORT``, as the commands and messages name it."""
        return f"{self.name} {self.port}"


@frozen
class Config:
    executor: Executor = field(factory=Executor)
    clusters: Tuple[Cluster, ...] = field(default=(), converter=tuple)
    advisors: Tuple[Advisor, ...] = field(default=(), converter=tuple)

    def cluster(self, address) -> Optional[Cluster]:
        address = parse_ip(address)
        for cluster in self.clusters:
            if cluster.address == address:
                return cluster
        return None

    def advisor(self, name, port) -> Optional[Advisor]:
        """The advisor *name* on *port*, or None (*name* and *port* as typed: ``"HTTP"``, ``"80"``)."""
        name = _name("advisor name")(name)
        port = parse_int(port, 1, 65535, "advisor port")
        for advisor in self.advisors:
            if advisor.name == name and advisor.port == port:
                return advisor
        return None


def server_key(cluster_address, port_number, server_address) -> str:
    """The name a server has in messages, reports and counters: ``cluster@port@server``."""
    return f"{cluster_address}@{port_number}@{server_address}"


def forwarding_method(executor: Executor, server: Server) -> str:
    """The forwarder name that carries traffic to *server*.

    ``encapforward no`` → ``mac``. ``encapforward yes encapcond always`` → the server's ``encaptype``.
    ``encapcond auto`` → ``mac`` when the server is on a network the executor is attached to
    (``executor set networks``), the ``encaptype`` otherwise.
    """
    if not server.encapforward:
        return "mac"
    if server.encapcond == "auto" and executor.attached(server.address):
        return "mac"
    return server.encaptype


__all__ = [
    "ADVISOR_VIAS",
    "Advisor",
    "Cluster",
    "Config",
    "Executor",
    "Port",
    "Server",
    "attrs",
    "forwarding_method",
    "parse_int",
    "parse_ip",
    "parse_mac",
    "parse_seconds",
    "server_key",
    "vip_problem",
]
