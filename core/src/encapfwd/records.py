"""The records of the plugin contract: what plugins register (:class:`Forwarder`, :class:`AdvisorType`),
what hooks receive (:class:`Egress`, :class:`SetupTarget`) and return (:class:`Template`, :class:`Transform`,
:class:`ProbeResult`), with their constants.

The hooks themselves are specified in :mod:`encapfwd.hookspecs`, which re-exports every name here so that
``from encapfwd.hookspecs import Forwarder`` keeps working for plugins written against it.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Optional

from attrs import field, frozen

from encapfwd.errors import one_line
from encapfwd.model import IPAddress, Server

#: The operating systems a back-end setup generator can be asked for.
OPERATING_SYSTEMS = ("linux", "aix", "solaris", "windows")


@frozen
class Forwarder:
    """What a forwarder plugin registers: metadata the core and the CLI need.

    :param name: the forwarding method, as used in ``encaptype`` (``ipip``, ``gre``) or ``mac``.
    :param overhead: bytes this method adds in front of P' (IPIP 20, GRE 24, GRE with key 28, MAC 0);
        the dispatcher compares ``len(P') + overhead`` with the MTU.
    :param ipv4_only: True when the method can only carry IPv4 (every encapsulation in the seed).
    :param operating_systems: the ``--os`` values its setup generator answers.
    :param encapsulates: True for tunnel methods (selected through ``encapforward yes``).
    :param description: one line for ``encapfwd forwarders``.
    :param template: True when the plugin describes this method as a :class:`Template`
        (``encapfwd_build_template``): it can then run on every engine, the XDP program included
        (``encapfwd forwarders`` lists ``xdp,python``); False: Python engine only. A declaration for the
        listing, made without a server: a server whose template is None or longer than
        :data:`XDP_MAX_HEADER` still runs in Python.
    """

    name: str
    overhead: int
    ipv4_only: bool = True
    operating_systems: tuple = field(default=OPERATING_SYSTEMS, converter=tuple)
    encapsulates: bool = True
    description: str = ""
    template: bool = False


@frozen
class Egress:
    """Where and how one server's packets leave the dispatcher; resolved by the core at configuration time.

    :param src_mac: the dispatcher's MAC (source of every frame sent).
    :param dst_mac: next hop MAC: the server's when it is on an attached network, else the gateway's.
    :param outer_src: outer IPv4 source for encapsulation (server's ``encapsource``, else executor ``nfa``).
    :param outer_dst: the server's address (outer destination for encapsulation).
    :param ttl: outer TTL for encapsulation (executor ``encapttl``).
    :param cluster: the cluster address (VIP) this server serves.
    :param mtu: the egress MTU.
    """

    src_mac: str
    dst_mac: str
    outer_src: Optional[IPAddress]
    outer_dst: IPAddress
    ttl: int
    cluster: IPAddress
    mtu: int


@frozen
class SetupTarget:
    """Everything a back-end setup generator may put in a script, already validated by the core.

    :param server: the back-end server.
    :param cluster: the cluster address (VIP) the server must accept.
    :param dispatcher: the tunnel's other end (the outer source the dispatcher uses), or None for MAC.
    :param options: extra validated values some recipes need (e.g. ``tunnel_address`` for AIX/Solaris).
    """

    server: Server
    cluster: IPAddress
    port: int
    dispatcher: Optional[IPAddress]
    options: dict = field(factory=dict, hash=False)


# A compiled transform: P' (an IP packet whose TTL was already decremented, as bytes) -> Ethernet frame.
Transform = Callable[[bytes], bytes]

#: The per-packet fields a :class:`Template` may ask every engine to fill (a small fixed set: the XDP
#: program implements exactly these).
TEMPLATE_FIELDS = ("ipv4", "tos", "df", "ident", "udp", "entropy")
#: Largest template header the XDP engine runs (bytes; also a multiple of 4): longer ones run in Python.
XDP_MAX_HEADER = 64


@frozen
class Template:
    """An encapsulation described as data, so that every engine (the Python dispatcher and the XDP program)
    runs the same method from the same bytes and the two cannot drift.

    The frame sent for P' is ``Ethernet(egress.dst_mac, egress.src_mac, type) + header' + P'`` where
    ``header'`` is *header* with *fields* filled per packet, and ``type`` is 0x0800 when *header* is not
    empty (an outer IPv4 header), else the IP version of P' (0x0800 or 0x86DD: MAC forwarding).

    :param header: the bytes between the Ethernet header and P' (outer IPv4 header + tunnel header, with
        the constant parts already in place: version/IHL 0x45, TTL, protocol, addresses, the tunnel
        header); empty for MAC forwarding.
    :param fields: which per-packet fields to fill, a subset of :data:`TEMPLATE_FIELDS`:

        - ``ipv4``: ``header[0:20]`` is an outer IPv4 header (IHL 5): total length (bytes 2-3) =
          ``len(header) + len(P')``, header checksum (bytes 10-11) = ``-(sum of the other nine 16-bit
          words) mod 0xFFFF``, computed after every other field;
        - ``tos``: byte 1 = the TOS of an IPv4 P' (RFC 2003 3.1), the traffic class of an IPv6 P';
        - ``df``: the DF bit (0x40 of byte 6) = P''s DF (set for an IPv6 P');
        - ``ident``: identification (bytes 4-5) = 0 when the outer DF is set (RFC 6864), else a counter of
          the executor's: the Python engine numbers in 0x0000-0x7FFF (each process from a random start),
          the XDP program in 0x8000-0xFFFF (each CPU its own residue class), so that two executors of one
          dispatcher never send the same sequence; tests mask exactly this field and the checksum;
        - ``udp``: ``header[20:28]`` is a UDP header: length (bytes 24-25) = ``len(header) - 20 +
          len(P')``, checksum 0 (RFC 768 / RFC 8086 3.1 allow it over IPv4);
        - ``entropy``: UDP source port (bytes 20-21) = ``0xC000 | (crc32(P'[12:20]) & 0x3FFF)``: a hash of
          P''s addresses (RFC 8086 5.1 flow entropy), the same for every fragment of a datagram.
    """

    header: bytes = field(default=b"", converter=bytes)
    fields: frozenset = field(default=frozenset(), converter=frozenset)

    def __attrs_post_init__(self):
        unknown = sorted(set(self.fields) - set(TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(f"unknown template field {unknown[0]!r} (known: {', '.join(TEMPLATE_FIELDS)})")
        needs_ip = {"tos", "df", "ident", "udp", "entropy"} & set(self.fields)
        if needs_ip and "ipv4" not in self.fields:
            raise ValueError("template fields tos, df, ident, udp, entropy need the ipv4 field")
        if "ipv4" in self.fields and (len(self.header) < 20 or self.header[0] != 0x45):
            raise ValueError("an ipv4 template header starts with a 20-byte IPv4 header (0x45)")
        if {"udp", "entropy"} & set(self.fields) and (len(self.header) < 28 or self.header[9] != 17):
            raise ValueError("udp/entropy template fields need header[20:28] to be UDP (protocol 17)")
        if self.header and "ipv4" not in self.fields:
            raise ValueError("a non-empty template header must be an outer IPv4 header (field ipv4)")

    @property
    def xdp_capable(self) -> bool:
        """True when the XDP program can run it (header a multiple of 4 bytes, at most XDP_MAX_HEADER)."""
        return len(self.header) % 4 == 0 and len(self.header) <= XDP_MAX_HEADER


#: Longest ``ProbeResult.detail`` kept (characters).
MAX_DETAIL = 200


def detail_line(text) -> str:
    """*text* as a short line: its first line, control characters replaced by ``?``, at most
    :data:`MAX_DETAIL` long (what ``ProbeResult.detail`` keeps; ``encapfwd.hookspecs.one_line`` is this)."""
    return one_line(text, MAX_DETAIL, first=True, strip=True, printable=True)


@frozen
class ProbeResult:
    """What one probe of an advisor found.

    :param ok: True when the server answered as expected.
    :param detail: a short one-line reason: ``"connected"``, ``"HTTP 200"``, ``"connection refused"``,
        ``"HTTP 503"``, ``"timeout"`` …
    :param latency: seconds from the start of the probe to its result.
    """

    ok: bool = field(converter=bool)
    detail: str = field(default="", converter=detail_line)
    latency: float = field(default=0.0, converter=float)


#: Keys every advisor has (``advisor start NAME PORT interval … timeout … rise … fall … via … hold …``);
#: an advisor's own keys must not use these names.
ADVISOR_FIELDS = ("interval", "timeout", "rise", "fall", "via", "hold")

_ADVISOR_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_ADVISOR_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def _is_async(function) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)
    )


@frozen
class AdvisorType:
    """What an advisor plugin registers: a kind of health check (``connect``, ``http``, ``udp`` …).

    :param name: the name used in ``advisor start NAME PORT`` (lower case: letters, digits, ``_.-``).
    :param keys: the advisor's own keys, each with a one-line help: ``{"path": "the path requested"}``.
        ``advisor start``/``set`` refuse any other key (besides :data:`ADVISOR_FIELDS`).
    :param description: one line for the listings.
    :param probe: ``async def probe(address: str, port: int, options: dict, timeout: float) ->
        ProbeResult``: probe the server at *address* (a plain IPv4 or IPv6 address) and *port*; *options*
        holds the keys the user set (defaults are the probe's to apply); *timeout* (seconds) bounds the
        whole probe (``asyncio.wait_for``). It must never raise: an error is a failed probe whose
        ``detail`` is the error in one line.
    :param check: optional ``check(options: dict) -> None`` raising
        :class:`encapfwd.errors.ConfigError` for a bad value (and for a required key that is missing); run
        on every change of the configuration, so a bad value never reaches the file.
    """

    name: str
    keys: dict = field(factory=dict, converter=dict, hash=False)
    description: str = ""
    probe: Callable = field(default=None, hash=False)  # required: a default only to keep the order above
    check: Optional[Callable] = field(default=None, hash=False)

    def __attrs_post_init__(self):
        if not isinstance(self.name, str) or not _ADVISOR_NAME.match(self.name):
            raise ValueError(f"invalid advisor name {self.name!r} (lower case letters, digits, _ . -)")
        for key, text in self.keys.items():
            if not isinstance(key, str) or not _ADVISOR_KEY.match(key):
                raise ValueError(f"advisor {self.name}: invalid key {key!r} (a lower-case word)")
            if key in ADVISOR_FIELDS:
                raise ValueError(f"advisor {self.name}: key {key!r} is one every advisor has")
            if not isinstance(text, str):
                raise ValueError(f"advisor {self.name}: the help of key {key!r} must be a string")
        if self.probe is None or not _is_async(self.probe):
            raise ValueError(f"advisor {self.name}: probe must be an async function (async def)")
        if self.check is not None and not callable(self.check):
            raise ValueError(f"advisor {self.name}: check must be callable")


__all__ = [
    "ADVISOR_FIELDS",
    "AdvisorType",
    "Egress",
    "Forwarder",
    "MAX_DETAIL",
    "OPERATING_SYSTEMS",
    "ProbeResult",
    "SetupTarget",
    "TEMPLATE_FIELDS",
    "Template",
    "Transform",
    "XDP_MAX_HEADER",
    "detail_line",
]
