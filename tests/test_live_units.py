"""Pieces of the live engine that need neither root nor namespaces: the socket filter program, the
checksum completion for offloaded frames, report merging, the control socket (server, client, path rules),
reloads that fail, the TX ring's slot filling, the workers' flow expiry and the CLI surface."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from encapfwd.runtime.afpacket import rings as afpacket
from encapfwd import control
from encapfwd.runtime import controller as live
from encapfwd.runtime.afpacket.checksum import complete_checksum


def _run_bpf(program, frame: bytes, pkttype: int = 0) -> int:
    """A tiny classic-BPF interpreter for the instructions cluster_filter emits."""
    pc = 0
    acc = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == afpacket._LD_B_ABS:
            acc = pkttype if k == (afpacket.SKF_AD_OFF + afpacket.SKF_AD_PKTTYPE) & 0xFFFFFFFF else frame[k]
        elif code == afpacket._LD_H_ABS:
            acc = struct.unpack_from("!H", frame, k)[0]
        elif code == afpacket._LD_W_ABS:
            if k + 4 > len(frame):
                return 0
            acc = struct.unpack_from("!I", frame, k)[0]
        elif code == afpacket._JEQ_K:
            pc += jt if acc == k else jf
        elif code == afpacket._JA:
            pc += k
        elif code == afpacket._RET_K:
            return k
        pc += 1


def _frame4(dst: str, ethertype: int = 0x0800) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton("192.0.2.1"), socket.inet_aton(dst)
    )
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype) + ip + bytes(8)


def _frame6(dst: str) -> bytes:
    ip = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        8,
        17,
        64,
        socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ip + bytes(8)


def test_filter_accepts_only_cluster_addresses_for_this_host():
    program = afpacket.cluster_filter(["10.0.9.1", "10.0.9.2", "2001:db8::9"])
    assert _run_bpf(program, _frame4("10.0.9.1")) > 0
    assert _run_bpf(program, _frame4("10.0.9.2")) > 0
    assert _run_bpf(program, _frame4("10.0.9.3")) == 0
    assert _run_bpf(program, _frame4("10.0.9.1"), pkttype=afpacket.PACKET_OUTGOING) == 0
    assert _run_bpf(program, _frame4("10.0.9.1"), pkttype=3) == 0  # PACKET_OTHERHOST
    assert _run_bpf(program, _frame4("10.0.9.1", ethertype=0x0806)) == 0
    assert _run_bpf(program, _frame6("2001:db8::9")) > 0
    assert _run_bpf(program, _frame6("2001:db8::8")) == 0


def test_filter_scales_to_many_addresses_and_refuses_too_many():
    many = [f"10.{i // 256}.{i % 256}.1" for i in range(2000)]
    program = afpacket.cluster_filter(many)
    assert _run_bpf(program, _frame4("10.7.207.1")) > 0
    assert _run_bpf(program, _frame4("10.7.207.2")) == 0
    with pytest.raises(ValueError):
        afpacket.cluster_filter([f"10.{i // 256}.{i % 256}.1" for i in range(2100)])


def test_complete_checksum_matches_scapy():
    scapy = pytest.importorskip("scapy.all")
    for l4 in (scapy.TCP(sport=1234, dport=80, flags="S"), scapy.UDP(sport=5, dport=53)):
        good = bytes(scapy.Ether() / scapy.IP(src="10.0.1.2", dst="10.0.9.1") / l4 / b"hello world")
        field = 14 + 20 + (16 if isinstance(l4, scapy.TCP) else 6)
        partial = bytearray(good)
        partial[field : field + 2] = b"\x12\x34"  # what an offloading sender leaves there
        assert complete_checksum(bytes(partial)) == good
    good6 = bytes(scapy.Ether() / scapy.IPv6(src="2001:db8::1", dst="2001:db8::9") / scapy.TCP() / b"x")
    partial6 = bytearray(good6)
    partial6[14 + 40 + 16 : 14 + 40 + 18] = b"\x00\x00"
    assert complete_checksum(bytes(partial6)) == good6
    assert complete_checksum(b"\x00" * 20) == b"\x00" * 20  # never raises


def test_merge_reports_sums_numbers():
    a = {"servers": {"s": {"packets": 1, "method": "mac"}}, "drops": {"x": 1}, "flows": {"flows": 2}}
    b = {"servers": {"s": {"packets": 2, "method": "mac"}}, "drops": {"y": 3}, "flows": {"flows": 5}}
    merged = live.merge_reports([a, b])
    assert merged == {
        "servers": {"s": {"packets": 3, "method": "mac"}},
        "drops": {"x": 1, "y": 3},
        "flows": {"flows": 7},
    }


def test_query_control_without_dispatcher_is_oserror(tmp_path):
    with pytest.raises(OSError):
        live.query_control(str(tmp_path / "nothing.sock"))


def test_run_module_imports_no_scapy_or_pyroute2():
    code = (
        "import sys, encapfwd.cli.run, encapfwd.runtime.controller, encapfwd.lab.topology; "
        "print('scapy' in sys.modules, 'pyroute2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_run_help_documents_options(cli):
    proc = cli("run", "--help", check=0)
    for word in ("--interface", "--workers", "--control", "SIGHUP", "blackhole"):
        assert word in proc.stdout


# ------------------------------------------------------------------------- hardening (no root needed)


def test_report_module_imports_only_the_control_client():
    """`server report` loads the control client, never the engine (no cycle through the dispatcher)."""
    code = (
        "import sys\nfrom encapfwd.cli import server_rows as report\n"
        "report.live_counters('/nonexistent/encapfwd.sock')\n"
        "print(sorted(m for m in ('encapfwd.runtime.controller', 'encapfwd.datapath.dispatcher', 'pyroute2', 'scapy',"
        " 'encapfwd.control') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['encapfwd.control']"
    assert live.query_control is control.query_control  # still importable from the engine


def test_default_control_path_is_per_network_namespace(monkeypatch):
    monkeypatch.delenv("ENCAPFWD_CONTROL", raising=False)
    inode = os.stat("/proc/self/ns/net").st_ino
    assert control.default_control_path() == f"/run/encapfwd/netns-{inode}.sock"
    assert live.default_control_path() == control.default_control_path()
    monkeypatch.setenv("ENCAPFWD_CONTROL", "/tmp/x.sock")
    assert control.default_control_path() == "/tmp/x.sock"


@pytest.mark.parametrize(
    "data, command, error",
    [
        (b"", "report", None),
        (b'{"command": "ping"}', "ping", None),
        (b"reload", "reload", None),
        (b'"ping"', "ping", None),
        (b"[" * 4000, None, "nested too deeply"),
        (b"\xff\xfe{}", None, "not UTF-8"),
        (b"[1, 2]", None, "expected"),
        (b'{"command": 5}', None, "expected"),
    ],
)
def test_parse_request_never_raises(data, command, error):
    got_command, got_error = control.parse_request(data)
    assert got_command == command
    assert (got_error is None) if error is None else (error in got_error)


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _serve(server, rounds=20):
    """Drive the server as the controller's poll loop does, without blocking."""
    import select as sel

    for _ in range(rounds):
        server.expire()
        poller = sel.poll()
        for fd, events in server.poll_set():
            poller.register(fd, events)
        for fd, event in poller.poll(10):
            assert server.handle(fd, event)


def _client(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(path)
    return sock


def _answer(sock):
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # the server closed with some of our request unread
            chunk = b""
        if not chunk:
            return json.loads(data)
        data += chunk


def test_control_server_answers_bad_requests_and_cuts_off_slow_clients(tmp_path):
    clock = _Clock()
    asked = []
    path = str(tmp_path / "c.sock")
    server = control.ControlServer(path, lambda c: asked.append(c) or {"ok": c}, clock=clock)
    server.open()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        # 4,000 brackets: an error reply, not a RecursionError
        deep = _client(path)
        deep.sendall(b"[" * 4000 + b"\n")
        # more than 64 KiB without a newline: refused once the limit is reached
        big = _client(path)
        big.sendall(b"x" * (control.MAX_REQUEST + 10))
        # a slow client: one byte, then nothing
        slow = _client(path)
        slow.sendall(b"{")
        # a good client behind them is served at once
        good = _client(path)
        good.sendall(b'{"command": "ping"}\n')
        _serve(server)
        assert _answer(good) == {"ok": "ping"}
        assert "nested too deeply" in _answer(deep)["error"]
        assert "too large" in _answer(big)["error"]
        assert asked == ["ping"]
        assert len(server.clients) == 1  # only the slow one is left
        slow.sendall(b'"comm')
        clock.now += control.REQUEST_TIMEOUT + 0.01  # its 2 s are over, however it trickles
        _serve(server, 2)
        assert server.clients == {}
        assert "not complete" in _answer(slow)["error"]
        assert server.stats["timeouts"] == 1 and server.stats["bad_requests"] == 2
    finally:
        server.close()
    assert not os.path.exists(path)


def test_control_request_sent_in_time_is_answered_after_a_busy_spell(tmp_path):
    """A request that arrived while the controller was busy (a long reload) is still answered."""
    clock = _Clock()
    path = str(tmp_path / "c.sock")
    server = control.ControlServer(path, lambda c: {"ok": c}, clock=clock)
    server.open()
    try:
        sock = _client(path)
        _serve(server, 2)  # accepted
        sock.sendall(b"report\n")
        clock.now += 10  # the controller was reloading meanwhile
        _serve(server, 2)
        assert _answer(sock) == {"ok": "report"}
    finally:
        server.close()


def test_control_server_caps_concurrent_clients(tmp_path):
    path = str(tmp_path / "c.sock")
    server = control.ControlServer(path, lambda c: {"ok": c}, max_clients=2)
    server.open()
    try:
        held = [_client(path) for _ in range(2)]
        _serve(server, 3)
        extra = _client(path)
        _serve(server, 3)
        assert "busy" in _answer(extra)["error"]
        assert len(server.clients) == 2
    finally:
        for sock in held:
            sock.close()
        server.close()


def test_claim_path_removes_only_a_stale_socket(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("precious")
    directory = tmp_path / "dir"
    directory.mkdir()
    link = tmp_path / "link"
    link.symlink_to(regular)
    for path, kind in ((regular, "a regular file"), (directory, "a directory"), (link, "a symbolic link")):
        with pytest.raises(control.ControlError, match=kind):
            control.claim_path(str(path))
    assert regular.read_text() == "precious" and directory.is_dir() and link.is_symlink()

    # somebody else's live socket stays
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(tmp_path / "other.sock"))
    other.listen(1)
    try:
        with pytest.raises(control.ControlError, match="in use by another program"):
            control.claim_path(str(tmp_path / "other.sock"))
        assert (tmp_path / "other.sock").exists()
    finally:
        other.close()

    # a stale socket (nobody listens any more) is removed
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    control.claim_path(str(tmp_path / "stale.sock"))
    assert not (tmp_path / "stale.sock").exists()
    control.claim_path(str(tmp_path / "absent.sock"))  # nothing there: fine


def test_claim_path_refuses_a_live_dispatcher(tmp_path):
    path = str(tmp_path / "live.sock")
    server = control.ControlServer(path, lambda c: {"pong": True} if c == "ping" else {"x": 1})
    server.open()
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [_serve(server, 1) for _ in iter(stop.is_set, True)])
    thread.start()
    try:
        with pytest.raises(control.ControlError, match="another encapfwd run answers"):
            control.claim_path(path)
        # a second server on the same path refuses before touching it
        with pytest.raises(control.ControlError):
            control.ControlServer(path, lambda c: {}).open()
        assert control.query_control(path, "ping")["pong"] is True
    finally:
        stop.set()
        thread.join()
        server.close()


def _bare_controller(path):
    controller = live.Controller.__new__(live.Controller)
    controller.config_path = str(path)
    controller.interface = None
    controller.reload_errors = 0
    controller.last_reload_error = None
    controller.restart_needed = []
    controller.executors = []
    return controller


@pytest.mark.parametrize(
    "content, words",
    [
        (b"[executor]\nnfa = '\xff\xfe'\n", "UTF-8"),
        (b"a = " + b"[" * 4000, "nested"),
        (b"[[clusters]]\naddress = 'not-an-address'\n", "not-an-address"),
    ],
)
def test_reload_failure_keeps_the_running_configuration(tmp_path, capsys, content, words):
    path = tmp_path / "encapfwd.toml"
    path.write_bytes(content)
    controller = _bare_controller(path)
    running = object()
    controller.config = running
    controller.reload()  # never raises
    assert controller.config is running
    assert controller.reload_errors == 1
    assert words in controller.last_reload_error
    assert "\n" not in controller.last_reload_error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("encapfwd: reload failed, keeping the running configuration: ")


@pytest.mark.parametrize(
    "exc, words",
    [
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not valid UTF-8"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (MemoryError(), "out of memory"),
        (KeyError("surprise"), "KeyError"),
    ],
)
def test_reload_boundary_catches_whatever_loading_raises(tmp_path, monkeypatch, capsys, exc, words):
    """Whatever the configuration loader raises (not only its own ConfigError), the reload is refused on
    one line and the running configuration stays."""
    from encapfwd import config as cfg

    def broken(path):
        raise exc

    monkeypatch.setattr(cfg, "load", broken)
    controller = _bare_controller(tmp_path / "encapfwd.toml")
    controller.config = running = object()
    controller.reload()
    assert controller.config is running and controller.reload_errors == 1
    assert words in controller.last_reload_error
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_changed_interface_is_reported_as_needing_a_restart(tmp_path):
    from encapfwd import config as cfg

    controller = _bare_controller(tmp_path / "x.toml")
    controller.iface = live.Interface("eth0", 2, "02:00:00:00:00:01", 1500, [])
    changed = cfg.loads('[executor]\ninterface = "eth9"\n')
    lines = controller._static_changes(changed)
    assert len(lines) == 1 and "eth9" in lines[0] and "restart" in lines[0] and "eth0" in lines[0]
    assert controller._static_changes(cfg.loads('[executor]\ninterface = "eth0"\n')) == []
    controller.interface = "eth0"  # --interface wins over the file: nothing to say
    assert controller._static_changes(changed) == []


def test_mtu_beyond_the_tx_ring_is_capped_on_reload(capsys):
    from encapfwd import config as cfg
    from encapfwd.runtime.afpacket import worker

    controller = _bare_controller("x")
    controller.max_mtu = worker.tx_mtu_limit(1500)
    assert controller.max_mtu >= 1500
    config = cfg.loads("[executor]\nmtu = 9000\n")
    assert controller._within_tx_ring(config).executor.mtu == controller.max_mtu
    assert "until a restart" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- TX ring, expiry


def _fake_tx(frame_nr=4):
    a, b = socket.socketpair()
    tx = afpacket.TxRing.__new__(afpacket.TxRing)
    tx.map = bytearray(2048 * frame_nr)
    tx.frame_size, tx.frame_nr, tx.max_frame = 2048, frame_nr, 2048 - afpacket.TX_DATA_OFFSET
    tx.index = tx.pending = tx.sent = tx.full = tx.too_big = tx.errors = 0

    class Sock:  # the kernel never takes anything: slots stay marked
        def send(self, data, flags=0):
            return 0

    tx.sock, tx.fd, tx._keep = Sock(), a.fileno(), (a, b)
    return tx


def test_tx_ring_fills_its_own_slots():
    tx = _fake_tx(4)
    assert tx.queue([[b"a" * 60], [], [b"b" * 70, b"c" * 5000]]) == 2
    assert tx.too_big == 1 and tx.pending == 2 and tx.index == 2
    assert tx.map[0] == afpacket.TP_STATUS_SEND_REQUEST
    assert struct.unpack_from("<I", tx.map, 4)[0] == 60
    assert bytes(tx.map[32:92]) == b"a" * 60
    assert bytes(tx.map[2048 + 32 : 2048 + 102]) == b"b" * 70
    assert tx.put(b"d" * 64) and tx.put(b"e" * 64)
    assert tx.index == 0  # wrapped
    tx.flush()
    assert tx.sent == 4 and tx.pending == 0
    assert not tx.put(b"f" * 64)  # every slot still the kernel's: counted, not overwritten
    assert tx.full == 1 and bytes(tx.map[32:92]) == b"a" * 60


def test_workers_expire_flows_about_once_a_second():
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.runtime.afpacket import worker as worker_mod
    from encapfwd.runtime.afpacket.messaging import send_msg
    from encapfwd.plugins import get_plugin_manager

    config = cfg.loads(
        '[executor]\nnfa = "10.0.2.1"\nmac = "02:00:00:00:00:01"\nnetworks = ["10.0.2.0/24"]\n'
        '[[clusters]]\naddress = "10.0.9.1"\n[[clusters.ports]]\nnumber = 80\nstaletimeout = 5\n'
        '[[clusters.ports.servers]]\naddress = "10.0.2.10"\nmac = "02:00:00:00:00:10"\n'
    )
    dispatcher = Dispatcher(config, get_plugin_manager())
    frame = bytearray(_frame4("10.0.9.1"))
    frame[0:6] = bytes.fromhex("020000000001")
    frame[14 + 9] = 17
    struct.pack_into("!HH", frame, 34, 1234, 80)
    from encapfwd.datapath.packet import checksum

    struct.pack_into("!H", frame, 24, 0)
    struct.pack_into("!H", frame, 24, checksum(bytes(frame[14:34])))
    start = time.monotonic() - 100  # the flow was last seen 100 s ago: stale after 5 s
    assert dispatcher.process(bytes(frame), start), dispatcher.drops
    assert dispatcher.report()["flows"]["flows"] == 1

    class Rx:  # an empty receive ring whose socket never becomes readable
        def __init__(self):
            self.pair = socket.socketpair()
            self.fd = self.pair[0].fileno()
            self.sock = self.pair[0]
            self.map = bytearray(1 << 12)
            self.block_size, self.block_nr = 1 << 11, 2
            self.HDR = afpacket.RxRing.HDR

        def statistics(self):
            return 0, 0

        def close(self):
            pass

    ours, theirs = socket.socketpair()
    iface = live.Interface("x", 1, "02:00:00:00:00:01", 1500, [])
    w = worker_mod.Worker(0, iface, config, dispatcher, theirs, 0, rings=(Rx(), _fake_tx()))
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while dispatcher.report()["flows"]["flows"]:
            assert time.monotonic() < deadline, "the worker never expired the stale flow"
            time.sleep(0.1)
        assert dispatcher.report()["flows"]["expired"] >= 1
    finally:
        send_msg(ours, ("stop",))
        thread.join(5)
    assert not thread.is_alive()
