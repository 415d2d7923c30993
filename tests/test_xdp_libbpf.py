"""THE PROOF for encapfwd.xdp.build and encapfwd.xdp.libbpf on this machine's kernel.

The fixture tests/xdp_fixtures/echo.c is compiled by ``build()`` and loaded through the ctypes binding;
``BPF_PROG_TEST_RUN`` runs it on frames built by scapy and its output is compared, byte for byte, with what
scapy builds independently; its per-CPU counters, a 65,537-slot batch update, a map-in-map swap, attaching
to a veth in a network namespace and a live-frames run across a veth pair are checked against the kernel.

Needs root (BPF is root-only here); skipped with ``available()``'s reason otherwise. clang is not a reason to
skip: ``./dev setup`` installs it.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import random
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from encapfwd.lab import netns as lab_netns
from encapfwd.xdp import BPFError, libbpf
from encapfwd.xdp import build as xdp_build
from xdp_support import one_cpu

FIXTURES = Path(__file__).resolve().parent / "xdp_fixtures"
ECHO = FIXTURES / "echo.c"
# mirrors of echo.h
CNT_PACKETS, CNT_TX, CNT_PASS, CNT_SEEN = range(4)
TABLE_SIZE = 65537

AVAILABLE, REASON = libbpf.available()
needs_bpf = pytest.mark.skipif(not AVAILABLE, reason=f"BPF unavailable: {REASON}")
LAB_REASON = lab_netns.lab_unavailable_reason(("ip",))
needs_lab = pytest.mark.skipif(LAB_REASON is not None, reason=f"namespace lab unavailable: {LAB_REASON}")


@pytest.fixture(scope="session")
def echo_path(tmp_path_factory) -> Path:
    """echo.c compiled once per session, into a cache folder of the session's own."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ENCAPFWD_BPF_CACHE", str(tmp_path_factory.mktemp("bpf-cache")))
        return xdp_build.build(ECHO)


@pytest.fixture
def echo(echo_path):
    with libbpf.BPFObject.open(echo_path) as obj:
        yield obj


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def u64s(values) -> list:
    return [struct.unpack("=Q", v)[0] for v in values]


# -- build ------------------------------------------------------------------------------------------------
def test_build_caches_by_source_headers_and_defines(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENCAPFWD_BPF_CACHE", str(cache))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("echo.c", "echo.h"):
        (src / name).write_bytes((FIXTURES / name).read_bytes())

    first = xdp_build.build(src / "echo.c")
    assert first.parent == cache and re.fullmatch(r"echo-[0-9a-f]{64}\.o", first.name)
    assert first.read_bytes()[:4] == b"\x7fELF"
    mtime = first.stat().st_mtime_ns
    assert xdp_build.build(src / "echo.c") == first and first.stat().st_mtime_ns == mtime  # a hit

    (src / "echo.h").write_text((src / "echo.h").read_text() + "\n/* changed */\n")
    after_header = xdp_build.build(src / "echo.c")
    with_define = xdp_build.build(src / "echo.c", {"ECHO_UNUSED": 1})
    assert len({first, after_header, with_define}) == 3
    assert sorted(cache.iterdir()) == sorted((first, after_header, with_define))


def test_build_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCAPFWD_BPF_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.c"
    bad.write_text("int f(void) { return undeclared_thing; }\n")
    with pytest.raises(BPFError) as info:
        xdp_build.build(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith("compiling bad.c failed: ")
    assert "bad.c:1:" in message and "error:" in message and "undeclared_thing" in message
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary file left behind

    with pytest.raises(BPFError, match="BPF source not found"):
        xdp_build.build("no-such-source.c")

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BPFError) as info:
        xdp_build.build(bad)
    assert str(info.value) == "clang is not installed: run ./dev setup or apt-get install clang libbpf-dev"


# -- load, test-run, maps ---------------------------------------------------------------------------------
@needs_bpf
def test_verifier_rejection_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCAPFWD_BPF_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "unchecked.c"
    src.write_text(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
        'SEC("xdp") int unchecked(struct xdp_md *ctx)\n'
        "{ return *(unsigned char *)(long)ctx->data ? XDP_PASS : XDP_DROP; }\n"
        'char LICENSE[] SEC("license") = "GPL";\n')
    with pytest.raises(BPFError) as info:
        libbpf.BPFObject.open(xdp_build.build(src))
    message = str(info.value)
    assert "\n" not in message and message.startswith("loading BPF object unchecked-")
    assert "outside of the packet" in message and "outside of the packet" in info.value.log


def _frames(rng: random.Random) -> list:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Dot1Q, Ether
    from scapy.packet import Raw

    def mac():
        return ":".join(f"{rng.randrange(256):02x}" for _ in range(6))

    def ip():
        return ".".join(str(rng.randrange(1, 255)) for _ in range(4))

    frames = []
    for i in range(120):
        eth = Ether(src=mac(), dst=mac())
        payload = Raw(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
        kind = i % 6
        if kind == 0:
            pkt = eth / IP(src=ip(), dst=ip()) / UDP(sport=rng.randrange(65536), dport=80) / payload
        elif kind == 1:
            pkt = eth / IP(src=ip(), dst=ip(), ttl=rng.randrange(1, 256)) / TCP(flags="S") / payload
        elif kind == 2:
            pkt = eth / IP(src=ip(), dst=ip()) / ICMP() / payload
        elif kind == 3:
            pkt = eth / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP() / payload
        elif kind == 4:
            pkt = eth / ARP(psrc=ip(), pdst=ip())
        else:
            pkt = eth / Dot1Q(vlan=rng.randrange(1, 4095)) / IP(src=ip(), dst=ip()) / UDP() / payload
        frames.append(bytes(pkt))
    frames.append(bytes(Ether(src=mac(), dst=mac(), type=0x0800)))  # IPv4 type, no IP header: still sent back
    return frames


def _expected(frame: bytes, prepend: bool, tag: int, inner_value: int):
    """What echo.c must do to *frame*, computed with scapy (the independent reference)."""
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    eth = Ether(frame)
    if eth.type != 0x0800:
        return libbpf.XDP_PASS, frame, CNT_PASS
    out = bytes(Ether(dst=eth.src, src=eth.dst, type=eth.type) / Raw(frame[14:]))
    if prepend:
        out = struct.pack("!HH", tag & 0xFFFF, inner_value & 0xFFFF) + out
    return libbpf.XDP_TX, out, CNT_TX


@needs_bpf
def test_echo_matches_scapy_reference_and_counts_per_cpu(echo):
    prog = echo.program("xdp_echo")
    counters, config, inner0 = echo.map("counters"), echo.map("config"), echo.map("inner0")
    assert counters.percpu and counters.value_size == 8 and counters.max_entries == 4
    ncpu = libbpf.possible_cpus()
    assert ncpu >= os.cpu_count() >= 1
    inner0.update(0, u32(0x1234))
    rng = random.Random(20261130)
    expected_counts = [0] * 4
    with one_cpu() as cpu:
        for prepend, tag in ((False, 0), (True, 0xBEEF)):
            config.update(0, struct.pack("=II", int(prepend), tag))
            for frame in _frames(rng):
                want_ret, want_out, counter = _expected(frame, prepend, tag, 0x1234)
                got = libbpf.test_run(prog, frame)
                assert (got.retval, got.data.hex()) == (want_ret, want_out.hex())
                expected_counts[CNT_PACKETS] += 1
                expected_counts[counter] += 1
    for index, want in enumerate(expected_counts):
        per_cpu = u64s(counters.lookup_percpu(index))
        assert len(per_cpu) == ncpu
        assert per_cpu == [want if c == cpu else 0 for c in range(ncpu)], index
    assert expected_counts[CNT_TX] > 0 and expected_counts[CNT_PASS] > 0
    assert struct.unpack("=I", inner0.lookup(1))[0] == expected_counts[CNT_TX] // 2  # prepend runs read it

    counters.update(CNT_PACKETS, struct.pack("=Q", 0))  # per-CPU update writes every CPU
    assert u64s(counters.lookup_percpu(CNT_PACKETS)) == [0] * ncpu
    with pytest.raises(ValueError, match="per-CPU"):
        counters.lookup(0)


@needs_bpf
def test_map_elements_errors_and_iteration(echo):
    config, table = echo.map("config"), echo.map("table")
    assert config.lookup(0) == bytes(8)
    config.update(0, struct.pack("=II", 1, 2), libbpf.BPF_EXIST)
    assert config.lookup(0) == struct.pack("=II", 1, 2)
    assert config.lookup(5) is None  # out of range in an array: absent
    with pytest.raises(BPFError, match=r"^updating map config: Argument list too long$"):
        config.update(1, bytes(8))
    with pytest.raises(BPFError, match=r"^deleting from map table: Invalid argument$"):
        table.delete(0)
    with pytest.raises(ValueError, match="key of 2 bytes"):
        table.lookup(b"\0\0")
    assert list(config.keys()) == [u32(0)]

    with libbpf.Map.create(libbpf.BPF_MAP_TYPE_HASH, 4, 8, 16, name="scratch hash") as hashmap:
        assert libbpf.Map.from_fd(hashmap.fd).name == "scratch_hash"
        for k in (3, 1, 2):
            hashmap.update(k, struct.pack("=Q", k * 10))
        assert sorted(hashmap) == [u32(1), u32(2), u32(3)]
        with pytest.raises(BPFError, match="File exists"):
            hashmap.update(1, bytes(8), libbpf.BPF_NOEXIST)
        assert hashmap.delete(2) is True and hashmap.delete(2) is False
        assert hashmap.lookup(2) is None and hashmap.lookup(3) == struct.pack("=Q", 30)


@needs_bpf
def test_batch_update_of_65537_entries(echo):
    table = echo.map("table")
    assert (table.key_size, table.value_size, table.max_entries) == (4, 4, TABLE_SIZE)
    keys = array.array("I", range(TABLE_SIZE))
    values = array.array("I", ((i * 2654435761) & 0xFFFFFFFF for i in range(TABLE_SIZE)))

    start = time.perf_counter()
    table.update_batch(keys.tobytes(), values.tobytes())
    batch_s = time.perf_counter() - start
    got = array.array("I", b"".join(table.lookup(k) for k in range(TABLE_SIZE)))
    assert got == values
    assert sum(1 for _ in table.keys()) == TABLE_SIZE

    zeros = bytes(4)
    start = time.perf_counter()
    for k in range(TABLE_SIZE):
        table.update(k, zeros)
    loop_s = time.perf_counter() - start
    assert table.lookup(TABLE_SIZE - 1) == zeros
    print(f"\nfill {TABLE_SIZE} slots: update_batch {batch_s * 1e3:.1f} ms, one by one {loop_s * 1e3:.0f} ms")

    with pytest.raises(ValueError, match="update_batch needs"):
        table.update_batch(keys.tobytes(), values.tobytes()[:-4])


@needs_bpf
def test_batch_update_falls_back_where_the_kernel_cannot_batch():
    # a DEVMAP has no batch update (ENOTSUPP): update_batch goes element by element; ifindex 1 is lo
    with libbpf.Map.create(14, 4, 4, 4, name="devmap") as devmap:  # BPF_MAP_TYPE_DEVMAP
        devmap.update_batch(array.array("I", [0, 2, 3]).tobytes(), array.array("I", [1, 1, 1]).tobytes())
        assert [devmap.lookup(k) for k in range(4)] == [u32(1), None, u32(1), u32(1)]


@needs_bpf
def test_map_in_map_swap_is_seen_by_the_program(echo):
    prog = echo.program("xdp_echo")
    outer, inner0, config = echo.map("outer"), echo.map("inner0"), echo.map("config")
    config.update(0, struct.pack("=II", 1, 7))
    frame = bytes(range(12)) + b"\x08\x00" + bytes(46)
    inner0.update(0, u32(111))
    assert libbpf.test_run(prog, frame).data[:4] == struct.pack("!HH", 7, 111)

    fresh = outer.create_inner("gen1")
    assert (fresh.map_type, fresh.key_size, fresh.value_size, fresh.max_entries) == (
        inner0.map_type, inner0.key_size, inner0.value_size, inner0.max_entries)
    fresh.update(0, u32(222))
    outer.set_inner(0, fresh)
    assert struct.unpack("=I", outer.lookup(0))[0] == fresh.id  # user space reads an inner map's id
    fresh_hits_fd = os.dup(fresh.fd)
    fresh.close()  # the outer map keeps it alive
    assert libbpf.test_run(prog, frame).data[:4] == struct.pack("!HH", 7, 222)
    with libbpf.Map.from_fd(fresh_hits_fd, owned=True) as again:
        assert again.lookup(1) == u32(1)
    assert inner0.lookup(1) == u32(1)  # only the first run went through inner0

    with libbpf.Map.create(libbpf.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="wrong") as wrong:
        with pytest.raises(BPFError, match=r"^putting an inner map into map outer: Invalid argument$"):
            outer.set_inner(0, wrong)
    with pytest.raises(BPFError, match="no inner map template"):
        inner0.create_inner()


# -- interfaces -------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def inside(ns: lab_netns.Namespace):
    """Switch this thread into *ns* (libbpf's netlink calls and ifindexes are per network namespace)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(lab_netns.NETNS_DIR, ns.name), os.O_RDONLY)
    try:
        if _libc.setns(target, lab_netns.CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        _libc.setns(own, lab_netns.CLONE_NEWNET)
        os.close(target)
        os.close(own)


@pytest.fixture
def veth_lab(request):
    """Namespaces A and B joined by the veth pair efxa0 (in A), efxb0 (in B); deleted by finalizers."""
    a, b = lab_netns.Namespace("xdpa"), lab_netns.Namespace("xdpb")
    request.addfinalizer(a.delete)
    request.addfinalizer(b.delete)
    for ns in (a, b):
        ns.create()
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            ns.sysctl(key, 1)  # no neighbour discovery frames: the peer sees only what a test sends
    lab_netns.veth_pair(a, "efxa0", b, "efxb0")
    return a, b


def _ip_link(ns, dev) -> str:
    return ns.ip("-d", "link", "show", "dev", dev).stdout


@needs_bpf
@needs_lab
@pytest.mark.parametrize("mode, word", [("native", "xdp"), ("generic", "xdpgeneric")])
def test_attach_query_refuse_detach_on_veth(echo, veth_lab, mode, word):
    a, _ = veth_lab
    prog = echo.program("xdp_echo")
    pid = libbpf.prog_id(prog)
    with inside(a):
        ifindex = socket.if_nametoindex("efxa0")
        assert libbpf.xdp_query(ifindex) == 0
        libbpf.xdp_attach(ifindex, prog, mode)
        try:
            assert libbpf.xdp_query(ifindex) == pid and libbpf.xdp_query(ifindex, mode) == pid
            shown = _ip_link(a, "efxa0")
            assert re.search(rf" mtu \d+ {word} ", shown) and f"prog/xdp id {pid} " in shown
            for again in ("native", "generic"):
                with pytest.raises(BPFError) as info:
                    libbpf.xdp_attach(ifindex, echo.program("xdp_count_pass"), again)
                assert str(info.value).startswith("XDP attach on efxa0 (ifindex ")
                assert f"(program id {pid} is already attached; detach it first)" in str(info.value)
            assert libbpf.xdp_query(ifindex) == pid
        finally:
            libbpf.xdp_detach(ifindex, mode)
        assert libbpf.xdp_query(ifindex) == 0
        assert "prog/xdp" not in _ip_link(a, "efxa0")


#: how a kernel refuses BPF_F_TEST_XDP_LIVE_FRAMES (some answer EPERM even to root with every capability)
LIVE_FRAMES_REFUSALS = (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP)


def _live_frames_refusal(exc: BPFError, prog: int, frame: bytes):
    """The skip reason when *exc* is the kernel refusing the live-frames flag itself, else None: one of
    LIVE_FRAMES_REFUSALS from the live-frames test run, while the same program runs the same frame without
    the flag (that run failing fails the test)."""
    if exc.errno not in LIVE_FRAMES_REFUSALS or not str(exc).startswith("live-frames test run on "):
        return None
    libbpf.test_run(prog, frame)
    return f"BPF_F_TEST_XDP_LIVE_FRAMES refused by this kernel: {errno.errorcode[exc.errno]} ({exc})"


@needs_bpf
@needs_lab
def test_live_frames_cross_the_veth(echo, veth_lab):
    """echo.c as a traffic generator: XDP_TX out of efxa0 reaches xdp_count_pass on the peer efxb0. Where
    the kernel refuses the live-frames flag (tried here, not guessed from its version) the test skips with
    the kernel's answer; bench/live.py sends with trafgen there."""
    a, b = veth_lab
    counters = echo.map("counters")
    frames = 1000
    frame = bytes.fromhex("020000000002" "020000000001" "0800") + bytes(50)
    with inside(b):
        peer = socket.if_nametoindex("efxb0")
        libbpf.xdp_attach(peer, echo.program("xdp_count_pass"), "native")
    try:
        with inside(a):
            ifindex = socket.if_nametoindex("efxa0")
            try:
                libbpf.live_frames(echo.program("xdp_echo"), frame, frames, ifindex)
            except BPFError as exc:
                refused = _live_frames_refusal(exc, echo.program("xdp_echo"), frame)
                if refused is None:
                    raise
                pytest.skip(refused)
        deadline = time.monotonic() + 5
        while sum(u64s(counters.lookup_percpu(CNT_SEEN))) < frames and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(u64s(counters.lookup_percpu(CNT_TX))) == frames
        assert sum(u64s(counters.lookup_percpu(CNT_SEEN))) == frames
    finally:
        with inside(b):
            libbpf.xdp_detach(peer, "native")


@needs_bpf
def test_closing_the_object_unloads_it(echo_path):
    obj = libbpf.BPFObject.open(echo_path)
    pid = libbpf.prog_id(obj.program("xdp_echo"))
    shown = subprocess.run(["bpftool", "prog", "show", "id", str(pid)], capture_output=True, text=True)
    assert shown.returncode == 0 and "xdp_echo" in shown.stdout
    obj.close()
    obj.close()
    shown = subprocess.run(["bpftool", "prog", "show", "id", str(pid)], capture_output=True, text=True)
    assert shown.returncode != 0
    with pytest.raises(BPFError, match="is closed"):
        obj.program("xdp_echo")


@needs_bpf
def test_open_and_query_errors_are_one_line(tmp_path):
    not_elf = tmp_path / "not-elf.o"
    not_elf.write_text("garbage\n")
    with pytest.raises(BPFError, match=r"^opening BPF object not-elf\.o: BPF object format invalid \(.*\)$"):
        libbpf.BPFObject.open(not_elf)
    with pytest.raises(BPFError, match=r"^opening BPF object missing\.o: No such file or directory"):
        libbpf.BPFObject.open(tmp_path / "missing.o")
    with pytest.raises(BPFError, match=r"^XDP query on ifindex 999999: No such device$"):
        libbpf.xdp_query(999999)
    fd = libbpf.load_verdict_program(libbpf.XDP_DROP)
    try:
        retval, out, _ = libbpf.test_run(fd, bytes(60))
        assert (retval, out) == (libbpf.XDP_DROP, bytes(60))
    finally:
        os.close(fd)


def test_available_gives_a_reason():
    ok, reason = libbpf.available()
    assert (ok and reason == "") or (not ok and reason and "\n" not in reason)
