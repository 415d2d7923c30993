"""Pieces of the live engine that need neither root nor namespaces: the socket filter program, the
checksum completion for offloaded frames, report merging, the control-socket client and the CLI surface."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import pytest
from encapfwd.engines import afpacket, live


def _run_bpf(program, frame: bytes, pkttype: int = 0) -> int:
    """A tiny classic-BPF interpreter for the instructions cluster_filter emits."""
    pc = 0
    acc = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == afpacket._LD_B_ABS:
            acc = pkttype if k == (afpacket.SKF_AD_OFF + afpacket.SKF_AD_PKTTYPE) & 0xFFFFFFFF else frame[k]
        elif code == afpacket._LD_H_ABS:
            acc = struct.unpack_from("!H", frame, k)[0]
        elif code == afpacket._LD_W_ABS:
            if k + 4 > len(frame):
                return 0
            acc = struct.unpack_from("!I", frame, k)[0]
        elif code == afpacket._JEQ_K:
            pc += jt if acc == k else jf
        elif code == afpacket._JA:
            pc += k
        elif code == afpacket._RET_K:
            return k
        pc += 1


def _frame4(dst: str, ethertype: int = 0x0800) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton("192.0.2.1"), socket.inet_aton(dst)
    )
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype) + ip + bytes(8)


def _frame6(dst: str) -> bytes:
    ip = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        8,
        17,
        64,
        socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ip + bytes(8)


def test_filter_accepts_only_cluster_addresses_for_this_host():
    program = afpacket.cluster_filter(["10.0.9.1", "10.0.9.2", "2001:db8::9"])
    assert _run_bpf(program, _frame4("10.0.9.1")) > 0
    assert _run_bpf(program, _frame4("10.0.9.2")) > 0
    assert _run_bpf(program, _frame4("10.0.9.3")) == 0
    assert _run_bpf(program, _frame4("10.0.9.1"), pkttype=afpacket.PACKET_OUTGOING) == 0
    assert _run_bpf(program, _frame4("10.0.9.1"), pkttype=3) == 0  # PACKET_OTHERHOST
    assert _run_bpf(program, _frame4("10.0.9.1", ethertype=0x0806)) == 0
    assert _run_bpf(program, _frame6("2001:db8::9")) > 0
    assert _run_bpf(program, _frame6("2001:db8::8")) == 0


def test_filter_scales_to_many_addresses_and_refuses_too_many():
    many = [f"10.{i // 256}.{i % 256}.1" for i in range(2000)]
    program = afpacket.cluster_filter(many)
    assert _run_bpf(program, _frame4("10.7.207.1")) > 0
    assert _run_bpf(program, _frame4("10.7.207.2")) == 0
    with pytest.raises(ValueError):
        afpacket.cluster_filter([f"10.{i // 256}.{i % 256}.1" for i in range(2100)])


def test_complete_checksum_matches_scapy():
    scapy = pytest.importorskip("scapy.all")
    for l4 in (scapy.TCP(sport=1234, dport=80, flags="S"), scapy.UDP(sport=5, dport=53)):
        good = bytes(scapy.Ether() / scapy.IP(src="10.0.1.2", dst="10.0.9.1") / l4 / b"hello world")
        field = 14 + 20 + (16 if isinstance(l4, scapy.TCP) else 6)
        partial = bytearray(good)
        partial[field : field + 2] = b"\x12\x34"  # what an offloading sender leaves there
        assert live.complete_checksum(bytes(partial)) == good
    good6 = bytes(scapy.Ether() / scapy.IPv6(src="2001:db8::1", dst="2001:db8::9") / scapy.TCP() / b"x")
    partial6 = bytearray(good6)
    partial6[14 + 40 + 16 : 14 + 40 + 18] = b"\x00\x00"
    assert live.complete_checksum(bytes(partial6)) == good6
    assert live.complete_checksum(b"\x00" * 20) == b"\x00" * 20  # never raises


def test_merge_reports_sums_numbers():
    a = {"servers": {"s": {"packets": 1, "method": "mac"}}, "drops": {"x": 1}, "flows": {"flows": 2}}
    b = {"servers": {"s": {"packets": 2, "method": "mac"}}, "drops": {"y": 3}, "flows": {"flows": 5}}
    merged = live.merge_reports([a, b])
    assert merged == {
        "servers": {"s": {"packets": 3, "method": "mac"}},
        "drops": {"x": 1, "y": 3},
        "flows": {"flows": 7},
    }


def test_query_control_without_dispatcher_is_oserror(tmp_path):
    with pytest.raises(OSError):
        live.query_control(str(tmp_path / "nothing.sock"))


def test_run_module_imports_no_scapy_or_pyroute2():
    code = (
        "import sys, encapfwd.cli_run, encapfwd.engines.live, encapfwd.lab.topology; "
        "print('scapy' in sys.modules, 'pyroute2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_run_help_documents_options(cli):
    proc = cli("run", "--help", check=0)
    for word in ("--interface", "--workers", "--control", "SIGHUP", "blackhole"):
        assert word in proc.stdout
