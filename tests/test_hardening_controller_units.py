"""The controller never lies and never stalls — the pieces, without root or namespaces.

The log line (one write per line across threads; identical lines collapsed), BGP logging (state changes,
not attempts), flap damping (the hold time), health verdicts restricted to the running configuration, the
control socket (a burst gets answers, not EAGAIN; "busy" is an error the CLI reports with a non-zero exit;
answers that come later), the bounded HTTP server of the metrics (deadlines, the connection cap, HTTP/0.9,
bad requests), neighbour resolution in the background (one total bound; unresolved servers named with
their reason) and health taken from the report's own per-server state. The same behaviour against a live
dispatcher: tests/test_hardening_controller.py.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from encapfwd.bgp import speaker as bgp

from encapfwd.runtime import common, httpd

from encapfwd import control
from encapfwd.health.manager import HealthManager, Target
from encapfwd.runtime.neighbours import NeighbourResolver

# ---------------------------------------------------------------------------------------------- logs

INTERLEAVE = r"""
import sys, threading
from encapfwd.runtime.common import log
def writer(n):
    for i in range(400):
        log(f"thread {n} line {i} " + "x" * 200, limit=False)
threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
"""


def test_log_lines_never_interleave_across_threads():
    proc = subprocess.run([sys.executable, "-c", INTERLEAVE], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.splitlines()
    assert len(lines) == 8 * 400
    assert all(line.startswith("encapfwd: thread ") and line.endswith(" " + "x" * 200) for line in lines)
    assert all(len(line.split()) == 6 for line in lines)


def test_identical_lines_are_collapsed_with_a_count():
    now = [0.0]
    limiter = common._Limiter(burst=5, window=60.0, clock=lambda: now[0])
    admitted = sum(limiter.admit("neighbour 10.0.2.9 is unreachable") for _ in range(62))
    assert admitted == 5 and limiter.due() == []
    now[0] = 61.0
    assert limiter.due() == ["… 57 more in the last minute: neighbour 10.0.2.9 is unreachable"]
    assert limiter.admit("neighbour 10.0.2.9 is unreachable")  # a new window


COLLAPSE = r"""
from encapfwd.runtime.common import log, flush_log
for i in range(100):
    log("the same event")
log("another event")
flush_log(force=True)
"""


def test_log_collapses_a_flood_into_a_few_lines():
    proc = subprocess.run([sys.executable, "-c", COLLAPSE], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.splitlines()
    assert lines == ["encapfwd: the same event"] * common.BURST + [
        "encapfwd: another event", f"encapfwd: … {100 - common.BURST} more in the last minute: the same event"]


def _speaker(monkeypatch):
    lines, now = [], [1000.0]
    monkeypatch.setattr(bgp, "log", lines.append)
    monkeypatch.setattr(bgp.time, "monotonic", lambda: now[0])
    speaker = bgp.Speaker.__new__(bgp.Speaker)
    speaker.session, speaker._backoff = "idle", 4.0
    speaker.failed_attempts = speaker._attempts_logged = 0
    speaker._attempts_since = 0.0
    return speaker, lines, now


def test_bgp_logs_state_changes_not_every_attempt(monkeypatch):
    speaker, lines, now = _speaker(monkeypatch)
    for _ in range(121):  # the peer refuses: connected / down about twice a second, for a minute
        speaker._session_event("10.0.2.254", "connected")
        speaker._session_event("10.0.2.254", "down")
        now[0] += 0.5
    assert len(lines) == 2, lines
    assert "not up (attempt failed)" in lines[0] and "still not up: 120 failed attempts" in lines[1]
    speaker._session_event("10.0.2.254", "connected")
    speaker._session_event("10.0.2.254", "up")
    assert lines[-1] == "bgp: session with 10.0.2.254 up", lines
    assert speaker._backoff == 1.0 and speaker.failed_attempts == 0
    speaker._session_event("10.0.2.254", "down")
    assert lines[-1] == "bgp: session with 10.0.2.254 down" and len(lines) == 4


# ------------------------------------------------------------------------------------ flap damping


def _target(**kw):
    values = dict(name="10.0.9.1@80@10.0.2.10", advisor="udp", port=80, address="10.0.2.10", interval=0.001,
                  timeout=0.001, rise=1, fall=1, hold=2.0)
    values.update(kw)
    return Target(**values)


def test_the_hold_time_damps_a_flapping_server():
    target = _target()
    changes = 0
    t = 0.0
    while t < 12.0:  # every other probe fails, 1000 probes a second
        changes += target.record(int(t * 1000) % 2 == 0, "x", 0.0001, now=t)
        target.settle(t)
        t += 0.001
    assert changes <= 12 / 2.0 + 1, changes  # without the hold: about 12,000
    undamped = _target(hold=0.0)
    assert sum(undamped.record(i % 2 == 0, "x", 0.0, now=i / 1000) for i in range(1000)) > 900


def test_a_held_verdict_is_applied_when_the_hold_is_over_if_still_called_for():
    target = _target(rise=1, fall=1, hold=2.0)
    assert target.record(False, "timeout", 0.0, now=0.0)  # the first verdict: never held
    assert target.state == "down" and target.held is None
    assert not target.record(True, "answer", 0.0, now=0.5)  # up too soon: held
    assert target.state == "down" and target.held == "up" and target.held_until() == 2.0
    assert not target.settle(1.9) and target.settle(2.0) and target.state == "up"
    assert not target.record(False, "timeout", 0.0, now=2.5) and target.held == "down"
    assert not target.record(True, "answer", 0.0, now=3.0) and target.held is None  # no longer called for
    assert not target.settle(5.0) and target.state == "up"


def _config(advisors=True, servers=("10.0.2.10", "10.0.2.11")):
    from encapfwd import config as cfg

    text = '[[clusters]]\naddress = "10.0.9.1"\n[[clusters.ports]]\nnumber = 80\n'
    text += "".join(f'[[clusters.ports.servers]]\naddress = "{s}"\n' for s in servers)
    if advisors:
        text += '[[advisors]]\nname = "udp"\nport = 80\noptions = {send = "ping"}\n'
    return cfg.loads(text)


def test_verdicts_count_only_for_the_configuration_that_has_their_advisor():
    from encapfwd.plugins import get_plugin_manager

    manager = HealthManager(_config(), get_plugin_manager())
    try:
        for target in manager._targets.values():
            for _ in range(target.fall):
                target.record(False, "timeout", 0.0)
        down = manager.down()
        assert set(down) == {"10.0.9.1@80@10.0.2.10", "10.0.9.1@80@10.0.2.11"}
        assert manager.down(_config()) == down
        assert manager.down(_config(advisors=False)) == {}  # the advisor stopped: its verdicts go with it
        assert set(manager.down(_config(servers=("10.0.2.10",)))) == {"10.0.9.1@80@10.0.2.10"}
    finally:
        manager.stop()


# ------------------------------------------------------------------------------------ control socket


class _Loop:
    """A ControlServer driven by a thread, as the controller's poll loop drives it."""

    def __init__(self, server):
        server.open()
        self.server, self.stop = server, threading.Event()
        self.calls = []  # run in the loop's thread, as the controller resolves deferred answers
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            while self.calls:
                self.calls.pop(0)()
            self.server.expire()
            poller = select.poll()
            for fd, events in self.server.poll_set():
                poller.register(fd, events)
            for fd, event in poller.poll(10):
                self.server.handle(fd, event)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def test_a_burst_of_connections_waits_in_the_backlog_and_gets_answers(tmp_path):
    path = str(tmp_path / "c.sock")
    server = control.ControlServer(path, lambda c: {"pong": True}, max_clients=4)
    server.open()
    socks = []
    try:
        for _ in range(100):  # nobody accepts yet: the backlog holds them all
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect(path)  # BlockingIOError (EAGAIN) here would fail the test
            socks.append(sock)
        assert control.LISTEN_BACKLOG >= 8 * control.MAX_CLIENTS
        for _ in range(40):
            server.expire()
            poller = select.poll()
            for fd, events in server.poll_set():
                poller.register(fd, events)
            for fd, event in poller.poll(5):
                server.handle(fd, event)
        assert server.stats["refused"] == 96 and len(server.clients) == 4
        busy = 0
        for sock in socks[4:]:
            sock.setblocking(True)
            sock.settimeout(2)
            data = sock.recv(4096)
            busy += json.loads(data)["error"].startswith("busy")
        assert busy == 96
    finally:
        for sock in socks:
            sock.close()
        server.close()


def test_busy_is_an_error_the_client_sees_as_busy(tmp_path):
    path = str(tmp_path / "c.sock")
    with _Loop(control.ControlServer(path, lambda c: {"pong": True}, max_clients=0)):
        with pytest.raises(control.ControlBusy, match="busy"):
            control.query_control(path, "ping", timeout=2)


def test_a_full_listen_queue_is_busy_not_eagain(tmp_path):
    path = str(tmp_path / "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)  # nobody accepts
    held = []
    try:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError as exc:
                assert exc.errno == errno.EAGAIN
                sock.close()
                break
            held.append(sock)
        started = time.monotonic()
        with pytest.raises(control.ControlBusy, match="listen queue"):
            control.query_control(path, "ping", timeout=0.5)
        assert time.monotonic() - started < 2
    finally:
        for sock in held:
            sock.close()
        listener.close()


def test_an_answer_that_comes_later_keeps_the_loop_serving(tmp_path):
    path = str(tmp_path / "c.sock")
    later = []

    def handler(command):
        if command == "reload":
            waiter = control.Deferred()
            later.append(waiter)
            return waiter
        return {"pong": True}

    with _Loop(control.ControlServer(path, handler)) as loop:
        answers = []
        thread = threading.Thread(target=lambda: answers.append(control.query_control(path, "reload", timeout=5)))
        thread.start()
        deadline = time.monotonic() + 3
        while not later and time.monotonic() < deadline:
            time.sleep(0.01)
        assert later and control.query_control(path, "ping", timeout=1)["pong"] is True  # served meanwhile
        loop.calls.append(lambda: later[0].resolve({"reloaded": True, "error": None}))
        thread.join(5)
        assert answers == [{"reloaded": True, "error": None}]


def test_the_cli_fails_when_a_dispatcher_is_there_but_does_not_answer(tmp_path, cli):
    from encapfwd.errors import EncapfwdError
    from encapfwd.cli.server_rows import live_counters

    assert live_counters(str(tmp_path / "nothing.sock")) is None  # no dispatcher: not an error
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    assert live_counters(str(tmp_path / "stale.sock")) is None  # a stale socket: nobody runs
    cli.config.write_text('[[clusters]]\naddress = "10.0.9.1"\n[[clusters.ports]]\nnumber = 80\n'
                          '[[clusters.ports.servers]]\naddress = "10.0.2.10"\n')
    path = str(tmp_path / "busy.sock")
    with _Loop(control.ControlServer(path, lambda c: {}, max_clients=0)):
        with pytest.raises(EncapfwdError, match="gave no answer: busy"):
            live_counters(path)
        for command in (("server", "report"), ("server", "report", "--json")):
            proc = cli(*command, "--control", path)
            assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
            assert proc.stderr.startswith("encapfwd: error: the dispatcher on ") and "busy" in proc.stderr
            assert proc.stderr.count("\n") == 1 and "no running dispatcher" not in proc.stdout
    proc = cli("server", "report", "--control", path)  # gone: the configuration alone, status 0
    assert proc.returncode == 0 and "no running dispatcher answered" in proc.stdout


def test_server_report_shows_the_running_plan_s_state_and_reason(tmp_path, cli):
    cli.config.write_text('[[clusters]]\naddress = "10.0.9.1"\n[[clusters.ports]]\nnumber = 80\n'
                          '[[clusters.ports.servers]]\naddress = "10.0.2.10"\n'
                          '[[clusters.ports.servers]]\naddress = "10.0.2.11"\n')
    report = {"servers": {
        "10.0.9.1@80@10.0.2.10": {"packets": 3, "bytes": 300, "state": "down", "reason": "advisor udp 80: timeout"},
        "10.0.9.1@80@10.0.2.11": {"packets": 5, "bytes": 500, "state": "up", "reason": None}}}
    path = str(tmp_path / "c.sock")
    with _Loop(control.ControlServer(path, lambda c: report)):
        rows = {r["server"]: r for r in json.loads(cli("server", "report", "--json", "--control", path).stdout)["servers"]}
        assert rows["10.0.9.1@80@10.0.2.10"]["status"] == "down"
        assert rows["10.0.9.1@80@10.0.2.10"]["configured"] == "up"
        assert rows["10.0.9.1@80@10.0.2.10"]["reason"] == "advisor udp 80: timeout"
        assert rows["10.0.9.1@80@10.0.2.11"]["status"] == "up" and rows["10.0.9.1@80@10.0.2.11"]["reason"] is None
        text = cli("server", "report", "--control", path).stdout.splitlines()
        assert text[0].split() == ["SERVER", "METHOD", "WEIGHT", "STATUS", "PACKETS", "BYTES", "REASON"]
        assert text[1].split()[:6] == ["10.0.9.1@80@10.0.2.10", "mac", "1", "down", "3", "300"]
        assert text[1].endswith("advisor udp 80: timeout")


# ------------------------------------------------------------------------------- the metrics' HTTP


def _http_server(handler=None, **kw):
    def ok(method, path, headers):
        return 200, [], b"fine\n"

    server = httpd.BoundedHTTPServer(("127.0.0.1", 0), socket.AF_INET, handler or ok, **kw)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


def _exchange(port, payload, timeout=10.0):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if payload:
            sock.sendall(payload)
        data = b""
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    return data.split(b"\r\n", 1)[0].decode(), data, time.monotonic() - started


@pytest.mark.parametrize("payload, status", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200"),
    (b"HEAD /metrics HTTP/1.0\r\n\r\n", "200"),
    (b"GET /metrics\r\n", "400"),  # HTTP/0.9: answered at once
    (b"GARBAGE\r\n", "400"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
    (b"GET /metrics HTTP/2.0\r\n\r\n", "505"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000, "431"),
])
def test_the_http_server_answers_every_request_at_once(payload, status):
    server = _http_server()
    try:
        line, data, took = _exchange(server.server_address[1], payload)
        assert line.split()[1] == status and took < 1.0, (line, took)
        if payload.startswith(b"HEAD"):
            assert data.endswith(b"\r\n\r\n")  # no body
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_client_costs_one_slot_for_at_most_the_request_deadline():
    server = _http_server(max_connections=2, request_timeout=0.6, deadline=2.0)
    port = server.server_address[1]
    try:
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"G")  # then one byte now and then
        time.sleep(0.1)
        assert _exchange(port, b"GET / HTTP/1.1\r\n\r\n")[0].split()[1] == "200"  # the other slot works
        slow2 = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.1)
        line, _, took = _exchange(port, b"GET / HTTP/1.1\r\n\r\n")
        assert line.split()[1] == "503" and took < 0.5  # the cap: an explicit, immediate busy
        started = time.monotonic()
        slow.settimeout(3)
        data = b""
        while True:
            try:
                slow.send(b"E")
            except OSError:
                pass
            try:
                chunk = slow.recv(4096)
            except socket.timeout:
                chunk = b""
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 1.5, data
        slow.close()
        slow2.close()
        time.sleep(0.2)
        assert _exchange(port, b"GET / HTTP/1.1\r\n\r\n")[0].split()[1] == "200"  # slots are free again
        assert server.stats["timeouts"] >= 1 and server.stats["refused"] >= 1
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_not_ready_by_the_deadline_is_503():
    def slow(method, path, headers):
        time.sleep(1.5)
        return 200, [], b"late\n"

    server = _http_server(slow, request_timeout=0.5, deadline=0.8)
    try:
        line, _, took = _exchange(server.server_address[1], b"GET / HTTP/1.1\r\n\r\n")
        assert line.split()[1] == "503" and took < 1.4, (line, took)
    finally:
        server.shutdown()
        server.server_close()


def test_health_in_the_metrics_is_the_report_s_own_state():
    pytest.importorskip("prometheus_client")
    from prometheus_client.core import GaugeMetricFamily  # noqa: F401
    from encapfwd.runtime.metrics import metric_families

    report = {"servers": {
        "10.0.9.1@80@10.0.2.10": {"method": "mac", "packets": 1, "bytes": 2, "state": "down",
                                  "reason": "advisor udp 80: timeout"},
        "10.0.9.1@80@10.0.2.11": {"method": "mac", "packets": 1, "bytes": 2, "state": "up", "reason": None}},
        # a stale health row that says otherwise must not win over the plan's state
        "health": {"10.0.9.1@80@10.0.2.11": {"state": "down", "advisors": {}}}, "engine": {}}
    families = {f.name: f for f in metric_families(report, {"10.0.9.1@80@10.0.2.10": True})}
    values = {s.labels["server"]: s.value for s in families["encapfwd_server_health"].samples}
    assert values == {"10.0.2.10": 0.0, "10.0.2.11": 1.0}


# ------------------------------------------------------------------------------- neighbours


class _FakeKernel:
    """A neighbour table that learns an address some time after it was asked for (None: never)."""

    def __init__(self, delays):
        self.delays, self.asked, self.table = delays, {}, {}
        self.lock = threading.Lock()

    def opener(self):
        return self

    def close(self):
        pass

    def dump(self, _ipr, _ifindex):
        now = time.monotonic()
        with self.lock:
            for address, when in self.asked.items():
                delay = self.delays.get(address)
                if delay is not None and now - when >= delay:
                    self.table[address] = "02:00:00:00:00:%02x" % (int(address.rsplit(".", 1)[1]) % 256)
            return dict(self.table)

    def ask(self, _ipr, address, _ifindex):
        with self.lock:
            self.asked.setdefault(address, time.monotonic())


def test_resolution_is_concurrent_with_one_total_bound():
    addresses = [f"10.0.2.{i}" for i in range(100, 200)]
    kernel = _FakeKernel({a: (0.05 if a.endswith("7") else None) for a in addresses})
    resolver = NeighbourResolver(2, refresh=0, opener=kernel.opener, table=kernel.dump, ask=kernel.ask)
    try:
        started = time.monotonic()
        macs = resolver.resolve(addresses, bound=0.5)
        took = time.monotonic() - started
        assert 0.5 <= took < 1.0, took  # one bound for all 100, not 100 × anything
        assert sorted(a for a, m in macs.items() if m) == sorted(a for a in addresses if a.endswith("7"))
        assert set(kernel.asked) == set(addresses)  # every one asked at once
    finally:
        resolver.stop()


def test_an_unresolved_server_comes_back_when_it_answers():
    kernel = _FakeKernel({"10.0.2.5": None})
    resolver = NeighbourResolver(2, refresh=0, opener=kernel.opener, table=kernel.dump, ask=kernel.ask)
    try:
        resolver.watch({"10.0.2.5": None, "10.0.2.6": "02:00:00:00:00:06"})
        time.sleep(0.2)
        assert resolver.changes() == {}
        with kernel.lock:
            kernel.table["10.0.2.5"] = "02:00:00:00:00:05"  # it answers now
        ready = select.select([resolver.fileno()], [], [], 3)[0]
        assert ready and resolver.changes() == {"10.0.2.5": (None, "02:00:00:00:00:05")}
    finally:
        resolver.stop()


def test_unresolved_servers_are_left_out_with_their_reason(capsys):
    from encapfwd.runtime.netlink import Interface
    from encapfwd.runtime.prepare import Staged, complete

    config = _config(advisors=False, servers=[f"10.0.2.{i}" for i in range(10, 30)])
    import attrs

    config = attrs.evolve(config, executor=attrs.evolve(config.executor, networks="10.0.2.0/24",
                                                        mac="02:00:00:00:00:01"))
    needed = tuple(f"10.0.2.{i}" for i in range(10, 30))
    staged = Staged(config, Interface("eth0", 2, "02:00:00:00:00:01", 1500, []), needed, None, {})
    done, reasons = complete(staged, {"10.0.2.10": "02:00:00:00:00:0a"})
    servers = {str(s.address): s for s in done.clusters[0].ports[0].servers}
    assert servers["10.0.2.10"].mac == "02:00:00:00:00:0a" and not servers["10.0.2.10"].down
    assert all(servers[a].down for a in needed[1:]) and len(reasons) == 19
    assert reasons["10.0.9.1@80@10.0.2.11"] == "no answer to ARP/ND on eth0"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "19 server address(es)" in err[0] and "and 14 more" in err[0]


def test_the_report_module_still_imports_only_the_control_client():
    code = ("import sys, encapfwd.cli.server_rows as r; r.live_counters('/nonexistent/x.sock'); "
            "print(sorted(m for m in sys.modules if m.startswith(('pyroute2', 'scapy', 'prometheus'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(
        os.environ, ENCAPFWD_CONTROL=""))
    assert out.stdout.strip() == "[]", out.stderr
