"""``encapfwd replay --engine xdp``: the sample capture through the loaded XDP program (BPF_PROG_TEST_RUN)
with the Python dispatcher as its slow path gives what the Python engine gives, judged by scapy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample.pcap"
CONFIG = ROOT / "examples" / "encapfwd.toml"
ENCAPFWD = str(Path(sys.executable).with_name("encapfwd"))


def _replay(tmp_path, engine, *prefix):
    out = tmp_path / f"{engine}.pcap"
    proc = subprocess.run([*prefix, ENCAPFWD, "--config", str(CONFIG), "replay", str(SAMPLE), str(out), "--json",
                           "--engine", engine], capture_output=True, text=True, timeout=120)
    return proc, out


@pytest.fixture
def bpf():
    if os.geteuid() != 0:
        pytest.skip("BPF needs root (CAP_BPF and CAP_NET_ADMIN)")
    from encapfwd.xdp.libbpf import available

    ok, why = available()
    if not ok:
        pytest.skip(why)


def _normalised(frame):
    """The frame with the outer IPv4 identification and checksum of a DF-clear tunnel packet cleared (each
    engine numbers those itself), after checking that checksum with scapy."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    if IP in pkt and pkt[IP].proto in (4, 47, 17) and not pkt[IP].flags.DF:
        ip = pkt[IP]
        fresh = IP(bytes(ip))
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == ip.chksum, "outer header checksum wrong"
        ip.id = 0
        ip.chksum = 0
    return bytes(pkt)


@pytest.mark.parametrize("engine", ["xdp", "tc"])
def test_replay_engine_xdp_matches_python(tmp_path, bpf, engine):
    """Also ``--engine tc``: the TC build of the same program, each frame a socket buffer."""
    from scapy.utils import rdpcap

    py, py_out = _replay(tmp_path, "python")
    xdp, xdp_out = _replay(tmp_path, engine)
    assert py.returncode == 0, py.stderr
    assert xdp.returncode == 0, xdp.stderr
    a, b = json.loads(py.stdout), json.loads(xdp.stdout)
    for key in ("frames_in", "frames_out", "forwarded", "dropped", "icmp_sent", "drops", "servers"):
        assert a[key] == b[key], key
    assert a["engines"] == {"xdp": 0, "python": a["frames_in"]}
    assert b["engines"][engine] + b["engines"]["python"] == b["frames_in"]
    assert b["engines"][engine] > b["frames_in"] * 0.8, b["engines"]  # the kernel did most of the work
    frames_a = [bytes(p) for p in rdpcap(str(py_out))]
    frames_b = [bytes(p) for p in rdpcap(str(xdp_out))]
    assert len(frames_a) == len(frames_b) == a["frames_out"]
    differ = [i for i, (x, y) in enumerate(zip(frames_a, frames_b)) if x != y]
    for i in differ:
        assert _normalised(frames_a[i]) == _normalised(frames_b[i]), f"frame {i} differs beyond the outer ID"


def test_replay_engine_xdp_output_dissects_cleanly(tmp_path, bpf):
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (./dev installs it)")
    proc, out = _replay(tmp_path, "xdp")
    assert proc.returncode == 0, proc.stderr
    expert = subprocess.run(["tshark", "-r", str(out), "-o", "ip.check_checksum:TRUE", "-z", "expert,warn", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert expert.returncode == 0, expert.stderr
    assert "Malformed" not in expert.stdout and "Bad checksum" not in expert.stdout, expert.stdout


def test_replay_engine_xdp_without_bpf_is_one_line(tmp_path):
    """Without the capabilities BPF needs (dropped from the bounding set), one error line, exit 1."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop capabilities")
    proc, out = _replay(tmp_path, "xdp", "setpriv", "--bounding-set", "-bpf,-sys_admin,-perfmon,-net_admin")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--engine xdp" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_replay_engine_xdp_agrees_on_frames_for_other_macs(tmp_path, bpf):
    """The sample with every third frame sent to another host's MAC and every fifth to a broadcast or
    multicast one: both engines forward the same frames and drop the same ones (``not-for-us``), and with
    ``--any-mac`` both forward the other host's frames again."""
    from encapfwd.replay.capture import PcapWriter, read_frames

    path = tmp_path / "mixed.pcap"
    with PcapWriter(path) as writer:
        for i, (ts, frame) in enumerate(read_frames(SAMPLE)):
            if len(frame) >= 14 and i % 3 == 1:
                frame = bytes.fromhex("020000000077") + frame[6:]
            elif len(frame) >= 14 and i % 5 == 2:
                frame = (b"\xff" * 6 if i % 2 else bytes.fromhex("01005e000001")) + frame[6:]
            writer.write(ts, frame)
    for extra in ((), ("--any-mac",)):
        runs = {}
        for engine in ("python", "xdp"):
            proc = subprocess.run([ENCAPFWD, "--config", str(CONFIG), "replay", str(path),
                                   str(tmp_path / f"{engine}.pcap"), "--json", "--engine", engine, *extra],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            runs[engine] = json.loads(proc.stdout)
        a, b = runs["python"], runs["xdp"]
        for key in ("frames_in", "frames_out", "forwarded", "dropped", "icmp_sent", "drops", "servers"):
            assert a[key] == b[key], (extra, key, a[key], b[key])
        assert a["drops"].get("not-for-us", 0) >= (10 if extra else 80), a["drops"]
