"""Flow synchronisation between the dispatchers of a scale-out group (docs/scale-out.md, "Flow synchronisation").

Each dispatcher's flow table is local. When ECMP moves an established flow to another dispatcher after a
configuration change, that dispatcher would place it with the new table, possibly on another server, and
the connection would be reset. With ``executor syncpeers``, every dispatcher publishes the flows it places
— ``(flow key, server name, age)`` — to its peers, which insert them into their own kernel flow table, so
that a shifted flow keeps its server. With the AF_PACKET engine the table swept and filled is the workers'
Python flow tables instead (:mod:`.flowsync_workers`: a table with ``named = True`` gives and takes named
entries).

Transport: UDP unicast to each configured peer (``syncpeers``, port ``syncport``). One datagram is at most
:data:`MAX_DATAGRAM` bytes::

    header (36 bytes, network order)
      magic "EFSY" | version 1 | type | count u16 | epoch u64 | sender u64 | seq u32 | sent_ms u64
    body (FLOWS and DUMP)
      names: n u8, then n × (length u8, UTF-8 server name "VIP@port@server")
      count × entry: family u8 (4|6) | proto u8 | src | dst (4 or 16 bytes each) | ports 4 bytes |
                     name index u8 | age_ms u32 (time since the flow's last packet at the sender)
    HMAC-SHA256(key, header + body), 32 bytes

Types: FLOWS (new or refreshed flows), DUMP_REQ (a starting dispatcher asks for every live flow), DUMP (a
part of that answer), DUMP_END (the answer is complete).

Security: the key comes from ``synckey`` (a file readable by its owner only: mode 0600 or stricter, at
least 16 bytes). The receiver checks, in this order, and drops with a counted reason — never raising:
size (``oversized``, ``short``), source address among the peers (``unknown-peer``), the MAC
(``bad-mac``, constant time), magic and version (``bad-magic``, ``bad-version``), the type
(``bad-type``), ``sent_ms`` within :data:`WINDOW` seconds of our clock (``stale``), the sender's epoch
(the sender's start time in ns: an older epoch than the last seen from that sender is ``replay``) and
sequence number (a 64-wide sliding window per sender and epoch: a repeated or too old number is
``replay``), then the body (``malformed``). Only a message that passes everything is applied, and its
sequence number recorded.

Servers are named (cluster@port@server), never by local server id: ids differ between dispatchers.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
import random
import select
import socket
import stat
import struct
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from encapfwd.errors import ConfigError
from encapfwd.runtime.common import log

MAGIC = b"EFSY"
VERSION = 1
FLOWS, DUMP_REQ, DUMP, DUMP_END = 1, 2, 3, 4
TYPES = {FLOWS: "flows", DUMP_REQ: "dump-request", DUMP: "dump", DUMP_END: "dump-end"}
HEADER = struct.Struct("!4sBBHQQIQ")
MAC_SIZE = 32
#: largest datagram sent or accepted (fits an Ethernet MTU with IPv6 + UDP headers)
MAX_DATAGRAM = 1400
#: seconds a message's send time may differ from the receiver's clock
WINDOW = 30.0
#: sequence numbers remembered per sender (sliding window)
REPLAY_WIDTH = 64
#: senders remembered at most (least recently heard forgotten first)
MAX_SENDERS = 64
#: entries waiting to be sent, at most (the oldest are dropped beyond it, counted)
QUEUE_MAX = 1 << 18
#: datagrams sent per second per peer, at most (about 70 IPv4 entries each)
RATE = 5000
#: datagrams read per wake-up, at most
READ_BUDGET = 512
#: datagrams sent per round of the controller's loop, at most (the loop comes back within 5 ms)
FLUSH_BUDGET = 256
#: seconds between two sweeps of the kernel flow table (at least; see KernelTable.sweep)
SWEEP_INTERVAL = 0.1
#: a sweep may use at most this share of the controller's time (the interval grows on large tables)
SWEEP_SHARE = 0.2
#: … this share while the program publishes new flows in its ring (the sweep then finds only refreshes, the
#: workers' flows and what a full ring could not take)
SWEEP_SHARE_RING = 0.04
#: seconds between two reads of the program's ring of new flows, at most (8 MiB hold 131,072 records: over
#: a second of new flows at 100,000/s)
RING_POLL = 0.02
#: seconds a starting dispatcher waits for a peer's dump before announcing anyway
CATCHUP_TIMEOUT = 3.0
ENV_CATCHUP = "ENCAPFWD_SYNC_CATCHUP"
REASONS = ("oversized", "short", "unknown-peer", "bad-mac", "bad-magic", "bad-version", "bad-type", "stale",
           "replay", "malformed")
_ENTRY_FIXED = struct.Struct("!BB")
_TAIL = struct.Struct("!BI")
#: an IPv4 entry on the wire: family, proto, src, dst, ports, name index, age_ms
_V4 = struct.Struct("!Bc4s4s4sBI")
_ALL_V4 = b"\x04" * (MAX_DATAGRAM // _V4.size + 1)
_KKEY = struct.Struct("<16s16s2s2sB3x")  # the kernel's struct flow_key (xdp/maps.py FLOW_KEY)
_KKEY4 = struct.Struct("<4s12x4s12x4sB3x")  # the same for IPv4 addresses (zero-padded), ports as 4 bytes
assert _KKEY4.size == _KKEY.size


# -- the key ---------------------------------------------------------------------------------------------

def read_key(path: str) -> bytes:
    """The group key from *path*: a regular file that only its owner may read, 16 to 4096 bytes (surrounding
    whitespace ignored). ConfigError (one line) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"synckey {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"synckey {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(f"synckey {path} is readable or writable by group or others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}): 'chmod 600 {path}'")
        data = os.read(fd, 8193)
    finally:
        os.close(fd)
    key = data.strip()
    if not 16 <= len(key) <= 4096:
        raise ConfigError(f"synckey {path} must hold 16 to 4096 bytes of key (e.g. 'head -c 32 /dev/urandom | "
                          f"base64 > {path}'), it holds {len(key)}")
    return key


# -- the codec ---------------------------------------------------------------------------------------------

def Entry(key: bytes, name: str, age_ms: int) -> tuple:  # noqa: N802 - a record's name
    """``(flow key, server name, age_ms)``: a plain tuple; the flow key is the dispatcher's (src + dst +
    proto + 4 port bytes: 13 bytes for IPv4, 37 for IPv6)."""
    return (key, name, age_ms)


def take_body(queue: "collections.deque", room: Optional[int] = None,
              taken: Optional[List[Entry]] = None) -> Tuple[int, bytes]:
    """``(count, body)``: entries popped from the left of *queue* while they fit in *room* bytes of a FLOWS or
    DUMP body (default: what a MAX_DATAGRAM datagram leaves), in one pass (names indexed, at most 255; at most
    65,535 entries). An entry too large for any datagram (a name too long) is dropped, never sent. The entries
    packed are appended to *taken* when given."""
    if room is None:
        room = MAX_DATAGRAM - HEADER.size - MAC_SIZE
    names: Dict[str, int] = {}
    raws: List[bytes] = []
    parts: List[bytes] = []
    used = 1  # the names' count
    tail = _TAIL.pack
    while queue and len(parts) < 0xFFFF:
        fkey, name, age = queue[0]
        n = (len(fkey) - 5) >> 1
        cost = 11 + 2 * n
        index = names.get(name)
        if index is None:
            raw = name.encode()
            cost += 1 + len(raw)
            if used + cost > room or len(names) >= 255:
                if not parts and 1 + cost > room:  # fits no datagram
                    queue.popleft()
                    continue
                break
            index = names[name] = len(raws)
            raws.append(bytes((len(raw),)) + raw)
        elif used + cost > room:
            break
        entry = queue.popleft()
        parts.append(bytes((4 if n == 4 else 6, fkey[2 * n])) + fkey[:2 * n] + fkey[2 * n + 1:2 * n + 5]
                     + tail(index, min(int(age), 0xFFFFFFFF)))
        used += cost
        if taken is not None:
            taken.append(entry)
    return len(parts), bytes((len(raws),)) + b"".join(raws) + b"".join(parts)


def seal(key: bytes, kind: int, epoch: int, sender: int, seq: int, count: int = 0, body: bytes = b"",
         sent_ms: Optional[int] = None) -> bytes:
    """One authenticated datagram: header, *body* (:func:`take_body`'s, for FLOWS and DUMP), HMAC."""
    if kind not in (FLOWS, DUMP):
        count, body = 0, b""
    if sent_ms is None:
        sent_ms = int(time.time() * 1000)
    message = HEADER.pack(MAGIC, VERSION, kind, count, epoch, sender, seq, sent_ms) + body
    return message + hmac.new(key, message, hashlib.sha256).digest()


def encode(key: bytes, kind: int, epoch: int, sender: int, seq: int, entries=(), sent_ms: Optional[int] = None
           ) -> bytes:
    """One authenticated datagram of *entries* (the caller keeps it within MAX_DATAGRAM: see :class:`Batcher`)."""
    queue = collections.deque(entries)
    count, body = take_body(queue, room=1 << 62)
    return seal(key, kind, epoch, sender, seq, count, body, sent_ms)


def decode_body(kind: int, count: int, body: bytes) -> List[Entry]:
    """The entries of a FLOWS or DUMP body (ValueError, IndexError or struct.error when malformed)."""
    if kind not in (FLOWS, DUMP):
        if body or count:
            raise ValueError("a body where none belongs")
        return []
    view = memoryview(body)
    nnames = view[0]
    pos = 1
    names = []
    for _ in range(nnames):
        length = view[pos]
        raw = bytes(view[pos + 1:pos + 1 + length])
        if len(raw) != length or not length:
            raise ValueError("truncated name")
        names.append(raw.decode())
        pos += 1 + length
    rest = view[pos:]
    if count and len(rest) == count * _V4.size and rest[0::_V4.size] == _ALL_V4[:count]:
        # every entry IPv4 (the common case): one unpack per entry
        out = []
        append, nnames = out.append, len(names)
        for _family, proto, src, dst, ports, index, age in _V4.iter_unpack(rest):
            if index >= nnames:
                raise ValueError("bad name index")
            append((src + dst + proto + ports, names[index], age))
        return out
    out = []
    for _ in range(count):
        family, proto = view[pos], view[pos + 1]
        if family == 4:
            alen = 4
        elif family == 6:
            alen = 16
        else:
            raise ValueError("bad family")
        end = pos + 2 + 2 * alen + 4 + 5
        if end > len(view):
            raise ValueError("truncated entry")
        src = bytes(view[pos + 2:pos + 2 + alen])
        dst = bytes(view[pos + 2 + alen:pos + 2 + 2 * alen])
        ports = bytes(view[pos + 2 + 2 * alen:pos + 6 + 2 * alen])
        index, age = _TAIL.unpack_from(view, pos + 6 + 2 * alen)
        if index >= len(names):
            raise ValueError("bad name index")
        out.append((src + dst + bytes((proto,)) + ports, names[index], age))
        pos = end
    if pos != len(view):
        raise ValueError("trailing bytes")
    return out


class Batcher:
    """Splits entries into the batches :func:`take_body` packs into datagrams of at most *limit* bytes (and
    255 distinct names each)."""

    def __init__(self, limit: int = MAX_DATAGRAM):
        self.room = limit - HEADER.size - MAC_SIZE

    def batches(self, entries: Iterable[Entry]) -> Iterable[List[Entry]]:
        queue = collections.deque(entries)
        while queue:
            batch: List[Entry] = []
            take_body(queue, self.room, batch)
            if batch:
                yield batch


# -- the receiver ----------------------------------------------------------------------------------------

class _Sender:
    __slots__ = ("epoch", "top", "bits", "heard")

    def __init__(self, epoch: int):
        self.epoch, self.top, self.bits, self.heard = epoch, -1, 0, 0.0


class Receiver:
    """Checks datagrams (see the module's text); counts what it drops by reason. Never raises."""

    def __init__(self, key: bytes, peers: Optional[Iterable] = None, window: float = WINDOW,
                 clock: Callable[[], float] = time.time):
        self.key = key
        self.peers = None if peers is None else {_norm(p) for p in peers}
        self.window = window
        self.clock = clock
        self.senders: "collections.OrderedDict[int, _Sender]" = collections.OrderedDict()
        self.rejected: Dict[str, int] = {r: 0 for r in REASONS}
        self.accepted = 0
        #: per peer address: (sender id, epoch) of the last message accepted, and its lag in ms
        self.lag_ms: Dict[str, int] = {}

    def _drop(self, reason: str):
        self.rejected[reason] += 1
        return None

    def accept(self, data: bytes, address=None):
        """``(type, sender, epoch, entries)`` of an acceptable datagram, else None (counted)."""
        try:
            return self._accept(data, address)
        except Exception:  # noqa: BLE001 - whatever a datagram holds, the receiver never raises
            return self._drop("malformed")

    def _accept(self, data, address):
        size = len(data)
        if size > MAX_DATAGRAM:
            return self._drop("oversized")
        if size < HEADER.size + MAC_SIZE:
            return self._drop("short")
        peer = _norm(address) if address is not None else None
        if self.peers is not None and peer not in self.peers:
            return self._drop("unknown-peer")
        message, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
        if not hmac.compare_digest(hmac.new(self.key, message, hashlib.sha256).digest(), mac):
            return self._drop("bad-mac")
        magic, version, kind, count, epoch, sender, seq, sent_ms = HEADER.unpack_from(message)
        if magic != MAGIC:
            return self._drop("bad-magic")
        if version != VERSION:
            return self._drop("bad-version")
        if kind not in TYPES:
            return self._drop("bad-type")
        now = self.clock()
        if abs(now * 1000 - sent_ms) > self.window * 1000:
            return self._drop("stale")
        state = self.senders.get(sender)
        if state is not None and epoch < state.epoch:
            return self._drop("replay")
        if state is not None and epoch == state.epoch:
            if seq <= state.top - REPLAY_WIDTH or (seq <= state.top and state.bits >> (state.top - seq) & 1):
                return self._drop("replay")
        entries = decode_body(kind, count, bytes(message[HEADER.size:]))  # errors: malformed
        # accepted: record the sequence number
        if state is None or epoch > state.epoch:
            state = _Sender(epoch)
            self.senders[sender] = state
            if len(self.senders) > MAX_SENDERS:
                self.senders.popitem(last=False)
        self.senders.move_to_end(sender)
        if seq > state.top:
            shift = seq - state.top
            state.bits = ((state.bits << shift) | 1) & ((1 << REPLAY_WIDTH) - 1) if shift < REPLAY_WIDTH else 1
            state.top = seq
        else:
            state.bits |= 1 << (state.top - seq)
        state.heard = now
        self.accepted += 1
        if peer is not None:
            self.lag_ms[peer] = max(0, int(now * 1000 - sent_ms))
        return kind, sender, epoch, entries


def _norm(address) -> str:
    if isinstance(address, tuple):
        address = address[0]
    text = str(address)
    if text.startswith("::ffff:"):
        text = text[7:]
    try:
        return str(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        return text


# -- the controller's side ---------------------------------------------------------------------------------

class _Peer:
    def __init__(self, address):
        self.address = address
        self.text = str(address)
        self.sent = 0
        self.datagrams = 0
        self.send_errors = 0
        self.skipped = 0
        self.tokens = float(RATE)
        self.refill = time.monotonic()
        #: a dump this peer asked for: the entries still to send (None: none asked)
        self.dump: Optional[collections.deque] = None
        self.dump_asked = -1e9

    def take(self, now: float) -> bool:
        self.tokens = min(float(RATE), self.tokens + (now - self.refill) * RATE)
        self.refill = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class PlanIndex:
    """The names and ids of one plan's servers, and its VIPs' families (built once per plan)."""

    def __init__(self, plan):
        self.plan = plan
        self.by_sid = {s.sid: s.name for s in plan.servers}
        self.by_name = {s.name: (s.sid, s.up) for s in plan.servers}
        self.family: Dict[bytes, int] = {}
        for port in plan.ports:
            address = ipaddress.ip_address(str(port.cluster))
            self.family[address.packed.ljust(16, b"\0")] = address.version


class FlowSync:
    """The controller's flow synchronisation: sweeps the kernel flow table, batches and sends what it finds
    to every peer, applies what the peers send, answers and asks for dumps. Driven by the controller's loop
    (:meth:`fds`, :meth:`on_readable`, :meth:`poll`); never raises into it."""

    def __init__(self, executor, plan_of: Callable[[], object], table_of: Callable[[], object],
                 key: Optional[bytes] = None, bind: Optional[str] = None):
        self.peers = [_Peer(p) for p in executor.syncpeers]
        self.port = executor.syncport
        self.key = key if key is not None else read_key(executor.synckey)
        self.plan_of, self.table_of = plan_of, table_of
        self.epoch = time.time_ns()
        self.sender = random.getrandbits(63) or 1
        self.seq = 0
        self.receiver = Receiver(self.key, [p.address for p in self.peers])
        self.queue: "collections.deque[tuple]" = collections.deque()
        self.sock = self._open(bind)
        self.index: Optional[PlanIndex] = None
        self.next_sweep = 0.0
        self.sweep_interval = SWEEP_INTERVAL
        self.stats = {"published": 0, "sent_entries": 0, "sent_datagrams": 0, "send_errors": 0,
                      "queue_dropped": 0, "received_entries": 0, "applied": 0, "refreshed": 0,
                      "kept_local": 0, "unknown_server": 0, "server_down": 0, "apply_errors": 0,
                      "no_table": 0, "dumps_served": 0, "dump_requests": 0, "from_ring": 0}
        self.catchup: dict = {"state": "not started"}
        self._dump_done: Dict[str, int] = {}

    def _open(self, bind):
        six = any(p.address.version == 6 for p in self.peers)
        family = socket.AF_INET6 if six else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if six:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.bind((bind or ("::" if six else "0.0.0.0"), self.port))
        except OSError as exc:
            sock.close()
            from encapfwd.runtime.common import LiveError

            raise LiveError(f"flow synchronisation: cannot listen on UDP port {self.port}: {exc.strerror}") from None
        self.six = six
        return sock

    def _dest(self, peer: _Peer):
        if self.six and peer.address.version == 4:
            return ("::ffff:" + peer.text, self.port)
        return (peer.text, self.port)

    # -- the loop's interface
    def fds(self) -> List[int]:
        return [self.sock.fileno()] if self.sock is not None else []

    def owns(self, fd: int) -> bool:
        return self.sock is not None and fd == self.sock.fileno()

    def timeout_ms(self, now: float) -> int:
        if self.queue or any(p.dump for p in self.peers):
            return 5
        wait = max(1, int((self.next_sweep - now) * 1000) + 1)
        if getattr(self.table_of(), "ring", None) is not None:
            wait = min(wait, int(RING_POLL * 1000))
        return wait

    def close(self) -> None:
        closing = getattr(self.table_of, "close", None)
        if closing is not None:
            closing()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close_in_child(self) -> None:
        if self.sock is not None:
            os.close(self.sock.detach())
            self.sock = None

    # -- the plan and the kernel table
    def _index(self) -> Optional[PlanIndex]:
        plan = self.plan_of()
        if plan is None:
            return None
        if self.index is None or self.index.plan is not plan:
            self.index = PlanIndex(plan)
        return self.index

    def _to_entries(self, rows, now_ns: int) -> List[tuple]:
        """Kernel rows ``(kernel key, sid, seen_ns)`` as entries (servers named; flows of servers or VIPs the
        plan does not know are left out)."""
        index = self._index()
        if index is None:
            return []
        by_sid, family = index.by_sid, index.family
        out = []
        append = out.append
        for key, sid, seen in rows:
            name = by_sid.get(sid)
            fam = family.get(key[16:32])
            if name is None or fam is None:
                continue
            age = (now_ns - seen) // 1_000_000
            if fam == 4:
                append((key[0:4] + key[16:20] + key[36:37] + key[32:36], name, age if age > 0 else 0))
            else:
                append((key[0:16] + key[16:32] + key[36:37] + key[32:36], name, age if age > 0 else 0))
        return out

    def sweep(self, now: float) -> int:
        """Publish the kernel table's new (and refresh-due) flows; the interval grows on large tables so
        that sweeping takes at most SWEEP_SHARE of the time."""
        table = self.table_of()
        self.next_sweep = now + self.sweep_interval
        if table is None:
            return 0
        rows = table.sweep()
        spent = table.last_sweep_seconds
        share = SWEEP_SHARE_RING if getattr(table, "ring", None) is not None else SWEEP_SHARE
        self.sweep_interval = max(SWEEP_INTERVAL, spent / share)
        self.next_sweep = now + self.sweep_interval
        # a named table (the AF_PACKET workers': flowsync_workers.py) gives entries, the kernel's rows
        entries = rows if getattr(table, "named", False) else self._to_entries(rows, time.monotonic_ns())
        self.publish(entries)
        if getattr(table, "refill_wanted", False):
            table.refill_wanted = False
            self.ask_for_dumps("a worker started again with an empty flow table")
        return len(entries)

    def ask_for_dumps(self, why: str) -> None:
        """Ask every peer for a dump of its live flows (applied as they come, by every worker): after a
        worker started again, the peers' copies of this dispatcher's flows and their own refill it."""
        self.stats["refills"] = self.stats.get("refills", 0) + 1
        for peer in self.peers:
            self._send(peer, DUMP_REQ)
        log(f"sync: {why}: asking {', '.join(p.text for p in self.peers)} for their flows")

    def publish(self, entries: Iterable[Entry]) -> None:
        """Queue entries for every peer (bounded: the oldest go beyond QUEUE_MAX, counted)."""
        entries = list(entries)
        self.stats["published"] += len(entries)
        over = len(self.queue) + len(entries) - QUEUE_MAX
        if over > 0:
            self.stats["queue_dropped"] += over
            for _ in range(min(over, len(self.queue))):
                self.queue.popleft()
            if len(entries) > QUEUE_MAX:
                entries = entries[-QUEUE_MAX:]
        self.queue.extend(entries)

    # -- sending
    def _send(self, peer: _Peer, kind: int, count: int = 0, body: bytes = b"") -> bool:
        """One datagram to *peer*: its own sequence number and HMAC around *body* (:func:`take_body`)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        data = seal(self.key, kind, self.epoch, self.sender, self.seq, count, body)
        try:
            self.sock.sendto(data, self._dest(peer))
        except OSError:
            peer.send_errors += 1
            self.stats["send_errors"] += 1
            return False
        peer.datagrams += 1
        peer.sent += count
        self.stats["sent_datagrams"] += 1
        self.stats["sent_entries"] += count
        return True

    def flush(self, now: float) -> None:
        """Send queued entries (to every peer) and dumps, within each peer's rate."""
        if self.sock is None:
            return
        dumping = any(p.dump is not None for p in self.peers)
        budget = FLUSH_BUDGET // 2 if dumping else FLUSH_BUDGET  # a dump is never starved by new flows
        while self.queue and budget > 0:
            ready = [p for p in self.peers if p.take(now)]
            if not ready and self.peers:
                # every peer is at its rate: keep the queue (bounded) for the next round
                break
            count, body = take_body(self.queue)  # encoded once for every peer
            for peer in self.peers:
                if peer in ready:
                    self._send(peer, FLOWS, count, body)
                else:  # this peer is at its rate while the others are not: it misses this batch
                    peer.skipped += count
            budget -= 1
            if not self.peers:
                break
        if dumping:
            budget += FLUSH_BUDGET // 2
        for peer in self.peers:
            while peer.dump is not None and budget > 0 and peer.take(now):
                budget -= 1
                if not peer.dump:
                    self._send(peer, DUMP_END)
                    peer.dump = None
                    self.stats["dumps_served"] += 1
                    break
                self._send(peer, DUMP, *take_body(peer.dump))

    # -- receiving
    def on_readable(self, fd: Optional[int] = None) -> bool:
        for _ in range(READ_BUDGET):
            try:
                data, address = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.handle(data, address)
        self._flush_table()
        return True

    def _flush_table(self) -> None:
        """A table that applies asynchronously (the AF_PACKET workers') gets what this round applied."""
        flush = getattr(self.table_of(), "flush", None)
        if flush is not None:
            flush()

    def handle(self, data: bytes, address) -> None:
        got = self.receiver.accept(data, address)
        if got is None:
            return
        kind, sender, epoch, entries = got
        if sender == self.sender:  # our own datagram (this host's address among syncpeers): nothing to learn
            return
        peer_text = _norm(address)
        if kind in (FLOWS, DUMP):
            self.stats["received_entries"] += len(entries)
            self.apply(entries)
            if kind == DUMP and self.catchup.get("state") == "waiting":
                self.catchup["flows"] = self.catchup.get("flows", 0) + len(entries)
        elif kind == DUMP_REQ:
            self.stats["dump_requests"] += 1
            self._serve_dump(peer_text)
        elif kind == DUMP_END:
            self._dump_done[peer_text] = self._dump_done.get(peer_text, 0) + 1

    def _serve_dump(self, peer_text: str) -> None:
        peer = next((p for p in self.peers if p.text == peer_text), None)
        now = time.monotonic()
        if peer is None or now - peer.dump_asked < 1.0:  # at most one dump per peer per second
            return
        peer.dump_asked = now
        table = self.table_of()
        rows = table.snapshot() if table is not None else []
        named = getattr(table, "named", False)  # entries (key, name, age) rather than kernel rows
        if len(rows) > QUEUE_MAX:  # bounded memory: the most recently seen flows first
            rows.sort(key=lambda row: row[2], reverse=not named)
            del rows[QUEUE_MAX:]
            self.stats["dump_truncated"] = self.stats.get("dump_truncated", 0) + 1
        peer.dump = collections.deque(rows if named else self._to_entries(rows, time.monotonic_ns()))

    def apply(self, entries: List[Entry]) -> None:
        """Insert a peer's flows into the kernel flow table, by server name, unless ours is fresher."""
        index = self._index()
        table = self.table_of()
        if index is None or table is None:
            self.stats["no_table"] += len(entries)
            return
        now_ns = time.monotonic_ns()
        rows = []
        append = rows.append
        pack, pack4 = _KKEY.pack, _KKEY4.pack
        by_name = index.by_name
        named = getattr(table, "named", False)  # the AF_PACKET workers' tables take the entries by name
        for key, name, age in entries:
            found = by_name.get(name)
            if found is None:
                self.stats["unknown_server"] += 1
                continue
            sid, up = found
            if not up:
                self.stats["server_down"] += 1
                continue
            if named:
                append((key, name, age))
            elif len(key) == 13:  # IPv4: src, dst, proto, ports
                append((pack4(key[:4], key[4:8], key[9:13], key[8]), sid, now_ns - age * 1_000_000))
            else:
                append((pack(key[:16], key[16:32], key[33:35], key[35:37], key[32]), sid,
                        now_ns - age * 1_000_000))
        counts = table.insert_many(rows)
        self.stats["applied"] += counts["inserted"]
        self.stats["refreshed"] += counts["refreshed"]
        self.stats["kept_local"] += counts["kept-local"]
        self.stats["apply_errors"] += counts["error"]

    # -- the periodic part
    def drain(self) -> int:
        """Publish the new flows the program wrote to its ring since the last call."""
        table = self.table_of()
        rows = table.drain() if getattr(table, "ring", None) is not None else None
        if not rows:
            return 0
        entries = self._to_entries(rows, time.monotonic_ns())
        self.stats["from_ring"] += len(entries)
        self.publish(entries)
        return len(entries)

    def poll(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        try:
            self.drain()
            if now >= self.next_sweep:
                self.sweep(now)
            self.flush(now)
            self._flush_table()
        except Exception as exc:  # noqa: BLE001 - synchronisation never stops forwarding
            self.stats["apply_errors"] += 1
            log(f"sync: {type(exc).__name__}: {exc}")

    # -- catch-up at start
    def catch_up(self, timeout: Optional[float] = None) -> dict:
        """Ask every peer for a dump of its live flows and apply them, until one peer's dump is complete and
        every other peer's is complete or 0.5 s passed, or *timeout* (default CATCHUP_TIMEOUT). Logged."""
        if timeout is None:
            timeout = float(os.environ.get(ENV_CATCHUP, "") or CATCHUP_TIMEOUT)
        started = time.monotonic()
        self.catchup = {"state": "waiting", "flows": 0, "peers": []}
        if not self.peers or timeout <= 0:
            self.catchup.update(state="skipped", seconds=0.0)
            return self.catchup
        for peer in self.peers:
            self._send(peer, DUMP_REQ)
        first_done = None
        deadline = started + timeout
        while True:
            now = time.monotonic()
            done = [p.text for p in self.peers if self._dump_done.get(p.text)]
            if done and first_done is None:
                first_done = now
            if len(done) == len(self.peers) or (first_done is not None and now - first_done >= 0.5):
                break
            if now >= deadline:
                break
            ready, _, _ = select.select([self.sock], [], [], min(0.05, max(0.0, deadline - now)))
            if ready:
                self.on_readable()
            self.flush(time.monotonic())
            if not done and now - started > 0.5 and int((now - started) * 2) != int((now - started - 0.05) * 2):
                for peer in self.peers:  # ask again (a lost datagram), at most twice a second
                    if not self._dump_done.get(peer.text):
                        self._send(peer, DUMP_REQ)
        seconds = round(time.monotonic() - started, 3)
        done = [p.text for p in self.peers if self._dump_done.get(p.text)]
        self.catchup.update(state="done" if done else "timed out", seconds=seconds, peers=done)
        if done:
            log(f"sync: caught up before announcing: {self.catchup['flows']} flows from {', '.join(done)} in "
                f"{seconds:.2f} s")
        else:
            log(f"sync: catch-up timed out after {seconds:.2f} s (no peer answered): announcing with the flows "
                "this dispatcher places itself")
        return self.catchup

    # -- the report
    def snapshot(self) -> dict:
        table = self.table_of()
        workers = {"workers": table.report()} if hasattr(table, "report") else {}
        return {
            **workers,
            "peers": [{"address": p.text, "sent_entries": p.sent, "sent_datagrams": p.datagrams,
                       "send_errors": p.send_errors, "skipped_at_rate": p.skipped, "lag_ms": self.receiver.lag_ms.get(p.text)}
                      for p in self.peers],
            "port": self.port,
            "queue": len(self.queue),
            "sweep_interval": round(self.sweep_interval, 3),
            "last_sweep_seconds": round(table.last_sweep_seconds, 4) if table is not None else None,
            "last_sweep_entries": table.last_sweep_entries if table is not None else None,
            "received_datagrams": self.receiver.accepted,
            "rejected": dict(self.receiver.rejected),
            "catchup": dict(self.catchup),
            **self.stats,
        }


__all__ = ["Batcher", "DUMP", "DUMP_END", "DUMP_REQ", "Entry", "FLOWS", "FlowSync", "MAX_DATAGRAM", "REASONS", "seal",
           "take_body",
           "Receiver", "decode_body", "encode", "read_key"]


def flowsync_for(controller) -> Optional[FlowSync]:
    """The controller's :class:`FlowSync` (None without ``executor syncpeers``): on the kernel flow table
    with the XDP and TC engines, on the workers' Python flow tables with the AF_PACKET engine
    (:mod:`.flowsync_workers`)."""
    executor = controller.config.executor
    if not executor.syncpeers:
        return None
    from encapfwd.flowsync.sweep import TableOf
    from encapfwd.runtime.common import LiveError

    try:
        key = read_key(executor.synckey)
    except ConfigError as exc:
        raise LiveError(str(exc)) from None
    workers = None
    if controller.engine in ("xdp", "tc"):
        table_of = TableOf(controller.kernel_flows)
    else:
        from encapfwd.flowsync.workers import WorkerFlows

        workers = WorkerFlows(controller.pool)

        def table_of():
            return workers
    sync = FlowSync(executor, lambda: controller.plan, table_of, key=key)
    if workers is not None:
        workers.stats = sync.stats
    log(f"sync: flows synchronised with {', '.join(p.text for p in sync.peers)} on UDP port {sync.port} "
        f"(HMAC-SHA256), {'the kernel flow table' if workers is None else 'the workers flow tables'}")
    return sync


def metric_families(sync: dict) -> list:
    """The Prometheus families of a report's ``sync`` section (engines/metrics.py adds them)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def num(value) -> float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0

    out = []
    for name, key, doc in (
            ("encapfwd_sync_published_total", "published", "Flows this dispatcher published to its peers."),
            ("encapfwd_sync_ring_published_total", "from_ring",
             "Of those, new flows the kernel program handed over in its ring (the rest: the table's sweep)."),
            ("encapfwd_sync_received_total", "received_entries", "Flow entries received from peers (authenticated)."),
            ("encapfwd_sync_applied_total", "applied", "Peers' flows inserted into the kernel flow table."),
            ("encapfwd_sync_refreshed_total", "refreshed", "Peers' flows that refreshed an older local entry."),
            ("encapfwd_sync_kept_local_total", "kept_local", "Peers' flows not applied: the local entry was fresher."),
            ("encapfwd_sync_queue_dropped_total", "queue_dropped", "Flows dropped from a full send queue."),
            ("encapfwd_sync_send_errors_total", "send_errors", "Datagrams the kernel refused to send.")):
        family = CounterMetricFamily(name, doc)
        family.add_metric([], num(sync.get(key)))
        out.append(family)
    rejected = CounterMetricFamily("encapfwd_sync_rejected_total", "Sync datagrams dropped, by reason.",
                                   labels=["reason"])
    for reason, count in sorted((sync.get("rejected") or {}).items()):
        rejected.add_metric([str(reason)], num(count))
    out.append(rejected)
    sent = CounterMetricFamily("encapfwd_sync_sent_total", "Flow entries sent, per peer.", labels=["peer"])
    lag = GaugeMetricFamily("encapfwd_sync_peer_lag_seconds",
                            "Send-to-receive delay of the last datagram accepted from the peer.", labels=["peer"])
    for peer in sync.get("peers") or ():
        sent.add_metric([str(peer.get("address"))], num(peer.get("sent_entries")))
        if peer.get("lag_ms") is not None:
            lag.add_metric([str(peer.get("address"))], num(peer.get("lag_ms")) / 1000)
    queue = GaugeMetricFamily("encapfwd_sync_queue", "Flow entries waiting to be sent.")
    queue.add_metric([], num(sync.get("queue")))
    return out + [sent, lag, queue]


def report_line(sync: dict) -> str:
    """One line of ``encapfwd server report`` for the report's ``sync`` section."""
    catchup = sync.get("catchup") or {}
    rejected = {k: v for k, v in (sync.get("rejected") or {}).items() if v}
    peers = ", ".join(f"{p.get('address')} ({p.get('sent_entries', 0)} sent"
                      f"{'' if p.get('lag_ms') is None else ', lag ' + str(p['lag_ms']) + ' ms'})"
                      for p in sync.get("peers") or ())
    state = catchup.get("state", "?")
    if state in ("done", "timed out"):
        state += f" ({catchup.get('flows', 0)} flows in {catchup.get('seconds', 0)} s)"
    return (f"sync: peers {peers or '-'}; {sync.get('published', 0)} published, {sync.get('received_entries', 0)} "
            f"received, {sync.get('applied', 0)} applied, {sync.get('kept_local', 0)} kept local; rejected "
            f"{', '.join(f'{k} {v}' for k, v in sorted(rejected.items())) or 'none'}; catch-up at start: {state}")
