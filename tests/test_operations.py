"""Operating ``encapfwd run`` as a production service (docs/operations.md).

Unit part (anyone): sd_notify on a path and an abstract socket, ``$NOTIFY_SOCKET`` taken out of the
environment, journal priorities, the notification sequence of :class:`~encapfwd.engines.sdnotify.Lifecycle`;
``systemd-analyze verify`` on the shipped units; ``promtool check rules`` and ``promtool test rules`` on the
shipped alert rules.

Live part (root, the MAC-only namespace lab; one dispatcher for the whole module): ``encapfwd run`` started
as systemd would (only the unit's capabilities, via ``setpriv --bounding-set``; ``$NOTIFY_SOCKET`` a datagram
socket this test binds; ``$JOURNAL_STREAM`` naming its log file), then: READY=1 after start; ``promtool check
metrics`` on a real scrape; ``encapfwd top`` (plain text and under tmux); the status page in headless
chromium; a good and a bad reload; the stop — and the exact sequence of notifications across all of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from encapfwd.engines import sdnotify

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
        self.dispatcher = type("D", (), {"plan": _Plan([True, False])})()


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
    assert sink.sent[-1] == "READY=1\nSTATUS=afpacket; 1/2 servers up; plan 0123456789ab; bgp idle, 0 routes announced"
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
    from encapfwd import cli_top

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


def test_status_page_history_and_routes():
    from encapfwd.engines import status_page

    now = [1000.0]
    counters = {"packets": 0, "bytes": 0}

    def fetch():
        return {"servers": {"c@80@s": {"method": "mac", "state": "up", "weight": 1, **counters}},
                "engine": {"engine": "afpacket"}}

    page = status_page.StatusPage(fetch, start=False, clock=lambda: now[0])
    page.sample()
    now[0] += 2
    counters.update(packets=200, bytes=20000)
    page.sample()
    assert page.history() == {"c@80@s": [[1002.0, 100.0, 80000.0]]}
    code, headers, body = page.route("/")
    assert code == 200 and dict(headers)["Content-Type"].startswith("text/html") and b"status.json" in body
    now[0] += 0.5  # within MIN_GAP: the last report, no new sample
    code, _, body = page.route("/status.json?x=1")
    document = json.loads(body)
    assert code == 200 and document["clusters"][0]["ports"][0]["servers"][0]["pps"] == 100.0
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


def test_ready_once_the_plan_runs(service):
    first, ready = service.messages(2)[:2]
    assert first == "STATUS=starting: " + _fields(first)["STATUS"].split(": ", 1)[1]
    fields = _fields(ready)
    assert list(fields) == ["READY", "STATUS"] and fields["READY"] == "1"
    # the control socket answers, and the plan READY=1 announced is the installed one
    report = service.lab.report()
    engine = report["engine"]
    assert engine["plan_digest"][:12] in fields["STATUS"]
    assert "1/1 servers up" in fields["STATUS"]
    # the unit's capabilities are enough for the engine auto chooses here (XDP where BPF works)
    assert engine["engine"] in fields["STATUS"]
    assert fields["STATUS"].startswith(("xdp (", "afpacket"))
    # ... and XDP is never refused for want of a capability (without CAP_PERFMON the verifier refuses the
    # program and auto falls back to afpacket: "Permission denied (R4 pointer -= pointer prohibited)")
    assert "Permission denied" not in service.log() and "needs root" not in service.log(), service.log()
    assert service.lab.curl("mac", 1)[0].startswith("server=mac ")
    # journal priorities: every line of the log starts with <N>encapfwd:
    lines = [l for l in service.log().splitlines() if l.strip()]
    assert lines and all(re.match(r"<[3-7]>encapfwd: ", l) for l in lines), lines
    assert any(l.startswith("<5>encapfwd: forwarding ") for l in lines), lines


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


CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=4000"]


def _chromium(service, tmp_path, *args) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is missing (Debian package chromium)")
    profile = tempfile.mkdtemp(dir=tmp_path)
    proc = service.lab.ns["dispatcher"].run(
        [chromium, *CHROMIUM, f"--user-data-dir={profile}", *args, f"http://127.0.0.1:{METRICS_PORT}/"],
        check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _status_json(service) -> dict:
    proc = service.lab.ns["dispatcher"].run(
        ["curl", "-s", "-S", "-f", "-m", "10", f"http://127.0.0.1:{METRICS_PORT}/status.json"], check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_status_page_shows_the_servers(service, tmp_path):
    from encapfwd.lab.topology import SERVERS

    vip, address, _ = SERVERS["mac"]
    service.lab.curl("mac", 3)
    status = _status_json(service)
    (row,) = status["clusters"][0]["ports"][0]["servers"]
    assert row["name"] == f"{vip}@80@{address}" and row["state"] == "up" and row["weight"] == 1
    assert status["engine"]["plan_digest"] == service.lab.report()["engine"]["plan_digest"]
    dom = _chromium(service, tmp_path, "--dump-dom")
    assert f'data-server="{vip}@80@{address}" data-state="up"' in dom, dom[-3000:]
    assert "<svg" in dom and '<div id="error"></div>' in dom  # no error shown
    # self-contained: no URL but its own endpoints
    page = service.lab.ns["dispatcher"].run(["curl", "-s", "-f", f"http://127.0.0.1:{METRICS_PORT}/"]).stdout
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_reloads_good_and_bad(service, tmp_path):
    from encapfwd.lab.topology import SERVERS

    lab = service.lab
    vip, address, _ = SERVERS["mac"]
    target = f"{vip}@80@{address}"
    count = len(service.messages(2))
    service.quiet(0.3)
    lab.cli("server", "down", target)
    service.proc.send_signal(signal.SIGHUP)  # what ExecReload= does
    reloading, ready = service.messages(count + 2)[count:count + 2]
    assert reloading.split("\n")[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", reloading.split("\n")[1])
    assert _fields(ready)["READY"] == "1" and "0/1 servers up" in _fields(ready)["STATUS"]
    # the status page: the server down. /status.json is computed per request (no cache), and the page fetches
    # it at load and then every REFRESH seconds: the change shows at the next refresh at the latest
    (row,) = _status_json(service)["clusters"][0]["ports"][0]["servers"]
    assert row["state"] == "down" and row["reason"] == "down in the configuration"
    shot = Path(os.environ.get("ENCAPFWD_SCREENSHOT_DIR") or tmp_path) / "status-page.png"
    dom = _chromium(service, tmp_path, "--dump-dom")
    assert f'data-server="{target}" data-state="down"' in dom, dom[-3000:]
    assert "down in the configuration" in dom and "0/1 servers up" in dom
    _chromium(service, tmp_path, "--window-size=1400,900", f"--screenshot={shot}")
    assert shot.stat().st_size > 10000
    last = _status_json(service)["engine"]["last_reload"]
    assert last["ok"] is True and last["error"] is None and abs(last["at"] - time.time()) < 60
    service.quiet(0.3)
    # a bad file: the old plan stays; READY=1 again, with the error in STATUS=
    good = Path(lab.config_path).read_bytes()
    Path(lab.config_path).write_bytes(b"[[clusters]]\naddress = 'not-an-address'\n")
    try:
        service.proc.send_signal(signal.SIGHUP)
        reloading, ready = service.messages(count + 4)[count + 2:count + 4]
    finally:
        Path(lab.config_path).write_bytes(good)
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
    status = _fields(ready)["STATUS"]
    assert ready.startswith("READY=1\n")
    assert status.startswith("reload failed, running the previous plan: ") and "not-an-address" in status
    assert "0/1 servers up" in status
    service.quiet(0.3)
    lab.cli("server", "up", target)


def test_stop_sequence(service):
    service.messages(6)
    service.quiet(0.2)
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(20) == 0, service.log()
    stopping = service.messages(7)[6]
    assert stopping.startswith("STOPPING=1\nSTATUS=stopping: ")
    kinds = [m.split("\n")[0].split("=")[0] for m in service.received]
    assert kinds == ["STATUS", "READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], service.received
    service.quiet(0.2)
