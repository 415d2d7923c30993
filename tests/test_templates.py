"""Encapsulations as data: the Template contract, its Python executor and how the core resolves a method.

- scapy is the independent oracle: the frames ``template_transform`` builds for random IPv4 P' (TCP/UDP, DF
  set and clear, TOS, lengths up to 1480) with the templates of mac, ipip, gre, gre+key and the GUE example
  are dissected by scapy, which recomputes every length and checksum;
- old-vs-new: the frozen copy of the former ``encapfwd.datapath.templates.ipv4_tunnel`` (below) and the template
  transforms give the same bytes for IPv4 P';
- a second, deliberately naive executor of the contract (``reference``, bytearray + RFC 1071 folding)
  agrees with the fast one for random templates (any field set, any header bytes) and any bytes P';
- Template validation, ``resolve`` (plugin failures as one line naming the distribution), the core's
  ``encapfwd_build_transform`` answer for template-only plugins;
- tshark finds no malformed packet and no bad checksum in 200 template outputs per method.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encapfwd import hookimpl
from encapfwd.datapath.templates import HEADER_CACHE, TUNNEL_FIELDS, resolve, template_transform
from encapfwd.errors import ConfigError, PluginError
from encapfwd.hookspecs import TEMPLATE_FIELDS, XDP_MAX_HEADER, Egress, Forwarder, Template
from encapfwd.model import Server
from encapfwd.datapath.packet import mac_bytes
from encapfwd.plugins import get_plugin_manager
from encapfwd.testing import SETTINGS, addresses, egresses

pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import GRE, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from scapy.utils import wrpcap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GUE_SRC = ROOT / "docs" / "examples" / "encapfwd-gue" / "src"
if str(GUE_SRC) not in sys.path:
    sys.path.insert(0, str(GUE_SRC))

import encapfwd_gre  # noqa: E402
import encapfwd_gue  # noqa: E402
import encapfwd_ipip  # noqa: E402
import encapfwd_mac  # noqa: E402

# ------------------------------------------------------------------ frozen reference: the former ipv4_tunnel
# encapfwd.datapath.templates.ipv4_tunnel as it was before templates (commit 26d29dc), code unchanged (docstrings
# dropped): the reference the template transforms must reproduce for IPv4 P'.

_OLD_HEADER_CACHE = 4096


def _words(raw: bytes) -> int:
    return sum(struct.unpack("!%dH" % (len(raw) // 2), raw))


def ipv4_tunnel(egress, proto: int, header: bytes = b"", proto6: int = 41, header6: bytes = b""):
    if len(header6) != len(header):
        raise ValueError("tunnel headers for IPv4 and IPv6 payloads must have the same length")
    eth = mac_bytes(egress.dst_mac) + mac_bytes(egress.src_mac) + b"\x08\x00"
    addrs = ipaddress.IPv4Address(egress.outer_src).packed + ipaddress.IPv4Address(egress.outer_dst).packed
    ttl = int(egress.ttl) & 0xFF
    tp4, tp6 = (ttl << 8) | proto, (ttl << 8) | proto6
    tail4, tail6 = addrs + header, addrs + header6
    extra = 20 + len(header)
    pack = struct.Struct(f"!14sBBHHHHH{len(tail4)}s").pack
    base4 = 0x4500 + _words(addrs) + tp4
    base6 = 0x4500 + _words(addrs) + tp6
    neg_df = -(base4 + 0x4000)
    neg = -base4
    idents = itertools.count(1)
    headers = {}

    def other(p) -> bytes:
        p = bytes(p)
        if len(p) >= 2 and p[0] >> 4 == 6:
            tos = ((p[0] & 0x0F) << 4) | (p[1] >> 4)
            base, tp, tail, flags, ident = base6, tp6, tail6, 0x4000, 0
        else:
            tos = p[1] if len(p) >= 2 else 0
            df = len(p) >= 7 and p[6] & 0x40
            base, tp, tail, flags = base4, tp4, tail4, (0x4000 if df else 0)
            ident = 0 if df else next(idents) & 0xFFFF
        total = (len(p) + extra) & 0xFFFF
        ck = -(base + flags + tos + total + ident) % 0xFFFF
        return pack(eth, 0x45, tos, total, ident, flags, tp, ck, tail) + p

    def transform(p: bytes) -> bytes:
        try:
            if p[0] >> 4 == 4:
                if p[6] & 0x40:
                    key = (p[1] << 16) | len(p)
                    cached = headers.get(key)
                    if cached is not None:
                        return cached + p
                    tos = p[1]
                    total = len(p) + extra
                    cached = pack(eth, 0x45, tos, total, 0, 0x4000, tp4, (neg_df - tos - total) % 0xFFFF,
                                  tail4)
                    if len(headers) < _OLD_HEADER_CACHE:
                        headers[key] = cached
                    return cached + p
                tos = p[1]
                total = len(p) + extra
                ident = next(idents) & 0xFFFF
                return pack(eth, 0x45, tos, total, ident, 0, tp4, (neg - tos - total - ident) % 0xFFFF,
                            tail4) + p
        except (IndexError, struct.error, TypeError):
            pass
        return other(p)

    return transform


def old_transform(method: str, egress, key=None):
    """What ipip/gre built with ipv4_tunnel before templates."""
    if method == "ipip":
        return ipv4_tunnel(egress, 4, proto6=41)
    flags = b"\x00\x00" if key is None else b"\x20\x00"
    key_field = b"" if key is None else struct.pack("!I", key)
    return ipv4_tunnel(egress, 47, flags + b"\x08\x00" + key_field,
                       proto6=47, header6=flags + b"\x86\xdd" + key_field)


# ----------------------------------------------------------------- a naive executor of the contract


def _rfc1071(header: bytes) -> int:
    total = sum((header[i] << 8) | header[i + 1] for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def reference(template: Template, egress):
    """The Template docstring, read literally: slow and obviously right (one counter per executor)."""
    counter = [0]
    macs = mac_bytes(egress.dst_mac) + mac_bytes(egress.src_mac)

    def run(p) -> bytes:
        p = bytes(p)

        def at(i):  # a byte past the end of P' reads as 0
            return p[i] if i < len(p) else 0

        v6 = len(p) >= 1 and p[0] >> 4 == 6
        if not template.header:
            return macs + (b"\x86\xdd" if v6 else b"\x08\x00") + p
        h = bytearray(template.header)
        f = template.fields
        if "tos" in f:
            h[1] = (((at(0) & 0x0F) << 4) | (at(1) >> 4)) if v6 else at(1)
        if "df" in f:
            h[6] = (h[6] & ~0x40 & 0xFF) | (0x40 if v6 or at(6) & 0x40 else 0)
        if "ident" in f:
            if h[6] & 0x40:
                h[4:6] = b"\x00\x00"
            else:
                counter[0] += 1
                h[4:6] = (counter[0] & 0x7FFF).to_bytes(2, "big")  # the Python engine's half
        if "udp" in f:
            h[24:26] = ((len(h) - 20 + len(p)) & 0xFFFF).to_bytes(2, "big")
            h[26:28] = b"\x00\x00"
        if "entropy" in f:
            h[20:22] = (0xC000 | (zlib.crc32(p[12:20]) & 0x3FFF)).to_bytes(2, "big")
        h[2:4] = ((len(h) + len(p)) & 0xFFFF).to_bytes(2, "big")
        h[10:12] = b"\x00\x00"
        h[10:12] = _rfc1071(bytes(h[:20])).to_bytes(2, "big")
        return macs + b"\x08\x00" + bytes(h) + p

    return run


# ------------------------------------------------------------------------------------ the five methods

EGRESS = Egress(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:fe",
                outer_src=ipaddress.ip_address("10.0.2.1"), outer_dst=ipaddress.ip_address("10.0.4.10"),
                ttl=64, cluster=ipaddress.ip_address("10.0.9.9"), mtu=1500)

#: name -> (forwarder, server options)
METHODS = {
    "mac": ("mac", {}),
    "ipip": ("ipip", {"encapforward": True, "encaptype": "ipip"}),
    "gre": ("gre", {"encapforward": True, "encaptype": "gre"}),
    "gre-key": ("gre", {"encapforward": True, "encaptype": "gre", "grekey": 0xDEADBEEF}),
    "gue": ("gue", {"encapforward": True, "encaptype": "gue"}),
}


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager(load_entrypoints=False,
                              plugins=[encapfwd_mac, encapfwd_ipip, encapfwd_gre, encapfwd_gue])


def template_of(registry, name, egress=EGRESS):
    method, options = METHODS[name]
    server = Server(address=str(egress.outer_dst), mac=egress.dst_mac, **options)
    template, transform = resolve(registry, method, server, egress)
    assert isinstance(template, Template) and template.xdp_capable
    return template, transform


@st.composite
def p_primes(draw, df=None):
    """An IPv4 P' (TCP or UDP, DF set or clear, any TOS, TTL, ID) of 40 to 1480 bytes."""
    proto = draw(st.sampled_from(["tcp", "udp"]))
    l4 = (TCP(sport=draw(st.integers(0, 65535)), dport=80, flags=draw(st.sampled_from(["S", "A", "PA", "F"])),
              seq=draw(st.integers(0, 2**32 - 1))) if proto == "tcp"
          else UDP(sport=draw(st.integers(0, 65535)), dport=53))
    dfset = draw(st.booleans()) if df is None else df
    ip = IP(src=draw(addresses), dst=draw(addresses), tos=draw(st.integers(0, 255)),
            ttl=draw(st.integers(0, 254)), id=draw(st.integers(0, 65535)), flags="DF" if dfset else 0)
    size = draw(st.integers(0, 1480 - len(ip / l4)))
    return bytes(ip / l4 / Raw(draw(st.binary(min_size=size, max_size=size))))


def check_with_scapy(name, egress, template, p, out, ident_seen):
    """Dissect *out* with scapy and check every field against P' and the egress; scapy recomputes the
    outer checksum and lengths independently."""
    method, options = METHODS[name]
    frame = Ether(out)
    assert frame.dst == egress.dst_mac and frame.src == egress.src_mac
    if name == "mac":
        assert frame.type == 0x0800 and out[14:] == p
        return
    assert frame.type == 0x0800
    outer = frame[IP]
    inner = IP(p)
    hlen = len(template.header)
    assert out[14 + hlen:] == p
    assert (outer.version, outer.ihl, outer.frag, outer.flags.MF) == (4, 5, 0, 0)
    assert outer.tos == inner.tos and outer.ttl == egress.ttl
    assert outer.src == str(egress.outer_src) and outer.dst == str(egress.outer_dst)
    assert outer.len == len(out) - 14 == hlen + len(p)
    assert bool(outer.flags.DF) == bool(inner.flags.DF)
    if inner.flags.DF:
        assert outer.id == 0
    else:
        assert outer.id == ident_seen
    # scapy's own checksum and lengths: rebuilding with them deleted gives the same bytes
    rebuilt = Ether(out)
    del rebuilt[IP].chksum
    del rebuilt[IP].len
    assert bytes(rebuilt) == out
    if name in ("ipip",):
        assert outer.proto == 4 and bytes(outer.payload) == p
    elif name in ("gre", "gre-key"):
        assert outer.proto == 47
        gre = frame[GRE]
        assert (gre.proto, gre.chksum_present, gre.seqnum_present, gre.version) == (0x0800, 0, 0, 0)
        key = options.get("grekey")
        assert gre.key_present == (key is not None) and (key is None or gre.key == key)
        assert hlen == (24 if key is None else 28)
    else:  # gue
        assert outer.proto == 17
        udp = frame[UDP]
        assert udp.dport == 6080 and udp.chksum == 0 and udp.len == 8 + 4 + len(p)
        assert udp.sport == 0xC000 | (zlib.crc32(p[12:20]) & 0x3FFF)
        rebuilt = Ether(out)
        del rebuilt[UDP].len
        assert bytes(rebuilt) == out
        assert bytes(udp.payload)[:4] == b"\x00\x04\x00\x00" and bytes(udp.payload)[4:] == p


@pytest.mark.parametrize("name", list(METHODS))
@SETTINGS
@given(data=st.data())
def test_template_outputs_pass_scapy(registry, name, data):
    egress = data.draw(egresses()) if name != "mac" else data.draw(egresses(outer=False))
    template, transform = template_of(registry, name, egress)
    ident = 0
    for p in data.draw(st.lists(p_primes(), min_size=1, max_size=4)):
        out = transform(p)
        if not p[6] & 0x40 and name != "mac":
            ident += 1
        check_with_scapy(name, egress, template, p, out, ident)


@pytest.mark.parametrize("name", ["ipip", "gre", "gre-key"])
@SETTINGS
@given(egress=egresses(), packets=st.lists(p_primes(), min_size=1, max_size=6))
def test_old_ipv4_tunnel_and_template_give_the_same_bytes(registry, name, egress, packets):
    _, new = template_of(registry, name, egress)
    method, options = METHODS[name]
    old = old_transform(method, egress, options.get("grekey"))
    for p in packets:
        a, b = old(p), new(p)
        if p[6] & 0x40:
            assert a == b
        else:
            # identification (bytes 18-19 of the frame) and checksum (24-25) masked for DF-clear packets;
            # both counters start at 1 per transform, so here they also agree exactly
            assert a[:18] + a[20:24] + a[26:] == b[:18] + b[20:24] + b[26:]
            assert a == b


def test_ipv6_p_prime_mac_carries_it_and_tunnels_do_not_raise(registry):
    """MAC forwarding still carries IPv6 (ethertype 0x86DD); IPIP/GRE templates cover IPv4 P' only."""
    p6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0x28) / UDP())
    _, mac = template_of(registry, "mac")
    assert mac(p6) == bytes(Ether(src=EGRESS.src_mac, dst=EGRESS.dst_mac) / IPv6(p6))
    for name in ("ipip", "gre", "gre-key", "gue"):
        template, transform = template_of(registry, name)
        out = transform(p6)  # never raises: framed per the contract (TOS = traffic class, DF set, ident 0)
        assert out == reference(template, EGRESS)(p6)
        outer = Ether(out)[IP]
        assert outer.tos == 0x28 and outer.flags.DF and outer.id == 0


# ------------------------------------------------------------- the fast executor against the naive one


@st.composite
def templates(draw):
    if draw(st.integers(0, 5)) == 0:
        return Template()
    if draw(st.booleans()):
        fields = set(TUNNEL_FIELDS) | set(draw(st.sets(st.sampled_from(["udp", "entropy"]))))
    else:
        fields = {"ipv4"} | draw(st.sets(st.sampled_from(["tos", "df", "ident", "udp", "entropy"])))
    udp = bool({"udp", "entropy"} & fields)
    size = draw(st.integers(28 if udp else 20, 72))
    header = bytearray(draw(st.binary(min_size=size, max_size=size)))
    header[0] = 0x45
    if udp:
        header[9] = 17
    return Template(header=bytes(header), fields=fields)


@st.composite
def any_p(draw):
    kind = draw(st.sampled_from(["bytes", "ipv4ish", "ipv6ish", "short"]))
    if kind == "short":
        return draw(st.binary(max_size=8))
    data = bytearray(draw(st.binary(min_size=1, max_size=120)))
    if kind == "ipv4ish":
        data[0] = 0x40 | (data[0] & 0x0F)
    elif kind == "ipv6ish":
        data[0] = 0x60 | (data[0] & 0x0F)
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(template=templates(), egress=egresses(), packets=st.lists(any_p(), min_size=1, max_size=8))
def test_fast_executor_equals_the_contract_for_any_template_and_bytes(template, egress, packets):
    fast, slow = template_transform(template, egress), reference(template, egress)
    for p in packets:
        assert fast(p) == slow(p)


@settings(max_examples=60, deadline=None)
@given(template=templates(), p=any_p())
def test_bytes_like_p_prime(template, p):
    assert (template_transform(template, EGRESS)(bytearray(p)) == template_transform(template, EGRESS)(p)
            == template_transform(template, EGRESS)(memoryview(p)))


@pytest.mark.parametrize("name", ["ipip", "gue"])
def test_ident_counter_wraps_and_skips_df_packets(registry, name):
    template, transform = template_of(registry, name)
    slow = reference(template, EGRESS)
    df_clear = bytes(IP(src="1.2.3.4", dst="10.0.9.9", flags=0) / UDP())
    df_set = bytes(IP(src="1.2.3.4", dst="10.0.9.9", flags="DF") / UDP())
    clear = 0
    for i in range(80000):
        p = df_set if i % 7 == 0 else df_clear
        clear += p is df_clear
        out = transform(p)
        assert out == slow(p)
    assert clear > 65536 and out[18:20] == (clear & 0x7FFF).to_bytes(2, "big")


def test_header_cache_is_bounded_and_stays_right():
    template = Template(header=bytes([0x45]) + bytes(8) + bytes([4]) + bytes(10), fields=TUNNEL_FIELDS)
    fast, slow = template_transform(template, EGRESS), reference(template, EGRESS)
    base = bytes(IP(flags="DF") / UDP())
    for tos in range(3):
        for extra in range(HEADER_CACHE // 2 + 10):
            p = bytes([base[0], tos]) + base[2:] + bytes(extra)
            assert fast(p) == slow(p)
            assert fast(p) == slow(p)  # a second time, from the cache


def test_checksum_is_zero_not_ffff_when_the_sum_is_a_multiple_of_ffff():
    # choose the constant words so that the nine other words sum to 0xFFFF * k: checksum 0 (RFC 1071)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 4, 0, bytes(4), bytes(4)))
    template0 = Template(header=bytes(header), fields={"ipv4"})
    p = bytes(10)
    s = 0x4500 + (20 + len(p)) + 0x4004
    need = (-s) % 0xFFFF
    header[12:14] = need.to_bytes(2, "big")
    template = Template(header=bytes(header), fields={"ipv4"})
    out = template_transform(template, EGRESS)(p)
    assert out[24:26] == b"\x00\x00" and _rfc1071(out[14:34]) == 0
    assert template_transform(template0, EGRESS)(p) == reference(template0, EGRESS)(p)


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, message", [
    (dict(header=b"", fields={"vxlan"}), "unknown template field 'vxlan'"),
    (dict(header=bytes([0x45]) + bytes(19), fields={"ipv4", "checksum"}), "unknown template field"),
    (dict(header=b"", fields={"tos"}), "need the ipv4 field"),
    (dict(header=bytes([0x45]) + bytes(18), fields={"ipv4"}), "20-byte IPv4 header"),
    (dict(header=bytes([0x46]) + bytes(23), fields={"ipv4"}), "20-byte IPv4 header"),
    (dict(header=bytes([0x60]) + bytes(39), fields={"ipv4"}), "20-byte IPv4 header"),
    (dict(header=bytes([0x45]) + bytes(27), fields={"ipv4", "udp"}), "protocol 17"),
    (dict(header=bytes([0x45]) + bytes(8) + b"\x11" + bytes(10), fields={"ipv4", "entropy"}), "protocol 17"),
    (dict(header=b"\x00\x00\x08\x00", fields=()), "must be an outer IPv4 header"),
])
def test_bad_templates_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Template(**kwargs)


def test_xdp_capable_follows_the_header_size():
    ip = bytes([0x45]) + bytes(19)
    assert Template().xdp_capable and Template(header=ip, fields={"ipv4"}).xdp_capable
    assert Template(header=ip + bytes(XDP_MAX_HEADER - 20), fields={"ipv4"}).xdp_capable
    assert not Template(header=ip + bytes(XDP_MAX_HEADER - 16), fields={"ipv4"}).xdp_capable
    assert not Template(header=ip + bytes(2), fields={"ipv4"}).xdp_capable
    assert set(TUNNEL_FIELDS) <= set(TEMPLATE_FIELDS)


def test_template_transform_takes_a_template():
    with pytest.raises(TypeError):
        template_transform(b"\x45", EGRESS)


# ------------------------------------------------------------------------------ resolve and the registry


def _plugin(**hooks):
    class Plugin:
        pass

    for name, fn in hooks.items():
        setattr(Plugin, name, staticmethod(hookimpl(fn)))
    Plugin.__name__ = "encapfwd-test"
    return Plugin


def _register(*names, template=False):
    def encapfwd_register_forwarders(register):
        for name in names:
            register(Forwarder(name=name, overhead=0, template=template))
    return encapfwd_register_forwarders


SERVER = Server(address="10.0.4.10")


def test_resolve_prefers_the_template_and_falls_back_to_the_python_transform():
    calls = []

    def encapfwd_build_template(forwarder, server, egress):
        calls.append(forwarder)
        return Template() if forwarder == "data" else None

    def encapfwd_build_transform(forwarder, server, egress):
        return (lambda p: b"CODE" + p) if forwarder == "code" else None

    registry = get_plugin_manager(load_entrypoints=False, plugins=[_plugin(
        encapfwd_register_forwarders=_register("data", "code"),
        encapfwd_build_template=encapfwd_build_template, encapfwd_build_transform=encapfwd_build_transform)])
    template, transform = resolve(registry, "data", SERVER, EGRESS)
    assert template == Template()
    assert transform(b"\x45") == bytes.fromhex("02000000 00fe0200 00000001 0800") + b"\x45"
    template, transform = resolve(registry, "code", SERVER, EGRESS)
    assert template is None and transform(b"x") == b"CODEx"
    assert calls == ["data", "code"]  # the template hook is asked once per resolve, not again by the core
    # every caller of encapfwd_build_transform gets a transform for template-only methods too
    derived = registry.hook.encapfwd_build_transform(forwarder="data", server=SERVER, egress=EGRESS)
    assert derived(b"\x45") == transform_of(registry, "data")(b"\x45")
    assert registry.hook.encapfwd_build_transform(forwarder="none", server=SERVER, egress=EGRESS) is None


def transform_of(registry, method):
    return resolve(registry, method, SERVER, EGRESS)[1]


@pytest.mark.parametrize("hook, result, message", [
    ("encapfwd_build_template", RuntimeError("template failed\nsecond line"),
     "server 10.0.9.9@80@10.0.4.10: the encapfwd-test plugin failed to build its 'boom' template: "
     "RuntimeError: template failed"),
    ("encapfwd_build_template", ValueError("unknown template field 'x'"),
     "failed to build its 'boom' template: ValueError: unknown template field 'x'"),
    ("encapfwd_build_template", b"\x45\x00", "returned a bytes as its 'boom' template, not an encapfwd"),
    ("encapfwd_build_transform", KeyError("k"), "failed to build its 'boom' transform: KeyError: 'k'"),
    ("encapfwd_build_transform", "not callable", "built no template and no transform"),
])
def test_plugin_failures_are_one_line_naming_the_distribution(hook, result, message):
    def impl(forwarder, server, egress):
        if forwarder != "boom":
            return None
        if isinstance(result, Exception):
            raise result
        return result

    registry = get_plugin_manager(load_entrypoints=False, plugins=[_plugin(
        encapfwd_register_forwarders=_register("boom"), **{hook: impl})])
    with pytest.raises(PluginError) as info:
        resolve(registry, "boom", SERVER, EGRESS, name="10.0.9.9@80@10.0.4.10")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "encapfwd-test" in str(info.value)


def test_encapfwd_errors_pass_through_resolve():
    def encapfwd_build_template(forwarder, server, egress):
        raise ConfigError("grekey too large")

    registry = get_plugin_manager(load_entrypoints=False, plugins=[_plugin(
        encapfwd_register_forwarders=_register("x"), encapfwd_build_template=encapfwd_build_template)])
    with pytest.raises(ConfigError, match="^grekey too large$"):
        resolve(registry, "x", SERVER, EGRESS)


def test_missing_method_is_one_line():
    registry = get_plugin_manager(load_entrypoints=False)
    with pytest.raises(PluginError, match="built no template and no transform"):
        resolve(registry, "nothing", SERVER, EGRESS)


def test_engines_from_the_forwarder_declaration(registry):
    assert all(registry.engines(name) == ("xdp", "python") for name in ("mac", "ipip", "gre", "gue"))

    def encapfwd_build_template(forwarder, server, egress):
        return None

    declared_no_hook = get_plugin_manager(load_entrypoints=False, plugins=[_plugin(
        encapfwd_register_forwarders=_register("liar", template=True))])
    assert declared_no_hook.engines("liar") == ("python",)
    python_only = get_plugin_manager(load_entrypoints=False, plugins=[_plugin(
        encapfwd_register_forwarders=_register("code"), encapfwd_build_template=encapfwd_build_template)])
    assert python_only.engines("code") == ("python",)
    with pytest.raises(PluginError, match="no installed plugin provides"):
        python_only.engines("absent")


# --------------------------------------------------------------------------------------------- tshark


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_finds_no_malformed_packet_and_no_bad_checksum(registry, tmp_path):
    rnd = random.Random(2003)
    frames = []
    for name in METHODS:
        _, transform = template_of(registry, name)
        for i in range(200):
            l4 = (TCP(sport=40003, dport=40004, flags="PA", seq=rnd.randrange(2**32))
                  if i % 2 else UDP(sport=40001, dport=40002))  # ports without a dissector: random payload
            ip = IP(src=f"198.51.100.{rnd.randrange(1, 255)}", dst="10.0.9.9", tos=rnd.randrange(256),
                    ttl=rnd.randrange(1, 255), id=rnd.randrange(65536), flags="DF" if i % 3 else 0)
            size = rnd.randrange(0, 1480 - len(ip / l4) + 1)
            payload = bytes(rnd.getrandbits(8) for _ in range(size))
            frames.append(Ether(transform(bytes(ip / l4 / Raw(payload)))))
    pcap = tmp_path / "templates.pcap"
    wrpcap(str(pcap), frames)
    proc = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
         "-o", "udp.check_checksum:TRUE", "-o", "tcp.analyze_sequence_numbers:FALSE",
         "-T", "fields", "-E", "separator=|", "-e", "frame.number", "-e", "_ws.expert.severity",
         "-e", "_ws.expert.group", "-e", "_ws.expert.message", "-e", "_ws.malformed",
         "-e", "frame.protocols"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 200 * len(METHODS)
    error, checksum, malformed = "8388608", "16777216", "117440512"
    bad = []
    for line in lines:
        number, severity, group, message, flag, protocols = line.split("|")
        if flag or error in severity.split(",") or {checksum, malformed} & set(group.split(",")):
            bad.append(line)
    assert not bad, bad[:5]
    # tshark saw what was sent: IPIP as IP in IP, GRE, UDP to the GUE port, plain IP for MAC
    protocols = [line.split("|")[-1] for line in lines]
    assert all(p.startswith("eth:ethertype:ip:") for p in protocols)
    assert sum(":ip:ip:" in p for p in protocols) == 200
    assert sum(":gre:ip:" in p for p in protocols) == 400
