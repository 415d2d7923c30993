"""Operating ``encapfwd run`` as a production service (docs/operations.md).

Unit part (anyone): sd_notify on a path and an abstract socket, ``$NOTIFY_SOCKET`` taken out of the
environment, journal priorities, the notification sequence of :class:`~encapfwd.runtime.sdnotify.Lifecycle`;
``systemd-analyze verify`` on the shipped units; ``promtool check rules`` and ``promtool test rules`` on the
shipped alert rules.

Live part (root, the MAC-only namespace lab; one dispatcher for the whole module): ``encapfwd run`` started
as systemd would (only the unit's capabilities, via ``setpriv --bounding-set``; ``$NOTIFY_SOCKET`` a datagram
socket this test binds; ``$JOURNAL_STREAM`` naming its log file), then: READY=1 after start; ``promtool check
metrics`` on a real scrape; a real ``prometheus`` server scraping it with the shipped rules; ``encapfwd top``
(plain text and under tmux); the status page open in one headless chromium page (DevTools protocol); a good
and a bad reload seen by every one of them; a ``connect`` advisor taking a server down on the open page; the
stop — and the exact sequence of notifications across all of it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from encapfwd.runtime import sdnotify

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "docs" / "examples" / "systemd"
RULES = ROOT / "docs" / "examples" / "prometheus" / "encapfwd-alerts.yml"
RULE_TESTS = ROOT / "docs" / "examples" / "prometheus" / "encapfwd-alerts.test.yml"


# ------------------------------------------------------------------------------------------ unit


def _dgram(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_notify_on_a_path_and_an_abstract_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with _dgram(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notifier = sdnotify.Notifier()
        assert "NOTIFY_SOCKET" not in os.environ  # children (workers, ExaBGP) never notify for us
        assert notifier.ready("xdp; 1/1 servers up\nsecond line")
        assert sock.recv(4096) == b"READY=1\nSTATUS=xdp; 1/1 servers up second line"
    name = f"encapfwd-test-{os.getpid()}"
    with _dgram("\0" + name) as sock:
        notifier = sdnotify.Notifier("@" + name)
        assert notifier.reloading()
        fields = sock.recv(4096).decode().split("\n")
        assert fields[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", fields[1])
        usec = int(fields[1].split("=")[1])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000
    assert not sdnotify.Notifier(None, take_from_env=False).notify("READY=1")  # no socket: nothing
    assert not sdnotify.Notifier("relative", take_from_env=False).enabled


def test_watchdog(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    sink = _Sink()
    assert sink.watchdog is None  # not taken from the environment
    notifier = sdnotify.Notifier("/nonexistent")
    assert notifier.watchdog == 20.0 and "WATCHDOG_USEC" not in os.environ and "WATCHDOG_PID" not in os.environ
    sink.watchdog = 20.0
    now = [0.0]
    life = sdnotify.Lifecycle(_Controller(), sink, clock=lambda: now[0])
    life.installed()
    assert sink.sent == ["STATUS=starting: afpacket engine", "WATCHDOG=1",
                         "READY=1\nSTATUS=afpacket; 1/2 servers up; plan 0123456789ab"]
    now[0] = 4.9
    life.poll()
    now[0] = 5.0
    life.poll()
    assert sink.sent[3:] == ["WATCHDOG=1"]


def test_journal_priorities(tmp_path, monkeypatch):
    log = tmp_path / "log"
    with open(log, "w") as handle:
        st = os.fstat(handle.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert sdnotify.journal_priorities(handle.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not sdnotify.journal_priorities(handle.fileno())
    assert sdnotify.priority_of("reload failed, keeping the running configuration: x") == 3
    assert sdnotify.priority_of("warning: eth0: the driver lost 200 frames") == 4
    assert sdnotify.priority_of("engine: xdp (generic) — auto: …") == 5
    assert sdnotify.priority_of("bgp: announce route 10.0.9.1/32 next-hop 10.0.2.1") == 6


class _Plan:
    def __init__(self, up):
        self.servers = [type("S", (), {"up": u, "weight": 1})() for u in up]
        self.digest = "0123456789abcdef"


class _Bgp:
    session, failed_attempts, announced = "idle", 0, {}


class _Controller:
    engine, xdp, last_reload_error = "afpacket", None, None

    def __init__(self, bgp=None):
        self.bgp = bgp
        self.plan = _Plan([True, False])


class _Sink(sdnotify.Notifier):
    def __init__(self):
        super().__init__("/nonexistent", take_from_env=False)

    def notify(self, *fields):
        self.sent.append("\n".join(fields))
        return True


def test_lifecycle_sequence_with_bgp():
    now = [0.0]
    controller = _Controller(_Bgp())
    sink = _Sink()
    life = sdnotify.Lifecycle(controller, sink, clock=lambda: now[0])
    life.installed()
    life.poll()
    life.reloading()  # before READY=1: systemd is not told about reloads
    life.reloaded()
    assert not any(m.startswith("READY=1") for m in sink.sent), sink.sent
    controller.bgp.failed_attempts = 1  # the first attempt failed: ready (ExaBGP keeps trying)
    life.poll()
    assert sink.sent[-1] == ("READY=1\nSTATUS=afpacket; 1/2 servers up; plan 0123456789ab; bgp session idle, "
                             "0 route(s) to announce")
    life.reloading()
    life.reloading()  # a second reload while the first waits: one RELOADING=1
    controller.last_reload_error = "encapfwd.toml: bad"
    life.reloaded()
    assert [m.split("\n")[0] for m in sink.sent[-2:]] == ["RELOADING=1", "READY=1"]
    assert sink.sent[-1].startswith("READY=1\nSTATUS=reload failed, running the previous plan: encapfwd.toml: bad; ")
    count = len(sink.sent)
    life.poll()  # nothing changed: nothing sent
    assert len(sink.sent) == count
    life.stopping()
    life.reloaded()  # a reload answered while stopping: no READY=1
    assert sink.sent[-1].startswith("STOPPING=1\nSTATUS=stopping: ") and len(sink.sent) == count + 1
    # without any sign from the session, READY=1 comes after the bound
    sink2, now[0] = _Sink(), 0.0
    life2 = sdnotify.Lifecycle(_Controller(_Bgp()), sink2, clock=lambda: now[0])
    life2.installed()
    assert not any(m.startswith("READY=1") for m in sink2.sent)
    now[0] = sdnotify.BGP_READY_BOUND
    life2.poll()
    assert sink2.sent[-1].startswith("READY=1")


@pytest.mark.parametrize("unit", ["encapfwd.service", "encapfwd@.service"])
def test_systemd_analyze_verify(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    text = (UNITS / unit).read_text()
    assert "Type=notify" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
    # the unit as shipped, with ExecStart= pointing at this installation (verify checks the binary exists)
    encapfwd = shutil.which("encapfwd") or str(Path(sys.executable).parent / "encapfwd")
    name = unit.replace("@.", "@eth1.")
    (tmp_path / name).write_text(text.replace("/usr/local/bin/encapfwd", encapfwd))
    proc = subprocess.run([analyze, "verify", str(tmp_path / name)], check=False, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc


def _promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian package prometheus)")
    return promtool


def test_top_render_rates_and_sorting():
    from encapfwd.cli import top as cli_top

    def report(a, b, drops):
        return {"servers": {"10.0.9.1@80@10.0.2.10": {"method": "mac", "packets": a, "bytes": a * 100, "state": "up",
                                                      "weight": 2},
                            "10.0.9.1@80@10.0.2.11": {"method": "mac", "packets": b, "bytes": b * 100,
                                                      "state": "down", "reason": "advisor connect: refused",
                                                      "weight": 1}},
                "flows": {"connections": {"10.0.9.1@80@10.0.2.10": 7}}, "drops": drops,
                "engine": {"engine": "xdp", "xdp_mode": "generic", "interface": "eth0", "plan_digest": "ab" * 32}}

    prev, cur = report(100, 50, {"no-server": 10}), report(300, 50, {"no-server": 30})
    lines = cli_top.render(prev, cur, 2.0, sort="pps", width=200)
    assert lines[0].startswith("encapfwd top — xdp (generic) on eth0")
    rows = [l.split() for l in lines if l.startswith("10.0.9.1:80 ") and "/" not in l.split()[1]]
    assert rows[0][:9] == ["10.0.9.1:80", "10.0.2.10", "mac", "up", "2", "100", "80.0k", "7", "300"], rows
    assert rows[1][3] == "down" and "refused" in " ".join(rows[1])
    assert [r[1] for r in (l.split() for l in cli_top.render(prev, cur, 2.0, sort="health"))
            if r and r[0] == "10.0.9.1:80" and "/" not in r[1]] == ["10.0.2.11", "10.0.2.10"]
    assert any(l.split() == ["no-server", "30", "10"] for l in lines), lines
    assert any(l.startswith("10.0.9.1:80") and "1/2" in l for l in lines)
    assert not any("FAILED" in l for l in lines)
    cur["engine"].update(reloads=3, reload_errors=1, last_reload_error="encapfwd.toml: bad",
                         last_reload={"at": 1e9, "ok": False, "error": "encapfwd.toml: bad"})
    failed = cli_top.render(prev, cur, 2.0)
    assert failed[1] == "last reload FAILED at " + time.strftime("%H:%M:%S", time.localtime(1e9)) + \
        ", the previous plan runs: encapfwd.toml: bad", failed[:3]


def test_status_page_history_and_routes():
    from encapfwd.runtime import status_page

    now = [1000.0]
    counters = {"packets": 0, "bytes": 0, "state": "up"}

    def fetch():
        return {"servers": {"c@80@s": {"method": "mac", "weight": 1, **counters}},
                "engine": {"engine": "afpacket"}}

    page = status_page.StatusPage(fetch, start=False, clock=lambda: now[0])
    page.sample()
    now[0] += 2
    counters.update(packets=200, bytes=20000)
    page.sample()
    assert page.history() == {"c@80@s": [[1002.0, 100.0, 80000.0]]}
    code, headers, body = page.route("/")
    assert code == 200 and dict(headers)["Content-Type"].startswith("text/html") and b"status.json" in body
    now[0] += 0.5  # within MIN_GAP: a fresh report (the state of now), no new sample
    counters["state"] = "down"
    code, _, body = page.route("/status.json?x=1")
    document = json.loads(body)
    row = document["clusters"][0]["ports"][0]["servers"][0]
    assert code == 200 and row["pps"] == 100.0 and row["state"] == "down" and len(page.samples) == 2
    assert page.route("/metrics") is None and page.route("/other") is None


def test_promtool_check_and_test_rules():
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(RULES)], check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout + check.stderr
    tested = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], check=False, capture_output=True, text=True,
                            timeout=120, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


# ------------------------------------------------------------------------------------------ live

METRICS_PORT = 9471


def _live_reason():
    if os.geteuid() != 0:
        return "the live operations tests need root (network namespaces, AF_PACKET)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    try:
        from encapfwd.lab import topology
    except ImportError as exc:
        return f"the lab is not importable: {exc}"
    reason = topology.unavailable_reason(("mac",))
    return f"the live operations tests need: {reason}" if reason else None


def unit_capabilities() -> str:
    """The unit's CapabilityBoundingSet= as setpriv's --bounding-set (``-all,+net_admin,…``)."""
    line = next(l for l in (UNITS / "encapfwd.service").read_text().splitlines()
                if l.startswith("CapabilityBoundingSet="))
    caps = line.split("=", 1)[1].split()
    return "-all," + ",".join("+" + c[len("CAP_"):].lower() for c in caps)


class Service:
    """The lab's dispatcher started as systemd would start the unit; :meth:`messages` reads what it told."""

    def __init__(self, lab, tmp):
        from encapfwd.lab.topology import encapfwd_argv

        self.lab = lab
        self.sock = _dgram(str(tmp / "notify"))
        self.received = []
        self.log_path = tmp / "journal.log"
        argv = encapfwd_argv() + ["--config", str(lab.config_path), "run", "--interface", "eth0",
                                  "--control", lab.control_path, "--metrics", f"127.0.0.1:{METRICS_PORT}"]
        with open(self.log_path, "ab") as log:
            st = os.fstat(log.fileno())
            env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
            env.update(NOTIFY_SOCKET=str(tmp / "notify"), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
            self.proc = lab.ns["dispatcher"].popen(["setpriv", "--bounding-set", unit_capabilities(), "--", *argv],
                                                   stdout=log, stderr=log, start_new_session=True, env=env)
        lab.dispatcher = self.proc

    def messages(self, count: int, timeout: float = 30.0) -> list:
        """Wait until *count* notifications arrived in total; all of them."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.received.append(self.sock.recv(4096).decode())
            except socket.timeout:
                break
        assert len(self.received) >= count, (self.received, self.log())
        return self.received

    def quiet(self, seconds: float = 0.5) -> None:
        """No other notification comes."""
        self.sock.settimeout(seconds)
        try:
            extra = self.sock.recv(4096).decode()
        except socket.timeout:
            return
        pytest.fail(f"unexpected notification {extra!r} after {self.received}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    reason = _live_reason()
    if reason:
        pytest.skip(reason)
    from encapfwd.lab import topology

    with topology.Topology(("mac",)) as lab:
        running = Service(lab, tmp_path_factory.mktemp("service"))
        try:
            yield running
        finally:
            if running.proc.poll() is None:
                topology.stop_process(running.proc)
            running.sock.close()


def _fields(message: str) -> dict:
    return dict(line.split("=", 1) for line in message.split("\n"))


def test_ready_once_the_plan_runs(service, prometheus, browser):  # both start now and get ready meanwhile
    first, ready = service.messages(2)[:2]
    assert first == "STATUS=starting: " + _fields(first)["STATUS"].split(": ", 1)[1]
    fields = _fields(ready)
    assert list(fields) == ["READY", "STATUS"] and fields["READY"] == "1"
    # the control socket answers, and the plan READY=1 announced is the installed one
    report = service.lab.report()
    engine = report["engine"]
    assert engine["plan_digest"][:12] in fields["STATUS"]
    assert "1/1 servers up" in fields["STATUS"]
    # the unit's capabilities are enough for the engine auto chooses here (TC on this veth where BPF works)
    assert engine["engine"] in fields["STATUS"]
    assert fields["STATUS"].startswith(("tc (", "afpacket"))
    # ... and XDP is never refused for want of a capability (without CAP_PERFMON the verifier refuses the
    # program and auto falls back to afpacket: "Permission denied (R4 pointer -= pointer prohibited)")
    assert "Permission denied" not in service.log() and "needs root" not in service.log(), service.log()
    assert service.lab.curl("mac", 1)[0].startswith("server=mac ")
    # journal priorities: every line of the log starts with <N>encapfwd:
    lines = [l for l in service.log().splitlines() if l.strip()]
    assert lines and all(re.match(r"<[3-7]>encapfwd: ", l) for l in lines), lines
    assert any(l.startswith("<5>encapfwd: forwarding ") for l in lines), lines


PROMETHEUS_PORT = 9472


def _http(service, port: int, path: str, timeout: float = 10.0) -> tuple:
    """``GET http://127.0.0.1:PORT/PATH`` inside the dispatcher's namespace: (status, body)."""
    with service.lab.ns["dispatcher"].socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" in head.lower():  # prometheus (Go) chunks what it streams
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            chunks.append(rest[:int(size, 16)])
            rest = rest[int(size, 16) + 2:]
        body = b"".join(chunks)
    return int(head.split()[1]), body


def _length(data: bytes) -> float:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return float("inf")  # until the peer closes


def _until(probe, timeout: float, interval: float = 0.05, what: str = ""):
    """Call *probe* until it returns something true (or *timeout* passes); (value, seconds it took)."""
    start = time.monotonic()
    while True:
        value = probe()
        if value or time.monotonic() - start > timeout:
            break
        time.sleep(interval)
    assert value, f"not within {timeout} s: {what() if callable(what) else what}"
    return value, time.monotonic() - start


class Prometheus:
    """A real ``prometheus`` in the dispatcher's namespace on 127.0.0.1: scrapes the dispatcher's ``--metrics``
    every second and evaluates the shipped alert rules every second (temporary TSDB)."""

    def __init__(self, service, tmp: Path):
        self.service, self.tmp, self.proc = service, tmp, None
        self.binary = shutil.which("prometheus")

    def start(self) -> None:
        if self.binary is None:
            return
        config = self.tmp / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
                          f"rule_files: [{json.dumps(str(RULES))}]\n"
                          "scrape_configs:\n  - job_name: encapfwd\n"
                          f"    static_configs: [{{targets: ['127.0.0.1:{METRICS_PORT}']}}]\n")
        with open(self.tmp / "prometheus.log", "wb") as log:
            self.proc = self.service.lab.ns["dispatcher"].popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def require(self) -> None:
        if self.binary is None:
            pytest.skip("prometheus is missing (Debian package prometheus)")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return (self.tmp / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str):
        code, body = _http(self.service, PROMETHEUS_PORT, path)
        document = json.loads(body)
        assert code == 200 and document["status"] == "success", (code, body[:500])
        return document["data"]

    def ready(self) -> bool:
        try:
            return _http(self.service, PROMETHEUS_PORT, "/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict:
        """An instant query: {the series' server label or '': value}."""
        data = self.api("/api/v1/query?query=" + urllib.parse.quote(expr))
        return {r["metric"].get("server", ""): float(r["value"][1]) for r in data["result"]}

    def alerts(self) -> dict:
        """{alertname: state} of the active alerts (pending or firing)."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("/api/v1/alerts")["alerts"]}

    def stop(self) -> int:
        """SIGTERM and wait: prometheus closes its TSDB and exits 0."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """Started with the first test that asks for it; it scrapes while the next tests run."""
    server = Prometheus(service, tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class _WebSocket:
    """The smallest RFC 6455 client the DevTools protocol needs: masked text frames out, frames in."""

    def __init__(self, sock: socket.socket, host: str, path: str):
        self.sock, self.buf = sock, b""
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("DevTools closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        size = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 1 << 16
                                                  else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        self.sock.sendall(b"\x81" + size + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(data)))

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._take(2)
            n = second & 0x7F
            if n >= 126:
                n = int.from_bytes(self._take(2 if n == 126 else 8), "big")
            payload, opcode = self._take(n), first & 0x0F
            if opcode == 8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode in (0, 1, 2):
                message += payload
                if first & 0x80:
                    return message.decode()


class Browser:
    """One headless chromium in the dispatcher's namespace; its page is driven over the DevTools protocol and
    stays open across the tests (the status page refreshes itself, as in front of an operator)."""

    FLAGS = ("--headless=new", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "--no-sandbox",
             "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--window-size=1400,900")

    def __init__(self, service, tmp: Path):
        self.service, self.tmp, self.proc, self.ws, self.calls = service, tmp, None, None, 0
        self.binary = shutil.which("chromium")

    def start(self) -> None:
        if self.binary is None:
            return
        (self.tmp / "profile").mkdir()
        with open(self.tmp / "chromium.log", "wb") as log:
            self.proc = self.service.lab.ns["dispatcher"].popen(
                [self.binary, *self.FLAGS, f"--user-data-dir={self.tmp / 'profile'}", "about:blank"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def page(self) -> Browser:
        """Connected to the page (the first call waits for chromium's DevToolsActivePort)."""
        if self.binary is None:
            pytest.skip("chromium is missing (Debian package chromium)")
        if self.ws is None:
            active = self.tmp / "profile" / "DevToolsActivePort"
            _until(lambda: active.exists() and active.read_text().strip(), 30, 0.1,
                   lambda: "DevToolsActivePort: " + (self.tmp / "chromium.log").read_text(errors="replace")[-2000:])
            port = int(active.read_text().split()[0])
            _, body = _http(self.service, port, "/json/list")
            target = next(t for t in json.loads(body) if t["type"] == "page")
            sock = self.service.lab.ns["dispatcher"].socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(("127.0.0.1", port))
            self.ws = _WebSocket(sock, f"127.0.0.1:{port}", urllib.parse.urlsplit(target["webSocketDebuggerUrl"]).path)
        return self

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events are not enabled; skip anything else anyway
            answer = json.loads(self.ws.recv())
            if answer.get("id") == self.calls:
                assert "error" not in answer, (method, answer)
                return answer["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def state_of(self, server: str):
        """The server's state as the page shows it (its row's data-state), None without a row."""
        return self.evaluate(f"(r => r && r.dataset.state)(document.querySelector('tr[data-server=\"{server}\"]'))")

    def text(self, element_id: str) -> str:
        return self.evaluate(f"document.getElementById({json.dumps(element_id)}).innerText")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: chromium and its helpers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.ws is not None:
            self.ws.sock.close()


@pytest.fixture(scope="module")
def browser(service, tmp_path_factory):
    """Started with the first test that asks for it (it starts while the next tests run)."""
    chromium = Browser(service, tmp_path_factory.mktemp("chromium"))
    chromium.start()
    try:
        yield chromium
    finally:
        chromium.stop()


def test_promtool_check_metrics_on_a_real_scrape(service):
    promtool = _promtool()
    scrape = service.lab.ns["dispatcher"].run(
        ["curl", "-s", "-S", "-f", "-m", "10", f"http://127.0.0.1:{METRICS_PORT}/metrics"], check=False)
    assert scrape.returncode == 0, scrape.stderr
    assert "encapfwd_xdp_tx_lost_total" in scrape.stdout
    proc = subprocess.run([promtool, "check", "metrics"], check=False, input=scrape.stdout, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc


def _top(*args, **kwargs):
    from encapfwd.lab.topology import encapfwd_argv

    return subprocess.run(encapfwd_argv() + ["top", *args], check=False, capture_output=True, text=True, timeout=60, **kwargs)


def test_top_plain_text(service):
    from encapfwd.lab.topology import SERVERS

    vip, address, _ = SERVERS["mac"]
    proc = _top("--control", service.lab.control_path, "--count", "2", "--interval", "0.3", "--sort", "pps")
    assert proc.returncode == 0, proc.stderr
    frames = proc.stdout.split("\n\nencapfwd top")
    assert len(frames) == 2, proc.stdout
    row = next(l for l in frames[-1].splitlines() if l.startswith(f"{vip}:80 "))
    fields = row.split()
    assert fields[1:4] == [address, "mac", "up"] and fields[4] == "1", row  # health, weight
    assert "PPS" in frames[0] and "DROP REASON" in frames[0] and f"{vip}:80" in frames[0]


def test_top_on_a_terminal(service, tmp_path):
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is missing (Debian package tmux)")
    from encapfwd.lab.topology import encapfwd_argv

    server = ["-L", f"encapfwd-test-{os.getpid()}"]
    command = " ".join(encapfwd_argv() + ["top", "--control", service.lab.control_path, "--interval", "0.5"])
    subprocess.run([tmux, *server, "new-session", "-d", "-x", "160", "-y", "40", "-s", "top", command],
                   check=True, timeout=20)

    def screen():
        return subprocess.run([tmux, *server, "capture-pane", "-p", "-t", "top"], check=False, capture_output=True, text=True,
                              timeout=20).stdout

    def wait_for(words, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = screen()
            if all(w in text for w in words):
                return text
            time.sleep(0.1)
        pytest.fail(f"{words} not on the screen:\n{screen()}")

    try:
        text = wait_for(["encapfwd top", "HEALTH", "sort: name", "10.0.2.10"])
        subprocess.run([tmux, *server, "send-keys", "-t", "top", "b"], check=True, timeout=20)
        wait_for(["sort: bps"])
        subprocess.run([tmux, *server, "send-keys", "-t", "top", "r"], check=True, timeout=20)
        wait_for(["sort: bps (reversed)"])
        subprocess.run([tmux, *server, "send-keys", "-t", "top", "q"], check=True, timeout=20)
        deadline = time.monotonic() + 10
        while subprocess.run([tmux, *server, "has-session", "-t", "top"], check=False, capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "q did not quit"
            time.sleep(0.1)
        assert "Traceback" not in text
    finally:
        subprocess.run([tmux, *server, "kill-server"], check=False, capture_output=True, timeout=20)


def test_prometheus_scrapes_the_dispatcher(service, prometheus):
    """The real server (started with the scrape test): the target up, the server's health 1, every shipped
    rule loaded."""
    from encapfwd.lab.topology import SERVERS

    prometheus.require()
    _until(prometheus.ready, 30, 0.2, prometheus.log)
    _until(lambda: prometheus.query('up{job="encapfwd"}') == {"": 1.0}, 15, 0.2, prometheus.log)
    assert prometheus.query("encapfwd_server_health") == {SERVERS["mac"][1]: 1.0}
    rules = {r["name"]: r for g in prometheus.api("/api/v1/rules")["groups"] for r in g["rules"]}
    assert sorted(rules) == sorted(re.findall(r"^ +- alert: (\w+)$", RULES.read_text(), re.MULTILINE)), rules
    assert all(r["health"] in ("ok", "unknown") for r in rules.values()), rules
    assert rules["EncapfwdServerDown"]["duration"] == 120 and rules["EncapfwdReloadFailing"]["duration"] == 0


def _status_json(service) -> dict:
    proc = service.lab.ns["dispatcher"].run(
        ["curl", "-s", "-S", "-f", "-m", "10", f"http://127.0.0.1:{METRICS_PORT}/status.json"], check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_status_page_shows_the_servers(service, browser):
    from encapfwd.lab.topology import SERVERS

    vip, address, _ = SERVERS["mac"]
    service.lab.curl("mac", 3)
    status = _status_json(service)
    (row,) = status["clusters"][0]["ports"][0]["servers"]
    assert row["name"] == f"{vip}@80@{address}" and row["state"] == "up" and row["weight"] == 1
    assert status["engine"]["plan_digest"] == service.lab.report()["engine"]["plan_digest"]
    page = browser.page()  # stays open on the status page for the next tests
    page.call("Page.navigate", url=f"http://127.0.0.1:{METRICS_PORT}/")
    _until(lambda: page.state_of(f"{vip}@80@{address}") == "up", 10, what=lambda: page.text("clusters"))
    assert "<svg" in page.evaluate("document.body.innerHTML") and page.text("error") == ""  # no error shown
    # self-contained: no URL but its own endpoints
    page = service.lab.ns["dispatcher"].run(["curl", "-s", "-f", f"http://127.0.0.1:{METRICS_PORT}/"]).stdout
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_good_reload_shows_on_the_open_page(service, browser, tmp_path):
    """``server down`` + SIGHUP (what ``systemctl reload`` does): the notifications, and the page that was
    already open shows the server down within its refresh interval plus the reload's own time."""
    from encapfwd.runtime.status_page import REFRESH
    from encapfwd.lab.topology import SERVERS

    lab = service.lab
    vip, address, _ = SERVERS["mac"]
    target = f"{vip}@80@{address}"
    page = browser.page()
    assert page.state_of(target) == "up"
    count = len(service.messages(2))
    service.quiet(0.3)
    lab.cli("server", "down", target)
    start = time.monotonic()
    service.proc.send_signal(signal.SIGHUP)  # what ExecReload= does
    reloading, ready = service.messages(count + 2)[count:count + 2]
    reload_time = time.monotonic() - start
    assert reloading.split("\n")[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", reloading.split("\n")[1])
    assert _fields(ready)["READY"] == "1" and "0/1 servers up" in _fields(ready)["STATUS"]
    # /status.json is computed per request (no cache) and the open page fetches it every REFRESH seconds: the
    # change shows at its next refresh (slack: one fetch of the report and the drawing, on a shared machine)
    _until(lambda: page.state_of(target) == "down", REFRESH + 5, what=lambda: page.text("clusters"))
    seen = time.monotonic() - start
    print(f"\nstatus page: down {seen:.2f} s after SIGHUP (reload {reload_time:.2f} s, refresh {REFRESH:g} s)")
    assert seen <= REFRESH + reload_time + 1.0, (seen, reload_time)
    text = page.evaluate("document.body.innerText")
    assert "down in the configuration" in text and "0/1 servers up" in text
    shot = Path(os.environ.get("ENCAPFWD_SCREENSHOT_DIR") or tmp_path) / "status-page.png"
    assert page.screenshot(shot).stat().st_size > 10000
    (row,) = _status_json(service)["clusters"][0]["ports"][0]["servers"]
    assert row["state"] == "down" and row["reason"] == "down in the configuration"
    last = _status_json(service)["engine"]["last_reload"]
    assert last["ok"] is True and last["error"] is None and abs(last["at"] - time.time()) < 60
    service.quiet(0.3)


def test_prometheus_sees_the_server_down(service, prometheus):
    """The server's health 0 in Prometheus; the shipped alerts on it pending (their ``for:`` is 2 min and
    30 s: firing is proven by ``promtool test rules``)."""
    from encapfwd.lab.topology import SERVERS

    prometheus.require()
    address = SERVERS["mac"][1]
    _, took = _until(lambda: prometheus.query("encapfwd_server_health") == {address: 0.0}, 10, 0.2,
                     lambda: prometheus.query("encapfwd_server_health"))
    def pending():
        alerts = prometheus.alerts()
        return alerts.get("EncapfwdServerDown") == alerts.get("EncapfwdPortAllServersDown") == "pending" and alerts

    alerts, took_alerts = _until(pending, 10, 0.2, prometheus.alerts)
    print(f"\nprometheus: health 0 after {took:.2f} s more, alerts pending after {took_alerts:.2f} s more")
    assert "EncapfwdReloadFailing" not in alerts, alerts


def test_bad_reload_keeps_the_previous_plan(service):
    """A bad file: the old plan stays; READY=1 again, with the error in STATUS=."""
    lab = service.lab
    count = len(service.messages(4))
    good = Path(lab.config_path).read_bytes()
    Path(lab.config_path).write_bytes(b"[[clusters]]\naddress = 'not-an-address'\n")
    try:
        service.proc.send_signal(signal.SIGHUP)
        reloading, ready = service.messages(count + 2)[count:count + 2]
    finally:
        Path(lab.config_path).write_bytes(good)
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
    status = _fields(ready)["STATUS"]
    assert ready.startswith("READY=1\n")
    assert status.startswith("reload failed, running the previous plan: ") and "not-an-address" in status
    assert "0/1 servers up" in status
    service.quiet(0.3)


def test_a_failed_reload_shows_everywhere(service, browser, prometheus, tmp_path):
    """After the bad reload: the report, the open status page, ``encapfwd top``, the metrics in Prometheus and
    the shipped alert ``EncapfwdReloadFailing`` (no ``for:``: firing at once) all say so."""
    from encapfwd.runtime.status_page import REFRESH
    from encapfwd.lab.topology import SERVERS

    lab = service.lab
    vip, address, _ = SERVERS["mac"]
    engine = _status_json(service)["engine"]
    assert engine["reload_errors"] == 1 and "not-an-address" in engine["last_reload_error"]
    assert engine["last_reload"]["ok"] is False and engine["last_reload"]["error"] == engine["last_reload_error"]
    page = browser.page()
    _until(lambda: "not-an-address" in page.text("engine"), REFRESH + 2, what=lambda: page.text("engine"))
    shown = page.text("engine")
    assert "(1 failed); last " in shown and ": failed " in shown, shown
    assert re.search(r"Last reload error\s+\S*encapfwd\.toml: invalid IP address: 'not-an-address'", shown), shown
    shot = Path(os.environ.get("ENCAPFWD_SCREENSHOT_DIR") or tmp_path) / "status-page-reload-failed.png"
    assert page.screenshot(shot).stat().st_size > 10000
    top = _top("--control", lab.control_path, "--once", "--interval", "0.1")
    assert top.returncode == 0, top.stderr
    line = top.stdout.splitlines()[1]
    assert line.startswith("last reload FAILED at ") and "the previous plan runs: " in line, top.stdout
    assert "not-an-address" in line, line
    assert page.state_of(f"{vip}@80@{address}") == "down"  # the previous plan still runs
    prometheus.require()
    _, took = _until(lambda: prometheus.query("encapfwd_reload_failures_total") == {"": 1.0}, 10, 0.2,
                     lambda: prometheus.query("encapfwd_reload_failures_total"))
    _, took_alert = _until(lambda: prometheus.alerts().get("EncapfwdReloadFailing") == "firing", 10, 0.2,
                           prometheus.alerts)
    print(f"\nprometheus: reload failure counted after {took:.2f} s, EncapfwdReloadFailing firing {took_alert:.2f} s later")
    assert prometheus.stop() == 0, prometheus.log()
    lab.cli("server", "up", SERVERS["mac"][0] + f"@80@{address}")


def test_advisor_takes_a_server_down_on_the_open_page(service, browser, tmp_path):
    """A second MAC server and a ``connect`` advisor (one reload); the server's httpd stops: the advisor takes
    it down (a STATUS= notification) and the page that stayed open shows it down within its refresh interval
    of the report saying so."""
    from encapfwd.runtime.status_page import REFRESH
    from encapfwd.lab.topology import SERVERS

    lab = service.lab
    vip, address, _ = SERVERS["mac"]
    target = f"{vip}@80@10.0.2.11"
    good = Path(lab.config_path).read_bytes()
    try:
        lab.cli("server", "add", target)
        m2 = lab.add_mac_server("m2", "10.0.2.11")
        lab.cli("advisor", "start", "connect", "80", "interval", "0.5", "timeout", "0.3", "fall", "1", "rise", "1",
                "hold", "0")
        service.proc.send_signal(signal.SIGHUP)
        assert "2/2 servers up" in _fields(service.messages(8)[7])["STATUS"], service.received
        page = browser.page()
        _until(lambda: page.state_of(target) == "up" and page.state_of(f"{vip}@80@{address}") == "up",
               REFRESH + 3, what=lambda: page.text("clusters"))
        m2.stop()

        def reported_down():
            return ((lab.report().get("health") or {}).get(target) or {}).get("state") == "down"

        _, reported = _until(reported_down, 10, what=lambda: lab.report().get("health"))
        _, shown = _until(lambda: page.state_of(target) == "down", REFRESH + 2, what=lambda: page.text("clusters"))
        print(f"\nadvisor: down in the report {reported:.2f} s after the httpd stopped, on the open page "
              f"{shown:.2f} s later (refresh {REFRESH:g} s)")
        assert shown <= REFRESH + 1.0, shown
        assert "advisor connect" in page.text("clusters") and "1/2 servers up" in page.text("clusters")
        change = service.messages(9)[8]
        assert change.startswith("STATUS=") and "1/2 servers up" in change, change
        shot = Path(os.environ.get("ENCAPFWD_SCREENSHOT_DIR") or tmp_path) / "status-page-advisor.png"
        assert page.screenshot(shot).stat().st_size > 10000
    finally:
        Path(lab.config_path).write_bytes(good)  # the next tests' configuration: no advisor, one server
        browser.stop()


def test_stop_sequence(service):
    service.messages(9)
    service.quiet(0.2)
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(20) == 0, service.log()
    stopping = service.messages(10)[9]
    assert stopping.startswith("STOPPING=1\nSTATUS=stopping: ")
    kinds = [m.split("\n")[0].split("=")[0] for m in service.received]
    assert kinds == ["STATUS", "READY", "RELOADING", "READY", "RELOADING", "READY", "RELOADING", "READY", "STATUS",
                     "STOPPING"], service.received
    service.quiet(0.2)


def test_ready_with_bgp_once_the_first_attempt_failed(service, tmp_path):
    """With a bgppeer that does not answer (nothing listens on the router's port 179): READY=1 comes after the
    first failed attempt, not before, and says so (the module's dispatcher is stopped by now: eth0 is free)."""
    from encapfwd.bgp.speaker import exabgp_path
    from encapfwd.lab.topology import encapfwd_argv, stop_process

    if exabgp_path() is None:
        pytest.skip("ExaBGP is not installed (the bgp extra)")
    assert service.proc.poll() is not None
    lab = service.lab
    config = tmp_path / "bgp.toml"
    shutil.copy(lab.config_path, config)
    lab.cli("executor", "set", "nfa", "10.0.2.1", "bgppeer", "10.0.2.254", "bgpasn", "65001", "bgppeerasn",
            "65000", config=config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    with _dgram(str(tmp_path / "notify")) as sock, open(tmp_path / "log", "wb") as log:
        proc = lab.ns["dispatcher"].popen(
            encapfwd_argv() + ["--config", str(config), "run", "--interface", "eth0", "--control",
                               str(tmp_path / "c.sock")], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            sock.settimeout(30)
            got = [sock.recv(4096).decode() for _ in range(3)]
        finally:
            stop_process(proc)
        text = (tmp_path / "log").read_text()
    assert got[0].startswith("STATUS=starting")
    assert got[1].startswith("STATUS=") and got[1].endswith("waiting for the BGP session"), got
    assert got[2].startswith("READY=1\nSTATUS=") and "bgp session down" in got[2], got
    assert text.index("not up (attempt failed)") < text.index("stopped:"), text
