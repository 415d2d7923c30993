"""What the XDP engine needs to know about its interface: which XDP mode delivers the frames the program
sends (``XDP_TX``), and how many of them the driver lost.

Measured, not assumed: on a veth, a frame sent with native ``XDP_TX`` reaches the peer only when the peer runs
a native XDP program of its own; otherwise the veth drops it (``rx_queue_N_xdp_tx_errors``), and nothing else
says so. That is most container and bridge set-ups (a veth whose peer is a bridge port). Generic XDP sends
through the driver's ordinary transmit path instead, which works on every interface.

- :func:`inspect` reads the interface (netlink): its kind (``veth``, ``bridge``, … or none for a NIC), its
  driver (ethtool), for a veth whether its peer — possibly in another network namespace, found by
  ``IFLA_LINK`` + ``IFLA_LINK_NETNSID`` and asked with ``IFLA_TARGET_NETNSID`` — has a native XDP program,
  and which XDP actions the driver runs natively (the ``netdev`` generic netlink family, Linux 6.3+).
- :func:`choose_mode` turns that into native or generic, with the reason in words.
- :class:`TxLossWatch` baselines the driver's counters of frames it could not send (ethtool statistics such
  as a veth's ``xdp_tx_errors`` or a NIC's XDP TX error/full counters, and the interface's ``tx_dropped``)
  and says how many were lost since.

Everything here is advice: a question the kernel does not answer gives None ("unknown"), never an exception
into the caller (except :func:`inspect` for an interface that does not exist).
"""

from __future__ import annotations

import ctypes
import fcntl
import re
import socket
import struct
from typing import Dict, Optional, Tuple

from encapfwd.errors import NoSuchInterface

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x03
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSTATS = 0x1D
ETH_SS_STATS = 1
ETH_GSTRING_LEN = 32
#: netdev_xdp_act (uapi/linux/netdev.h): the driver runs XDP_PASS, DROP, TX and ABORTED itself
NETDEV_XDP_ACT_BASIC = 1
#: IFLA_XDP_ATTACHED values (pyroute2 names them)
_ATTACHED = {"xdp": "native", "xdpdrv": "native", 1: "native", "xdpgeneric": "generic", 2: "generic",
             "xdpoffload": "offload", 3: "offload", "xdpmulti": "multi", 4: "multi"}
#: ethtool statistics that count frames a driver could not send with XDP (XDP_TX, or redirected into it):
#: veth ``rx_queue_0_xdp_tx_errors`` / ``tx_queue_0_xdp_xmit_errors``, mlx5 ``rx_xdp_tx_err`` /
#: ``rx_xdp_tx_full`` / ``tx_xdp_err``, virtio_net ``tx_queue_0_xdp_tx_drops``, …  (not ``xdp_drops``: those
#: are frames the program itself dropped)
_LOST_STAT = re.compile(r"xdp.*(tx|xmit).*(err|drop|full)|(tx|xmit).*xdp.*(err|drop|full)")
#: interface kinds whose XDP_TX can vanish silently (the far end must run XDP to take native frames)
VETH = "veth"


class Link:
    """What :func:`inspect` found out about an interface (None: could not be found out)."""

    def __init__(self, name: str, index: int):
        self.name = name
        self.index = index
        self.kind: Optional[str] = None  # IFLA_INFO_KIND: veth, bridge, macvlan, …; None for a NIC
        self.driver: Optional[str] = None  # ethtool's driver name
        self.xdp_features: Optional[int] = None  # netdev_xdp_act bits; None: the kernel does not say
        self.attached: Optional[str] = None  # the mode of an XDP program already on it
        self.peer: Optional[str] = None  # veth: the peer's name
        self.peer_native: Optional[bool] = None  # veth: the peer runs a native XDP program
        self.peer_error: Optional[str] = None  # veth: why the peer could not be asked

    @property
    def what(self) -> str:
        """The driver in words (``veth``, ``bridge``, ``ixgbe``)."""
        return self.kind or self.driver or "unknown driver"

    @property
    def veth_without_peer_program(self) -> bool:
        """A veth whose peer has no native XDP program (or could not be asked): native XDP_TX frames are
        lost there."""
        return self.kind == VETH and not self.peer_native

    def peer_words(self) -> str:
        peer = f" ({self.peer})" if self.peer else ""
        if self.peer_native:
            return f"{self.name} is a veth whose peer{peer} runs a native XDP program"
        if self.peer_error:
            return f"{self.name} is a veth whose peer could not be inspected ({self.peer_error})"
        return f"{self.name} is a veth whose peer{peer} has no XDP program"


# ------------------------------------------------------------------------------------------ netlink


def _xdp_attached(msg) -> Tuple[Optional[str], bool]:
    """(mode of the attached program or None, whether a native one is among them) of an RTM_NEWLINK."""
    xdp = msg.get_attr("IFLA_XDP")
    if not xdp:
        return None, False
    attached = _ATTACHED.get(xdp.get_attr("IFLA_XDP_ATTACHED"))
    native = bool(xdp.get_attr("IFLA_XDP_DRV_PROG_ID")) or attached == "native"
    return attached, native


def inspect(ipr, name: str) -> Link:
    """The interface *name* of this network namespace (NoSuchInterface when there is none)."""
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NoSuchInterface(f"no such interface: {name}")
    msg = ipr.get_links(found[0])[0]
    link = Link(name, found[0])
    info = msg.get_attr("IFLA_LINKINFO")
    link.kind = info.get_attr("IFLA_INFO_KIND") if info else None
    link.attached, _ = _xdp_attached(msg)
    link.driver = ethtool_driver(name)
    link.xdp_features = xdp_features(link.index)
    if link.kind == VETH:
        _peer(ipr, msg, link)
    return link


def _peer(ipr, msg, link: Link) -> None:
    """Fill in the veth peer of *link*: its name and whether it runs a native XDP program."""
    peer = msg.get_attr("IFLA_LINK")
    nsid = msg.get_attr("IFLA_LINK_NETNSID")
    if not peer:
        link.peer_error = "the kernel does not name it"
        return
    try:
        if nsid is None:  # the peer is in this namespace
            answer = ipr.get_links(peer)
        else:
            answer = ipr.link("get", index=peer, IFLA_IF_NETNSID=nsid)  # IFLA_TARGET_NETNSID
        other = next(iter(answer))
    except Exception as exc:  # noqa: BLE001 - unknown counts as "no program"
        link.peer_error = f"{type(exc).__name__}: {exc}"
        return
    link.peer = other.get_attr("IFLA_IFNAME")
    _mode, link.peer_native = _xdp_attached(other)


def xdp_features(ifindex: int) -> Optional[int]:
    """The XDP actions the driver of *ifindex* runs natively (``netdev`` generic netlink family, Linux 6.3+:
    ``NETDEV_CMD_DEV_GET`` → ``NETDEV_A_DEV_XDP_FEATURES``), or None when the kernel does not say."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16) as sock:  # NETLINK_GENERIC
            sock.settimeout(2.0)
            family = _genl(sock, 0x10, 3, 1, struct.pack("=HH", 11, 2) + b"netdev\0" + b"\0")  # GETFAMILY
            fid = family.get(1)  # CTRL_ATTR_FAMILY_ID
            if fid is None:
                return None
            dev = _genl(sock, struct.unpack("=H", fid[:2])[0], 1, 1,
                        struct.pack("=HHI", 8, 1, ifindex))  # NETDEV_CMD_DEV_GET, NETDEV_A_DEV_IFINDEX
            raw = dev.get(3)  # NETDEV_A_DEV_XDP_FEATURES
            return struct.unpack("=Q", raw[:8])[0] if raw and len(raw) >= 8 else None
    except (OSError, struct.error, ValueError):
        return None


def _genl(sock, msg_type: int, cmd: int, version: int, attrs: bytes) -> Dict[int, bytes]:
    """One generic netlink request; the attributes of the answer (ValueError on an error answer)."""
    body = struct.pack("=BBH", cmd, version, 0) + attrs
    sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, 1, 1, 0) + body)  # NLM_F_REQUEST
    data = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == 2:  # NLMSG_ERROR
        raise ValueError(-struct.unpack_from("=i", data, 16)[0])
    out: Dict[int, bytes] = {}
    pos = 20
    while pos + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        out[atype & 0x3FFF] = data[pos + 4:pos + alen]
        pos += (alen + 3) & ~3
    return out


# ------------------------------------------------------------------------------------------ ethtool


def _ethtool(name: str, buffer) -> bool:
    """SIOCETHTOOL on *name* with *buffer* (a ctypes buffer starting with the command)."""
    ifreq = struct.pack("16sP", name.encode()[:15], ctypes.addressof(buffer))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        except OSError:
            return False
    return True


def _drvinfo(name: str):
    buffer = ctypes.create_string_buffer(196)  # struct ethtool_drvinfo
    struct.pack_into("=I", buffer, 0, ETHTOOL_GDRVINFO)
    return buffer if _ethtool(name, buffer) else None


def ethtool_driver(name: str) -> Optional[str]:
    """The driver's name (``ethtool -i``), or None."""
    info = _drvinfo(name)
    if info is None:
        return None
    return info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace") or None


def ethtool_stats(name: str) -> Dict[str, int]:
    """The driver's statistics (``ethtool -S``); empty when it has none or the ioctl fails."""
    info = _drvinfo(name)
    if info is None:
        return {}
    count = struct.unpack_from("=I", info, 180)[0]  # n_stats
    if not count or count > 65536:
        return {}
    strings = ctypes.create_string_buffer(12 + count * ETH_GSTRING_LEN)
    struct.pack_into("=III", strings, 0, ETHTOOL_GSTRINGS, ETH_SS_STATS, count)
    values = ctypes.create_string_buffer(8 + count * 8)
    struct.pack_into("=II", values, 0, ETHTOOL_GSTATS, count)
    if not _ethtool(name, strings) or not _ethtool(name, values):
        return {}
    got = min(count, struct.unpack_from("=I", strings, 8)[0], struct.unpack_from("=I", values, 4)[0])
    out = {}
    raw = strings.raw
    for i in range(got):
        start = 12 + i * ETH_GSTRING_LEN
        key = raw[start:start + ETH_GSTRING_LEN].split(b"\0", 1)[0].decode(errors="replace")
        out[key] = struct.unpack_from("=Q", values, 8 + i * 8)[0]
    return out


def tx_dropped(name: str) -> Optional[int]:
    """The interface's ``tx_dropped`` (what the driver counted as not sent; a veth adds its lost XDP_TX
    frames), from sysfs."""
    try:
        with open(f"/sys/class/net/{name}/statistics/tx_dropped") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------- mode


def choose_mode(link: Optional[Link], asked: str) -> Tuple[str, str, Optional[str]]:
    """``(mode, why, warning)`` for the XDP program on *link*: *asked* (``native``/``generic``) is taken
    as it is (a warning when native frames would be lost); ``auto`` is native only where the frames the
    program sends arrive: a veth whose peer runs a native XDP program, a driver that runs XDP itself;
    generic everywhere else (a veth without one, bridges, macvlan, VLAN devices …, which have no native XDP
    transmit; generic XDP sends through the driver's transmit path)."""
    if asked in ("native", "generic"):
        warning = None
        if asked == "native" and link is not None and link.veth_without_peer_program:
            warning = (f"{link.peer_words()}: frames the XDP program sends (XDP_TX) in native mode will be "
                       "lost; use --xdp-mode generic, or attach an XDP program to the peer")
        return asked, f"--xdp-mode {asked}", warning
    if link is None:
        return "native", "native XDP (the interface could not be inspected)", None
    if link.kind == VETH:
        if link.peer_native:
            return "native", f"{link.peer_words()}, so native XDP_TX frames reach it", None
        return "generic", f"{link.peer_words()}, so native XDP_TX frames would be lost", None
    if link.xdp_features is not None:
        if link.xdp_features & NETDEV_XDP_ACT_BASIC:
            return "native", f"{link.name}'s driver ({link.what}) runs XDP natively", None
        return "generic", f"{link.name}'s driver ({link.what}) has no native XDP", None
    return "native", f"native XDP on {link.name} ({link.what}; generic if the driver refuses it)", None


# ------------------------------------------------------------------------------------------- losses


class TxLossWatch:
    """Frames the driver of *name* could not send, counted from a baseline (:meth:`start`).

    Lost = the larger of the growth of the ethtool XDP TX error counters and the growth of ``tx_dropped``
    (a veth counts a lost XDP_TX frame in both; generic XDP's transmit failures show only in
    ``tx_dropped``; a NIC's XDP TX errors often only in its ethtool counters): never counted twice.
    """

    def __init__(self, name: str):
        self.name = name
        self._last: Dict[str, int] = {}
        self.counters: Dict[str, int] = {}  # growth of each counter since the baseline
        self.lost = 0

    def _read(self) -> Dict[str, int]:
        values = {k: v for k, v in ethtool_stats(self.name).items() if _LOST_STAT.search(k)}
        dropped = tx_dropped(self.name)
        if dropped is not None:
            values["tx_dropped"] = dropped
        return values

    def start(self) -> None:
        try:
            self._last = self._read()
        except Exception:  # noqa: BLE001 - advice only
            self._last = {}
        self.counters, self.lost = {}, 0

    def update(self) -> int:
        """Read the counters; frames lost since :meth:`start` (it only grows)."""
        try:
            now = self._read()
        except Exception:  # noqa: BLE001 - advice only
            return self.lost
        counters = self.counters
        for key, value in now.items():
            last = self._last.get(key)
            # a counter that appeared or went down (the driver reset it) counts from zero again
            grown = value - last if last is not None and value >= last else (value if last is not None else 0)
            if grown:
                counters[key] = counters.get(key, 0) + grown
            self._last[key] = value
        ethtool = sum(v for k, v in counters.items() if k != "tx_dropped")
        self.lost = max(self.lost, ethtool, counters.get("tx_dropped", 0))
        return self.lost

    def words(self) -> str:
        """The counters that grew, e.g. ``rx_queue_0_xdp_tx_errors +1744, tx_dropped +1744``."""
        return ", ".join(f"{k} +{v}" for k, v in sorted(self.counters.items())) or "no counter grew"


__all__ = ["Link", "TxLossWatch", "choose_mode", "ethtool_driver", "ethtool_stats", "inspect", "tx_dropped",
           "xdp_features"]
