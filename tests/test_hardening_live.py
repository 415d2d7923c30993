"""The live engine survives bad reloads, bad control requests and slow control clients, and keeps forwarding.

A MAC-forwarding lab (encapfwd.lab.topology with only the "mac" back-end: plain namespaces, no
user-mode-linux): client ns → router ns → dispatcher ns running ``encapfwd run`` → the MAC server's kernel.
After every bad thing, a curl from the client through the dispatcher must still be answered by the server,
and the dispatcher's report must say what went wrong.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

pytestmark = pytest.mark.slow

topology = pytest.importorskip("encapfwd.lab.topology")

REASON = topology.unavailable_reason(("mac",))
if REASON:
    pytest.skip(f"live hardening tests need: {REASON}", allow_module_level=True)

from encapfwd.control import query_control  # noqa: E402
from encapfwd.lab.netns import Namespace, veth_pair  # noqa: E402


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}


def _start(lab, *, control=True, interface=False, extra=(), timeout=20.0):
    """``encapfwd run`` in the dispatcher namespace, like Topology.start_dispatcher but without
    ``--interface`` (the configuration's ``executor interface`` applies) unless asked."""
    argv = topology.encapfwd_argv() + ["--config", str(lab.config_path), "run"]
    if interface:
        argv += ["--interface", "eth0"]
    if control:
        argv += ["--control", lab.control_path]
    argv += list(extra)
    log = open(lab.log_path, "ab")
    lab.dispatcher = lab.ns["dispatcher"].popen(
        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_env()
    )
    log.close()
    return lab.dispatcher


def _wait_up(proc, path, lab, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, lab.dispatcher_log()
        try:
            query_control(path, "ping", timeout=1.0)
            return
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, lab.dispatcher_log()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab():
    with topology.Topology(("mac",)) as built:
        _start(built)
        _wait_up(built.dispatcher, built.control_path, built)
        yield built


@pytest.fixture
def running(lab):
    if lab.dispatcher is None or lab.dispatcher.poll() is not None:
        lab.stop_dispatcher()
        _start(lab)
        _wait_up(lab.dispatcher, lab.control_path, lab)
    return lab


def _forwards(lab, count=2):
    answers = lab.curl("mac", count)
    assert all(a.startswith("server=mac ") for a in answers), (answers, lab.dispatcher_log())
    assert lab.dispatcher.poll() is None, lab.dispatcher_log()


def _wait(predicate, lab, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, lab.dispatcher_log()
        time.sleep(0.05)


# ------------------------------------------------------------------------------------- bad reloads

BAD_CONFIGS = {
    "not-utf8": (b"[executor]\ninterface = 'eth0'\nnfa = '\xff\xfe10.0.2.1'\n", "UTF-8"),
    "deep-nesting": (b"a = " + b"[" * 4000 + b"\n", "nested"),
    "huge-nesting": (b"a = " + b"[" * 200_000 + b"\n", "nested"),
}


@pytest.mark.parametrize("how", ["sighup", "control"])
@pytest.mark.parametrize("bad", sorted(BAD_CONFIGS))
def test_bad_reload_keeps_the_running_configuration(running, how, bad):
    lab = running
    content, words = BAD_CONFIGS[bad]
    good = lab.config_path.read_bytes()
    before = lab.report()["engine"]
    try:
        lab.config_path.write_bytes(content)
        if how == "sighup":
            lab.dispatcher.send_signal(signal.SIGHUP)
            _wait(lambda: lab.report()["engine"]["reload_errors"] > before["reload_errors"], lab)
        else:
            answer = query_control(lab.control_path, "reload", timeout=15)
            assert answer["reloaded"] is False and words in answer["error"], answer
        engine = lab.report()["engine"]
        assert engine["reload_errors"] == before["reload_errors"] + 1
        assert engine["reloads"] == before["reloads"]
        assert words in engine["last_reload_error"], engine["last_reload_error"]
        assert "reload failed, keeping the running configuration" in lab.dispatcher_log()
        _forwards(lab)
    finally:
        lab.config_path.write_bytes(good)
    # and a good file reloads again afterwards
    answer = query_control(lab.control_path, "reload", timeout=15)
    assert answer == {"reloaded": True, "error": None}
    _forwards(lab, 1)


# ---------------------------------------------------------------------------- bad control requests


def _raw_request(path, data: bytes, timeout=5.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may already have answered a request that is too large, and closed
            pass
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return json.loads(out)


BAD_REQUESTS = {
    "deep-brackets": (b"[" * 4000 + b"\n", "nested"),
    "too-large": (b"x" * (1 << 20), "too large"),
    "not-utf8": (b"\xff\xfe\xfd\n", "UTF-8"),
    "not-an-object": (b"[1, 2, 3]\n", "expected"),
    "unknown-command": (b'{"command": "shutdown"}\n', "unknown command"),
}


@pytest.mark.parametrize("bad", sorted(BAD_REQUESTS))
def test_bad_control_request_gets_an_error_and_forwarding_goes_on(running, bad):
    lab = running
    data, words = BAD_REQUESTS[bad]
    answer = _raw_request(lab.control_path, data)
    assert words in answer.get("error", ""), answer
    assert lab.dispatcher.poll() is None, lab.dispatcher_log()
    assert query_control(lab.control_path, "ping")["pong"] is True
    _forwards(lab)


def test_a_slow_control_client_holds_up_nothing(running):
    """One byte every 1.5 s: the controller still answers reports at once, reloads on SIGHUP, restarts a
    killed worker, and cuts the slow client off after 2 s in total."""
    lab = running
    stop = threading.Event()
    outcome = {}

    def dribble():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(lab.control_path)
            started = time.monotonic()
            try:
                for byte in b'{"command": "report"}':
                    sock.sendall(bytes([byte]))
                    if stop.wait(1.5):
                        break
                sock.settimeout(5)
                outcome["answer"] = sock.recv(65536)
            except OSError as exc:
                outcome["error"] = exc
            outcome["after"] = time.monotonic() - started

    slow = threading.Thread(target=dribble)
    slow.start()
    try:
        time.sleep(0.3)
        # a report: at once
        t = time.monotonic()
        engine = lab.report()["engine"]
        assert time.monotonic() - t < 1.0
        # a reload on SIGHUP: promptly
        t = time.monotonic()
        lab.dispatcher.send_signal(signal.SIGHUP)
        _wait(lambda: lab.report()["engine"]["reloads"] > engine["reloads"], lab, timeout=10)
        assert time.monotonic() - t < 3.0
        # a killed worker: started again promptly
        victim = lab.report()["workers"][0]["pid"]
        t = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: lab.report()["engine"]["worker_restarts"] > engine["worker_restarts"], lab, timeout=10)
        assert time.monotonic() - t < 3.0
        _forwards(lab)
    finally:
        slow.join(20)
        stop.set()
    assert not slow.is_alive()
    # the slow client was cut off after its 2 s, with a reason (or a reset), well before it finished
    assert outcome["after"] < 6.0, outcome
    if "answer" in outcome and outcome["answer"]:
        assert b"not complete within" in outcome["answer"], outcome
    assert lab.report()["engine"]["control_requests"]["timeouts"] >= 1
    _forwards(lab)


# ------------------------------------------------------------------------------- the control path


def _run_refused(lab, control_path):
    argv = topology.encapfwd_argv() + ["--config", str(lab.config_path), "run", "--control", control_path]
    return lab.ns["dispatcher"].run(argv, check=False, timeout=60, env=_env())


def test_control_path_in_use_is_left_alone(running):
    lab = running
    regular = lab.workdir / "precious.txt"
    regular.write_text("keep me")
    directory = lab.workdir / "adir"
    directory.mkdir(exist_ok=True)
    live_inode = os.stat(lab.control_path).st_ino
    cases = [
        (str(regular), "is a regular file"),
        (str(directory), "is a directory"),
        (lab.control_path, "another encapfwd run answers"),
    ]
    for path, words in cases:
        proc = _run_refused(lab, path)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("encapfwd: error: ")]
        assert len(errors) == 1 and words in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert regular.read_text() == "keep me" and directory.is_dir()
    assert os.stat(lab.control_path).st_ino == live_inode  # the running dispatcher's socket is untouched
    assert query_control(lab.control_path, "ping")["pong"] is True
    _forwards(lab)


def test_a_stale_control_socket_is_replaced(running):
    lab = running
    lab.stop_dispatcher(signal.SIGKILL)  # no clean-up: the socket file stays behind, nobody listens on it
    assert os.path.exists(lab.control_path)
    time.sleep(0.3)  # the workers follow their controller (PR_SET_PDEATHSIG)
    proc = _start(lab)
    _wait_up(proc, lab.control_path, lab)
    _forwards(lab)


# ------------------------------------------------------------------------- settings needing a restart


def test_a_changed_interface_is_logged_as_needing_a_restart(running):
    lab = running
    before = lab.report()["engine"]
    lab.cli("executor", "set", "interface", "eth9")
    try:
        lab.dispatcher.send_signal(signal.SIGHUP)
        _wait(lambda: lab.report()["engine"]["reloads"] > before["reloads"], lab)
        engine = lab.report()["engine"]
        assert engine["interface"] == "eth0" and engine["last_reload_error"] is None
        assert any("eth9" in line for line in engine["restart_needed"]), engine["restart_needed"]
        assert "executor interface is now eth9" in lab.dispatcher_log()
        _forwards(lab)
    finally:
        lab.cli("executor", "set", "interface", "eth0")
    lab.dispatcher.send_signal(signal.SIGHUP)
    _wait(lambda: lab.report()["engine"]["restart_needed"] == [], lab)


# ------------------------------------------------------------- default control path per namespace


def test_default_control_socket_is_per_network_namespace(running):
    """Two dispatchers in two namespaces, neither given --control, do not collide; ``server report`` in
    each namespace finds its own."""
    lab = running
    lab.stop_dispatcher()
    other = Namespace("second").create()
    second = None
    try:
        veth_pair(other, "eth0", other, "peer0")
        other.ip("addr", "add", "10.0.77.1/24", "dev", "eth0")
        config = lab.workdir / "second.toml"
        config.write_text(
            '[executor]\ninterface = "eth0"\nnfa = "10.0.77.1"\nnetworks = ["10.0.77.0/24"]\n'
            '[[clusters]]\naddress = "10.0.78.1"\n[[clusters.ports]]\nnumber = 80\n'
            '[[clusters.ports.servers]]\naddress = "10.0.77.10"\nmac = "02:00:00:00:77:10"\n'
        )
        first = _start(lab, control=False)
        second = other.popen(
            topology.encapfwd_argv() + ["--config", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=_env(),
        )
        paths = {}
        for name, ns, proc in (("first", lab.ns["dispatcher"], first), ("second", other, second)):
            inode = os.stat(f"/run/netns/{ns.name}").st_ino
            paths[name] = f"/run/encapfwd/netns-{inode}.sock"
            _wait_up(proc, paths[name], lab)
        assert paths["first"] != paths["second"]
        for name, ns, proc, cfg in (
            ("first", lab.ns["dispatcher"], first, lab.config_path),
            ("second", other, second, config),
        ):
            out = ns.run(
                topology.encapfwd_argv() + ["--config", str(cfg), "server", "report", "--json"], env=_env()
            ).stdout
            live = json.loads(out)["live"]
            assert live is not None and live["engine"]["pid"] == proc.pid, out
            assert live["engine"]["control"] == paths[name]
        _forwards(lab)
    finally:
        if second is not None:
            second.send_signal(signal.SIGTERM)
            second.wait(10)
        lab.stop_dispatcher()
        other.delete()
    assert not os.path.exists(paths["first"]) and not os.path.exists(paths["second"])
    _start(lab)
    _wait_up(lab.dispatcher, lab.control_path, lab)
