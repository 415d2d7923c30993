"""One forwarding process of the AF_PACKET executor: its rings, its Dispatcher, its counters, its loop.

A worker is forked by the supervisor (:mod:`.supervisor`) with the controller's compiled dispatcher; it
talks to the controller only through messages (:mod:`.messaging`): ``report``, ``reload`` (a prepared,
immutable :class:`~encapfwd.model.Config`), ``stop``.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
from typing import Optional

from encapfwd.model import Config
from encapfwd.runtime.afpacket import triage as overload
from encapfwd.runtime.afpacket.admission import KNOWN_REFRESH, LEARN_BUDGET, Admission
from encapfwd.runtime.afpacket.checksum import complete_checksum
from encapfwd.runtime.afpacket.gso import VNET_HDR, VNET_HDR_LEN, segments
from encapfwd.runtime.afpacket.messaging import recv_msg, send_msg
from encapfwd.runtime.afpacket.rings import (
    TP_STATUS_CSUMNOTREADY,
    TP_STATUS_USER,
    PROTOCOL_NAMES,
    TX_DATA_OFFSET,
    RxRing,
    TxRing,
    arp_reply,
    cluster_filter,
    gratuitous_arp,
    listen_protocol,
    set_cpu,
    set_parent_death_signal,
)
from encapfwd.runtime.common import log
from encapfwd.runtime.netlink import Interface
from encapfwd.runtime.prepare import cluster_addresses

#: seconds between two calls of the dispatcher's expiry (flow table and fragment table) in each worker
EXPIRE_INTERVAL = 1.0
#: outside triage, the frames of one received block in this many are looked at to learn known clients
#: (admission.py): the look costs ~0.15 µs per frame, a client with traffic is seen in any block
LEARN_EVERY = 8
#: bytes of a frame beyond the IP packet that a TX slot must hold: Ethernet header + one VLAN tag
_L2_ROOM = 14 + 4


#: set by the TC engine before workers start (they are forked: they inherit it): the skb mark of the frames
#: its program hands up to the slow path (encapfwd.xdp.tc.SLOW_MARK); the socket filter takes only those
SLOW_PATH_MARK = None


def tx_frame_size(mtu: int) -> int:
    """The TX ring slot size for an interface MTU (a power of two ≥ 2048 holding the header and a frame)."""
    frame = 2048
    while frame - 32 < mtu + _L2_ROOM:
        frame *= 2
    return frame


def tx_mtu_limit(mtu: int) -> int:
    """The largest MTU the TX ring of a worker started on an interface of MTU *mtu* can send."""
    return tx_frame_size(mtu) - TX_DATA_OFFSET - _L2_ROOM


def expire(dispatcher, now: float) -> None:
    """Forget stale flows (from the flow table's least-recently-used end, up to the first live one: cost
    proportional to what expired) and stale fragment state. Each worker calls it every
    :data:`EXPIRE_INTERVAL` seconds from its loop, so least-connections counts and the report's flow
    count fall when traffic stops, not only when new flows push old ones out."""
    dispatcher.scheduler.expire(now)
    dispatcher.expire(now)


class Worker:
    """One forwarding process: its rings, its Dispatcher, its counters.

    *rings*, when given, is ``(rx, tx)`` already opened (tests); otherwise the worker opens a TPACKET_V3
    receive ring in *fanout_group* and a TPACKET_V2 transmit ring on *iface*.
    """

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
        rings=None,
    ):
        self.number = number
        self.iface = iface
        self.config = config
        self.dispatcher = dispatcher
        self.channel = channel
        self.cpu = cpu
        self.stop = False
        self.answer_arp = answer_arp
        self.qdisc_bypass = qdisc_bypass
        self.fanout_group = fanout_group
        self._last_error: Optional[int] = None
        self._own_mac = bytes.fromhex(iface.mac.replace(":", ""))
        #: flow synchronisation (engines/flowsync_workers.py): made on the first sync message
        self.sync = None
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
        #: overload triage (runtime/afpacket/triage.py): on while this worker cannot keep up
        self.triage = overload.Triage(self.stats)
        self.stats.update(known_clients=0, known_learned=0, admission_attaches=0, admission_error=None)
        #: GSO buffers (several segments in one, longer than the link's MTU allows a frame): cut into their
        #: segments (gso.py; ``gso_buffers``, ``gso_segments``), or, where that cannot be done, dropped, counted
        self.stats.update(gso_buffers=0, gso_segments=0, gso_dropped=0)
        self._gso_said = -60.0
        self._longest = iface.mtu + 18  # Ethernet header and one VLAN tag
        if rings is not None:
            self.rx, self.tx = rings
        else:
            self._open_rings(iface, config, rx_blocks, rx_block_size, fanout_group, qdisc_bypass)
        #: known-client admission in the kernel (runtime/afpacket/admission.py): the socket filter that takes
        #: the shed ports' SYNs of known clients and a sample of the others while the triage sheds
        self.admission = Admission(self._program(config), self._set_filter,
                                   log=lambda line: log(f"worker {self.number}: {line}"))

    def _set_filter(self, program) -> None:
        self.rx.set_filter(program)

    def _open_rings(self, iface, config, rx_blocks, rx_block_size, fanout_group, qdisc_bypass) -> None:
        self.rx = RxRing(
            iface.name,
            self._program(config),
            block_nr=rx_blocks,
            block_size=rx_block_size,
            fanout_group=fanout_group,
            protocol=self._protocol(config, fanout_group),
            vnet=True,
        )
        frame = tx_frame_size(iface.mtu)
        # through the qdisc by default, which keeps what we send visible to tcpdump on this host;
        # --qdisc-bypass (PACKET_QDISC_BYPASS) hands frames straight to the driver instead
        try:
            self.tx = TxRing(
                iface.name, frame_size=frame, frame_nr=max(256, (1 << 22) // frame), qdisc_bypass=qdisc_bypass
            )
        except BaseException:
            self.rx.close()
            raise

    def _protocol(self, config, fanout_group: int) -> int:
        return listen_protocol(cluster_addresses(config), arp=self.answer_arp, fanout=bool(fanout_group))

    def _program(self, config):
        return cluster_filter(cluster_addresses(config), arp=self.answer_arp, mark=SLOW_PATH_MARK)

    def announce(self) -> None:
        """Gratuitous ARP for every IPv4 cluster address (with --answer-arp), so neighbours learn our MAC."""
        if not self.answer_arp:
            return
        mac = self._own_mac
        for address in cluster_addresses(self.config):
            if address.version == 4:
                self.send_now(gratuitous_arp(mac, address.packed))

    def send_now(self, frame: bytes) -> None:
        self.tx.put(frame)
        self.tx.flush()

    # -- commands from the controller

    def report(self) -> dict:
        self._kernel_stats()
        try:
            dispatched = self.dispatcher.report()
        except Exception as exc:  # noqa: BLE001 - a report must never stop forwarding
            dispatched = {"error": f"{type(exc).__name__}: {exc}"}
        engine = dict(self.stats, number=self.number)
        # what the receive socket is bound to (rings.listen_protocol): "IPv4" keeps it off the frames a kernel
        # program forwards at tc ingress
        engine["rx_protocol"] = PROTOCOL_NAMES.get(getattr(self.rx, "protocol", None), "all")
        if self.sync is not None:
            engine["sync"] = dict(self.sync.stats)
        return {"dispatcher": dispatched, "engine": engine}

    def _kernel_stats(self) -> None:
        admission = self.admission
        self.stats.update(known_clients=len(admission.known.seen), known_learned=admission.known.learned,
                          admission_attaches=admission.attaches, admission_error=admission.error)
        sink = self.dispatcher.flow_sink
        if hasattr(sink, "lookup"):  # the kernel's flow table: frames handed up that followed its flows
            self.stats.update(kernel_adopted=sink.adopted, kernel_lookup_errors=sink.lookup_errors)
        try:
            _packets, drops = self.rx.statistics()
            self.stats["kernel_drops"] += drops
            self.triage.drops += drops  # the kernel resets them on read: the next window judges them too
        except OSError:
            pass
        tx = self.tx
        self.stats.update(tx=tx.sent, tx_ring_full=tx.full, tx_too_big=tx.too_big, tx_errors=tx.errors)

    def handle(self, message) -> None:
        kind = message[0]
        if kind == "report":
            send_msg(self.channel, ("report", self.report()))
        elif kind == "reload":
            plan = message[1]  # the controller's plan: nothing to compile here, no plugin to call
            config = plan.config
            try:
                self.dispatcher.reload(plan)
                program = self._program(config)
                self.rx.set_filter(program)
                if not self.fanout_group:  # the cluster addresses' families may have changed
                    self.rx.bind(self._protocol(config, 0))
                self.admission.set_base(program)  # the admission filter on it again at the next window
                self.config = config
                if self.number == 0:
                    self.announce()
                self.stats["reloads"] += 1
                send_msg(self.channel, ("reloaded", None))
            except Exception as exc:  # noqa: BLE001
                send_msg(self.channel, ("reloaded", f"{type(exc).__name__}: {exc}"))
        elif kind == "stop":
            self.stop = True
        elif kind == "set-pressure":  # overload: the kernel program's pressure mode, followed (runtime/overload.py)
            setter = getattr(self.dispatcher, "set_pressure", None)
            if setter is not None:
                try:
                    setter(bool(message[1]))
                except Exception as exc:  # noqa: BLE001 - forwarding goes on in the exact mode
                    log(f"worker {self.number}: pressure mode not followed: {type(exc).__name__}: {exc}")
        elif kind.startswith("sync-"):  # flow synchronisation with the AF_PACKET engine
            if self.sync is None:
                from encapfwd.flowsync.workers import WorkerJournal

                self.sync = WorkerJournal(self.dispatcher)
            self.sync.handle(self.channel, message)

    def _poll_channel(self, poller_timeout: int = 0) -> None:
        while True:
            ready, _, _ = select.select([self.channel], [], [], poller_timeout / 1000)
            if not ready:
                return
            try:
                message = recv_msg(self.channel)
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
        """Forward until told to stop. For each received block, :meth:`_outputs` walks its frames and
        yields what the dispatcher (or the ARP responder) makes of each, and ``TxRing.queue`` copies those
        into the TX ring; one ``send()`` per block. Every :data:`EXPIRE_INTERVAL` seconds (checked once per
        block and on each idle wake-up) stale flows and fragments are forgotten."""
        from time import monotonic

        rx, tx = self.rx, self.tx
        rxm = rx.map
        block_size, block_nr = rx.block_size, rx.block_nr
        u32 = struct.Struct("<I")
        u32_unpack, u32_pack = u32.unpack_from, u32.pack_into
        blkhdr = struct.Struct("<II").unpack_from
        flush, queue = tx.flush, tx.queue
        outputs = self._outputs
        stats = self.stats
        poller = select.poll()
        poller.register(rx.fd, select.POLLIN | select.POLLERR)
        poller.register(self.channel.fileno(), select.POLLIN)
        channel_fd = self.channel.fileno()
        channel_poller = select.poll()
        channel_poller.register(channel_fd, select.POLLIN)
        channel_poll = channel_poller.poll
        next_expiry = monotonic() + EXPIRE_INTERVAL
        triage = self.triage
        triaged = self._triaged
        learn_every = LEARN_EVERY
        triage.window_start = monotonic()
        triage.window_end = triage.window_start + overload.WINDOW
        backlog_frames, backlog_wait = overload.BACKLOG_FRAMES, overload.BACKLOG_WAIT
        block_opened = struct.Struct("<II").unpack_from  # tpacket_hdr_v1.ts_first_pkt: sec, nsec
        from time import time as wall
        block = 0
        received = 0
        while not self.stop:
            base = block * block_size
            if not u32_unpack(rxm, base + 8)[0] & TP_STATUS_USER:
                if tx.pending:
                    flush()
                stats["rx"] = received
                # while triaging, wake up at least once per window: the hold must end on time
                for fd, event in poller.poll(int(overload.WINDOW * 1000) if triage.active else 1000):
                    if fd == channel_fd:
                        self._poll_channel()
                    elif event & select.POLLERR:
                        self._socket_error()
                now = monotonic()
                if now >= next_expiry:
                    next_expiry = now + EXPIRE_INTERVAL
                    expire(self.dispatcher, now)
                if triage.active and now >= triage.window_end:
                    self._overload_tick(now)
                continue
            if self._last_error is not None:
                log(f"worker {self.number}: {self.iface.name}: receiving again")
                self._last_error = None
            count, offset = blkhdr(rxm, base + 12)
            now = monotonic()
            # a backlog: a well-filled block whose first frame has waited too long (when it was opened)
            if count >= backlog_frames:
                sec, nsec = block_opened(rxm, base + 32)
                waited = wall() - sec - nsec * 1e-9
                if waited > backlog_wait:
                    triage.backlog = True
                    if waited > triage.waited:
                        triage.waited = waited
            # outside triage the frames of one block in LEARN_EVERY are looked at (to learn known clients)
            queue(triaged(base + offset, count, now) if triage.active
                  else outputs(base + offset, count, now, False, not block % learn_every))
            received += count
            triage.frames += count
            u32_pack(rxm, base + 8, 0)  # the block goes back to the kernel
            block += 1
            if block == block_nr:
                block = 0
            flush()
            if now >= triage.window_end:
                self._overload_tick(now)
            if now >= next_expiry:
                next_expiry = now + EXPIRE_INTERVAL
                expire(self.dispatcher, now)
            if channel_poll(0):  # the controller has something for us
                stats["rx"] = received
                self._poll_channel()
        stats["rx"] = received

    def _overload_tick(self, now: float) -> None:
        """End of an overload window (runtime/afpacket/triage.py): ring drops read, pressure judged; a
        change is told to the controller (an unsolicited ``pressure`` message)."""
        drops = 0
        try:
            _packets, drops = self.rx.statistics()
            self.stats["kernel_drops"] += drops
        except OSError:
            pass
        triage = self.triage
        message = triage.tick(now, drops)
        self.admission.known.budget = LEARN_BUDGET
        # the kernel's admission filter follows the triage (at most one attach per window)
        admission = self.admission
        try:
            admission.update(triage.shed if triage.active else (), triage.want_sample, now)
        except Exception as exc:  # noqa: BLE001 - forwarding goes on with the filter as it is
            admission.error = f"{type(exc).__name__}: {exc}"
        triage.filtered, triage.sample_before, triage.sample = admission.filtered, triage.sample, admission.sample
        if message is not None:
            message["worker"] = self.number
            try:
                send_msg(self.channel, ("pressure", message))
            except OSError:
                pass

    def _triaged(self, offset: int, count: int, now: float):
        """:meth:`_outputs` under overload: each frame first looked at in the ring (one unpack, no copy);
        new connections of the shed ports are dropped before the dispatcher, but one in ``triage.stride``."""
        return self._outputs(offset, count, now, triaging=True)

    def _outputs(self, offset: int, count: int, now: float, triaging: bool = False, learning: bool = True):
        """For each of the *count* frames of a received block starting at *offset*: the list of frames to
        send (checksums completed first for offloaded frames; ARP answered with ``--answer-arp``); with
        *triaging*, new connections of the shed ports are dropped first (:meth:`_triaged`).

        Every IPv4 frame is first looked at in the ring (one unpack, no copy): a TCP segment with ACK and
        without SYN of a flow in the flow table makes its source a known client (admission.py; outside triage
        only with *learning* — one block in :data:`LEARN_EVERY` —, only a segment with PSH, and at most
        ``LEARN_BUDGET`` learned per window); under triage,
        a SYN of a shed port from a known client goes through (``overload_known_admitted``), another one is
        counted and, but one in ``triage.stride``, dropped."""
        rxm = self.rx.map
        hdr = self.rx.HDR.unpack_from
        look = overload.FRAME.unpack_from
        least = overload.FRAME_SIZE if triaging or learning else 1 << 30  # else never looked at
        triage = self.triage
        counts = triage.counts
        counts_get = counts.get
        udp = triage.udp
        sampled = triage.sampled
        filtered = triage.filtered
        shed = triage.shed
        dropped = self.stats["overload_dropped"]
        orphans = triage.orphans
        orphan_shed = triage.orphan_shed
        orphans_dropped = self.stats["overload_orphans_dropped"]
        scheduler = self.dispatcher.scheduler
        entries = scheduler.table.entries
        udp_new = not scheduler.stateless  # without a flow table no UDP flow is ever established
        known = self.admission.known
        known_seen = known.seen
        known_get = known_seen.get
        learn = known.learn
        budget = known.budget
        refresh = KNOWN_REFRESH
        process = self.dispatcher.process
        fix = complete_checksum
        stats = self.stats
        arp = self.answer_arp
        own_mac = self._own_mac
        csum_not_ready = TP_STATUS_CSUMNOTREADY
        longest = self._longest
        for _ in range(count):
            nxt, snaplen, status, mac = hdr(rxm, offset)
            start = offset + mac
            offset += nxt
            if snaplen > longest:  # no frame is longer than the link's MTU: a GSO buffer
                yield from self._gso_buffer(rxm, start - mac, start, snaplen, now)
                continue
            if snaplen >= least:
                et, vihl, proto, dst, dport, flags = look(rxm, start)
                if et == 0x0800 and vihl == 0x45:
                    new = False
                    if proto == 6:
                        syn = flags & 0x12
                        if syn == 0x10 and triaging:
                            # ACK without SYN: of a flow in the table, a client that completed its handshake; of
                            # none, an orphan (a flood of random ACKs), shed with its port's (known clients' pass)
                            src = rxm[start + 26 : start + 30]
                            if src + dst + b"\x06" + rxm[start + 34 : start + 38] in entries:
                                if budget:
                                    seen = known_get(src)
                                    if seen is None or now - seen > refresh:
                                        learn(src, now)
                                        budget -= 1
                                        known.budget = budget
                            else:
                                key = (dst, dport)
                                orphans[key] = orphans.get(key, 0) + 1
                                if key in orphan_shed and src not in known_seen:
                                    triage.orphan_skip -= 1
                                    if triage.orphan_skip <= 0:
                                        triage.orphan_skip = triage.orphan_stride
                                    else:
                                        name = orphan_shed[key]
                                        orphans_dropped[name] = orphans_dropped.get(name, 0) + 1
                                        continue
                        elif syn == 0x10 and budget and flags & 0x08:
                            # outside triage only segments with PSH, the client's data, are looked at (not every
                            # pure ACK): a client that completed its handshake
                            src = rxm[start + 26 : start + 30]
                            seen = known_get(src)
                            if (seen is None or now - seen > refresh) and \
                                    src + dst + b"\x06" + rxm[start + 34 : start + 38] in entries:
                                learn(src, now)
                                budget -= 1
                                known.budget = budget
                        elif triaging and syn == 0x02:
                            new = True
                    elif proto == 17 and triaging and udp_new:
                        new = rxm[start + 26 : start + 34] + b"\x11" + rxm[start + 34 : start + 38] not in entries
                    if new:
                        key = (dst, dport)
                        if key in shed:
                            if proto == 6 and rxm[start + 26 : start + 30] in known_seen:
                                stats["overload_known_admitted"] += 1  # a known client: never shed
                            else:
                                counts[key] = counts_get(key, 0) + 1
                                if proto == 6:
                                    if key in filtered:  # the kernel's sample of the unknown SYNs
                                        sampled[key] = sampled.get(key, 0) + 1
                                else:
                                    udp[key] = udp.get(key, 0) + 1
                                triage.skip -= 1
                                if triage.skip <= 0:  # one in *stride* admitted, spread over the window
                                    triage.skip = triage.stride
                                    stats["overload_admitted"] += 1
                                else:
                                    name = shed[key]
                                    dropped[name] = dropped.get(name, 0) + 1
                                    continue
                        else:
                            counts[key] = counts_get(key, 0) + 1
                            if proto == 17:
                                udp[key] = udp.get(key, 0) + 1
            frame = rxm[start : start + snaplen]
            if status & csum_not_ready:
                frame = fix(frame)
                stats["checksums_completed"] += 1
            if arp and frame[12] == 8 and frame[13] == 6:
                reply = arp_reply(frame, own_mac)
                if reply:
                    stats["arp_replies"] += 1
                    yield (reply,)
            else:
                yield process(frame, now)

    def _gso_buffer(self, rxm, at: int, start: int, snaplen: int, now: float):
        """A buffer longer than any frame of the link (its ring header at *at*, the frame at *start*): several
        segments of one flow merged, by GRO on this interface or, over a veth, by the sender's TSO (a host's
        bridge hands a container what its NIC's GRO made). Cut into the segments it stands for (:mod:`.gso`,
        from the ring's virtio_net_hdr), each forwarded as if it had come alone (``gso_buffers``,
        ``gso_segments``). One that cannot be cut — the ring cut it short, the kernel gives no
        virtio_net_hdr, a kind of buffer gso.py does not cut — is dropped, counted (``gso_dropped``) and said
        in the log at most once a minute with what to do (docs/live.md, "GSO buffers")."""
        stats = self.stats
        length = self.rx.LEN.unpack_from(rxm, at)[0]
        why = None
        if not self.rx.vnet:
            why = "this kernel gives the receive ring no virtio_net_hdr (PACKET_VNET_HDR)"
        elif length > snaplen:
            why = "longer than a block of the receive ring"
        else:
            _flags, gso_type, _hlen, gso_size, _cstart, _coff = VNET_HDR.unpack_from(rxm, start - VNET_HDR_LEN)
            pieces = segments(rxm[start : start + snaplen], gso_type, gso_size)
            if pieces:
                stats["gso_buffers"] += 1
                stats["gso_segments"] += len(pieces)
                process = self.dispatcher.process
                for piece in pieces:
                    yield process(piece, now)
                return
            why = f"a kind of buffer the workers do not cut (gso_type {gso_type}, gso_size {gso_size})"
        stats["gso_dropped"] += 1
        if now - self._gso_said >= 60.0:
            self._gso_said = now
            log(f"worker {self.number}: {self.iface.name}: dropped a {length:,}-byte buffer of several segments "
                f"merged by GRO or a sender's TSO ({stats['gso_dropped']:,} so far): {why}. Turn GRO off on this "
                "interface and TSO/GSO off on the one that feeds it (ethtool -K DEV gro off; tso off gso off), "
                "or run --engine tc, which forwards such buffers whole")

    def close(self) -> None:
        for ring in (self.tx, self.rx):
            try:
                ring.close()
            except OSError:
                pass


def worker_main(
    number, iface, config, dispatcher, channel, fanout_group, cpu, answer_arp=False, qdisc_bypass=False
) -> int:
    """The body of a forked worker process: set it up, say ``ready`` (or ``error``), forward, say
    ``stopped`` with a last report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
        send_msg(channel, ("error", f"worker {number}: {type(exc).__name__}: {exc}"))
        return 1
    send_msg(channel, ("ready", os.getpid()))
    try:
        worker.run()
    finally:
        worker.close()
    try:
        send_msg(channel, ("stopped", worker.report()))
    except OSError:
        pass
    return 0
