"""The core's advisors (``connect``, ``http``, ``udp``) against real sockets: servers on 127.0.0.1 started by
the tests, and black holes in network namespaces the tests create (root only; skipped otherwise).

Every probe returns a ProbeResult (never raises) within its timeout: a server that never answers costs one
timeout, and many such probes run concurrently cost one timeout in all.
"""

from __future__ import annotations

import asyncio
import ctypes
import http.server
import os
import socket
import threading
import time

import pytest

from encapfwd.health import probes as advisors
from encapfwd.health.probes import probe_connect, probe_http, probe_udp
from encapfwd.errors import ConfigError
from encapfwd.hookspecs import ProbeResult

TIMEOUT = 0.3
#: what a probe of a black hole may take at most: its timeout plus scheduling slack (2 shared cores)
SLACK = 0.3


def run(coro):
    return asyncio.run(coro)


def timed(coro):
    started = time.monotonic()
    result = asyncio.run(coro)
    return result, time.monotonic() - started


def assert_one_timeout(result: ProbeResult, took: float, timeout: float = TIMEOUT):
    assert not result.ok and result.detail == "timeout", result
    assert timeout - 0.05 <= took <= timeout + SLACK, took
    assert timeout - 0.05 <= result.latency <= timeout + SLACK, result.latency


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def listener():
    """A TCP socket listening on 127.0.0.1 (the kernel completes handshakes; nobody needs to accept)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def closed_port():
    """A TCP port on 127.0.0.1 that is bound (so nobody else takes it) but not listening: refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def full_backlog():
    """A listening socket that never accepts, its accept queue full: new handshakes get no answer at all
    (the kernel drops their SYNs), so a connect to it hangs: a black hole on loopback, no root needed."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    held = []
    for _ in range(8):  # fill the queue: the first connects complete, then they hang
        client = socket.socket()
        client.settimeout(0.2)
        try:
            client.connect(("127.0.0.1", port))
            held.append(client)
        except (socket.timeout, OSError):
            client.close()
            break
    else:
        pytest.fail("the accept queue never filled")
    yield port
    for client in held:
        client.close()
    sock.close()


class Handler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, self.headers.get("Host")))
        status = {"/fail": 503, "/moved": 301, "/empty": 204}.get(self.path, 200)
        if self.path == "/slow":
            time.sleep(1.0)
        try:
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except OSError:  # the probe gave up (slow): nothing to answer to
            pass


@pytest.fixture
def web():
    """A small HTTP server on 127.0.0.1 in a thread: /fail → 503, /moved → 301, /slow answers after 1 s,
    anything else → 200; it records (path, Host) of every request."""
    Handler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def raw_tcp():
    """A TCP server on 127.0.0.1 that answers every connection with fixed bytes (set ``.answer``) and
    closes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    state = {"answer": b"", "stop": False}

    def serve():
        while not state["stop"]:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(state["answer"])
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], state
    state["stop"] = True
    sock.close()


@pytest.fixture
def udp_server():
    """A UDP server on 127.0.0.1: ``PING…`` gets ``PONG…`` back, a DNS-like query gets its ID with the QR
    bit set, anything else no answer. Records what it received."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    received = []

    def serve():
        while True:
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                return
            received.append(data)
            if data.startswith(b"PING"):
                sock.sendto(b"PONG" + data[4:], peer)
            elif len(data) >= 12 and data[2:4] == b"\x01\x00":  # a DNS query with RD: answer
                sock.sendto(data[:2] + b"\x81\x80" + data[4:], peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], received
    sock.close()


# ----------------------------------------------------------------------------- namespaces (root only)

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(namespace, coro_factory):
    """Run ``asyncio.run(coro_factory())`` in a thread that lives in *namespace* (setns applies to the
    calling thread only: the test process stays where it is). Returns (result, seconds)."""
    out = {}

    def target():
        fd = os.open(f"/run/netns/{namespace.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                out["error"] = OSError(ctypes.get_errno(), "setns failed")
                return
        finally:
            os.close(fd)
        started = time.monotonic()
        try:
            out["result"] = asyncio.run(coro_factory())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["took"] = time.monotonic() - started

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    if "error" in out:
        raise out["error"]
    return out["result"], out["took"]


#: in the namespace: an address behind a neighbour that never answers (its SYNs vanish) …
SILENT = "198.51.100.1"
#: … and one whose route is ``blackhole`` (the kernel refuses to send: EINVAL at once)
BLACKHOLED = "192.0.2.1"


@pytest.fixture(scope="module")
def blackhole_ns():
    from encapfwd.lab import netns

    reason = netns.lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.Namespace("advbh") as ns:
        ns.ip("link", "add", "bh0", "type", "veth", "peer", "name", "bh1")
        ns.ip("link", "set", "bh0", "up")
        ns.ip("link", "set", "bh1", "up")
        ns.ip("addr", "add", "198.51.100.254/24", "dev", "bh0")
        ns.ip("neigh", "replace", SILENT, "lladdr", "02:00:00:00:00:99", "dev", "bh0", "nud", "permanent")
        ns.ip("route", "add", "blackhole", "192.0.2.0/24")
        yield ns


# ------------------------------------------------------------------------------------------- connect


def test_connect_to_a_listening_socket_is_ok(listener):
    result, took = timed(probe_connect("127.0.0.1", listener, {}, 1.0))
    assert result.ok and result.detail == "connected", result
    assert 0 <= result.latency <= took < 1.0


def test_connect_over_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sock = socket.socket(socket.AF_INET6)
    try:
        sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this machine")
    sock.listen(4)
    try:
        assert run(probe_connect("::1", sock.getsockname()[1], {}, 1.0)).ok
    finally:
        sock.close()


def test_connect_to_a_closed_port_is_refused_at_once(closed_port):
    result, took = timed(probe_connect("127.0.0.1", closed_port, {}, 1.0))
    assert not result.ok and result.detail == "connection refused", result
    assert took < 0.5


def test_connect_to_a_full_backlog_costs_one_timeout(full_backlog):
    result, took = timed(probe_connect("127.0.0.1", full_backlog, {}, TIMEOUT))
    assert_one_timeout(result, took)


def test_twenty_black_holed_connects_cost_one_timeout_together(full_backlog):
    async def twenty():
        return await asyncio.gather(*(probe_connect("127.0.0.1", full_backlog, {}, TIMEOUT) for _ in range(20)))

    results, took = timed(twenty())
    assert len(results) == 20 and all(r.detail == "timeout" and not r.ok for r in results), results
    assert took <= TIMEOUT + SLACK, f"20 concurrent probes took {took:.2f} s"


def test_connect_to_a_silent_address_in_a_namespace_costs_one_timeout(blackhole_ns):
    result, took = in_netns(blackhole_ns, lambda: probe_connect(SILENT, 80, {}, TIMEOUT))
    assert_one_timeout(result, took)


def test_twenty_probes_of_a_silent_address_run_concurrently(blackhole_ns):
    async def twenty():
        return await asyncio.gather(*(probe_connect(SILENT, 80 + i, {}, TIMEOUT) for i in range(20)))

    results, took = in_netns(blackhole_ns, twenty)
    assert all(r.detail == "timeout" for r in results), results
    assert took <= TIMEOUT + SLACK, f"20 concurrent probes took {took:.2f} s"


def test_a_blackhole_route_fails_at_once_with_its_reason(blackhole_ns):
    result, took = in_netns(blackhole_ns, lambda: probe_connect(BLACKHOLED, 80, {}, 2.0))
    assert not result.ok and result.detail == "invalid argument", result  # EINVAL: the route discards
    assert took < 0.5


def test_connect_never_raises():
    for address, port in (("not-an-address", 80), ("127.0.0.1", 70000), ("", 0)):
        result = run(probe_connect(address, port, {}, 0.5))
        assert isinstance(result, ProbeResult) and not result.ok and result.detail, result
        assert "\n" not in result.detail


# ---------------------------------------------------------------------------------------------- http


def test_http_200_is_ok_and_sends_path_and_host(web):
    result = run(probe_http("127.0.0.1", web, {"path": "/health/check?full=1"}, 2.0))
    assert result.ok and result.detail == "HTTP 200", result
    assert Handler.seen[-1] == ("/health/check?full=1", f"127.0.0.1:{web}")


def test_http_defaults_to_slash(web):
    assert run(probe_http("127.0.0.1", web, {}, 2.0)).ok
    assert Handler.seen[-1][0] == "/"


def test_http_host_option_is_the_host_header(web):
    assert run(probe_http("127.0.0.1", web, {"host": "www.example.org"}, 2.0)).ok
    assert Handler.seen[-1] == ("/", "www.example.org")


def test_http_503_fails(web):
    result = run(probe_http("127.0.0.1", web, {"path": "/fail"}, 2.0))
    assert not result.ok and result.detail == "HTTP 503", result


@pytest.mark.parametrize("path,status,ok", [
    ("/moved", None, True),            # default 200-399
    ("/moved", "200-299", False),
    ("/moved", "200,301-302", True),
    ("/fail", "503", True),            # a port that is expected to say "maintenance"
    ("/empty", "200", False),
    ("/empty", "200-204", True),
    ("/", "300-399", False),
])
def test_http_status_ranges(web, path, status, ok):
    options = {"path": path} if status is None else {"path": path, "status": status}
    result = run(probe_http("127.0.0.1", web, options, 2.0))
    assert result.ok is ok, result
    assert result.detail.startswith("HTTP ")


def test_http_slow_answer_costs_one_timeout(web):
    result, took = timed(probe_http("127.0.0.1", web, {"path": "/slow"}, TIMEOUT))
    assert_one_timeout(result, took)


def test_http_refused_and_not_http(closed_port, raw_tcp):
    result = run(probe_http("127.0.0.1", closed_port, {}, 1.0))
    assert not result.ok and result.detail == "connection refused"
    port, state = raw_tcp
    state["answer"] = b"SSH-2.0-OpenSSH\r\n"
    result = run(probe_http("127.0.0.1", port, {}, 1.0))
    assert not result.ok and result.detail == "not an HTTP answer", result
    state["answer"] = b""
    result = run(probe_http("127.0.0.1", port, {}, 1.0))
    assert not result.ok and result.detail == "connection closed without an answer", result


def test_http_bad_options_are_a_failed_probe_not_an_exception(web):
    for options in ({"path": "/a b"}, {"path": "/a\r\nX-Injected: 1"}, {"status": "2xx"},
                    {"host": "a b"}, {"path": 5}):
        result = run(probe_http("127.0.0.1", web, options, 1.0))
        assert not result.ok and result.detail.startswith("invalid option"), (options, result)
        assert "\n" not in result.detail and "\r" not in result.detail
    assert Handler.seen == []  # nothing was sent


# ----------------------------------------------------------------------------------------------- udp


def test_udp_answer_matching_expect(udp_server):
    port, received = udp_server
    result = run(probe_udp("127.0.0.1", port, {"send": "PING me", "expect": "PONG"}, 1.0))
    assert result.ok and result.detail == "answer (7 bytes)", result
    assert received[-1] == b"PING me"
    assert run(probe_udp("127.0.0.1", port, {"send": "hex:50494e47", "expect": "hex:504f4e47"}, 1.0)).ok
    assert received[-1] == b"PING"
    assert run(probe_udp("127.0.0.1", port, {"send": "PING"}, 1.0)).ok  # no expect: any answer


def test_udp_answer_not_matching_expect(udp_server):
    port, _ = udp_server
    result = run(probe_udp("127.0.0.1", port, {"send": "PING", "expect": "PANG"}, 1.0))
    assert not result.ok and result.detail == "unexpected answer (4 bytes)", result


def test_udp_no_answer_costs_one_timeout(udp_server):
    port, received = udp_server
    result, took = timed(probe_udp("127.0.0.1", port, {"send": "hello"}, TIMEOUT))
    assert_one_timeout(result, took)
    assert received[-1] == b"hello"


def test_udp_closed_port_is_port_unreachable(closed_port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: the kernel answers ICMP port unreachable
    result = run(probe_udp("127.0.0.1", port, {"send": "x"}, 1.0))
    assert not result.ok and result.detail == "port unreachable", result


DNS_QUERY = "hex:1234010000010000000000000000020001"  # the example of docs/advisors.md: ". NS", ID 0x1234


def test_udp_dns_example_of_the_docs(udp_server):
    port, received = udp_server
    advisors.check_udp({"send": DNS_QUERY, "expect": "hex:1234"})
    result = run(probe_udp("127.0.0.1", port, {"send": DNS_QUERY, "expect": "hex:1234"}, 1.0))
    assert result.ok, result
    assert received[-1] == bytes.fromhex(DNS_QUERY[4:])


def test_twenty_silent_udp_probes_cost_one_timeout(udp_server):
    port, _ = udp_server

    async def twenty():
        return await asyncio.gather(*(probe_udp("127.0.0.1", port, {"send": "quiet"}, TIMEOUT) for _ in range(20)))

    results, took = timed(twenty())
    assert all(r.detail == "timeout" for r in results)
    assert took <= TIMEOUT + SLACK


# ------------------------------------------------------------------------------------ option checks


@pytest.mark.parametrize("options,message", [
    ({"path": "no-slash"}, "must start with '/'"),
    ({"path": "/a b"}, "spaces"),
    ({"path": "/a\tb"}, "control"),
    ({"path": "/é"}, "non-ASCII"),
    ({"status": "600"}, "100-599"),
    ({"status": "99"}, "expected e.g. 200"),
    ({"status": "299-200"}, "low to high"),
    ({"status": "2xx"}, "expected e.g. 200"),
    ({"host": "bad host"}, "invalid host"),
])
def test_http_check_refuses(options, message):
    with pytest.raises(ConfigError, match=message):
        advisors.check_http(options)


def test_http_check_accepts():
    advisors.check_http({"path": "/health?x=1&y=%20", "status": "200,204,300-399", "host": "[2001:db8::1]:8080"})
    assert advisors.parse_status("200-299,301") == ((200, 299), (301, 301))


@pytest.mark.parametrize("options,message", [
    ({}, "send is required"),
    ({"send": "hex:abc"}, "pairs of hex digits"),
    ({"send": "hex:zz"}, "pairs of hex digits"),
    ({"send": "caf\u00e9"}, "printable ASCII"),
    ({"send": "x", "expect": "hex:"}, "pairs of hex digits"),
    ({"send": "x" * 1025}, "longer than 1024"),
])
def test_udp_check_refuses(options, message):
    with pytest.raises(ConfigError, match=message):
        advisors.check_udp(options)


# ------------------------------------------------------------------------------ via forwarding's segments


def test_via_forwarding_segments_are_what_scapy_decodes():
    """The SYN and RST that ``via forwarding`` sends (engines/through.py), checked by scapy as the oracle, and
    a SYN-ACK scapy builds is what the prober reads back."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from encapfwd.health.forwarding_probe import RST, SYN, parse_answer, syn_segment

    src, dst = socket.inet_aton("10.0.2.1"), socket.inet_aton("10.0.9.1")
    for flags, name in ((SYN, "S"), (RST, "R")):
        raw = syn_segment(src, dst, 40000, 80, 0xFFFFFFF0, flags)
        pkt = IP(raw)
        assert (pkt.src, pkt.dst, pkt.ttl, pkt.flags) == ("10.0.2.1", "10.0.9.1", 63, "DF")
        assert (pkt[TCP].sport, pkt[TCP].dport, pkt[TCP].seq, str(pkt[TCP].flags)) == (40000, 80, 0xFFFFFFF0, name)
        again = IP(raw)
        del again.chksum, again[TCP].chksum
        rebuilt = IP(bytes(again))
        assert (rebuilt.chksum, rebuilt[TCP].chksum) == (pkt.chksum, pkt[TCP].chksum)
        assert dict(pkt[TCP].options).get("MSS") == (1360 if flags == SYN else None)
    synack = Ether() / IP(src="10.0.9.1", dst="10.0.2.1") / TCP(sport=80, dport=40000, flags="SA", ack=0xFFFFFFF1)
    assert parse_answer(bytes(synack)) == ((dst, 80, 40000), 0x12, 0xFFFFFFF1)
    assert parse_answer(bytes(Ether() / IP() / b"x")) is None
    assert parse_answer(b"\x00" * 10) is None
