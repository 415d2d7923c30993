"""THE PROOF for MAC forwarding back-end setup: a network namespace's own kernel is the back-end server.

The generated Linux script runs verbatim in the server namespace; the dispatcher's MAC-forwarded SYN for
the cluster address (built by the mac plugin's data path) gets a SYN-ACK from the VIP straight to the
client; the server answers no ARP for the VIP; ``--undo`` restores everything and silences it.

    test process ──AF_PACKET── efwd0 (192.0.2.1, 2001:db8::1) ══ efws0 (192.0.2.10, 2001:db8::10) server ns
"""

from __future__ import annotations

import ipaddress
import random
import subprocess
import sys
import time

import pytest
from encapfwd.lab import netns as lab_netns

REASON = lab_netns.lab_unavailable_reason(("ip", "ethtool"))
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"namespace lab unavailable: {REASON}")

DISPATCHER, DISPATCHER6 = "192.0.2.1", "2001:db8::1"
SERVER, SERVER6 = "192.0.2.10", "2001:db8::10"
CLIENT, CLIENT6 = "198.51.100.7", "2001:db8:7::7"
VIP, VIP6 = "203.0.113.80", "2001:db8:80::80"

SNAPSHOT = r"""
for k in all/arp_ignore all/arp_announce all/rp_filter lo/rp_filter; do echo "$k=$(cat /proc/sys/net/ipv4/conf/$k)"; done
ip -o addr show dev lo | sed 's/ valid_lft.*//; s/\\//'
ip -o link show dev lo | sed 's/ link\/.*//'
echo "state: $(find "$ENCAPFWD_STATE_DIR" -type f 2>/dev/null | sort | tr '\n' ' ')"
"""

LISTENER = r"""
import socket, sys, time
socks = []
for family, any_address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((any_address, 80))
    s.listen(128)
    socks.append(s)
print("listening", flush=True)
time.sleep(600)
"""


def _config(vip, server, lab):
    from encapfwd import config as cfg

    return cfg.loads(
        f'[executor]\nnfa = "{DISPATCHER}"\nmac = "{lab.dmac}"\nnetworks = ["192.0.2.0/24", "2001:db8::/64"]\n'
        f'[[clusters]]\naddress = "{vip}"\n[[clusters.ports]]\nnumber = 80\n'
        f'[[clusters.ports.servers]]\naddress = "{server}"\nmac = "{lab.smac}"\nencapforward = false\n'
    )


def _script(tmp_path, config, vip, server, *extra):
    from click.testing import CliRunner
    from encapfwd import config as cfg
    from encapfwd.cli import cli

    path = tmp_path / "encapfwd.toml"
    path.write_text(cfg.dumps(config))
    result = CliRunner().invoke(cli, ["--config", str(path), "backend-setup", f"{vip}@80@{server}",
                                      "--os", "linux", *extra])
    assert result.exit_code == 0, result.output
    return result.output


class Lab:
    def __init__(self, d, s, sock, registry, state):
        self.d, self.s, self.sock, self.registry, self.state = d, s, sock, registry, state
        self.dmac = d.mac("efwd0")
        self.smac = s.mac("efws0")
        self.dispatchers = {}

    def sh(self, script):
        proc = self.s.run(["sh", "-c", script], check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                                 "ENCAPFWD_STATE_DIR": self.state})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def snapshot(self):
        return self.sh(SNAPSHOT)

    def _drain(self):
        while True:
            try:
                self.sock.recv(65535)
            except OSError:
                return

    def forward(self, config, vip, client, tcp):
        """The frames the dispatcher sends for the client's packet: the whole Dispatcher when it exists,
        else the mac forwarder's compiled transform."""
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import Ether

        v6 = ":" in vip
        try:
            from encapfwd.datapath.dispatcher import Dispatcher
        except ImportError:
            from encapfwd.hookspecs import Egress

            server = config.cluster(vip).ports[0].servers[0]
            egress = Egress(src_mac=self.dmac, dst_mac=self.smac, outer_src=None, outer_dst=server.address, ttl=64,
                            cluster=ipaddress.ip_address(vip), mtu=1500)
            transform = self.registry.hook.encapfwd_build_transform(forwarder="mac", server=server, egress=egress)
            inner = (IPv6(src=client, dst=vip, hlim=63) if v6 else IP(src=client, dst=vip, ttl=63)) / tcp
            return [transform(bytes(inner))]
        dispatcher = self.dispatchers.get(config)
        if dispatcher is None:
            dispatcher = self.dispatchers[config] = Dispatcher(config, self.registry)
        inner = (IPv6(src=client, dst=vip, hlim=64) if v6 else IP(src=client, dst=vip, ttl=64)) / tcp
        out = dispatcher.process(bytes(Ether(src="02:00:00:00:00:fe", dst=self.dmac) / inner), time.monotonic())
        assert len(out) == 1, dispatcher.drops
        return out

    def probe(self, config, vip, client, wait=1.0):
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import Ether

        sport, seq = random.randint(20000, 60000), random.randint(1, 2**31)
        tcp = TCP(sport=sport, dport=80, flags="S", seq=seq, window=64240)
        v6 = ":" in vip
        self._drain()
        for frame in self.forward(config, vip, client, tcp):
            assert Ether(frame).dst == self.smac  # MAC forwarding: to the server's MAC, IP untouched
            self.sock.send(frame)
        deadline = time.monotonic() + wait
        layer = IPv6 if v6 else IP
        while time.monotonic() < deadline:
            try:
                pkt = Ether(self.sock.recv(65535))
            except OSError:
                continue
            if pkt.src.lower() != self.smac or layer not in pkt or TCP not in pkt:
                continue
            ip, reply = pkt[layer], pkt[TCP]
            if (ip.src == vip and ip.dst == client and reply.dport == sport and reply.flags & 0x12 == 0x12
                    and reply.ack == seq + 1):
                return True
        return False

    def arp_answered(self, address, wait=0.5):
        from scapy.layers.l2 import ARP, Ether

        self._drain()
        self.sock.send(bytes(Ether(src=self.dmac, dst="ff:ff:ff:ff:ff:ff")
                             / ARP(op=1, hwsrc=self.dmac, psrc=DISPATCHER, pdst=address)))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                pkt = Ether(self.sock.recv(65535))
            except OSError:
                continue
            if ARP in pkt and pkt[ARP].op == 2 and pkt[ARP].psrc == address:
                return True
        return False


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from encapfwd.lab import Namespace, packet_socket, veth_pair
    from encapfwd.plugins import get_plugin_manager

    registry = get_plugin_manager()
    if "mac" not in registry.forwarders:
        pytest.skip("forwarder plugin mac not installed")
    state = str(tmp_path_factory.mktemp("encapfwd-state"))
    with Namespace("macd") as d, Namespace("macs") as s:
        veth_pair(d, "efwd0", s, "efws0")
        d.ip("addr", "add", f"{DISPATCHER}/24", "dev", "efwd0")
        d.ip("-6", "addr", "add", f"{DISPATCHER6}/64", "dev", "efwd0", "nodad")
        d.ip("route", "add", "blackhole", f"{CLIENT}/32")
        d.ip("-6", "route", "add", "blackhole", f"{CLIENT6}/128")
        s.ip("addr", "add", f"{SERVER}/24", "dev", "efws0")
        s.ip("-6", "addr", "add", f"{SERVER6}/64", "dev", "efws0", "nodad")
        s.ip("route", "add", "default", "via", DISPATCHER)
        s.ip("-6", "route", "add", "default", "via", DISPATCHER6)
        s.ethtool_offload("efws0", tx=False)  # complete checksums in what the server sends
        for key in ("all", "default"):
            s.sysctl(f"net.ipv4.conf.{key}.rp_filter", 1)  # strict, like a hardened distribution
        listener = s.popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline().strip() == "listening"
            sock = packet_socket(d, "efwd0", timeout=0.05)
            try:
                yield Lab(d, s, sock, registry, state)
            finally:
                sock.close()
        finally:
            listener.kill()
            listener.wait()


@pytest.mark.parametrize("vip,server,client", [(VIP, SERVER, CLIENT), (VIP6, SERVER6, CLIENT6)], ids=["ipv4", "ipv6"])
def test_mac_setup_answers_undo_silences(lab, tmp_path, vip, server, client):
    config = _config(vip, server, lab)
    setup = _script(tmp_path, config, vip, server)
    undo = _script(tmp_path, config, vip, server, "--undo")
    assert " dev lo scope host" in setup

    before = lab.snapshot()
    assert not lab.probe(config, vip, client, wait=0.5), "answered before any setup"
    lab.sh(setup)
    after = lab.snapshot()
    assert lab.probe(config, vip, client), f"no SYN-ACK after the setup; server state:\n{after}"
    if ":" not in vip:
        assert not lab.arp_answered(vip), "the server answers ARP for the cluster address"
        assert lab.arp_answered(SERVER), "the server no longer answers ARP for its own address"
    lab.sh(setup)
    assert lab.snapshot() == after
    assert lab.probe(config, vip, client)
    lab.sh(undo)
    assert lab.snapshot() == before
    assert not lab.probe(config, vip, client, wait=0.5), "still answering after --undo"
    lab.sh(undo)
    assert lab.snapshot() == before


def test_arp_for_vip_without_the_sysctls(lab):
    """Why the script sets arp_ignore: a VIP on lo alone is answered by ARP (the dispatcher's traffic would go
    to this server's MAC directly, bypassing the dispatcher)."""
    lab.sh(f"ip addr add {VIP}/32 dev lo scope host")
    try:
        assert lab.arp_answered(VIP)
    finally:
        lab.sh(f"ip addr del {VIP}/32 dev lo")
