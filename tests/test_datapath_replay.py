"""``encapfwd replay`` / ``explain`` end to end, the shipped sample, and tshark over the output.

tshark (Debian package) is the independent decoder: with IP/TCP/UDP checksum validation on it must report
no malformed packet, no bad checksum, no warning, and the expected protocol stack per packet.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "examples" / "sample.pcap"
CONFIG = ROOT / "examples" / "encapfwd.toml"
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (Debian package tshark)")


def encapfwd(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
    return subprocess.run([str(BIN / "encapfwd"), *args], capture_output=True, text=True, env=env, cwd=cwd, check=False,
                          timeout=120)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "out.pcap"
    proc = encapfwd("--config", str(CONFIG), "replay", str(SAMPLE), str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_sample_files_are_regenerated_byte_for_byte(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample.py"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sample.pcap").read_bytes() == SAMPLE.read_bytes()
    assert (tmp_path / "encapfwd.toml").read_text() == CONFIG.read_text()


def test_replay_summary(replayed):
    _, summary = replayed
    assert summary["frames_in"] == 273
    assert summary["forwarded"] + summary["dropped"] == summary["frames_in"]
    drops = summary["drops"]
    for reason in ("not-ip", "vlan-tagged", "not-cluster", "not-port", "ttl-exceeded", "bad-checksum",
                   "frag-needed"):
        assert drops.get(reason, 0) >= 1, (reason, drops)
    methods = {}
    for row in summary["servers"].values():
        methods[row["method"]] = methods.get(row["method"], 0) + row["packets"]
    assert methods.get("mac") and methods.get("ipip") and methods.get("gre")
    assert summary["icmp_sent"] == 2  # time exceeded + fragmentation needed
    assert summary["frames_out"] >= summary["forwarded"] + summary["icmp_sent"]


def test_replay_text_summary(tmp_path):
    proc = encapfwd("--config", str(CONFIG), "replay", str(SAMPLE), str(tmp_path / "o.pcap"))
    assert proc.returncode == 0, proc.stderr
    assert "replayed 273 frames" in proc.stdout
    assert "10.0.9.9@80@10.0.2.10" in proc.stdout and "ttl-exceeded" in proc.stdout


def _tshark_fields(path, *fields):
    cmd = [TSHARK, "-r", str(path), "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
           "-o", "udp.check_checksum:TRUE", "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a",
           "-E", "aggregator=,"]
    for f in fields:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


@needs_tshark
def test_tshark_reads_the_output_cleanly(replayed):
    out, summary = replayed
    rows = _tshark_fields(out, "frame.number", "frame.protocols", "_ws.expert.severity", "ip.checksum.status",
                          "tcp.checksum.status", "udp.checksum.status", "_ws.malformed", "eth.dst", "ip.dst")
    assert len(rows) == summary["frames_out"]
    stacks = {}
    for number, protocols, severity, ipck, tcpck, udpck, malformed, eth_dst, ip_dst in rows:
        assert not malformed, (number, protocols)
        assert "0" not in ipck.split(",") and "0" not in tcpck.split(",") and "0" not in udpck.split(","), (
            number, protocols, ipck, tcpck, udpck)  # 0 = bad checksum
        levels = [int(s) for s in severity.split(",") if s]
        assert all(level < 6291456 for level in levels), (number, protocols, severity)  # below "warning"
        outer = ip_dst.split(",")[0]
        if outer == "10.0.3.10" or outer == "10.0.5.11":
            assert protocols.startswith("eth:ethertype:ip:ip:") or "ip:data" in protocols, (number, protocols)
        if outer in ("10.0.4.10", "10.0.2.12", "10.0.5.10"):
            assert protocols.startswith("eth:ethertype:ip:gre:ip") or "ip:data" in protocols, (number, protocols)
        stacks[protocols] = stacks.get(protocols, 0) + 1
    for stack in ("eth:ethertype:ip:tcp", "eth:ethertype:ip:ip:tcp", "eth:ethertype:ip:gre:ip:tcp",
                  "eth:ethertype:ipv6:tcp", "eth:ethertype:ip:icmp:ip:tcp"):
        assert stacks.get(stack), (stack, stacks)


@needs_tshark
def test_tshark_sees_gre_key_and_tunnel_fields(replayed):
    out, _ = replayed
    rows = _tshark_fields(out, "ip.dst", "gre.key", "gre.proto", "ip.proto", "ip.ttl")
    keyed = [r for r in rows if r[0].startswith("10.0.4.10")]
    assert keyed and all(r[1] == "0x000004d2" or r[1] == "1234" for r in keyed), keyed[:3]
    assert all(r[2] == "0x0800" for r in keyed)
    assert all(r[4].split(",")[0] == "64" for r in keyed)


def test_pcapng_input_gives_the_same_output(tmp_path, replayed):
    from scapy.utils import PcapNgWriter, RawPcapReader

    ng = tmp_path / "sample.pcapng"
    writer = PcapNgWriter(str(ng))
    from scapy.layers.l2 import Ether

    for data, meta in RawPcapReader(str(SAMPLE)):
        pkt = Ether(data)
        pkt.time = meta.sec + meta.usec / 1e6
        writer.write(pkt)
    writer.close()
    out = tmp_path / "ng-out.pcap"
    proc = encapfwd("--config", str(CONFIG), "replay", str(ng), str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == replayed[0].read_bytes()


def test_garbage_frames_are_counted_not_raised(tmp_path):
    from encapfwd.replay.capture import read_frames
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    rnd = random.Random(5)
    sample = [f for _, f in read_frames(SAMPLE)]
    frames = []
    for i in range(400):
        f = bytearray(rnd.choice(sample))
        for _ in range(rnd.randint(1, 3)):
            op = rnd.random()
            if op < 0.3:
                del f[rnd.randint(0, len(f)):]
            elif f:
                f[rnd.randrange(len(f))] = rnd.randrange(256)
        frames.append(bytes(f) if i % 5 else bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 80))))
    bad = tmp_path / "bad.pcap"
    wrpcap(str(bad), [Ether(f) if len(f) >= 14 else Raw(f) for f in frames], linktype=1)
    proc = encapfwd("--config", str(CONFIG), "replay", str(bad), str(tmp_path / "o.pcap"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["frames_in"] == 400
    assert summary["forwarded"] + summary["dropped"] == 400
    assert "internal-error" not in summary["drops"]


def test_user_errors_are_one_line(tmp_path):
    notpcap = tmp_path / "x.pcap"
    notpcap.write_bytes(b"hello world, not a capture at all")
    proc = encapfwd("--config", str(CONFIG), "replay", str(notpcap), str(tmp_path / "o.pcap"))
    assert proc.returncode != 0 and "not a pcap" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = encapfwd("--config", str(tmp_path / "missing.toml"), "replay", str(SAMPLE), str(tmp_path / "o.pcap"))
    assert proc.returncode != 0 and "missing.toml" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = encapfwd("--config", str(CONFIG), "replay", str(tmp_path / "nope.pcap"), str(tmp_path / "o.pcap"))
    assert proc.returncode != 0 and "nope.pcap" in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(CONFIG.read_text().replace('gatewaymac = "02:00:00:00:00:fe"\n', ""))
    proc = encapfwd("--config", str(broken), "replay", str(SAMPLE), str(tmp_path / "o.pcap"))
    assert proc.returncode != 0 and "gatewaymac" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_raw_ip_and_linux_cooked_captures_replay_like_ethernet(tmp_path):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import CookedLinux, CookedLinuxV2
    from scapy.utils import wrpcap

    pkt = IP(src="198.51.100.7", dst="10.0.9.9", ttl=20) / TCP(sport=4000, dport=80, flags="S")
    captures = {
        "raw.pcap": ([pkt], 101),
        "sll.pcap": ([CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\x02\x00\x00\x00\x00\xaa")
                      / pkt], 113),
        "sll2.pcap": ([CookedLinuxV2(pkttype=0, lladdrtype=1, lladdrlen=6,
                                     src=b"\x02\x00\x00\x00\x00\xaa") / pkt], 276),
    }
    for name, (packets, linktype) in captures.items():
        path = tmp_path / name
        wrpcap(str(path), packets, linktype=linktype)
        proc = encapfwd("--config", str(CONFIG), "replay", str(path), str(tmp_path / ("out-" + name)), "--json")
        assert proc.returncode == 0, (name, proc.stderr)
        summary = json.loads(proc.stdout)
        assert summary["forwarded"] == 1, (name, summary)


def test_unsupported_link_type_is_refused(tmp_path):
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    wifi = tmp_path / "wifi.pcap"
    wrpcap(str(wifi), [Raw(b"\x00" * 40)], linktype=105)
    proc = encapfwd("--config", str(CONFIG), "replay", str(wifi), str(tmp_path / "o.pcap"))
    assert proc.returncode != 0 and "link type 105" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_progress_bar_goes_to_stderr(tmp_path):
    from click.testing import CliRunner
    from encapfwd.cli.replay import replay_command

    runner = CliRunner()
    result = runner.invoke(replay_command, [str(SAMPLE), str(tmp_path / "o.pcap"), "--progress", "--json"],
                           obj={"config_path": str(CONFIG)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["frames_in"] == 273
    assert "replaying" in result.stderr


def test_explain_shows_before_and_after():
    proc = encapfwd("--config", str(CONFIG), "explain", str(SAMPLE), "--index", "0")
    assert proc.returncode == 0, proc.stderr
    assert "=> forwarded to 10.0.9.9@80@" in proc.stdout
    assert proc.stdout.count("###[ Ethernet ]###") == 2 and "###[ TCP ]###" in proc.stdout
    from encapfwd.replay.capture import read_frames

    index = next(i for i, (_, f) in enumerate(read_frames(SAMPLE)) if f[12:14] == b"\x08\x06")
    arp = encapfwd("--config", str(CONFIG), "explain", str(SAMPLE), "--index", str(index))
    assert arp.returncode == 0 and "=> dropped: not-ip" in arp.stdout, arp.stdout[-500:]
    past = encapfwd("--config", str(CONFIG), "explain", str(SAMPLE), "--index", "100000")
    assert past.returncode != 0 and "273 frames" in past.stderr


def test_cli_module_does_not_import_scapy():
    code = "import sys, encapfwd.cli.replay, encapfwd.datapath.dispatcher, encapfwd.replay.capture; " \
           "sys.exit(1 if any(m.startswith('scapy') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


def test_frames_for_another_mac_are_not_forwarded_unless_any_mac(tmp_path):
    """Replay forwards what a live dispatcher would: frames of an Ethernet capture sent to another host's
    MAC, and broadcast/multicast ones to a cluster address, are ``not-for-us``; ``--any-mac`` takes every
    unicast frame of a capture taken elsewhere as sent to the dispatcher (broadcasts stay as they are)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import CookedLinux, Ether
    from scapy.utils import wrpcap

    me, other = "02:00:00:00:00:01", "02:00:00:00:00:77"  # the executor mac of examples/encapfwd.toml
    pkt = IP(src="198.51.100.7", dst="10.0.9.9", ttl=20) / TCP(sport=4000, dport=80, flags="S")
    frames = [Ether(src="02:00:00:00:00:aa", dst=dst) / pkt
              for dst in (me, other, other, "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:05")]
    path = tmp_path / "elsewhere.pcap"
    wrpcap(str(path), frames)
    proc = encapfwd("--config", str(CONFIG), "replay", str(path), str(tmp_path / "o.pcap"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["forwarded"] == 1 and summary["drops"] == {"not-for-us": 4}, summary
    text = encapfwd("--config", str(CONFIG), "replay", str(path), str(tmp_path / "o.pcap"))
    assert "4 frames were not sent to the dispatcher's MAC" in text.stdout and "--any-mac" in text.stdout
    proc = encapfwd("--config", str(CONFIG), "replay", str(path), str(tmp_path / "a.pcap"), "--json", "--any-mac")
    summary = json.loads(proc.stdout)
    assert summary["forwarded"] == 3 and summary["drops"] == {"not-for-us": 2} and summary["any_mac"], summary
    explain = encapfwd("--config", str(CONFIG), "explain", str(path), "--index", "1")
    assert "=> dropped: not-for-us" in explain.stdout, explain.stdout[-500:]
    explain = encapfwd("--config", str(CONFIG), "explain", str(path), "--index", "1", "--any-mac")
    assert "=> forwarded to 10.0.9.9@80@" in explain.stdout, explain.stdout[-500:]
    # a cooked capture says where a frame went: to this host (and outgoing) forwarded, the others not
    cooked = tmp_path / "cooked.pcap"
    wrpcap(str(cooked), [CookedLinux(pkttype=kind, lladdrtype=1, lladdrlen=6, src=b"\x02\x00\x00\x00\x00\xaa") / pkt
                         for kind in (0, 1, 2, 3, 4)], linktype=113)
    proc = encapfwd("--config", str(CONFIG), "replay", str(cooked), str(tmp_path / "c.pcap"), "--json")
    summary = json.loads(proc.stdout)
    assert summary["forwarded"] == 2 and summary["drops"] == {"not-for-us": 3}, summary
