"""Linux AF_PACKET plumbing for the live engine: TPACKET_V3 receive ring, TPACKET_V2 transmit ring,
classic BPF socket filter and PACKET_FANOUT. Plain :mod:`socket`, :mod:`mmap` and :mod:`struct`.

Layouts are those of ``<linux/if_packet.h>`` (stable kernel ABI):

- receive: a ring of *blocks*; a block belongs to user space while ``block_status & TP_STATUS_USER``;
  inside it ``num_pkts`` packets, each a ``tpacket3_hdr`` followed (at ``tp_mac``) by the frame, chained
  by ``tp_next_offset``; writing ``TP_STATUS_KERNEL`` to the block status hands it back.
- transmit: fixed-size slots, each a ``tpacket2_hdr`` (status, len, …) with the frame at offset 32
  (``TPACKET2_HDRLEN - sizeof(struct sockaddr_ll)``); user space fills available slots, marks them
  ``TP_STATUS_SEND_REQUEST`` and one ``send()`` makes the kernel transmit every marked slot.
"""

from __future__ import annotations

import ctypes
import ipaddress
import mmap
import os
import socket
import struct
from collections.abc import Iterable
from typing import List, Tuple

SOL_PACKET = 263
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806

PACKET_VERSION = 10
PACKET_RX_RING = 5
PACKET_TX_RING = 13
PACKET_STATISTICS = 6
PACKET_LOSS = 14
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
PACKET_VNET_HDR = 15

TPACKET_V2 = 1
TPACKET_V3 = 2

TP_STATUS_USER = 1
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_SEND_REQUEST = 1

PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000  # Linux 6.8+

SO_ATTACH_FILTER = 26

PACKET_HOST = 0
PACKET_OUTGOING = 4

TX_DATA_OFFSET = 32  # TPACKET_ALIGN(sizeof(struct tpacket2_hdr)) == TPACKET2_HDRLEN - sizeof(sockaddr_ll)

_PAGE = mmap.PAGESIZE


# ------------------------------------------------------------------------------------ classic BPF

# opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_JEQ_K = 0x15
_JA = 0x05
_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_MARK = 20


def listen_protocol(addresses: Iterable, *, arp: bool = False, fanout: bool = False) -> int:
    """The Ethernet protocol a receive socket binds to: IPv4 (or IPv6) alone when every cluster address is
    of that family and no ARP is answered, else every protocol (``ETH_P_ALL``).

    Why it matters: the kernel hands a frame to a socket bound to every protocol (a *tap*) before tc ingress
    runs, so with the TC engine such a socket pays for every frame the program forwards (the socket buffer
    shared, its filter run); a socket bound to one protocol is given only what tc ingress let up. With the
    XDP engine the forwarded frames never become socket buffers, with the AF_PACKET engine every frame is
    the worker's anyway: there it changes nothing. A socket in a fanout group cannot be bound again (the
    kernel refuses), and all of a group's sockets must share one protocol, so workers in a group keep
    ``ETH_P_ALL``: a reload that changes the cluster addresses' families must never need a new socket.
    """
    if arp or fanout:
        return ETH_P_ALL
    families = {ipaddress.ip_address(str(address)).version for address in addresses}
    if families == {4}:
        return ETH_P_IP
    if families == {6}:
        return ETH_P_IPV6
    return ETH_P_ALL


#: the names a report gives the protocols of :func:`listen_protocol`
PROTOCOL_NAMES = {ETH_P_ALL: "all", ETH_P_IP: "IPv4", ETH_P_IPV6: "IPv6"}


def _insn(code: int, jt: int, jf: int, k: int) -> Tuple[int, int, int, int]:
    return (code, jt, jf, k & 0xFFFFFFFF)


def cluster_filter(
    addresses: Iterable, snaplen: int = 0xFFFF, *, arp: bool = False, mark=None
) -> List[Tuple[int, int, int, int]]:
    """A classic BPF program accepting only frames addressed to this host (``PACKET_HOST``) whose
    Ethernet type is IPv4 or IPv6 and whose destination address is one of *addresses*; with *arp*, also
    ARP requests (broadcast or unicast) asking for one of the IPv4 *addresses*.

    Each address costs two instructions for IPv4 (four with *arp*) and eight for IPv6 (the kernel allows
    4,096 in all, so about 2,000 IPv4 cluster addresses). VLAN-tagged frames that the NIC did not untag are
    not accepted.

    With *mark* (the TC engine), an IPv4 or IPv6 frame is taken only when it carries that ``skb->mark``: the
    TC program marks the frames it hands up to the slow path (a packet socket sees every frame before tc
    ingress runs, so without it the workers would forward again what the program forwarded).
    """
    v4 = []
    v6 = []
    for address in addresses:
        address = ipaddress.ip_address(str(address))
        (v4 if address.version == 4 else v6).append(address.packed)
    prog: list = []  # entries: ("insn", code, jt_label, jf_label, k) resolved below
    labels = {}

    def emit(code, k=0, jt=None, jf=None):
        prog.append([code, jt, jf, k])

    def label(name):
        labels[name] = len(prog)

    # conditional jumps reach 255 instructions at most: far targets go through an unconditional "ja"
    if arp and v4:
        emit(_LD_H_ABS, 12)
        emit(_JEQ_K, ETH_P_ARP, jt=None, jf="notarp")
        emit(_LD_H_ABS, 20)  # ARP operation
        emit(_JEQ_K, 1, jt="+1", jf=None)
        emit(_RET_K, 0)
        emit(_LD_W_ABS, 38)  # target protocol address
        for packed in v4:
            emit(_JEQ_K, struct.unpack("!I", packed)[0], jt=None, jf="+1")
            emit(_JA, "accept")
        emit(_RET_K, 0)
        label("notarp")
    emit(_LD_B_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
    emit(_JEQ_K, PACKET_HOST, jt="+1", jf=None)
    emit(_RET_K, 0)
    if mark is not None:
        emit(_LD_W_ABS, SKF_AD_OFF + SKF_AD_MARK)
        emit(_JEQ_K, mark, jt="+1", jf=None)
        emit(_RET_K, 0)
    emit(_LD_H_ABS, 12)
    emit(_JEQ_K, ETH_P_IP, jt=None, jf="+1")
    emit(_JA, "v4")
    emit(_JEQ_K, ETH_P_IPV6, jt=None, jf="+1")
    emit(_JA, "v6")
    emit(_RET_K, 0)
    label("v4")
    if v4:
        emit(_LD_W_ABS, 30)
        for packed in v4:
            emit(_JEQ_K, struct.unpack("!I", packed)[0], jt=None, jf="+1")
            emit(_JA, "accept")
    emit(_JA, "reject")
    label("v6")
    for n, packed in enumerate(v6):
        words = struct.unpack("!4I", packed)
        for i, word in enumerate(words):
            emit(_LD_W_ABS, 38 + 4 * i)
            emit(_JEQ_K, word, jt=None, jf=f"v6next{n}")
        emit(_JA, "accept")
        label(f"v6next{n}")
    emit(_JA, "reject")
    label("accept")
    emit(_RET_K, snaplen)
    label("reject")
    emit(_RET_K, 0)

    out = []
    for pc, (code, jt, jf, k) in enumerate(prog):

        def rel(target, pc=pc):
            if target is None:
                return 0
            if target == "+1":
                return 1
            offset = labels[target] - pc - 1
            if offset < 0:
                raise ValueError("BPF jumps go forward only")
            return offset

        if code == _JA:
            out.append(_insn(code, 0, 0, rel(k)))
        else:
            jt_off, jf_off = rel(jt), rel(jf)
            if jt_off > 255 or jf_off > 255:
                raise ValueError("BPF conditional jump too far")
            out.append(_insn(code, jt_off, jf_off, k))
    if len(out) > 4096:
        raise ValueError(f"too many cluster addresses for one socket filter ({len(out)} instructions)")
    return out


def arp_reply(request: bytes, mac: bytes) -> bytes:
    """The ARP reply "the target address of *request* is at *mac*" (RFC 826); b"" if not a request."""
    if (
        len(request) < 42
        or request[12:14] != b"\x08\x06"
        or request[14:22] != b"\x00\x01\x08\x00\x06\x04\x00\x01"
    ):
        return b""
    sender_mac, sender_ip, target_ip = request[22:28], request[28:32], request[38:42]
    return (
        sender_mac
        + mac
        + b"\x08\x06"
        + b"\x00\x01\x08\x00\x06\x04\x00\x02"
        + mac
        + target_ip
        + sender_mac
        + sender_ip
    )


def gratuitous_arp(mac: bytes, address: bytes) -> bytes:
    """A gratuitous ARP request announcing *address* at *mac* (updates neighbours' caches)."""
    return (
        b"\xff" * 6
        + mac
        + b"\x08\x06"
        + b"\x00\x01\x08\x00\x06\x04\x00\x01"
        + mac
        + address
        + b"\x00" * 6
        + address
    )


def attach_filter(sock: socket.socket, program) -> None:
    """Attach (or atomically replace) a classic BPF program on *sock*."""
    raw = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# ----------------------------------------------------------------------------------------- rings


class RxRing:
    """A TPACKET_V3 receive ring on its own AF_PACKET socket bound to *ifname*.

    Only what the BPF *program* accepts is copied into the ring; our own transmissions are never looped
    back (``PACKET_IGNORE_OUTGOING`` and the filter's ``PACKET_HOST`` test).

    With *vnet* (``PACKET_VNET_HDR``, where the kernel takes it: :attr:`vnet` says), each frame comes with its
    ``struct virtio_net_hdr`` just before it (at ``tp_mac`` − 10): a GSO buffer's type and segment size, which
    the workers need to cut it (:mod:`.gso`).
    """

    HDR = struct.Struct("<I8xI4xIH")  # tp_next_offset, tp_snaplen, tp_status, tp_mac
    #: ``tp_len`` (the frame's whole length; longer than tp_snaplen when the ring's block cut it short)
    LEN = struct.Struct("<16xI")

    def __init__(
        self,
        ifname: str,
        program,
        *,
        block_size: int = 1 << 18,
        block_nr: int = 64,
        retire_ms: int = 1,
        fanout_group: int = 0,
        protocol: int = ETH_P_ALL,
        vnet: bool = False,
    ):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing yet
        self.vnet = False
        try:
            attach_filter(sock, program)
            if vnet:  # before the ring: the kernel refuses it on a socket that has one
                try:
                    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                    self.vnet = True
                except OSError:
                    pass
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frame_size = 2048
            req = struct.pack(
                "7I", block_size, block_nr, frame_size, block_size // frame_size * block_nr, retire_ms, 0, 0
            )
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.map = mmap.mmap(
                sock.fileno(), block_size * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            try:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:  # kernels before 4.20: the filter's PACKET_HOST test is enough
                pass
            sock.bind((ifname, protocol))
            if fanout_group:
                # In a fanout group the socket's own PACKET_IGNORE_OUTGOING no longer applies (the group's hook
                # receives): without the group's flag, every frame we send would be cloned (and, from a TX
                # ring, its pages copied), hashed and run through our filter only to be rejected there.
                arg = (fanout_group & 0xFFFF) | (PACKET_FANOUT_HASH << 16)
                try:
                    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, arg | (PACKET_FANOUT_FLAG_IGNORE_OUTGOING << 16))
                except OSError:  # kernels before 6.8: the filter's PACKET_HOST test rejects them
                    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, arg)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.fd = sock.fileno()
        self.block_size = block_size
        self.block_nr = block_nr
        self.ifname = ifname
        self.protocol = protocol

    def set_filter(self, program) -> None:
        attach_filter(self.sock, program)

    def bind(self, protocol: int) -> None:
        """Receive *protocol* from now on (:func:`listen_protocol`); the ring and its frames stay."""
        if protocol != self.protocol:
            self.sock.bind((self.ifname, protocol))
            self.protocol = protocol

    def statistics(self) -> Tuple[int, int]:
        """(packets, drops) since the previous call (the kernel resets them on read)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, _freeze = struct.unpack("3I", raw)
        return packets, drops

    def close(self) -> None:
        try:
            self.map.close()
        finally:
            self.sock.close()


_TX_HDR = struct.Struct("<II").pack_into  # tpacket2_hdr: tp_status, tp_len written together


class TxRing:
    """A TPACKET_V2 transmit ring: :meth:`queue` (many frames) or :meth:`put` (one) copies frames into the
    next free slots and marks them for sending; :meth:`flush` asks the kernel to send every marked slot
    with one system call. Only these methods touch the slots."""

    def __init__(
        self, ifname: str, *, frame_size: int = 2048, frame_nr: int = 2048, qdisc_bypass: bool = True
    ):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: never receives
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)  # a bad frame is skipped, never wedges the ring
            if qdisc_bypass:
                try:
                    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
                except OSError:
                    pass
            block_size = max(_PAGE, frame_size)
            while block_size % frame_size:
                block_size += _PAGE
            per_block = block_size // frame_size
            block_nr = max(1, frame_nr // per_block)
            frame_nr = per_block * block_nr
            sock.setsockopt(
                SOL_PACKET, PACKET_TX_RING, struct.pack("4I", block_size, block_nr, frame_size, frame_nr)
            )
            self.map = mmap.mmap(
                sock.fileno(), block_size * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            sock.bind((ifname, 0))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.fd = sock.fileno()
        self.frame_size = frame_size
        self.frame_nr = frame_nr
        self.max_frame = frame_size - TX_DATA_OFFSET
        self.index = 0
        self.pending = 0
        self.sent = 0
        self.full = 0
        self.too_big = 0
        self.errors = 0

    def queue(self, batches) -> int:
        """Copy every frame of every list in *batches* (an iterable of lists of frames, e.g. one list per
        received frame) into the next free slots, marked ``TP_STATUS_SEND_REQUEST``; returns how many.
        Nothing is sent until :meth:`flush` — except when the ring is full: then what is queued is sent and,
        if the slot is still the kernel's, we wait for it once (≤ 10 ms) before counting the frame in
        :attr:`full`. Frames larger than a slot are counted in :attr:`too_big`.

        The data path calls this once per received block: the position and the pending count live in
        locals and are written back at the end (and before any flush)."""
        txm = self.map
        size = self.frame_size
        end = size * self.frame_nr
        tx_max = self.max_frame
        hdr = _TX_HDR
        slot = self.index * size
        queued = 0
        total = 0
        try:
            for outs in batches:
                for out in outs:
                    length = len(out)
                    if length > tx_max:
                        self.too_big += 1
                        continue
                    if txm[slot]:  # still owned by the kernel: send what is queued, then wait once
                        self.index = slot // size
                        self.pending += queued
                        total += queued
                        queued = 0
                        self.flush()
                        if txm[slot]:
                            self.wait_writable()
                            if txm[slot]:
                                self.full += 1
                                continue
                    data = slot + TX_DATA_OFFSET
                    txm[data : data + length] = out
                    hdr(txm, slot, TP_STATUS_SEND_REQUEST, length)
                    queued += 1
                    slot += size
                    if slot == end:
                        slot = 0
        finally:
            self.index = slot // size
            self.pending += queued
        return total + queued

    def put(self, frame: bytes) -> bool:
        """Queue one frame (see :meth:`queue`); False when it did not fit (too big, ring full)."""
        return self.queue(((frame,),)) == 1

    def flush(self) -> None:
        if self.pending:
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError:
                self.errors += 1
            self.sent += self.pending
            self.pending = 0

    def wait_writable(self, timeout_ms: int = 10) -> None:
        import select

        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        poller.poll(timeout_ms)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            try:
                self.map.close()
            finally:
                self.sock.close()


def set_cpu(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def set_parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel signals us when the parent dies (no orphaned workers)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass
