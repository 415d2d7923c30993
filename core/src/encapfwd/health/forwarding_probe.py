"""``via forwarding``: probe a cluster address through one server's own forwarding method.

The probe is what a client's first packet is: a TCP SYN from the executor's ``nfa`` to VIP:PORT. It is
turned into a frame by the running plan's transform for that server — the same bytes client traffic gets
(MAC frame, IPIP, GRE …) — and sent on the dispatcher's interface. The server, when its tunnel and VIP are
set up, answers SYN-ACK from VIP:PORT straight to the ``nfa`` (direct return, like every answer); that
frame is caught by a packet socket before the dispatcher's IP layer (so neither a blackhole route for the
VIPs nor rp_filter hides it), and the probe then sends a RST the same way so the server keeps no half-open
connection. A server that answers on its own address but has no tunnel, or no VIP on its loopback, never
answers this probe: it is down.

The source port is reserved for the probe by a bound (never connected) TCP socket, so the kernel neither
hands it to another connection nor keeps the SYN-ACK (it answers it with a RST of its own, which is fine).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import secrets
import socket
import struct
import time
from typing import Callable, Dict, Optional, Tuple

from encapfwd.datapath.packet import checksum
from encapfwd.records import ProbeResult

ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
IP_FREEBIND = 15
#: TCP flags
SYN, RST, ACK = 0x02, 0x04, 0x10
#: the MSS the probe's SYN offers (small enough for any encapsulation on a 1500-byte path)
PROBE_MSS = 1360
#: the probe's TTL as P' (after the dispatcher's decrement)
PROBE_TTL = 63


def _bpf_program(nfa: bytes):
    """Classic BPF: accept IPv4 TCP frames to *nfa* (the first 128 bytes), drop everything else."""
    insns = [
        (0x28, 0, 0, 12),  # ldh [12]            ethertype
        (0x15, 0, 5, ETH_P_IP),  # jeq #0x800
        (0x20, 0, 0, 30),  # ld [30]             IPv4 destination
        (0x15, 0, 3, int.from_bytes(nfa, "big")),
        (0x30, 0, 0, 23),  # ldb [23]            protocol
        (0x15, 0, 1, socket.IPPROTO_TCP),
        (0x06, 0, 0, 128),  # ret #128
        (0x06, 0, 0, 0),  # ret #0
    ]
    raw = b"".join(struct.pack("HBBI", *insn) for insn in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = struct.pack("HL", len(insns), ctypes.addressof(buf))
    return prog, buf  # keep buf alive while the option is set


def syn_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, flags: int = SYN) -> bytes:
    """An IPv4 packet P' carrying one TCP segment without data (SYN with an MSS option, or RST)."""
    options = struct.pack("!BBH", 2, 4, PROBE_MSS) if flags & SYN else b""
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, offset << 4, flags,
                      64240 if flags & SYN else 0, 0, 0) + options
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), secrets.randbelow(0x10000), 0x4000,
                     PROBE_TTL, socket.IPPROTO_TCP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


def parse_answer(frame: bytes) -> Optional[Tuple[Tuple[bytes, int, int], int, int]]:
    """``((source, source port, destination port), flags, ack)`` of an Ethernet/IPv4/TCP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != socket.IPPROTO_TCP:
        return None
    ihl = (frame[14] & 0x0F) * 4
    tcp = 14 + ihl
    if ihl < 20 or len(frame) < tcp + 14:
        return None
    sport, dport, _seq, ack = struct.unpack_from("!HHII", frame, tcp)
    return (bytes(frame[26:30]), sport, dport), frame[tcp + 13], ack


class ForwardingProber:
    """The ``via forwarding`` probes of one dispatcher; used from the manager's event loop only.

    :param interface: the dispatcher's interface (frames leave and answers arrive there).
    :param plan_of: returns the running plan (its servers' transforms build the frames, its
        configuration's executor ``nfa`` is the probes' source).
    """

    def __init__(self, interface: str, plan_of: Callable[[], object]):
        self.interface = interface
        self.plan_of = plan_of
        self._tx: Optional[socket.socket] = None
        self._rx: Optional[socket.socket] = None
        self._rx_nfa: Optional[bytes] = None
        self._filter = None
        self._waiting: Dict[Tuple[bytes, int, int], asyncio.Future] = {}

    # -- sockets

    def _open(self, nfa: bytes) -> None:
        if self._tx is None:
            self._tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self._tx.bind((self.interface, 0))
            self._tx.setblocking(False)
        if self._rx is not None and self._rx_nfa == nfa:
            return
        self._close_rx()
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        try:
            prog, self._filter = _bpf_program(nfa)
            rx.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
            rx.bind((self.interface, ETH_P_IP))
            rx.setblocking(False)
        except BaseException:
            rx.close()
            raise
        self._drain(rx, deliver=False)  # what came before the filter
        self._rx, self._rx_nfa = rx, nfa
        asyncio.get_running_loop().add_reader(rx.fileno(), self._on_readable)

    def _close_rx(self) -> None:
        if self._rx is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._rx.fileno())
            except RuntimeError:
                pass
            self._rx.close()
            self._rx = None

    def close(self) -> None:
        self._close_rx()
        if self._tx is not None:
            self._tx.close()
            self._tx = None

    def _drain(self, rx: socket.socket, deliver: bool = True) -> None:
        while True:
            try:
                frame = rx.recv(128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if deliver:
                answer = parse_answer(frame)
                if answer is not None:
                    future = self._waiting.get(answer[0])
                    if future is not None and not future.done():
                        future.set_result(answer[1:])

    def _on_readable(self) -> None:
        if self._rx is not None:
            self._drain(self._rx)

    # -- probing

    def _server(self, name: str):
        plan = self.plan_of()
        for server in plan.servers:
            if server.name == name:
                return plan, server
        return plan, None

    async def connect(self, name: str, vip: str, port: int, timeout: float) -> ProbeResult:
        """A TCP handshake with *vip*:*port* through server *name*'s method (cluster@port@server); never
        raises; *timeout* bounds it."""
        started = time.monotonic()

        def result(ok: bool, detail: str) -> ProbeResult:
            return ProbeResult(ok=ok, detail=detail, latency=time.monotonic() - started)

        plan, server = self._server(name)
        if server is None or server.transform is None:
            return result(False, "not in the running plan")
        nfa = plan.config.executor.nfa
        if nfa is None:
            return result(False, "via forwarding needs the executor's nfa")
        src, dst = ipaddress.IPv4Address(nfa).packed, ipaddress.IPv4Address(vip).packed
        reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        key = None
        try:
            reserved.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            reserved.bind((str(nfa), 0))
            sport = reserved.getsockname()[1]
            self._open(src)
            key = (dst, port, sport)
            future = asyncio.get_running_loop().create_future()
            self._waiting[key] = future
            isn = secrets.randbits(32)
            self._tx.send(server.transform(syn_segment(src, dst, sport, port, isn)))
            try:
                flags, ack = await asyncio.wait_for(future, max(0.0, timeout - (time.monotonic() - started)))
            except asyncio.TimeoutError:
                return result(False, f"timeout (no answer through {server.method})")
            if flags & (SYN | ACK) == SYN | ACK and ack == (isn + 1) & 0xFFFFFFFF:
                # the server keeps no half-open connection: a RST the same way
                self._tx.send(server.transform(syn_segment(src, dst, sport, port, (isn + 1) & 0xFFFFFFFF, RST)))
                return result(True, f"SYN-ACK from {vip}:{port} through {server.method}")
            if flags & RST:
                return result(False, f"connection refused (RST from {vip}:{port} through {server.method})")
            return result(False, f"unexpected answer (TCP flags {flags:#04x})")
        except OSError as exc:
            text = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            return result(False, text[:1].lower() + text[1:])
        finally:
            if key is not None:
                self._waiting.pop(key, None)
            reserved.close()


__all__ = ["ForwardingProber", "parse_answer", "syn_segment"]
