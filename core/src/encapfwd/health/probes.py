"""The core's advisors (health checks), registered like any plugin: ``connect``, ``http`` and ``udp``.

Each probe is ``async def probe(address, port, options, timeout) -> ProbeResult``: it never raises (an error
is a failed probe with a one-line ``detail``) and *timeout* bounds the whole probe (``asyncio.wait_for``),
so a server that never answers costs exactly one timeout and many probes run concurrently in one event
loop. Standard library only; ``docs/advisors.md`` is the user's guide.

- ``connect``: a TCP handshake (then an orderly close).
- ``http``: ``GET path HTTP/1.1`` with a ``Host`` header; the status of the answer must be in ``status``.
- ``udp``: one datagram ``send``; any answer (or one that starts with ``expect``) within the timeout.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
import time
from typing import Awaitable, Callable, List, Mapping, Tuple

from encapfwd.errors import ConfigError, shown
from encapfwd.hookspecs import hookimpl
from encapfwd.records import AdvisorType, ProbeResult

#: What ``http`` accepts when ``status`` is not set.
DEFAULT_STATUS = "200-399"
#: Longest status line (and header block) ``http`` reads before deciding.
MAX_STATUS_LINE = 8192
#: Longest ``udp`` payload (``send``, ``expect``), in bytes.
MAX_PAYLOAD = 1024

_STATUS_LINE = re.compile(rb"^HTTP/[0-9]\.[0-9] ([0-9]{3})(?:[ \r\n]|$)")
_STATUS_RANGE = re.compile(r"^([0-9]{3})(?:-([0-9]{3}))?$")
_HOST = re.compile(r"^(?:[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
_HEX = re.compile(r"^(?:[0-9A-Fa-f]{2})+$")


# ------------------------------------------------------------------------------------- values


def parse_status(text: str) -> Tuple[Tuple[int, int], ...]:
    """``200``, ``200-299`` or a comma-separated list of those → ((lo, hi), …); statuses 100-599."""
    if not isinstance(text, str) or not text:
        raise ConfigError("http: status must be e.g. 200 or 200-299")
    ranges = []
    for part in text.split(","):
        match = _STATUS_RANGE.match(part)
        if not match:
            raise ConfigError(f"http: invalid status {shown(text)} (expected e.g. 200, 200-299 or 200,301-302)")
        lo = int(match.group(1))
        hi = int(match.group(2) or lo)
        if not 100 <= lo <= hi <= 599:
            raise ConfigError(
                f"http: invalid status {shown(text)} (statuses are 100-599, a range goes from low to high)"
            )
        ranges.append((lo, hi))
    return tuple(ranges)


def check_path(path: str) -> str:
    """An HTTP request path: starts with ``/``; printable ASCII without spaces; at most 1024 characters."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"http: path must start with '/', got {shown(path)}")
    if not all(0x21 <= ord(c) <= 0x7E for c in path):
        raise ConfigError(
            f"http: path {shown(path)} has spaces, control or non-ASCII characters "
            "(percent-encode them, e.g. %20)"
        )
    if len(path) > 1024:
        raise ConfigError("http: path is longer than 1024 characters")
    return path


def check_host(host: str) -> str:
    """A ``Host`` header: a name or an address, ``[IPv6]``, optionally ``:port``."""
    if not isinstance(host, str) or not _HOST.match(host):
        raise ConfigError(f"http: invalid host {shown(host)} (a name or address, optionally with :port)")
    port = host.rsplit("]", 1)[-1].partition(":")[2] if host.startswith("[") else host.partition(":")[2]
    if port and not 1 <= int(port) <= 65535:
        raise ConfigError(f"http: invalid host {shown(host)}: the port must be from 1 to 65535")
    return host


def parse_payload(text: str, key: str) -> bytes:
    """``hex:0a1b…`` (pairs of hex digits) or printable ASCII text, sent or expected as its bytes."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"udp: {key} must be hex:… or printable ASCII text")
    if text[:4].lower() == "hex:":
        digits = text[4:]
        if not _HEX.match(digits):
            raise ConfigError(f"udp: {key} {shown(text)}: after hex: come pairs of hex digits (e.g. hex:0a1b)")
        data = bytes.fromhex(digits)
    elif text.isascii() and text.isprintable():
        data = text.encode("ascii")
    else:
        raise ConfigError(f"udp: {key} {shown(text)}: printable ASCII text or hex:… for other bytes")
    if len(data) > MAX_PAYLOAD:
        raise ConfigError(f"udp: {key} is longer than {MAX_PAYLOAD} bytes")
    return data


def check_http(options: Mapping[str, str]) -> None:
    if "path" in options:
        check_path(options["path"])
    if "status" in options:
        parse_status(options["status"])
    if "host" in options:
        check_host(options["host"])


def check_udp(options: Mapping[str, str]) -> None:
    if "send" not in options:
        raise ConfigError("udp: the key send is required (what to send, e.g. send hex:… or send ping)")
    parse_payload(options["send"], "send")
    if "expect" in options:
        parse_payload(options["expect"], "expect")


# ------------------------------------------------------------------------------------- probing


def describe(exc: BaseException) -> str:
    """A failed probe's one-line reason."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, ConfigError):
        return f"invalid option: {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        text = exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
        return text[:1].lower() + text[1:]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def bounded(attempt: Callable[[], Awaitable[Tuple[bool, str]]], timeout: float) -> ProbeResult:
    """Run *attempt* (→ ``(ok, detail)``) bounded by *timeout* seconds in total; never raises (but lets a
    cancellation of the caller through)."""
    started = time.monotonic()
    try:
        bound = max(0.0, float(timeout))
        ok, detail = await asyncio.wait_for(attempt(), bound)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every error is a failed probe
        return ProbeResult(ok=False, detail=describe(exc), latency=time.monotonic() - started)
    return ProbeResult(ok=ok, detail=detail, latency=time.monotonic() - started)


def _family(address: str) -> int:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"invalid address {shown(address)}") from None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


async def _connected(address: str, port: int, kind: int) -> socket.socket:
    """A non-blocking socket connected to *address*:*port* (closed again if connecting fails)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(address), kind)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def probe_connect(address: str, port: int, options: dict, timeout: float) -> ProbeResult:
    """``connect``: ok when a TCP handshake with *address*:*port* completes."""

    async def attempt():
        sock = await _connected(address, port, socket.SOCK_STREAM)
        sock.close()
        return True, "connected"

    return await bounded(attempt, timeout)


def _host_header(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return host if port == 80 else f"{host}:{port}"


async def probe_http(address: str, port: int, options: dict, timeout: float) -> ProbeResult:
    """``http``: ``GET path`` (default ``/``) with ``Host`` (default the server's address); ok when the
    status is in ``status`` (default 200-399)."""

    async def attempt():
        path = check_path(options.get("path", "/"))
        ranges = parse_status(options.get("status", DEFAULT_STATUS))
        host = check_host(options["host"]) if options.get("host") else _host_header(address, port)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: encapfwd-advisor\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        loop = asyncio.get_running_loop()
        sock = await _connected(address, port, socket.SOCK_STREAM)
        try:
            await loop.sock_sendall(sock, request)
            data = b""
            while b"\n" not in data and len(data) < MAX_STATUS_LINE:
                chunk = await loop.sock_recv(sock, MAX_STATUS_LINE - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        if not data:
            return False, "connection closed without an answer"
        match = _STATUS_LINE.match(data)
        if not match:
            return False, "not an HTTP answer"
        status = int(match.group(1))
        if any(lo <= status <= hi for lo, hi in ranges):
            return True, f"HTTP {status}"
        return False, f"HTTP {status}"

    return await bounded(attempt, timeout)


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future):
        self.future = future

    def datagram_received(self, data, addr):
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc):
        if not self.future.done():
            self.future.set_exception(exc)

    def connection_lost(self, exc):
        if exc is not None and not self.future.done():
            self.future.set_exception(exc)


async def probe_udp(address: str, port: int, options: dict, timeout: float) -> ProbeResult:
    """``udp``: send ``send``; ok when an answer comes back (one that starts with ``expect`` when set)."""

    async def attempt():
        payload = parse_payload(options.get("send", ""), "send")
        expect = parse_payload(options["expect"], "expect") if options.get("expect") else None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        sock = await _connected(address, port, socket.SOCK_DGRAM)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _OneAnswer(future), sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            transport.sendto(payload)
            try:
                answer = await future
            except ConnectionRefusedError:
                return False, "port unreachable"
        finally:
            transport.close()
        if expect is not None and not answer.startswith(expect):
            return False, f"unexpected answer ({len(answer)} bytes)"
        return True, f"answer ({len(answer)} bytes)"

    return await bounded(attempt, timeout)


BUILTIN: List[AdvisorType] = [
    AdvisorType(
        name="connect",
        keys={},
        description="TCP handshake with the server's port",
        probe=probe_connect,
    ),
    AdvisorType(
        name="http",
        keys={
            "path": "the path requested (default /)",
            "status": "statuses that are good: 200, 200-299 or 200,301-302 (default 200-399)",
            "host": "the Host header (default the server's address, with :PORT unless 80)",
        },
        description="HTTP GET of a path; the status must be in a range",
        probe=probe_http,
        check=check_http,
    ),
    AdvisorType(
        name="udp",
        keys={
            "send": "the datagram sent: printable ASCII text, or hex:0a1b… (required)",
            "expect": "the answer must start with these bytes (text or hex:…); default any answer",
        },
        description="one UDP datagram; an answer (matching expect) must come back",
        probe=probe_udp,
        check=check_udp,
    ),
]


@hookimpl(trylast=True)
def encapfwd_register_advisors(register):
    for advisor in BUILTIN:
        register(advisor)


__all__ = [
    "BUILTIN",
    "DEFAULT_STATUS",
    "bounded",
    "check_host",
    "check_path",
    "describe",
    "parse_payload",
    "parse_status",
    "probe_connect",
    "probe_http",
    "probe_udp",
]
