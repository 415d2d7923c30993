"""THE PROOF for IPIP and GRE back-end setup: a real Linux kernel (user-mode-linux 6.1, or Debian's 6.1 under
QEMU where user-mode-linux cannot boot: encapfwd.lab.kernels) runs the generated
script verbatim, receives the dispatcher's own encapsulated TCP SYN for the cluster address (built by the
plugins' data path), and answers with a SYN-ACK from the VIP straight to the client, not encapsulated.
``--undo`` silences it again and restores every setting; running a script twice changes nothing.

Topology (all addresses exist only inside this test's namespace and guest)::

    test process ──AF_PACKET── efwtap0 (192.0.2.1, in namespace efw<pid>-uml-N) ══ eth0 of the guest (192.0.2.10)
                                 the "dispatcher"                                   back-end: guest kernel
    client 198.51.100.7 (routed via 192.0.2.1), cluster 203.0.113.80 port 80

One guest boots per module (about 2 s as user-mode-linux, 6 s under QEMU+TCG); the guest starts with strict reverse-path filtering (rp_filter 1),
as a hardened distribution would, so the scripts' rp_filter lines matter.
"""

from __future__ import annotations

import ipaddress
import random
import time

import pytest
from encapfwd.lab import guest as guestlab
from encapfwd.lab import kernels

REASON = kernels.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"real-kernel lab unavailable: {REASON}")

DISPATCHER = "192.0.2.1"
SERVER = "192.0.2.10"
CLIENT = "198.51.100.7"
VIP = "203.0.113.80"
VIP2 = "203.0.113.81"
GUEST_MAC = "02:00:00:00:00:0a"
TAP = "efwtap0"

SNAPSHOT = r"""
cd /proc/sys/net/ipv4/conf && grep -H . all/arp_ignore all/arp_announce default/rp_filter */rp_filter
# ip_gre pulls in ipv6, which the kernel never unloads (it is built in on most distributions)
echo "modules: $(cut -d' ' -f1 /proc/modules | grep -vx -e ipv6 -e crc_ccitt | sort | tr '\n' ' ')"
ip -o -4 addr show | sed 's/ valid_lft.*//; s/\\//'
ip -o link show | sed 's/ link\/.*//; s/: <[^>]*>//; s/qdisc.*state/state/; s/ mode .*//'
echo "state: $(find "${ENCAPFWD_STATE_DIR:-/run/encapfwd}" -type f 2>/dev/null | sort | tr '\n' ' ')"
"""

LISTENER = r"""
cat > /tmp/listen.py <<'EOF'
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(128)
open("/tmp/listening", "w").close()
time.sleep(3600)
EOF
setsid python3 /tmp/listen.py > /tmp/listen.log 2>&1 &
i=0
while [ ! -e /tmp/listening ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
[ -e /tmp/listening ]
"""


DISPATCHER_MAC = None  # the TAP's MAC, set by the fixture


def _config(clusters):
    """A configuration: *clusters* is a list of (vip, encaptype, grekey)."""
    from encapfwd import config as cfg

    mac = f'mac = "{DISPATCHER_MAC}"\n' if DISPATCHER_MAC else ""
    text = [f'[executor]\nnfa = "{DISPATCHER}"\n{mac}networks = ["192.0.2.0/24"]\n']
    for vip, encaptype, grekey in clusters:
        text.append(f'[[clusters]]\naddress = "{vip}"\n[[clusters.ports]]\nnumber = 80\n'
                    f'[[clusters.ports.servers]]\naddress = "{SERVER}"\nmac = "{GUEST_MAC}"\nencapforward = true\n'
                    f'encaptype = "{encaptype}"\nencapcond = "always"\n'
                    + (f"grekey = {grekey}\n" if grekey is not None else ""))
    return cfg.loads("\n".join(text))


def _script(tmp_path, config, vip, *extra):
    """The script exactly as ``encapfwd backend-setup`` prints it."""
    from click.testing import CliRunner
    from encapfwd import config as cfg
    from encapfwd.cli import cli

    path = tmp_path / "encapfwd.toml"
    path.write_text(cfg.dumps(config))
    result = CliRunner().invoke(cli, ["--config", str(path), "backend-setup", f"{vip}@80@{SERVER}",
                                      "--os", "linux", *extra])
    assert result.exit_code == 0, result.output
    return result.output


class Lab:
    def __init__(self, ns, guest, sock, registry):
        self.ns = ns
        self.guest = guest
        self.sock = sock
        self.registry = registry
        self.dispatcher_mac = ns.mac(TAP)
        self.dispatchers = {}

    def sh(self, script, ok=True):
        result = self.guest.run(script)
        if ok:
            assert result.returncode == 0, result.output
        return result

    def snapshot(self):
        return self.sh(SNAPSHOT).output

    def transform(self, config, vip):
        from encapfwd.hookspecs import Egress
        from encapfwd.model import forwarding_method

        executor = config.executor
        server = config.cluster(vip).ports[0].servers[0]
        method = forwarding_method(executor, server)
        egress = Egress(src_mac=self.dispatcher_mac, dst_mac=GUEST_MAC,
                        outer_src=server.encapsource or executor.nfa, outer_dst=server.address,
                        ttl=executor.encapttl, cluster=ipaddress.ip_address(vip), mtu=executor.mtu)
        transform = self.registry.hook.encapfwd_build_transform(forwarder=method, server=server, egress=egress)
        assert transform is not None, f"no transform for {method}"
        return transform

    def forward(self, config, vip, p_prime_tcp):
        """The frames the dispatcher sends for a client's packet: the whole Dispatcher when it exists,
        else the forwarder's compiled transform (the same data path, without selection)."""
        from scapy.layers.inet import IP
        from scapy.layers.l2 import Ether

        try:
            from encapfwd.datapath.dispatcher import Dispatcher
        except ImportError:
            Dispatcher = None
        if Dispatcher is None:
            return [self.transform(config, vip)(bytes(IP(src=CLIENT, dst=vip, ttl=63) / p_prime_tcp))]
        frame = bytes(Ether(src="02:00:00:00:00:fe", dst=self.dispatcher_mac) / IP(src=CLIENT, dst=vip, ttl=64)
                      / p_prime_tcp)
        dispatcher = self.dispatchers.get(config)
        if dispatcher is None:
            dispatcher = self.dispatchers[config] = Dispatcher(config, self.registry)
        out = dispatcher.process(frame, time.monotonic())
        assert len(out) == 1, dispatcher.drops
        return out

    def probe(self, config, vip, wait=1.5):
        """Send the dispatcher's E(P') of a fresh client SYN; return (syn-acks to the client, other replies)."""
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        sport = random.randint(20000, 60000)
        seq = random.randint(1, 2**31)
        frames = self.forward(config, vip, TCP(sport=sport, dport=80, flags="S", seq=seq, window=64240))
        method = "gre" if config.cluster(vip).ports[0].servers[0].encaptype == "gre" else "ipip"
        sent = Ether(frames[0])
        assert sent[IP].proto == (47 if method == "gre" else 4) and sent[IP].dst == SERVER
        while True:  # drain
            try:
                self.sock.recv(65535)
            except OSError:
                break
        for frame in frames:
            self.sock.send(frame)
        return self._collect(vip, sport, seq, wait)

    def _collect(self, vip, sport, seq, wait):
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        synacks, encapsulated = [], []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                raw = self.sock.recv(65535)
            except OSError:
                continue
            pkt = Ether(raw)
            if pkt.src.lower() != GUEST_MAC or IP not in pkt:
                continue
            ip = pkt[IP]
            if ip.proto in (4, 47):
                encapsulated.append(pkt)
                continue
            if TCP in ip and ip.src == vip and ip.dst == CLIENT and ip[TCP].dport == sport:
                tcp = ip[TCP]
                if tcp.flags & 0x12 == 0x12 and tcp.ack == seq + 1 and tcp.sport == 80:
                    assert pkt.dst.lower() == self.dispatcher_mac.lower()  # routed to the client's gateway
                    synacks.append(pkt)
                    break
        return synacks, encapsulated


def _lab(kind=None):
    """A guest of *kind* (None: the kind the lab selected by booting) on a TAP in a fresh namespace."""
    from encapfwd.lab import LabUnavailable, Namespace, packet_socket
    from encapfwd.plugins import get_plugin_manager

    guestlab.cleanup_stale()  # guests of test processes that were killed
    try:
        if kind is None:
            selection = kernels.select()
            print(selection.describe())
            kind = selection.kind
        else:
            reason = kernels.make(kind, None, None).unavailable_reason()
            if reason:
                pytest.skip(f"{kind}: {reason}")
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    registry = get_plugin_manager()
    for name in ("ipip", "gre"):
        if name not in registry.forwarders:
            pytest.skip(f"forwarder plugin {name} not installed")
    global DISPATCHER_MAC
    with Namespace("uml") as ns:
        ns.tap(TAP)
        DISPATCHER_MAC = ns.mac(TAP)
        ns.ip("addr", "add", f"{DISPATCHER}/24", "dev", TAP)
        for key in ("all", "default", TAP):
            ns.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        # the "dispatcher" namespace drops what it receives for the client: no kernel chatter in replies
        ns.ip("route", "add", "blackhole", f"{CLIENT}/32")
        with kernels.make(kind, ns, TAP, mac=GUEST_MAC, address=f"{SERVER}/24", gateway=DISPATCHER) as guest:
            print(f"{guest.label} boot: {guest.boot_seconds:.2f} s")
            sock = packet_socket(ns, TAP, timeout=0.05)
            try:
                lab = Lab(ns, guest, sock, registry)
                lab.sh("echo 1 > /proc/sys/net/ipv4/conf/all/rp_filter; echo 1 > /proc/sys/net/ipv4/conf/default/rp_filter")
                lab.sh(LISTENER)
                yield lab
            finally:
                sock.close()


@pytest.fixture(scope="module")
def lab():
    yield from _lab()


@pytest.fixture(scope="module")
def qemu_lab():
    """The fall-back kernel, QEMU+TCG, proven on every host (it is the one that runs where user-mode-linux
    cannot boot, e.g. on a CPU with AMX)."""
    yield from _lab("qemu-tcg")


@pytest.mark.parametrize("encaptype,grekey", [("ipip", None), ("gre", None), ("gre", 7)],
                         ids=["ipip", "gre", "gre-key"])
def test_tunnel_setup_answers_undo_silences(lab, tmp_path, encaptype, grekey):
    _setup_answers_undo_silences(lab, tmp_path, encaptype, grekey)


def _setup_answers_undo_silences(lab, tmp_path, encaptype, grekey):
    global DISPATCHER_MAC
    DISPATCHER_MAC = lab.dispatcher_mac  # _config's, for this lab's TAP
    config = _config([(VIP, encaptype, grekey)])
    setup = _script(tmp_path, config, VIP)
    undo = _script(tmp_path, config, VIP, "--undo")
    module = "ip_gre" if encaptype == "gre" else "ipip"
    assert f"modprobe {module}" in setup

    before = lab.snapshot()
    synacks, _ = lab.probe(config, VIP, wait=0.6)
    assert not synacks, "answered before any setup"

    lab.sh(setup)
    after = lab.snapshot()
    synacks, encapsulated = lab.probe(config, VIP)
    assert synacks, f"no SYN-ACK after the setup; guest state:\n{after}"
    assert not encapsulated, "the reply came back encapsulated"

    lab.sh(setup)  # twice is harmless
    assert lab.snapshot() == after
    assert lab.probe(config, VIP)[0], "no SYN-ACK after running the setup twice"

    lab.sh(undo)
    assert lab.snapshot() == before
    synacks, _ = lab.probe(config, VIP, wait=0.6)
    assert not synacks, "still answering after --undo"
    lab.sh(undo)  # twice is harmless
    assert lab.snapshot() == before


def test_two_clusters_share_settings(lab, tmp_path):
    """Two clusters on one server: undoing one keeps the other working; the last undo restores everything."""
    config = _config([(VIP, "ipip", None), (VIP2, "gre", None)])
    setup_a, undo_a = _script(tmp_path, config, VIP), _script(tmp_path, config, VIP, "--undo")
    setup_b, undo_b = _script(tmp_path, config, VIP2), _script(tmp_path, config, VIP2, "--undo")
    before = lab.snapshot()
    lab.sh(setup_a)
    lab.sh(setup_b)
    assert lab.probe(config, VIP)[0] and lab.probe(config, VIP2)[0]
    lab.sh(undo_a)
    assert not lab.probe(config, VIP, wait=0.6)[0]
    assert lab.probe(config, VIP2)[0], "undoing one cluster broke the other"
    assert "all/rp_filter:0" in lab.snapshot()
    lab.sh(undo_b)
    assert lab.snapshot() == before


def test_undo_keeps_what_was_there_before(lab, tmp_path):
    """A VIP and a module the administrator had already set up are not removed by --undo."""
    config = _config([(VIP, "ipip", None)])
    lab.sh(f"modprobe ipip && ip link set tunl0 up && ip addr add {VIP}/32 dev tunl0 scope host")
    try:
        before = lab.snapshot()
        lab.sh(_script(tmp_path, config, VIP))
        lab.sh(_script(tmp_path, config, VIP, "--undo"))
        assert lab.snapshot() == before
    finally:
        lab.sh("ip link set tunl0 down; ip addr flush dev tunl0; modprobe -r ipip")


def test_persistent_form(lab, tmp_path):
    """--persistent applies now and writes boot files; replaying those files as a boot would works too."""
    config = _config([(VIP, "ipip", None)])
    setup = _script(tmp_path, config, VIP, "--persistent")
    undo = _script(tmp_path, config, VIP, "--persistent", "--undo")
    unit = f"/etc/systemd/system/encapfwd-ipip-{VIP}.service"
    files = [f"/etc/modules-load.d/encapfwd-ipip-{VIP}.conf", f"/etc/sysctl.d/90-encapfwd-ipip-{VIP}.conf", unit]
    before = lab.snapshot()
    lab.sh(setup)
    lab.sh(setup)
    assert lab.probe(config, VIP)[0], "no SYN-ACK after the persistent setup"
    lab.sh(" && ".join(f"test -f {f}" for f in files) + f" && mkdir -p /tmp/boot && cp {' '.join(files)} /tmp/boot/")
    lab.sh(undo)
    assert lab.sh(" || ".join(f"test -e {f}" for f in files), ok=False).returncode != 0, "boot files left"
    assert lab.snapshot() == before
    assert not lab.probe(config, VIP, wait=0.6)[0]

    # a boot, as systemd would do it: modules-load.d, sysctl.d, then the unit's ExecStart lines
    boot = lab.sh(
        "cd /tmp/boot && modprobe $(grep -v '^#' encapfwd-ipip-*.conf | head -1) && "
        "sysctl -q -p 90-encapfwd-ipip-*.conf && "
        "grep '^ExecStart=' encapfwd-ipip-*.service | sed 's/^ExecStart=//' > start.sh && "
        "grep '^ExecStop=-' encapfwd-ipip-*.service | sed 's/^ExecStop=-//' > stop.sh && sh -e start.sh"
    )
    assert boot.ok
    assert lab.probe(config, VIP)[0], "no SYN-ACK after replaying the boot files"
    lab.sh("sh -e /tmp/boot/stop.sh")
    assert not lab.probe(config, VIP, wait=0.6)[0]
    lab.sh("ip link set tunl0 down; modprobe -r ipip; for k in arp_ignore arp_announce; do echo 0 > /proc/sys/net/ipv4/conf/all/$k; done; echo 1 > /proc/sys/net/ipv4/conf/all/rp_filter")
    assert lab.snapshot() == before


def test_rp_filter_lines_are_needed(lab, tmp_path):
    """Without its rp_filter lines the same script gets no answer: strict reverse-path filtering drops the
    decapsulated SYN (its source, the client, is routed out of eth0, not tunl0)."""
    config = _config([(VIP, "ipip", None)])
    setup = _script(tmp_path, config, VIP)
    crippled = "\n".join(line for line in setup.splitlines() if not line.startswith("efw_sysctl net.ipv4.conf.all.rp")
                         and not line.startswith("efw_sysctl net.ipv4.conf.tunl0.rp"))
    assert crippled.count("rp_filter 0") == 0 and "efw_addr tunl0" in crippled
    before = lab.snapshot()
    lab.sh(crippled)
    try:
        assert not lab.probe(config, VIP, wait=0.6)[0], "answered although rp_filter is strict"
        lab.sh(setup)
        assert lab.probe(config, VIP)[0]
    finally:
        lab.sh(_script(tmp_path, config, VIP, "--undo"))
    assert lab.snapshot() == before


# last in the module: the fall-back kernel's own lab (its TAP has another MAC than the lab above)
@pytest.mark.parametrize("encaptype,grekey", [("ipip", None), ("gre", 7)], ids=["ipip", "gre-key"])
def test_fallback_kernel_setup_answers_undo_silences(qemu_lab, tmp_path, encaptype, grekey):
    """The same proof on QEMU+TCG with Debian's kernel, whatever kind this host selected."""
    assert qemu_lab.guest.kind == "QEMU+TCG"
    _setup_answers_undo_silences(qemu_lab, tmp_path, encaptype, grekey)
