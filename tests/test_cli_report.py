"""`server report` joins configuration with counters; the counters agree with scapy's reading of the output."""

import json
from collections import Counter

from conftest import ROOT, run_cli

CONFIG = ROOT / "examples" / "encapfwd.toml"
SAMPLE = ROOT / "examples" / "sample.pcap"


def server_of(frame, servers):
    """Which configured server scapy says *frame* goes to (None for ICMP answers to clients)."""
    from scapy.all import IP, IPv6, Ether

    if IP in frame and frame[IP].proto in (4, 47):
        if frame[IP].frag:  # a non-first fragment of an outer packet: counted once, with its first piece
            return "fragment"
        return frame[IP].dst
    for address, mac in servers.items():
        if mac and frame[Ether].dst == mac and (IP in frame or IPv6 in frame):
            return address
    return None


def test_report_counters_match_the_packets_scapy_sees(tmp_path):
    from scapy.all import rdpcap
    import tomllib

    out = tmp_path / "out.pcap"
    summary = run_cli("--config", str(CONFIG), "replay", "--json", str(SAMPLE), str(out), check=0).stdout
    saved = tmp_path / "summary.json"
    saved.write_text(summary)
    report = json.loads(run_cli("--config", str(CONFIG), "server", "report", "--json", "--counters",
                                str(saved), check=0).stdout)
    macs = {}
    for cluster in tomllib.loads(CONFIG.read_text())["clusters"]:
        for port in cluster["ports"]:
            for server in port["servers"]:
                macs[server["address"]] = server.get("mac")
    seen = Counter(server_of(frame, macs) for frame in rdpcap(str(out)))
    per_address = Counter()
    for row in report["servers"]:
        per_address[row["server"].rsplit("@", 1)[1]] += row["packets"]
    assert sum(per_address.values()) > 200
    for address, packets in per_address.items():
        assert packets == seen[address], (address, packets, seen)
    table = run_cli("--config", str(CONFIG), "server", "report", "--counters", str(saved), check=0).stdout
    assert "flow table:" in table and "dropped not-cluster: 1" in table
