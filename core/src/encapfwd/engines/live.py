"""Live forwarding on Linux: AF_PACKET rings around the dispatcher (``encapfwd run``).

Shape::

    controller process (signals, control socket, configuration, neighbour resolution)
      ├── worker 0: RX ring (TPACKET_V3) ─► Dispatcher.process ─► TX ring (TPACKET_V2) ─► send()
      ├── worker 1: same, in the same PACKET_FANOUT group (flow hash) …
      └── …

- A classic BPF socket filter lets only frames addressed to this host whose destination is a cluster
  address reach user space; everything else stays in the kernel.
- Every worker compiles the same configuration, so selection (Maglev over the 5-tuple) is identical in all
  of them; the kernel's flow hash keeps a connection on one worker, hence on one flow table.
- SIGHUP: the controller reloads the configuration file, resolves MACs again, validates, and hands the new
  configuration to every worker, which calls ``Dispatcher.reload`` (established flows keep their server).
  A configuration that does not load is reported and the old one stays in force.
- SIGTERM / SIGINT: workers stop after the batch in hand, rings are closed, the control socket is removed.
- The control socket (AF_UNIX stream, mode 0600 in a 0700 directory, peers checked with SO_PEERCRED)
  answers ``report`` with the summed counters of every worker as JSON; :func:`query_control` is its client.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from typing import Dict, List, Optional, Tuple

import attrs

from ..errors import EncapfwdError
from ..model import Config, forwarding_method

DEFAULT_CONTROL = "/run/encapfwd/control.sock"
ENV_CONTROL = "ENCAPFWD_CONTROL"
ENV_NEIGH_REFRESH = "ENCAPFWD_NEIGH_REFRESH"
FANOUT_BASE = 0x4E00

NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


class LiveError(EncapfwdError):
    """A one-line reason why live forwarding cannot start."""


def log(message: str) -> None:
    print(f"encapfwd: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the control socket


def default_control_path() -> str:
    return os.environ.get(ENV_CONTROL) or DEFAULT_CONTROL


def query_control(path: Optional[str] = None, command: str = "report", timeout: float = 5.0) -> dict:
    """Ask a running ``encapfwd run`` for *command* (``report``, ``ping``) over its control socket.

    Raises OSError when nothing listens at *path* (or only root may open it), ValueError on a bad answer.
    """
    path = path or default_control_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    answer = json.loads(b"".join(chunks).decode() or "null")
    if not isinstance(answer, dict):
        raise ValueError("the control socket gave no JSON object")
    if "error" in answer and len(answer) == 1:
        raise ValueError(answer["error"])
    return answer


def merge_reports(reports: List[dict]):
    """Sum the numbers of several workers' reports, recursively (dicts by key, lists by position)."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return {}
    first = reports[0]
    if isinstance(first, bool) or not isinstance(first, (dict, list, int, float)):
        return first
    if isinstance(first, (int, float)):
        return sum(r for r in reports if isinstance(r, (int, float)) and not isinstance(r, bool))
    if isinstance(first, list):
        if all(isinstance(r, list) and len(r) == len(first) for r in reports):
            return [merge_reports([r[i] for r in reports]) for i in range(len(first))]
        return first
    keys: List = []
    for r in reports:
        if isinstance(r, dict):
            keys.extend(k for k in r if k not in keys)
    return {k: merge_reports([r.get(k) for r in reports if isinstance(r, dict)]) for k in keys}


# -------------------------------------------------------------------------- kernel state (pyroute2)


class Interface:
    def __init__(self, name: str, index: int, mac: str, mtu: int, networks: list):
        self.name, self.index, self.mac, self.mtu, self.networks = name, index, mac, mtu, networks


def _ipr():
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise LiveError("encapfwd run needs pyroute2: pip install 'encapfwd[live]'") from None
    return IPRoute()


def interface_info(ipr, name: str) -> Interface:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LiveError(f"no such interface: {name}")
    index = found[0]
    link = ipr.get_links(index)[0]
    mac = (link.get_attr("IFLA_ADDRESS") or "").lower()
    if len(mac) != 17:
        raise LiveError(f"interface {name} has no Ethernet address (only Ethernet interfaces are supported)")
    networks = []
    for msg in ipr.get_addr(index=index):
        address = msg.get_attr("IFA_ADDRESS")
        if address:
            networks.append(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"))
    return Interface(name, index, mac, link.get_attr("IFLA_MTU") or 1500, networks)


def local_addresses(ipr) -> Dict[ipaddress._BaseAddress, str]:
    """Every address configured in this network namespace, with its interface name."""
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    out = {}
    for msg in ipr.get_addr():
        for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
            value = msg.get_attr(attr)
            if value:
                out[ipaddress.ip_address(value.split("%")[0])] = names.get(msg["index"], "?")
    return out


def neighbour_mac(ipr, address, ifindex: int, timeout: float = 3.0) -> Optional[str]:
    """The MAC of *address* from the kernel's neighbour table; asks the kernel to resolve it (NTF_USE,
    as ``ip neigh replace ADDR dev IF use``) when missing, and waits up to *timeout* seconds."""
    address = str(address)
    deadline = time.monotonic() + timeout
    asked = False
    while True:
        for msg in ipr.get_neighbours(dst=address, ifindex=ifindex):
            lladdr = msg.get_attr("NDA_LLADDR")
            if lladdr and msg["state"] & NUD_VALID:
                return lladdr.lower()
        if time.monotonic() >= deadline:
            return None
        if not asked or time.monotonic() + 1.0 < deadline:
            try:
                ipr.neigh("replace", dst=address, ifindex=ifindex, flags=0x01, state=0)  # NTF_USE
            except Exception:  # noqa: BLE001 - resolution is retried; failure is reported below
                pass
            asked = True
        time.sleep(0.05)


def route_gateway(ipr, address) -> Optional[str]:
    try:
        routes = ipr.route("get", dst=str(address))
    except Exception:  # noqa: BLE001
        return None
    for route in routes:
        gateway = route.get_attr("RTA_GATEWAY")
        if gateway:
            return gateway
    return None


# ------------------------------------------------------------------------------------ preparation


def check_platform() -> None:
    if not sys.platform.startswith("linux"):
        raise LiveError("encapfwd run needs Linux (AF_PACKET); use 'encapfwd replay' elsewhere")
    if os.geteuid() != 0:
        raise LiveError(
            "encapfwd run needs root (raw AF_PACKET sockets: CAP_NET_RAW, CAP_NET_ADMIN); run it with sudo"
        )


def prepare(
    config: Config,
    registry,
    interface: Optional[str] = None,
    *,
    resolve_timeout: float = 3.0,
    warn=log,
    resolved: Optional[dict] = None,
) -> Tuple[Config, Interface]:
    """Fill in what live mode takes from the kernel and check what would make forwarding wrong.

    - the interface (``--interface`` or ``executor interface``) must exist; its MAC is the source of every
      frame sent; its networks are the attached networks when ``executor networks`` is empty; its first
      IPv4 address is the ``nfa`` when none is set; the MTU is capped at the interface's;
    - a cluster address configured locally is an error (the kernel would answer it instead of a server);
    - every server's forwarding method must have an installed plugin;
    - the MAC of every server on an attached network (unless pinned with ``mac``) and of the gateway
      (unless pinned with ``gatewaymac``) comes from the neighbour table, resolved when missing. The gateway,
      when not configured, is the kernel's next hop towards the first off-link server. A server whose MAC
      cannot be resolved is marked down (with a warning) rather than sent to a wrong address.

    *resolved*, when given, receives ``{address: mac or None}`` for every MAC taken from the neighbour table
    (not the pinned ones), so that the controller can notice when one changes.
    """
    from ..config import validate

    ex = config.executor
    name = interface or ex.interface
    if not name:
        raise LiveError("no interface: pass --interface IF or set 'executor set interface IF'")
    if not config.clusters:
        raise LiveError("no cluster configured: add one with 'encapfwd cluster add ADDRESS'")
    validate(config, registry)
    with _ipr() as ipr:
        iface = interface_info(ipr, name)
        local = local_addresses(ipr)
        for cluster in config.clusters:
            if cluster.address in local:
                raise LiveError(
                    f"cluster address {cluster.address} is configured as a local address (on "
                    f"{local[cluster.address]}): this host's kernel would answer it; remove it here (only "
                    "the "
                    f"servers hold it, on loopback) and route or ARP it to the dispatcher instead"
                )
        for cluster in config.clusters:
            for port in cluster.ports:
                for server in port.servers:
                    method = forwarding_method(ex, server)
                    try:
                        registry.forwarder(method)
                    except EncapfwdError as exc:
                        raise LiveError(
                            f"server {cluster.address}@{port.number}@{server.address}: {exc}"
                        ) from None

        changes = {"mac": iface.mac, "interface": iface.name}
        if ex.mac and ex.mac != iface.mac:
            warn(f"executor mac {ex.mac} differs from {iface.name}'s {iface.mac}: using {iface.mac}")
        if not ex.networks:
            changes["networks"] = tuple(i.network for i in iface.networks if not i.ip.is_link_local)
        if ex.nfa is None:
            v4 = [i.ip for i in iface.networks if i.version == 4]
            if v4:
                changes["nfa"] = v4[0]
        if ex.mtu > iface.mtu:
            changes["mtu"] = iface.mtu
        ex = attrs.evolve(ex, **changes)

        macs: Dict = {}
        offlink = []
        clusters = []
        for cluster in config.clusters:
            ports = []
            for port in cluster.ports:
                servers = []
                for server in port.servers:
                    if not ex.attached(server.address):
                        offlink.append(server.address)
                    elif server.mac is None and not server.down:
                        if server.address not in macs:
                            macs[server.address] = neighbour_mac(
                                ipr, server.address, iface.index, resolve_timeout
                            )
                        mac = macs[server.address]
                        if resolved is not None:
                            resolved[server.address] = mac
                        if mac is None:
                            warn(
                                f"server {cluster.address}@{port.number}@{server.address}: "
                                "no answer to ARP/ND "
                                f"on {iface.name}; marked down until the next reload (SIGHUP)"
                            )
                            server = attrs.evolve(server, down=True)
                        else:
                            server = attrs.evolve(server, mac=mac)
                    servers.append(server)
                ports.append(attrs.evolve(port, servers=tuple(servers)))
            clusters.append(attrs.evolve(cluster, ports=tuple(ports)))

        if offlink:
            gateway = ex.gateway
            if gateway is None:
                found = route_gateway(ipr, offlink[0])
                if found is None:
                    raise LiveError(
                        f"server {offlink[0]} is not on an attached network and there is no gateway: "
                        f"'executor set gateway ADDR' (or a route to it)"
                    )
                gateway = ipaddress.ip_address(found)
                ex = attrs.evolve(ex, gateway=gateway)
            if ex.gatewaymac is None:
                mac = neighbour_mac(ipr, gateway, iface.index, resolve_timeout)
                if mac is None:
                    raise LiveError(f"gateway {gateway} does not answer ARP on {iface.name}")
                ex = attrs.evolve(ex, gatewaymac=mac)
                if resolved is not None:
                    resolved[gateway] = mac
    return attrs.evolve(config, executor=ex, clusters=tuple(clusters)), iface


def cluster_addresses(config: Config) -> List:
    return [cluster.address for cluster in config.clusters]


def kernel_warnings(config: Config, warn=log) -> None:
    """Warn when this host's kernel would also forward cluster traffic (a second copy to the servers)."""
    try:
        _kernel_warnings(config, warn)
    except Exception:  # noqa: BLE001 - only advice; never stops the start
        pass


def _kernel_warnings(config: Config, warn) -> None:
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as handle:
            forwarding = handle.read().strip() == "1"
    except OSError:
        return
    if not forwarding:
        return
    with _ipr() as ipr:
        for cluster in config.clusters:
            if cluster.address.version != 4:
                continue
            try:
                routes = ipr.route("get", dst=str(cluster.address))
            except Exception:  # noqa: BLE001
                continue
            for route in routes:
                if route["type"] == 1:  # RTN_UNICAST: the kernel would route it too
                    warn(
                        f"IP forwarding is on and {cluster.address} has a unicast route: the kernel forwards "
                        f"it as well; add 'ip route add blackhole {cluster.address}/32' "
                        "(or turn ip_forward off)"
                    )


# --------------------------------------------------------------------------------- checksum fix-up


def complete_checksum(frame: bytes) -> bytes:
    """Fill in the TCP/UDP checksum of a frame whose sender left it to offload (TP_STATUS_CSUMNOTREADY:
    a local or veth sender with TX checksum offload; the field then holds only the pseudo-header sum)."""
    from ..packet import checksum

    try:
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0x0F) * 4
            total = struct.unpack_from("!H", frame, 16)[0]
            proto = frame[23]
            if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:  # a fragment: nothing to complete
                return frame
            start, end = 14 + ihl, 14 + total
            pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, end - start)
        elif ethertype == 0x86DD:
            proto = frame[20]
            start = 54
            end = start + struct.unpack_from("!H", frame, 18)[0]
            pseudo = frame[22:54] + struct.pack("!IxxxB", end - start, proto)
        else:
            return frame
        if proto == 6:
            offset = 16
        elif proto == 17:
            offset = 6
        else:
            return frame
        if end > len(frame) or end - start < offset + 2:
            return frame
        segment = bytearray(frame[start:end])
        segment[offset : offset + 2] = b"\x00\x00"
        value = checksum(pseudo + segment)
        if proto == 17 and value == 0:
            value = 0xFFFF
        out = bytearray(frame)
        struct.pack_into("!H", out, start + offset, value)
        return bytes(out)
    except (IndexError, struct.error):
        return frame


# ------------------------------------------------------------------------------- worker <-> parent


def _send_msg(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv_msg(sock: socket.socket):
    (length,) = struct.unpack("!I", _recv_exact(sock, 4))
    return pickle.loads(_recv_exact(sock, length))


# ------------------------------------------------------------------------------------------- worker


class Worker:
    """One forwarding process: its rings, its Dispatcher, its counters."""

    def __init__(
        self,
        number: int,
        iface: Interface,
        config: Config,
        dispatcher,
        channel: socket.socket,
        fanout_group: int,
        *,
        cpu: Optional[int] = None,
        rx_blocks: int = 512,
        rx_block_size: int = 1 << 16,
        answer_arp: bool = False,
        qdisc_bypass: bool = False,
    ):
        from .afpacket import RxRing, TxRing, cluster_filter

        self.number = number
        self.iface = iface
        self.config = config
        self.dispatcher = dispatcher
        self.channel = channel
        self.cpu = cpu
        self.stop = False
        self.answer_arp = answer_arp
        self.qdisc_bypass = qdisc_bypass
        self._last_error: Optional[int] = None
        self.stats = {
            "socket_errors": 0,
            "arp_replies": 0,
            "rx": 0,
            "tx": 0,
            "kernel_drops": 0,
            "checksums_completed": 0,
            "tx_ring_full": 0,
            "tx_too_big": 0,
            "tx_errors": 0,
            "reloads": 0,
            "qdisc_bypass": bool(qdisc_bypass),
            "cpu": cpu,
            "pid": os.getpid(),
        }
        self._cluster_filter = cluster_filter
        self.rx = RxRing(
            iface.name,
            self._program(config),
            block_nr=rx_blocks,
            block_size=rx_block_size,
            fanout_group=fanout_group,
        )
        frame = 2048
        while frame - 32 < iface.mtu + 14 + 4:
            frame *= 2
        # through the qdisc by default, which keeps what we send visible to tcpdump on this host;
        # --qdisc-bypass (PACKET_QDISC_BYPASS) hands frames straight to the driver instead
        self.tx = TxRing(
            iface.name, frame_size=frame, frame_nr=max(256, (1 << 22) // frame), qdisc_bypass=qdisc_bypass
        )

    def _program(self, config):
        return self._cluster_filter(cluster_addresses(config), arp=self.answer_arp)

    def announce(self) -> None:
        """Gratuitous ARP for every IPv4 cluster address (with --answer-arp), so neighbours learn our MAC."""
        if not self.answer_arp:
            return
        from .afpacket import gratuitous_arp

        mac = bytes.fromhex(self.iface.mac.replace(":", ""))
        for address in cluster_addresses(self.config):
            if address.version == 4:
                self.send_now(gratuitous_arp(mac, address.packed))

    def send_now(self, frame: bytes) -> None:
        from .afpacket import TX_DATA_OFFSET

        tx = self.tx
        slot = tx.index * tx.frame_size
        if tx.map[slot]:
            tx.flush()
            if tx.map[slot]:
                tx.full += 1
                return
        tx.map[slot + TX_DATA_OFFSET : slot + TX_DATA_OFFSET + len(frame)] = frame
        struct.pack_into("<I", tx.map, slot + 4, len(frame))
        tx.map[slot] = 1
        tx.pending += 1
        tx.index = (tx.index + 1) % tx.frame_nr
        tx.flush()

    # -- commands from the controller

    def report(self) -> dict:
        self._kernel_stats()
        try:
            dispatched = self.dispatcher.report()
        except Exception as exc:  # noqa: BLE001 - a report must never stop forwarding
            dispatched = {"error": f"{type(exc).__name__}: {exc}"}
        return {"dispatcher": dispatched, "engine": dict(self.stats, number=self.number)}

    def _kernel_stats(self) -> None:
        try:
            _packets, drops = self.rx.statistics()
            self.stats["kernel_drops"] += drops
        except OSError:
            pass
        tx = self.tx
        self.stats.update(tx=tx.sent, tx_ring_full=tx.full, tx_too_big=tx.too_big, tx_errors=tx.errors)

    def handle(self, message) -> None:
        kind = message[0]
        if kind == "report":
            _send_msg(self.channel, ("report", self.report()))
        elif kind == "reload":
            config = message[1]
            try:
                self.dispatcher.reload(config)
                self.rx.set_filter(self._program(config))
                self.config = config
                if self.number == 0:
                    self.announce()
                self.stats["reloads"] += 1
                _send_msg(self.channel, ("reloaded", None))
            except Exception as exc:  # noqa: BLE001
                _send_msg(self.channel, ("reloaded", f"{type(exc).__name__}: {exc}"))
        elif kind == "stop":
            self.stop = True

    def _poll_channel(self, poller_timeout: int = 0) -> None:
        while True:
            ready, _, _ = select.select([self.channel], [], [], poller_timeout / 1000)
            if not ready:
                return
            try:
                message = _recv_msg(self.channel)
            except (EOFError, OSError):
                self.stop = True  # the controller is gone
                return
            self.handle(message)
            poller_timeout = 0

    def _socket_error(self) -> None:
        """Consume the receive socket's pending error (e.g. ENETDOWN when the link goes down), which would
        otherwise make every poll() return at once; say so once per change."""
        err = self.rx.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.stats["socket_errors"] += 1
            if err != self._last_error:
                log(f"worker {self.number}: {self.iface.name}: {os.strerror(err)} (waiting for it)")
            self._last_error = err
            time.sleep(0.05)

    # -- the data path

    def run(self) -> None:
        """Forward until told to stop. Everything per packet is a local variable or a bound method; the TX
        ring's position and pending count live in locals during a block and are written back before any
        flush and at the block's end (one ``send()`` per received block)."""
        from time import monotonic

        from .afpacket import TP_STATUS_CSUMNOTREADY, TP_STATUS_USER, TX_DATA_OFFSET

        rx, tx = self.rx, self.tx
        rxm, txm = rx.map, tx.map
        block_size, block_nr = rx.block_size, rx.block_nr
        hdr = rx.HDR.unpack_from
        u32 = struct.Struct("<I")
        u32_unpack, u32_pack = u32.unpack_from, u32.pack_into
        # tpacket2_hdr: tp_status, tp_len written together (the kernel reads the ring only in our send())
        tx_hdr = struct.Struct("<II").pack_into
        blkhdr = struct.Struct("<II").unpack_from
        tx_size, tx_max = tx.frame_size, tx.max_frame
        tx_end = tx_size * tx.frame_nr
        flush, wait_writable = tx.flush, tx.wait_writable
        fix = complete_checksum
        stats = self.stats
        arp = self.answer_arp
        if arp:
            from .afpacket import arp_reply

            own_mac = bytes.fromhex(self.iface.mac.replace(":", ""))
        poller = select.poll()
        poller.register(rx.fd, select.POLLIN | select.POLLERR)
        poller.register(self.channel.fileno(), select.POLLIN)
        channel_fd = self.channel.fileno()
        channel_poller = select.poll()
        channel_poller.register(channel_fd, select.POLLIN)
        channel_poll = channel_poller.poll
        block = 0
        received = 0
        while not self.stop:
            base = block * block_size
            if not u32_unpack(rxm, base + 8)[0] & TP_STATUS_USER:
                if tx.pending:
                    flush()
                stats["rx"] = received
                for fd, event in poller.poll(1000):
                    if fd == channel_fd:
                        self._poll_channel()
                    elif event & select.POLLERR:
                        self._socket_error()
                continue
            if self._last_error is not None:
                log(f"worker {self.number}: {self.iface.name}: receiving again")
                self._last_error = None
            process = self.dispatcher.process
            count, offset = blkhdr(rxm, base + 12)
            offset += base
            now = monotonic()
            slot = tx.index * tx_size
            queued = 0
            for _ in range(count):
                nxt, snaplen, status, mac = hdr(rxm, offset)
                start = offset + mac
                frame = rxm[start : start + snaplen]
                offset += nxt
                if status & TP_STATUS_CSUMNOTREADY:
                    frame = fix(frame)
                    stats["checksums_completed"] += 1
                if arp and frame[12] == 8 and frame[13] == 6:
                    reply = arp_reply(frame, own_mac)
                    outs = [reply] if reply else []
                    stats["arp_replies"] += len(outs)
                else:
                    outs = process(frame, now)
                for out in outs:
                    size = len(out)
                    if size > tx_max:
                        tx.too_big += 1
                        continue
                    if txm[slot]:  # still owned by the kernel: send what is queued, then wait once
                        tx.index = slot // tx_size
                        tx.pending += queued
                        queued = 0
                        flush()
                        if txm[slot]:
                            wait_writable()
                            if txm[slot]:
                                tx.full += 1
                                continue
                    data = slot + TX_DATA_OFFSET
                    txm[data : data + size] = out
                    tx_hdr(txm, slot, 1, size)  # TP_STATUS_SEND_REQUEST, tp_len
                    queued += 1
                    slot += tx_size
                    if slot == tx_end:
                        slot = 0
            received += count
            u32_pack(rxm, base + 8, 0)  # the block goes back to the kernel
            block += 1
            if block == block_nr:
                block = 0
            tx.index = slot // tx_size
            tx.pending += queued
            flush()
            if channel_poll(0):  # the controller has something for us
                stats["rx"] = received
                self._poll_channel()
        stats["rx"] = received

    def close(self) -> None:
        for ring in (self.tx, self.rx):
            try:
                ring.close()
            except OSError:
                pass


def _worker_main(
    number, iface, config, dispatcher, channel, fanout_group, cpu, answer_arp=False, qdisc_bypass=False
) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from .afpacket import set_cpu, set_parent_death_signal

    set_parent_death_signal(signal.SIGTERM)
    worker = None

    def on_term(signum, frame):
        if worker is not None:
            worker.stop = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        if cpu is not None:
            set_cpu(cpu)
        worker = Worker(
            number,
            iface,
            config,
            dispatcher,
            channel,
            fanout_group,
            cpu=cpu,
            answer_arp=answer_arp,
            qdisc_bypass=qdisc_bypass,
        )
        if number == 0:
            worker.announce()
    except Exception as exc:  # noqa: BLE001
        _send_msg(channel, ("error", f"worker {number}: {type(exc).__name__}: {exc}"))
        return 1
    _send_msg(channel, ("ready", os.getpid()))
    try:
        worker.run()
    finally:
        worker.close()
    try:
        _send_msg(channel, ("stopped", worker.report()))
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------- controller


class Controller:
    """Starts the workers, serves the control socket, reloads on SIGHUP, stops on SIGTERM/SIGINT."""

    def __init__(
        self,
        config_path: str,
        registry,
        *,
        interface: Optional[str] = None,
        workers: int = 1,
        control_path: Optional[str] = None,
        cpus: Optional[List[int]] = None,
        answer_arp: bool = False,
        qdisc_bypass: bool = False,
    ):
        from ..config import load
        from ..dispatcher import Dispatcher

        check_platform()
        if workers < 1:
            raise LiveError("--workers must be at least 1")
        self.config_path = config_path
        self.registry = registry
        self.interface = interface
        self.nworkers = workers
        self.control_path = control_path or default_control_path()
        self.cpus = cpus
        self.answer_arp = answer_arp
        self.qdisc_bypass = qdisc_bypass
        self._load = load
        self._Dispatcher = Dispatcher
        config = load(config_path)
        self.resolved: dict = {}
        self.config, self.iface = prepare(config, registry, interface, resolved=self.resolved)
        # how often the neighbour table is read again for the MACs taken from it (seconds; 0 = never)
        self.neigh_interval = float(os.environ.get(ENV_NEIGH_REFRESH, "10") or 0)
        self.neigh_changes = 0
        self.dispatcher = self._build(self.config)
        kernel_warnings(self.config)
        self.fanout_group = (os.getpid() & 0xFFFF) or FANOUT_BASE  # one group per dispatcher (per netns)
        self.workers: Dict[int, dict] = {}  # number -> {pid, channel}
        self.started = time.time()
        self.reloads = 0
        self.reload_errors = 0
        self.last_reload_error: Optional[str] = None
        self.restarts = 0
        self.final_reports: Dict[int, dict] = {}
        self._stop = False
        self._reload = False
        self.listener: Optional[socket.socket] = None

    def _build(self, config):
        try:
            return self._Dispatcher(config, self.registry)
        except EncapfwdError as exc:
            raise LiveError(str(exc)) from None

    # -- workers

    def _spawn(self, number: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cpu = self.cpus[number % len(self.cpus)] if self.cpus else None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                parent_end.close()
                if self.listener is not None:
                    self.listener.close()
                for other in self.workers.values():
                    other["channel"].close()
                signal.set_wakeup_fd(-1)
                code = _worker_main(
                    number,
                    self.iface,
                    self.config,
                    self.dispatcher,
                    child_end,
                    self.fanout_group,
                    cpu,
                    self.answer_arp,
                    self.qdisc_bypass,
                )
            except BaseException as exc:  # noqa: BLE001
                try:
                    log(f"worker {number} failed: {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        child_end.close()
        message = _recv_msg(parent_end)
        if message[0] != "ready":
            os.waitpid(pid, 0)
            parent_end.close()
            raise LiveError(message[1])
        self.workers[number] = {"pid": pid, "channel": parent_end}

    def _ask_all(self, message, reply_kind: str, timeout: float = 5.0) -> Dict[int, object]:
        answers = {}
        for worker in list(self.workers.values()):
            try:
                _send_msg(worker["channel"], message)
            except OSError:
                continue
        for number, worker in list(self.workers.items()):
            channel = worker["channel"]
            channel.settimeout(timeout)
            try:
                while True:
                    kind, payload = _recv_msg(channel)
                    if kind == reply_kind:
                        answers[number] = payload
                        break
            except (EOFError, OSError, socket.timeout):
                pass
            finally:
                channel.settimeout(None)
        return answers

    # -- reports

    def report(self) -> dict:
        answers = self._ask_all(("report",), "report")
        workers = [answers[n] for n in sorted(answers)]
        merged = merge_reports([w["dispatcher"] for w in workers])
        engine = merge_reports([w["engine"] for w in workers]) if workers else {}
        for key in ("cpu", "pid", "number"):
            engine.pop(key, None)
        engine.update(
            interface=self.iface.name,
            mac=self.iface.mac,
            workers=len(self.workers),
            pid=os.getpid(),
            uptime=round(time.time() - self.started, 3),
            reloads=self.reloads,
            reload_errors=self.reload_errors,
            last_reload_error=self.last_reload_error,
            worker_restarts=self.restarts,
            neighbour_changes=self.neigh_changes,
            clusters=[str(a) for a in cluster_addresses(self.config)],
            answer_arp=self.answer_arp,
            qdisc_bypass=self.qdisc_bypass,
            config=os.path.abspath(self.config_path),
        )
        out = dict(merged) if isinstance(merged, dict) else {"dispatcher": merged}
        out["engine"] = engine
        out["workers"] = [w["engine"] for w in workers]
        return out

    # -- reload

    def reload(self) -> None:
        try:
            config = self._load(self.config_path)
            resolved: dict = {}
            name = self.interface or self.iface.name
            config, iface = prepare(config, self.registry, name, resolved=resolved)
            if iface.index != self.iface.index:
                raise LiveError("the interface cannot change on reload; restart instead")
            dispatcher = self._build(config)
        except EncapfwdError as exc:
            self.reload_errors += 1
            self.last_reload_error = str(exc)
            log(f"reload failed, keeping the running configuration: {exc}")
            return
        answers = self._ask_all(("reload", config), "reloaded")
        errors = [f"worker {n}: {e}" for n, e in answers.items() if e]
        self.config, self.dispatcher = config, dispatcher
        self.resolved = resolved
        self.reloads += 1
        if errors:
            self.reload_errors += 1
            self.last_reload_error = "; ".join(errors)
            log("reload failed in " + "; ".join(errors))
        else:
            self.last_reload_error = None
            log(f"configuration reloaded from {self.config_path} ({len(answers)} workers)")

    def neighbours_changed(self) -> bool:
        """True when a MAC taken from the neighbour table changed (a server or router replaced, a
        gratuitous ARP) or one that did not resolve now does; asks the kernel to resolve missing ones."""
        changed = []
        try:
            with _ipr() as ipr:
                for address, mac in self.resolved.items():
                    now = None
                    for msg in ipr.get_neighbours(dst=str(address), ifindex=self.iface.index):
                        lladdr = msg.get_attr("NDA_LLADDR")
                        if lladdr and msg["state"] & NUD_VALID:
                            now = lladdr.lower()
                    if now is None:
                        try:
                            ipr.neigh("replace", dst=str(address), ifindex=self.iface.index,
                                      flags=0x01, state=0)  # NTF_USE: resolve it
                        except Exception:  # noqa: BLE001, S110 - retried next time
                            pass
                    elif now != mac:
                        changed.append(f"{address} {mac or 'unresolved'} → {now}")
        except Exception:  # noqa: BLE001 - advice only; never stops forwarding
            return False
        if changed:
            self.neigh_changes += 1
            log("neighbour changed: " + ", ".join(changed) + "; reloading")
        return bool(changed)

    # -- control socket

    def _open_control(self) -> None:
        path = self.control_path
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            query_control(path, "ping", timeout=1.0)
        except (OSError, ValueError):
            pass
        else:
            raise LiveError(f"another encapfwd run answers on {path}; stop it or pass --control PATH")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(16)
        listener.setblocking(False)
        self.listener = listener

    def _serve_one(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(2.0)
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
                if uid not in (0, os.geteuid()):
                    conn.sendall(json.dumps({"error": "permission denied"}).encode())
                    return
                data = b""
                while not data.endswith(b"\n") and len(data) < 4096:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                try:
                    request = json.loads(data.decode() or "{}")
                    command = request.get("command", "report") if isinstance(request, dict) else str(request)
                except ValueError:
                    command = data.decode(errors="replace").strip() or "report"
                if command == "ping":
                    answer = {"pong": True, "pid": os.getpid()}
                elif command == "report":
                    answer = self.report()
                elif command == "reload":
                    self.reload()
                    answer = {"reloaded": self.last_reload_error is None, "error": self.last_reload_error}
                else:
                    answer = {"error": f"unknown command {command!r} (report, ping, reload)"}
                conn.sendall(json.dumps(answer, default=str).encode())
            except OSError:
                pass

    # -- main loop

    def run(self) -> int:
        rpipe, wpipe = os.pipe()
        os.set_blocking(wpipe, False)
        os.set_blocking(rpipe, False)
        old_wakeup = signal.set_wakeup_fd(wpipe)

        def on_stop(signum, frame):
            self._stop = True

        def on_hup(signum, frame):
            self._reload = True

        previous = {
            s: signal.signal(s, h)
            for s, h in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))
        }
        try:
            for number in range(self.nworkers):
                self._spawn(number)
            self._open_control()
            log(
                f"forwarding {len(self.config.clusters)} cluster(s) on {self.iface.name} ({self.iface.mac}) "
                f"with {self.nworkers} worker(s)"
                f"{'; answering ARP for the cluster addresses' if self.answer_arp else ''}; "
                f"control socket {self.control_path}"
            )
            poller = select.poll()
            poller.register(rpipe, select.POLLIN)
            poller.register(self.listener.fileno(), select.POLLIN)
            for worker in self.workers.values():
                poller.register(worker["channel"].fileno(), select.POLLIN)
            next_neigh = time.monotonic() + self.neigh_interval
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self.reload()
                    continue
                if self.neigh_interval and time.monotonic() >= next_neigh:
                    next_neigh = time.monotonic() + self.neigh_interval
                    if self.neighbours_changed():
                        self.reload()
                        continue
                timeout = 1000 if not self.neigh_interval else max(10, int(self.neigh_interval * 1000))
                for fd, _event in poller.poll(min(1000, timeout)):
                    if fd == rpipe:
                        try:
                            os.read(rpipe, 512)
                        except BlockingIOError:
                            pass
                    elif self.listener is not None and fd == self.listener.fileno():
                        self._serve_one()
                    else:
                        self._worker_event(fd, poller)
            return 0
        finally:
            self._shutdown()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in previous.items():
                signal.signal(s, h)
            os.close(rpipe)
            os.close(wpipe)

    def _worker_event(self, fd: int, poller) -> None:
        for number, worker in list(self.workers.items()):
            if worker["channel"].fileno() != fd:
                continue
            try:
                kind, payload = _recv_msg(worker["channel"])
                return  # an unsolicited message (late reply); ignore
            except (EOFError, OSError):
                pass
            poller.unregister(fd)
            worker["channel"].close()
            try:
                _, status = os.waitpid(worker["pid"], 0)
            except ChildProcessError:
                status = -1
            del self.workers[number]
            if self._stop:
                return
            self.restarts += 1
            log(f"worker {number} (pid {worker['pid']}) exited (status {status}); starting it again")
            try:
                self._spawn(number)
            except EncapfwdError as exc:
                log(f"cannot restart worker {number}: {exc}")
                self._stop = True
                return
            poller.register(self.workers[number]["channel"].fileno(), select.POLLIN)

    def _shutdown(self) -> None:
        if self.listener is not None:
            try:
                self.listener.close()
                os.unlink(self.control_path)
            except OSError:
                pass
            self.listener = None
        for worker in self.workers.values():
            try:
                _send_msg(worker["channel"], ("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for number, worker in list(self.workers.items()):
            channel = worker["channel"]
            channel.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while True:
                    kind, payload = _recv_msg(channel)
                    if kind == "stopped":
                        self.final_reports[number] = payload
                        break
            except (EOFError, OSError, socket.timeout):
                pass
            channel.close()
            try:
                pid, _ = os.waitpid(worker["pid"], os.WNOHANG)
                if pid == 0:
                    os.kill(worker["pid"], signal.SIGTERM)
                    time.sleep(0.2)
                    pid, _ = os.waitpid(worker["pid"], os.WNOHANG)
                    if pid == 0:
                        os.kill(worker["pid"], signal.SIGKILL)
                        os.waitpid(worker["pid"], 0)
            except (ChildProcessError, ProcessLookupError):
                pass
        self.workers.clear()

    def final_summary(self) -> dict:
        workers = [self.final_reports[n] for n in sorted(self.final_reports)]
        merged = merge_reports([w["dispatcher"] for w in workers]) if workers else {}
        engine = merge_reports([w["engine"] for w in workers]) if workers else {}
        return {"dispatcher": merged, "engine": engine}


def run(config_path: str, registry, **kwargs) -> int:
    controller = Controller(config_path, registry, **kwargs)
    code = controller.run()
    summary = controller.final_summary()
    engine = summary.get("engine") or {}
    log(f"stopped: {engine.get('rx', 0)} frames received, {engine.get('tx', 0)} sent")
    return code


__all__ = [
    "Controller",
    "LiveError",
    "complete_checksum",
    "default_control_path",
    "merge_reports",
    "prepare",
    "query_control",
    "run",
]
