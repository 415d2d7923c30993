"""Encapsulations as data: the Python executor of a :class:`~encapfwd.records.Template`, and how the core
turns a server's method into a template and a transform.

- :func:`template_transform` compiles ``transform(p_prime) -> frame`` from a template, once per server. It
  runs exactly the contract of :class:`~encapfwd.records.Template`, which the XDP program implements too.
- :func:`resolve` asks ``encapfwd_build_template`` first and derives the transform from the template; a
  method that cannot be described as data falls back to ``encapfwd_build_transform`` (Python engine only).
  Plugin failures become one-line :class:`~encapfwd.errors.PluginError` naming the distribution.
- :class:`TemplateTransforms` answers ``encapfwd_build_transform`` last (``trylast``) for methods that have
  a template, so every caller of that hook gets a transform for every method.

Per packet (standard tunnel fields ``ipv4, tos, df, ident`` and an IPv4 P'): everything constant
(Ethernet header, version/IHL, TTL, protocol, addresses, tunnel header, their checksum contribution) is
precomputed, so a packet costs a few integer operations, one ``struct.pack`` and one concatenation; the
headers of DF packets (identification 0, RFC 6864) are cached by (TOS, length), per server.

Checksum: the one's-complement sum of the header words is congruent to their plain sum modulo 0xFFFF, so
the checksum is ``-(sum) % 0xFFFF`` (0 when the folded sum is 0xFFFF, exactly as RFC 1071 folding gives).

What the transform reads from P' (it never raises, whatever the bytes): P' is IPv6 when it is not empty
and its first nibble is 6, otherwise it is read as IPv4; a byte past the end of P' reads as 0 (an empty or
short P' gets TOS 0 and DF clear); ``entropy`` hashes ``P'[12:20]`` as sliced (shorter when P' is).
Lengths are taken modulo 2**16.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
import zlib
from typing import Optional, Tuple

from encapfwd.datapath.packet import mac_bytes
from encapfwd.errors import EncapfwdError, PluginError, one_line
from encapfwd.hookspecs import hookimpl
from encapfwd.records import Template, Transform

#: Headers of DF packets kept per server, by TOS and length (DF packets all have identification 0).
HEADER_CACHE = 4096
#: The fields of an IPv4 tunnel (IPIP, GRE, GUE …): the outer header copies P''s TOS and DF (RFC 2003 3.1)
#: and takes an identification when DF is clear. The fast path is specialised for templates with them.
TUNNEL_FIELDS = frozenset({"ipv4", "tos", "df", "ident"})

_DF = 0x4000


def _words(raw: bytes) -> int:
    return sum(struct.unpack("!%dH" % (len(raw) // 2), raw))


def ipv4_header(egress, proto: int) -> bytes:
    """The constant 20-byte outer IPv4 header of a tunnel template to ``egress.outer_dst``.

    Version/IHL 0x45, TTL ``egress.ttl``, protocol *proto*, source ``egress.outer_src``; TOS, total length,
    identification, flags and checksum 0: the template's fields fill them per packet.
    """
    src = ipaddress.IPv4Address(egress.outer_src).packed
    dst = ipaddress.IPv4Address(egress.outer_dst).packed
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, egress.ttl, proto, 0, src, dst)


#: The Python engine's identifications (DF-clear packets): the low half; the XDP program uses the high half.
IDENT_MASK = 0x7FFF


def template_transform(template: Template, egress, ident_start: int = 1) -> Transform:
    """Compile ``transform(p_prime) -> frame`` running *template* for the server behind *egress*.

    The frame is ``Ethernet(egress.dst_mac, egress.src_mac, type) + header' + P'`` exactly as
    :class:`~encapfwd.records.Template` specifies. The transform never raises for any bytes P'.
    Each transform keeps its own identification counter for DF-clear packets: *ident_start*, +1, …, in the
    Python engine's half of the space, 0x0000-0x7FFF (the XDP program numbers in 0x8000-0xFFFF), so the
    executors of one dispatcher never hand out the same sequence; forked workers start at random points.
    """
    if not isinstance(template, Template):
        raise TypeError(
            f"template_transform() takes an encapfwd.hookspecs.Template, not {type(template).__name__}")
    macs = mac_bytes(egress.dst_mac) + mac_bytes(egress.src_mac)
    if not template.header:
        return _mac(macs)
    return _ipv4(template, macs + b"\x08\x00", ident_start)


def _mac(macs: bytes) -> Transform:
    eth4 = macs + b"\x08\x00"
    eth6 = macs + b"\x86\xdd"

    def transform(p: bytes) -> bytes:
        try:
            if p[0] >> 4 == 6:
                return eth6 + p
        except (IndexError, TypeError):
            pass
        return eth4 + p

    return transform


def _ipv4(template: Template, eth: bytes, ident_start: int = 1) -> Transform:
    header, fields = template.header, template.fields
    hlen = len(header)
    f_tos, f_df, f_ident = "tos" in fields, "df" in fields, "ident" in fields
    f_udp, f_entropy = "udp" in fields, "entropy" in fields
    udp_layout = f_udp or f_entropy  # header[20:28] is UDP (checked by Template)

    tos_c = header[1]
    ident_c = int.from_bytes(header[4:6], "big")
    flags_c = int.from_bytes(header[6:8], "big")  # flags + fragment offset
    if f_df:
        flags_c &= ~_DF & 0xFFFF  # the DF bit is P''s; the other bits stay the header's
    ttlproto = int.from_bytes(header[8:10], "big")
    addrs = header[12:20]
    # sum of the header words that never change (word 0 is 0x4500 + TOS; the checksum word is excluded)
    base = 0x4500 + ttlproto + _words(addrs)
    neg_df = -(base + flags_c + _DF)  # checksum of a DF packet = (neg_df - tos - total) % 0xFFFF
    neg = -(base + flags_c)  # checksum = (neg - tos - total - ident) % 0xFFFF
    udp_extra = hlen - 20
    idents = itertools.count(ident_start)

    if udp_layout:
        sport_c = int.from_bytes(header[20:22], "big")
        dport = int.from_bytes(header[22:24], "big")
        ulen_c = int.from_bytes(header[24:26], "big")
        uck = 0 if f_udp else int.from_bytes(header[26:28], "big")
        rest = header[28:]
        pack_udp = struct.Struct(f"!14sBBHHHHH8sHHHH{len(rest)}s").pack
    else:
        tail = header[12:]
        pack_ip = struct.Struct(f"!14sBBHHHHH{len(tail)}s").pack

    def build(tos: int, df: int, n: int, ident: int, sport: int) -> bytes:
        """Ethernet + header' for a P' of *n* bytes (every per-packet value given)."""
        total = (hlen + n) & 0xFFFF
        flags = flags_c | df
        ck = -(base + flags + tos + total + ident) % 0xFFFF
        if udp_layout:
            ulen = (udp_extra + n) & 0xFFFF if f_udp else ulen_c
            return pack_udp(eth, 0x45, tos, total, ident, flags, ttlproto, ck, addrs, sport, dport, ulen, uck,
                            rest)
        return pack_ip(eth, 0x45, tos, total, ident, flags, ttlproto, ck, tail)

    def general(p) -> bytes:
        """Any P' and any field set, per the Template contract; never raises."""
        p = bytes(p)
        n = len(p)
        v6 = n >= 1 and p[0] >> 4 == 6
        if not f_tos:
            tos = tos_c
        elif v6:
            tos = ((p[0] & 0x0F) << 4) | (p[1] >> 4 if n >= 2 else 0)
        else:
            tos = p[1] if n >= 2 else 0
        df = (_DF if v6 or (n >= 7 and p[6] & 0x40) else 0) if f_df else 0
        if not f_ident:
            ident = ident_c
        elif (flags_c | df) & _DF:
            ident = 0
        else:
            ident = next(idents) & IDENT_MASK
        sport = 0xC000 | (zlib.crc32(p[12:20]) & 0x3FFF) if f_entropy else (sport_c if udp_layout else 0)
        return build(tos, df, n, ident, sport) + p

    if not TUNNEL_FIELDS <= fields:
        return general

    if not udp_layout:
        headers = {}  # (TOS << 16 | len(P')) -> Ethernet + header' of a DF packet

        def transform(p: bytes) -> bytes:
            try:
                if p[0] >> 4 == 4:
                    if p[6] & 0x40:
                        key = (p[1] << 16) | len(p)
                        cached = headers.get(key)
                        if cached is not None:
                            return cached + p
                        tos = p[1]
                        total = (len(p) + hlen) & 0xFFFF
                        cached = pack_ip(eth, 0x45, tos, total, 0, flags_c | _DF, ttlproto,
                                         (neg_df - tos - total) % 0xFFFF, tail)
                        if len(headers) < HEADER_CACHE:
                            headers[key] = cached
                        return cached + p
                    tos = p[1]
                    total = (len(p) + hlen) & 0xFFFF
                    ident = next(idents) & IDENT_MASK
                    return pack_ip(eth, 0x45, tos, total, ident, flags_c, ttlproto,
                                   (neg - tos - total - ident) % 0xFFFF, tail) + p
            except (IndexError, TypeError):
                pass
            return general(p)

        return transform

    crc32 = zlib.crc32

    def transform_udp(p: bytes) -> bytes:
        try:
            if p[0] >> 4 == 4:
                tos = p[1]
                n = len(p)
                total = (n + hlen) & 0xFFFF
                sport = 0xC000 | (crc32(p[12:20]) & 0x3FFF) if f_entropy else sport_c
                ulen = (udp_extra + n) & 0xFFFF if f_udp else ulen_c
                if p[6] & 0x40:
                    return pack_udp(eth, 0x45, tos, total, 0, flags_c | _DF, ttlproto,
                                    (neg_df - tos - total) % 0xFFFF, addrs, sport, dport, ulen, uck, rest) + p
                ident = next(idents) & IDENT_MASK
                return pack_udp(eth, 0x45, tos, total, ident, flags_c, ttlproto,
                                (neg - tos - total - ident) % 0xFFFF, addrs, sport, dport, ulen, uck, rest) + p
        except (IndexError, TypeError):
            pass
        return general(p)

    return transform_udp


# ------------------------------------------------------------------------------------ resolving a method


def resolve(registry, method: str, server, egress, *, name: Optional[str] = None
            ) -> Tuple[Optional[Template], Transform]:
    """The template (None for a Python-only method) and the transform that send P' to *server*.

    Asks ``encapfwd_build_template`` first: a :class:`~encapfwd.records.Template` gives
    ``template_transform(template, egress)``; None falls back to the plugins' ``encapfwd_build_transform``.
    A plugin that raises (other than an :class:`~encapfwd.errors.EncapfwdError`, passed on as is), returns
    something else than a Template, or builds nothing is a one-line
    :class:`~encapfwd.errors.PluginError` naming *name* (the server, e.g. ``10.0.9.9@80@10.0.3.10``) and
    the distribution that registered *method* (``registry.owners``).
    """
    who = f"server {name if name is not None else server.address}"
    owner = registry.owners.get(method, "unknown")
    hook = registry.hook
    try:
        template = hook.encapfwd_build_template(forwarder=method, server=server, egress=egress)
    except EncapfwdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin bug becomes one clear line
        raise PluginError(
            f"{who}: the {owner} plugin failed to build its {method!r} template: {one_line(f'{type(exc).__name__}: {exc}', None, first=True)}"
        ) from None
    if template is not None:
        if not isinstance(template, Template):
            raise PluginError(
                f"{who}: the {owner} plugin returned a {type(template).__name__} as its {method!r} template, "
                "not an encapfwd.hookspecs.Template"
            )
        return template, template_transform(template, egress)
    bridge = registry.pm.get_plugin(TemplateTransforms.NAME)
    build = (registry.pm.subset_hook_caller("encapfwd_build_transform", remove_plugins=[bridge])
             if bridge is not None else hook.encapfwd_build_transform)
    try:
        transform = build(forwarder=method, server=server, egress=egress)
    except EncapfwdError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PluginError(
            f"{who}: the {owner} plugin failed to build its {method!r} transform: {one_line(f'{type(exc).__name__}: {exc}', None, first=True)}"
        ) from None
    if not callable(transform):
        raise PluginError(
            f"{who}: the plugin providing {method!r} ({owner}) built no template and no transform")
    return None, transform


class TemplateTransforms:
    """The core's answer to ``encapfwd_build_transform`` for methods described by a template (asked last).

    Registered in every registry (:func:`encapfwd.plugins.get_plugin_manager`) so that callers of
    ``encapfwd_build_transform`` get a transform for template-only plugins too.
    """

    NAME = "encapfwd.encap"  # the registered plugin name (unchanged: `encapfwd forwarders` shows it)

    def __init__(self, pm):
        self._pm = pm

    @hookimpl(trylast=True)
    def encapfwd_build_transform(self, forwarder, server, egress):
        template = self._pm.hook.encapfwd_build_template(forwarder=forwarder, server=server, egress=egress)
        if template is None:
            return None
        return template_transform(template, egress)


__all__ = [
    "HEADER_CACHE",
    "TUNNEL_FIELDS",
    "TemplateTransforms",
    "ipv4_header",
    "resolve",
    "template_transform",
]
