"""GSO buffers on the AF_PACKET path (docs/live.md, "GSO buffers"): the workers cut a buffer of several
segments into the frames the sender's segmentation would have sent (runtime/afpacket/gso.py).

- The oracle is a real kernel's GSO: the same buffer handed to a veth with TSO and checksum offload off,
  through a packet socket with PACKET_VNET_HDR (the kernel then segments it in software, ``tcp_gso_segment``
  / ``__udp_gso_segment``, and computes every checksum), captured at the far end: the segments must be the
  same bytes, TCP over IPv4 and IPv6, UDP (UDP_L4) over IPv4.
- A worker given such a buffer in its ring (with the ring's virtio_net_hdr) forwards every segment through
  its dispatcher; one it cannot cut (no virtio_net_hdr, cut short by the ring, another GSO type) is dropped,
  counted and said in the log.
- Live, with every engine: tests/test_live_e2e.py's 4 MiB uploads in GSO buffers.
"""

from __future__ import annotations

import mmap
import os
import select
import shutil
import socket
import struct

import pytest

from encapfwd.runtime.afpacket import gso

SRC4, DST4 = bytes((10, 7, 0, 1)), bytes((10, 7, 0, 2))
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")
MACS = bytes.fromhex("020000000702" "020000000701")


def _ones(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def buffer(version: int, proto: int, payload: bytes, flags: int = 0x18, ident: int = 0x1234) -> tuple:
    """A GSO buffer as the kernel hands it on (CHECKSUM_PARTIAL: the L4 checksum field holds the
    pseudo-header's sum) and its virtio_net_hdr's (hdr_len, csum_start, csum_offset)."""
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", 40000, 80, 0xFFFFF000, 77, 0x80, flags, 501, 0, 0) + bytes(
            (1, 1, 8, 10)) + (123456).to_bytes(4, "big") + (654321).to_bytes(4, "big")  # 32 bytes: NOP NOP TS
        offset = 16
    else:
        l4 = struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0)
        offset = 6
    length = len(l4) + len(payload)
    if version == 4:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, ident, 0x4000, 64, proto, 0, SRC4, DST4))
        ip[10:12] = (~_ones(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
        pseudo = SRC4 + DST4 + bytes((0, proto)) + length.to_bytes(2, "big")
        frame = MACS + b"\x08\x00" + bytes(ip)
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, length, proto, 64, SRC6, DST6)
        pseudo = SRC6 + DST6 + length.to_bytes(4, "big") + bytes((0, 0, 0, proto))
        frame = MACS + b"\x86\xdd" + ip
    start = len(frame)
    l4 = bytearray(l4)
    l4[offset : offset + 2] = _ones(pseudo).to_bytes(2, "big")
    return frame + bytes(l4) + payload, start + (32 if proto == 6 else 8), start, offset


def _kernel_segments(frame: bytes, gso_type: int, gso_size: int, hdr_len: int, csum_start: int,
                     csum_offset: int) -> list:
    """The segments a real kernel makes of *frame*: sent into veth ``gsoa`` (TSO, GSO and checksum offload off)
    from a packet socket with PACKET_VNET_HDR, received at ``gsob``."""
    from encapfwd.lab.netns import Namespace, packet_socket, veth_pair

    with Namespace("gso") as ns:
        for key in ("all", "default"):
            ns.sysctl(f"net.ipv6.conf.{key}.disable_ipv6", 1)
        veth_pair(ns, "gsoa", ns, "gsob")
        ns.ethtool_offload("gsoa", tso=False, gso=False, tx=False)
        ns.ethtool_offload("gsob", gro=False)
        rx = packet_socket(ns, "gsob")
        tx = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            tx.setsockopt(263, 15, 1)  # PACKET_VNET_HDR
            tx.bind(("gsoa", 0))
            try:
                tx.send(gso.VNET_HDR.pack(1, gso_type, hdr_len, gso_size, csum_start, csum_offset) + frame)
            except OSError as exc:  # e.g. UDP_L4 from a packet socket needs Linux 6.2
                pytest.skip(f"this kernel's packet sockets refuse a GSO buffer of type {gso_type}: {exc}")
            out = []
            while select.select([rx], [], [], 0.5)[0]:
                got = rx.recv(65535)
                if got[12:14] == frame[12:14]:
                    out.append(got)
            return out
        finally:
            tx.close()
            rx.close()


def _need_lab():
    if os.geteuid() != 0:
        pytest.skip("the kernel oracle needs root (a network namespace, packet sockets)")
    if shutil.which("ethtool") is None:
        pytest.skip("the kernel oracle needs ethtool (Debian package ethtool)")


CASES = {
    "tcp4": (4, 6, gso.GSO_TCPV4, 1448),
    "tcp6": (6, 6, gso.GSO_TCPV6, 1428),
    "udp4": (4, 17, gso.GSO_UDP_L4, 1200),
}


@pytest.mark.parametrize("case", list(CASES))
def test_segments_are_the_kernels(case):
    _need_lab()
    version, proto, gso_type, size = CASES[case]
    payload = os.urandom(10 * size + 333)  # ten full segments and a short last one
    frame, hdr_len, csum_start, csum_offset = buffer(version, proto, payload, flags=0x80 | 0x18 | 0x01)
    ours = gso.segments(frame, gso_type, size)
    kernel = _kernel_segments(frame, gso_type, size, hdr_len, csum_start, csum_offset)
    assert len(kernel) == 11, [len(k) for k in kernel]
    assert [s.hex() for s in ours] == [k.hex() for k in kernel]
    if proto == 6:  # what that means: CWR on the first only, FIN and PSH on the last only, sequence advanced
        l4 = 34 if version == 4 else 54
        assert [s[l4 + 13] for s in ours] == [0x90] + [0x10] * 9 + [0x19]
        seqs = [int.from_bytes(s[l4 + 4 : l4 + 8], "big") for s in ours]
        assert seqs == [(0xFFFFF000 + i * size) & 0xFFFFFFFF for i in range(11)]  # wraps past 2**32
    assert b"".join(s[hdr_len:] for s in ours) == payload


def test_what_cannot_be_cut_is_said_so():
    frame, *_ = buffer(4, 6, os.urandom(4000))
    assert gso.segments(frame, gso.GSO_TCPV4, 0) is None  # no segment size
    assert gso.segments(frame, gso.GSO_UDP_L4, 1000) is None  # the type does not match the protocol
    assert gso.segments(frame, 3, 1000) is None  # UFO: fragments, not segments
    assert gso.segments(frame[:-1000], gso.GSO_TCPV4, 1000) is None  # shorter than its IP total length
    fragment = frame[:20] + b"\x20\x00" + frame[22:]  # MF set
    assert gso.segments(fragment, gso.GSO_TCPV4, 1000) is None
    assert gso.segments(b"\x00" * 12 + b"\x08\x06" + bytes(40), gso.GSO_TCPV4, 1000) is None  # ARP
    assert len(gso.segments(frame, gso.GSO_TCPV4 | gso.GSO_ECN, 1000)) == 4  # ECN: cut alike


# -- a worker with such a buffer in its ring ------------------------------------------------------------------
VIP = "10.7.0.2"
CONFIG = (
    '[executor]\nnfa = "10.7.1.1"\nmac = "02:00:00:00:07:02"\nnetworks = ["10.7.1.0/24"]\n'
    f'[[clusters]]\naddress = "{VIP}"\n'
    '[[clusters.ports]]\nnumber = 80\n'
    '[[clusters.ports.servers]]\naddress = "10.7.1.10"\nmac = "02:00:00:00:07:10"\n'
)


class _Ring:
    """One TPACKET_V3 block with a PACKET_VNET_HDR socket's layout: tpacket3_hdr (next offset, snaplen, len,
    status, mac offset), the virtio_net_hdr just before the frame."""

    def __init__(self, frames, vnet=True):
        from encapfwd.runtime.afpacket.rings import RxRing

        self.HDR, self.LEN, self.vnet = RxRing.HDR, RxRing.LEN, vnet
        self.map = mmap.mmap(-1, sum(48 + len(f) + 16 for f, _, _ in frames) + 64)
        offset = 0
        for frame, header, length in frames:
            size = (48 + len(frame) + 15) & ~15
            struct.pack_into("<I8xIIIH", self.map, offset, size, len(frame), length or len(frame), 0, 48)
            self.map[offset + 38 : offset + 48] = header
            self.map[offset + 48 : offset + 48 + len(frame)] = frame
            offset += size
        self.count = len(frames)

    def statistics(self):
        return 0, 0


def _worker(frames, vnet=True):
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plugins import get_plugin_manager
    from encapfwd.runtime.afpacket.worker import Worker
    from encapfwd.runtime.netlink import Interface

    config = cfg.loads(CONFIG)
    ours, theirs = socket.socketpair()
    worker = Worker(0, Interface("x", 1, "02:00:00:00:07:02", 1500, []), config,
                    Dispatcher(config, get_plugin_manager()), theirs, 0, rings=(_Ring(frames, vnet), None))
    return worker, (ours, theirs)


def _to_vip(frame: bytes) -> bytes:
    return bytes.fromhex("020000000702") + frame[6:30] + socket.inet_aton(VIP) + frame[34:]


def test_a_worker_forwards_every_segment_of_a_buffer(capsys):
    frame, hdr_len, start, offset = buffer(4, 6, os.urandom(5 * 1448))
    frame = _to_vip(frame)  # the pseudo-header's sum is stale now: the segments' checksums are computed anew
    header = gso.VNET_HDR.pack(1, gso.GSO_TCPV4, hdr_len, 1448, start, offset)
    small = _to_vip(buffer(4, 6, b"hello")[0])
    worker, pair = _worker([(frame, header, 0), (small, bytes(10), 0), (frame, header, len(frame) + 100),
                            (frame, gso.VNET_HDR.pack(0, 3, 0, 1448, 0, 0), 0)])
    try:
        out = list(worker._outputs(0, worker.rx.count, 1.0))
        sent = [frames[0] for frames in out if frames]
        assert len(sent) == 6  # five segments and the small frame
        for i, segment in enumerate(sent[:5]):
            assert segment[:6] == bytes.fromhex("020000000710") and len(segment) == 14 + 20 + 32 + 1448
            assert segment[22] == 63  # P': TTL - 1
            assert int.from_bytes(segment[38:42], "big") == (0xFFFFF000 + i * 1448) & 0xFFFFFFFF
            ip = segment[14:34]
            assert _ones(ip) == 0xFFFF  # the header checksum holds
            pseudo = ip[12:20] + bytes((0, 6)) + (len(segment) - 34).to_bytes(2, "big")
            assert _ones(pseudo + segment[34:]) == 0xFFFF  # so does TCP's
        stats = worker.stats
        assert (stats["gso_buffers"], stats["gso_segments"], stats["gso_dropped"]) == (1, 5, 2)
        assert worker.dispatcher.report()["forwarded"] == 6
        log = capsys.readouterr().err
        assert "dropped a 7,406-byte buffer of several segments" in log and "longer than a block" in log
    finally:
        for s in pair:
            s.close()


def test_without_a_virtio_header_the_buffer_is_dropped_and_said(capsys):
    frame, hdr_len, start, offset = buffer(4, 6, os.urandom(3 * 1448))
    worker, pair = _worker([(_to_vip(frame), bytes(10), 0)], vnet=False)
    try:
        assert not [o for o in worker._outputs(0, worker.rx.count, 1.0) if o]
        assert worker.stats["gso_dropped"] == 1 and worker.stats["gso_buffers"] == 0
        assert "gives the receive ring no virtio_net_hdr" in capsys.readouterr().err
    finally:
        for s in pair:
            s.close()
