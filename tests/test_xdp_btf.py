"""The BTF check: every byte layout and constant ``encapfwd.xdp.maps`` mirrors, against the compiled programs.

``maps.py`` packs and unpacks the keys and values of the program's maps with ``struct`` formats, and mirrors
its enums (drop and pass reasons, template field bits) and a few numbers. A field moved, resized or added in
C, or an enumerator inserted, without maps.py following, would make the controller write plans the program
misreads; nothing else would notice until frames went wrong. Here the compiled objects (the XDP build and the
TC build, ``encapfwd_tc.bpf.c`` including ``encapfwd.bpf.c``) are read with ``bpftool btf dump file X``
(JSON) and compared with maps.py:

- every C struct maps.py mirrors (:data:`STRUCTS`): size, each member's name, offset and size, in order, and
  its kind (an integer packed little-endian, or bytes kept as they are: arrays, ``__be16`` ports); a ``x``
  pad byte of a format must be a C member named ``pad``;
- every map of the program (:data:`MAPS`, the set must be the same): its key and value types (the C struct
  maps.py's format mirrors, or an integer of the format's size), and its ``max_entries`` where the program
  fixes it (``drops``, ``passes`` and ``flow_events`` hold one counter per reason of :data:`maps.DROPS` /
  :data:`maps.PASSES` / :data:`maps.FLOW_EVENTS`);
- the constants (:func:`constant_problems`): BTF carries an enum only as part of a variable's type and a
  number only as an array's length, so they are read from a build of the same source with
  ``-DENCAPFWD_BTF_CONSTANTS`` (one extra variable, ``btf_constants``, at the end of ``encapfwd.bpf.c``;
  the loaded objects are built without it): the enumerators of ``drop_reason``, ``pass_reason``,
  ``flow_event`` and ``template_field`` (names are maps.py's, upper case, ``-`` as ``_``), ``NO_SERVER``, ``MAX_HDR``
  (= ``XDP_MAX_HEADER``), the C defaults of ``MAX_SERVERS`` and ``MAX_PORTS`` and, in the TC build,
  ``SLOW_MARK`` (:data:`encapfwd.xdp.tc.SLOW_MARK`).

The comparison functions return a list of problems (empty: all agree); the last tests show they find a
doctored expectation and a doctored copy of the C source. Needs clang and bpftool (``./dev setup`` installs
both), no root.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from encapfwd.hookspecs import XDP_MAX_HEADER
from encapfwd.xdp import maps as M

SOURCES = {"xdp": "encapfwd.bpf.c", "tc": "encapfwd_tc.bpf.c"}
CONSTANTS_DEFINE = "ENCAPFWD_BTF_CONSTANTS"

#: C struct -> (maps.py's format, the C member each item of the format fills, in order; pad items too)
STRUCTS = {
    "control": (M.CONTROL, ("gen", "owner")),
    "host_entry": (M.HOST_ENTRY, ("mac", "check", "pad")),
    "vip_key": (M.VIP_KEY, ("addr", "family", "gen", "pad")),
    "port_key": (M.PORT_KEY, ("addr", "port", "proto", "gen")),
    "port_entry": (M.PORT_ENTRY, ("ring_base", "ring_size", "timeout", "fallback")),
    "overload": (M.OVERLOAD, ("pressure", "newflow_limit", "publish", "handup_limit")),
    "newflow_window": (M.NEWFLOW_WINDOW, ("start_ns", "count")),
    "server_entry": (M.SERVER_ENTRY, ("dst", "src", "hdr_len", "fields", "mtu", "up", "xdp", "hdr")),
    "flow_key": (M.FLOW_KEY, ("src", "dst", "sport", "dport", "proto", "pad")),
    "flow_value": (M.FLOW_VALUE, ("sid", "pad", "seen_ns")),
    "counter": (M.COUNTER, ("packets", "bytes")),
}
#: map -> (key format, value format, max_entries where the program fixes it, else None: set by the loader
#: or not mirrored)
MAPS = {
    "control": (M.U32, M.CONTROL, 1),
    "host": (M.U32, M.HOST_ENTRY, 2),
    "vips": (M.VIP_KEY, M.U32, None),
    "port_index": (M.PORT_KEY, M.U32, 4 * M.MAX_PORTS),
    "ports": (M.U32, M.PORT_ENTRY, 2 * M.MAX_PORTS),
    "servers": (M.U32, M.SERVER_ENTRY, 2 * M.MAX_SERVERS),
    "ring": (M.U32, M.U32, None),
    "flows": (M.FLOW_KEY, M.FLOW_VALUE, None),
    "stats": (M.U32, M.COUNTER, M.MAX_SERVERS),
    "drops": (M.U32, M.U64, len(M.DROPS)),
    "passes": (M.U32, M.U64, len(M.PASSES)),
    "idents": (M.U32, M.U32, 1),
    "last_reason": (M.U32, M.U32, 1),
    "overload": (M.U32, M.OVERLOAD, 1),
    "newflow_rate": (M.U32, M.NEWFLOW_WINDOW, 1),
    "handup_rate": (M.U32, M.NEWFLOW_WINDOW, 1),
    "flow_events": (M.U32, M.U64, len(M.FLOW_EVENTS)),
    "new_flows": (None, None, None),  # a ring buffer: no key, no value; its records are struct flow_record
}

_FORMAT_ITEM = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdsp])")
_INT_CODES = "bB?hHiIlLqQ"


# -- BTF ------------------------------------------------------------------------------------------------------
class BTF:
    """The types of one object's BTF (``bpftool -j btf dump file``), by id and by (kind, name)."""

    def __init__(self, types: List[dict]):
        self.by_id = {t["id"]: t for t in types}
        self.named = {(t["kind"], t["name"]): t for t in types if t.get("name") not in (None, "(anon)")}

    @classmethod
    def of(cls, path) -> "BTF":
        return cls(_dump(str(path)))

    def find(self, kind: str, name: str) -> Optional[dict]:
        return self.named.get((kind, name))

    def strip(self, type_id: int) -> dict:
        """The type behind typedefs and qualifiers."""
        t = self.by_id[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = self.by_id[t["type_id"]]
        return t

    def size(self, type_id: int) -> int:
        t = self.strip(type_id)
        if t["kind"] == "ARRAY":
            return t["nr_elems"] * self.size(t["type_id"])
        if t["kind"] == "PTR":
            return 8
        return t["size"]

    def kind(self, type_id: int) -> str:
        """``"int"`` (a number in host order) or ``"bytes"`` (an array, or a ``__be`` typedef: network order)."""
        t = self.by_id[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            if t["kind"] == "TYPEDEF" and t["name"].startswith("__be"):
                return "bytes"
            t = self.by_id[t["type_id"]]
        return "bytes" if t["kind"] == "ARRAY" else "int" if t["kind"] in ("INT", "ENUM", "ENUM64") else t["kind"]

    def array_len(self, type_id: int) -> int:
        """The number ``__uint(name, N)`` encodes: a pointer to an array of N."""
        t = self.strip(type_id)
        assert t["kind"] == "PTR", t
        return self.strip(t["type_id"])["nr_elems"]

    def pointee(self, type_id: int) -> dict:
        """What ``__type(name, T)`` encodes: a pointer to T (T itself, typedefs kept)."""
        t = self.strip(type_id)
        assert t["kind"] == "PTR", t
        return self.by_id[t["type_id"]]

    def maps(self) -> Dict[str, dict]:
        """The map definitions (the anonymous structs of the ``.maps`` section's variables), by map name."""
        sec = self.find("DATASEC", ".maps")
        if sec is None:
            return {}
        out = {}
        for var in sec["vars"]:
            v = self.by_id[var["type_id"]]
            out[v["name"]] = {m["name"]: m["type_id"] for m in self.strip(v["type_id"])["members"]}
        return out


@lru_cache(maxsize=None)
def _dump(path: str) -> List[dict]:
    proc = subprocess.run([shutil.which("bpftool") or "bpftool", "-j", "btf", "dump", "file", path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"bpftool btf dump file {path}: {proc.stderr.strip()}"
    return json.loads(proc.stdout)["types"]


# -- the expectations from maps.py -----------------------------------------------------------------------------
def format_items(fmt: struct.Struct) -> List[tuple]:
    """``(offset, size, kind)`` of each item of a little-endian, unaligned format; kind ``int``, ``bytes``
    (``Ns``) or ``pad`` (``Nx``, one item)."""
    text = fmt.format
    assert text[0] == "<", f"{text}: maps.py formats are little-endian with no alignment ('<')"
    out, offset = [], 0
    for count, code in _FORMAT_ITEM.findall(text[1:]):
        n = int(count) if count else 1
        if code in "sx":
            out.append((offset, n, "bytes" if code == "s" else "pad"))
            offset += n
        else:
            assert code in _INT_CODES, f"{text}: format code {code!r} has no C counterpart here"
            size = struct.calcsize("<" + code)
            for _ in range(n):
                out.append((offset, size, "int"))
                offset += size
    assert offset == fmt.size, text
    return out


def struct_problems(btf: BTF, name: str, fmt: struct.Struct, members) -> List[str]:
    """What differs between C's ``struct name`` and *fmt* whose items fill *members* (C member names)."""
    where = f"struct {name} / {fmt.format!r}"
    t = btf.find("STRUCT", name)
    if t is None:
        return [f"{where}: no struct {name} in the object's BTF"]
    items = format_items(fmt)
    if len(items) != len(members):
        return [f"{where}: the test names {len(members)} members for {len(items)} format items"]
    problems = []
    if t["size"] != fmt.size:
        problems.append(f"{where}: sizeof is {t['size']} in C, {fmt.size} in maps.py")
    c_members = sorted(t["members"], key=lambda m: m["bits_offset"])
    c_names = [m["name"] for m in c_members]
    if c_names != list(members):
        problems.append(f"{where}: C's members in memory order are {c_names}, maps.py's format fills {list(members)}")
    by_name = {m["name"]: m for m in c_members}
    for (offset, size, kind), member in zip(items, members):
        m = by_name.get(member)
        if m is None:
            problems.append(f"{where}: C has no member {member!r}")
            continue
        if m.get("bitfield_size") or m["bits_offset"] % 8:
            problems.append(f"{where}: {member} is a bit field in C")
            continue
        c_offset, c_size, c_kind = m["bits_offset"] // 8, btf.size(m["type_id"]), btf.kind(m["type_id"])
        if (c_offset, c_size) != (offset, size):
            problems.append(f"{where}: {member} is at offset {c_offset}, {c_size} bytes in C; maps.py packs it at "
                            f"offset {offset}, {size} bytes")
        if kind == "pad":
            if not member.startswith("pad"):
                problems.append(f"{where}: maps.py skips the bytes of {member} (pad), C does not call it pad")
        elif member.startswith("pad") and kind == "bytes":
            problems.append(f"{where}: {member} is padding in C, maps.py packs bytes into it")
        elif kind != c_kind and not member.startswith("pad"):
            problems.append(f"{where}: {member} is {c_kind} in C ({'network' if c_kind == 'bytes' else 'host'} "
                            f"order), maps.py packs it as {kind}")
    return problems


def _type_problems(btf: BTF, where: str, type_id: int, fmt: struct.Struct) -> List[str]:
    t = btf.pointee(type_id)
    stripped = btf.strip(t["id"])
    mirrored = [name for name, (f, _) in STRUCTS.items() if f is fmt]
    if mirrored:
        if stripped["kind"] != "STRUCT" or stripped["name"] != mirrored[0]:
            return [f"{where} is {stripped['kind']} {stripped.get('name')!r} in C, maps.py packs it as struct "
                    f"{mirrored[0]} ({fmt.format!r})"]
        return []
    if stripped["kind"] != "INT" or btf.size(t["id"]) != fmt.size:
        return [f"{where} is {stripped['kind']} {stripped.get('name')!r} of {btf.size(t['id'])} bytes in C, maps.py "
                f"packs it as {fmt.format!r} ({fmt.size} bytes)"]
    return []


def map_problems(btf: BTF, maps=None, check_entries: bool = True) -> List[str]:
    """What differs between the object's maps and *maps* (default :data:`MAPS`)."""
    maps = MAPS if maps is None else maps
    defs = btf.maps()
    problems = []
    if set(defs) != set(maps):
        problems.append(f"maps: C has {sorted(set(defs) - set(maps))} more, {sorted(set(maps) - set(defs))} fewer "
                        "than the test's table")
    for name in sorted(set(defs) & set(maps)):
        key, value, entries = maps[name]
        d = defs[name]
        if key is None:  # a ring buffer
            problems += [f"map {name}: has a {m} in C, none in the test's table" for m in ("key", "value") if m in d]
        else:
            problems += _type_problems(btf, f"map {name}: key", d["key"], key)
            problems += _type_problems(btf, f"map {name}: value", d["value"], value)
        if check_entries and entries is not None and btf.array_len(d["max_entries"]) != entries:
            problems.append(f"map {name}: max_entries is {btf.array_len(d['max_entries'])} in C, {entries} in "
                            "maps.py")
    return problems


def record_problems(btf: BTF) -> List[str]:
    """``struct flow_record`` (the ``new_flows`` ring's records) against ``maps.FLOW_RECORD``: a flow key, then
    a flow value, nothing else."""
    t = btf.find("STRUCT", "flow_record")
    if t is None:
        return ["struct flow_record: not in the object's BTF"]
    got = [(m["name"], m["bits_offset"] // 8, btf.strip(m["type_id"]).get("name")) for m in t["members"]]
    want = [("key", 0, "flow_key"), ("value", M.FLOW_KEY.size, "flow_value")]
    problems = [] if got == want else [f"struct flow_record: C has {got}, maps.py packs {want}"]
    if t["size"] != M.FLOW_RECORD.size:
        problems.append(f"struct flow_record: sizeof is {t['size']} in C, {M.FLOW_RECORD.size} in maps.py")
    return problems


def layout_problems(btf: BTF, check_entries: bool = True) -> List[str]:
    problems = []
    for name, (fmt, members) in STRUCTS.items():
        problems += struct_problems(btf, name, fmt, members)
    return problems + map_problems(btf, check_entries=check_entries)


def enum_problems(btf: BTF, name: str, expected: Dict[str, int]) -> List[str]:
    t = btf.find("ENUM", name)
    if t is None:
        return [f"enum {name}: not in the object's BTF"]
    got = {v["name"]: v["val"] for v in t["values"]}
    if got != expected:
        return [f"enum {name}: C has {got}, maps.py mirrors {expected}"]
    return []


def reasons(prefix: str, names) -> Dict[str, int]:
    """C's enumerators for maps.py's reason names, in order, and the ``_MAX`` that counts them."""
    out = {prefix + n.upper().replace("-", "_"): i for i, n in enumerate(names)}
    out[prefix + "MAX"] = len(names)
    return out


def constant_problems(btf: BTF, tc: bool, drops=M.DROPS, passes=M.PASSES, fields=None,
                      events=M.FLOW_EVENTS) -> List[str]:
    """What differs between the constants of a ``-DENCAPFWD_BTF_CONSTANTS`` build and maps.py's."""
    fields = M.FIELD_BITS if fields is None else fields
    problems = enum_problems(btf, "drop_reason", reasons("D_", drops))
    problems += enum_problems(btf, "pass_reason", reasons("P_", passes))
    problems += enum_problems(btf, "flow_event", reasons("E_", events))
    problems += enum_problems(btf, "template_field", {"F_" + k.upper(): v for k, v in fields.items()})
    t = btf.find("STRUCT", "btf_constants")
    if t is None:
        return problems + ["struct btf_constants: not in the object's BTF (built without ENCAPFWD_BTF_CONSTANTS?)"]
    numbers = {m["name"]: btf.array_len(m["type_id"]) for m in t["members"] if btf.strip(m["type_id"])["kind"] == "PTR"
               and btf.strip(btf.strip(m["type_id"])["type_id"])["kind"] == "ARRAY"}
    from encapfwd.xdp import tc as T

    expected = {"d_max": len(drops), "p_max": len(passes), "e_max": len(events), "no_server": M.NO_SERVER,
                "max_hdr": XDP_MAX_HEADER, "max_servers": M.MAX_SERVERS, "max_ports": M.MAX_PORTS}
    if tc:
        expected["slow_mark"] = T.SLOW_MARK
    if numbers != expected:
        problems.append(f"constants: C has {numbers}, the Python side {expected}")
    if M.SERVER_ENTRY.size - M.HEADER_OFFSET != XDP_MAX_HEADER:
        problems.append("maps.HEADER_OFFSET does not leave XDP_MAX_HEADER bytes of template header")
    return problems


# -- building ----------------------------------------------------------------------------------------------------
def _need_tools():
    if shutil.which("clang") is None:
        from encapfwd.xdp.build import NO_CLANG

        pytest.skip(NO_CLANG)
    if shutil.which("bpftool") is None and not Path("/usr/sbin/bpftool").exists():
        pytest.skip("bpftool is not installed (it reads the objects' BTF): run ./dev setup or apt-get install bpftool")


@lru_cache(maxsize=None)
def loaded_object(which: str) -> Path:
    """The object encapfwd loads (the engine's own build: same defines)."""
    from encapfwd.xdp import dataplane, tc

    try:
        return (dataplane if which == "xdp" else tc).object_path()
    except OSError:  # no libbpf.so to count CPUs with: NCPUS changes no layout
        from encapfwd.xdp.build import build

        return build(SOURCES[which], {"MAX_SERVERS": M.MAX_SERVERS, "MAX_PORTS": M.MAX_PORTS})


def constants_object(source) -> Path:
    """*source* built with the constants in its BTF, and the C defaults of MAX_SERVERS and MAX_PORTS."""
    from encapfwd.xdp.build import build

    return build(source, {CONSTANTS_DEFINE: None})


# -- the check -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", sorted(SOURCES))
def test_layouts_match_the_loaded_object(which):
    _need_tools()
    btf = BTF.of(loaded_object(which))
    assert layout_problems(btf) == []
    # the loaded objects carry no probe variable: their maps and data are the program's only
    assert btf.find("STRUCT", "btf_constants") is None


@pytest.mark.parametrize("which", sorted(SOURCES))
def test_constants_and_defaults_match(which):
    _need_tools()
    btf = BTF.of(constants_object(SOURCES[which]))
    assert constant_problems(btf, tc=which == "tc") == []
    # built with the C defaults of MAX_SERVERS and MAX_PORTS: the map sizes maps.py assumes follow from them
    assert layout_problems(btf) == []
    # the ring's record type is only in this build's BTF (the loaded one inlines every use of it)
    assert record_problems(btf) == []


# -- the check finds mismatches ------------------------------------------------------------------------------------
def test_format_items():
    assert format_items(M.FLOW_KEY) == [(0, 16, "bytes"), (16, 16, "bytes"), (32, 2, "bytes"), (34, 2, "bytes"),
                                        (36, 1, "int"), (37, 3, "pad")]
    assert format_items(struct.Struct("<2IQ")) == [(0, 4, "int"), (4, 4, "int"), (8, 8, "int")]


def test_doctored_expectations_are_found():
    _need_tools()
    btf = BTF.of(loaded_object("xdp"))
    # two fields swapped in the expectation
    problems = struct_problems(btf, "flow_key", M.FLOW_KEY, ("src", "dst", "dport", "sport", "proto", "pad"))
    assert any("dport is at offset 34" in p for p in problems), problems
    # mtu packed after up and xdp
    problems = struct_problems(btf, "server_entry", struct.Struct(f"<6s6sHHBBH{XDP_MAX_HEADER}s"),
                               ("dst", "src", "hdr_len", "fields", "up", "xdp", "mtu", "hdr"))
    assert any("mtu is at offset 16" in p for p in problems), problems
    # a port packed as a little-endian integer (the C member is __be16, kept in network order)
    problems = struct_problems(btf, "port_key", struct.Struct("<16sHBB"), ("addr", "port", "proto", "gen"))
    assert problems == ["struct port_key / '<16sHBB': port is bytes in C (network order), maps.py packs it as int"]
    # a padding byte packed as data, one too few
    assert struct_problems(btf, "host_entry", struct.Struct("<6sB"), ("mac", "check"))
    # a map's value of another size, a map's counters one fewer than the reasons
    doctored = dict(MAPS, flows=(M.FLOW_KEY, M.U64, None), drops=(M.U32, M.U64, len(M.DROPS) + 1))
    problems = map_problems(btf, doctored)
    assert len(problems) == 2 and "map drops: max_entries is 4" in problems[0] and "map flows: value" in problems[1]
    # constants
    btf = BTF.of(constants_object(SOURCES["tc"]))
    problems = constant_problems(btf, tc=True, drops=("truncated", "bad-checksum", "no-server", "not-port"),
                                 passes=M.PASSES[:-1], fields=dict(M.FIELD_BITS, df=0x08, ident=0x04))
    assert [p.split(":")[0] for p in problems] == ["enum drop_reason", "enum pass_reason", "enum template_field",
                                                   "constants"], problems


def test_a_doctored_source_is_found(tmp_path):
    """A copy of the C source with a struct member moved and two enumerators swapped, maps.py unchanged."""
    _need_tools()
    from encapfwd.xdp.build import PACKAGE_DIR, build

    for path in PACKAGE_DIR.iterdir():
        if path.suffix in (".c", ".h"):
            shutil.copy(path, tmp_path / path.name)
    source = tmp_path / "encapfwd.bpf.c"
    text = source.read_text()
    moved = text.replace("    __u16 mtu;\n    __u8 up;\n    __u8 xdp; /* 0: no template, frames go up */\n",
                         "    __u8 up;\n    __u8 xdp; /* 0: no template, frames go up */\n    __u16 mtu;\n")
    moved = moved.replace("D_NOT_PORT, D_NO_SERVER, D_MAX", "D_NO_SERVER, D_NOT_PORT, D_MAX")
    assert moved.count("__u16 mtu;") == 1 and moved != text and "D_NO_SERVER, D_NOT_PORT" in moved
    source.write_text(moved)
    for which in sorted(SOURCES):
        btf = BTF.of(build(tmp_path / SOURCES[which], {CONSTANTS_DEFINE: None}))
        problems = layout_problems(btf)
        assert any("mtu is at offset 18, 2 bytes in C; maps.py packs it at offset 16" in p for p in problems), problems
        assert any("C's members in memory order are ['dst', 'src', 'hdr_len', 'fields', 'up', 'xdp', 'mtu'" in p
                   for p in problems), problems
        problems = constant_problems(btf, tc=which == "tc")
        assert len(problems) == 1 and "enum drop_reason" in problems[0] and "'D_NOT_PORT': 3" in problems[0], problems


def test_doctored_overload_layouts_are_found():
    """The overload maps (docs/live.md, "Overload") are checked like the others: flow events out of order,
    the overload word's fields swapped, a port entry without its pressure table."""
    _need_tools()
    btf = BTF.of(constants_object(SOURCES["xdp"]))
    problems = constant_problems(btf, tc=False, events=("rate-limit", "not-syn", "pressure", "handup-limit"))
    assert len(problems) == 1 and problems[0].startswith("enum flow_event"), problems
    problems = constant_problems(btf, tc=False, events=M.FLOW_EVENTS + ("more",))
    assert [p.split(":")[0] for p in problems] == ["enum flow_event", "constants"], problems
    assert struct_problems(btf, "overload", M.OVERLOAD, ("newflow_limit", "pressure", "publish", "handup_limit"))
    problems = struct_problems(btf, "port_entry", M.PORT_ENTRY, ("ring_base", "ring_size", "timeout", "pad"))
    assert any("C has no member 'pad'" in p for p in problems), problems
    doctored = dict(MAPS, flow_events=(M.U32, M.U64, len(M.FLOW_EVENTS) - 1))
    assert [p.split(":")[0] for p in map_problems(btf, doctored)] == ["map flow_events"]
