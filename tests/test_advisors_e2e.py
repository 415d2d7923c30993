"""The manager inside ``encapfwd run``: a connect advisor takes a failed server out of selection and puts it
back, live, with real kernels (three MAC-forwarded back-end namespaces behind one port).

A client opens one new connection every 100 ms through the dispatcher while one server's httpd is stopped
and started again; connections already open to the other servers are used across both changes.
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.slow

topology = pytest.importorskip("encapfwd.lab.topology")

REASON = topology.unavailable_reason(("mac",))
if REASON:
    pytest.skip(f"advisor end-to-end tests need: {REASON}", allow_module_level=True)

INTERVAL, TIMEOUT, FALL, RISE = 1.0, 0.5, 2, 2
#: the controller compiles and installs the new plan after the verdict (measured ≈ 0.2 s)
APPLY = 0.6


@pytest.fixture(scope="module")
def lab():
    with topology.Topology(("mac",)) as built:
        vip = topology.SERVERS["mac"][0]
        servers = {"mac": None}
        for name, address in (("m2", "10.0.2.11"), ("m3", "10.0.2.12")):
            built.cli("server", "add", f"{vip}@80@{address}")
            servers[name] = built.add_mac_server(name, address)
        built.cli("advisor", "start", "connect", "80", "interval", str(INTERVAL), "timeout", str(TIMEOUT),
                  "fall", str(FALL), "rise", str(RISE))
        built.start_dispatcher()
        built.servers = servers
        yield built


def _health(lab, name):
    return (lab.report().get("health") or {}).get(name, {}).get("state")


def _wait_for(predicate, timeout):
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_failed_server_goes_down_and_comes_back_without_failing_requests(lab):
    vip = topology.SERVERS["mac"][0]
    m2 = f"{vip}@80@10.0.2.11"
    assert _wait_for(lambda: _health(lab, m2) == "up", 5) is not None, lab.report().get("health")
    # long-lived connections, and which server each one reached
    held = []
    for _ in range(8):
        sock = lab.connect("mac")
        held.append((sock, lab.http_get(sock).split()[0]))
    others = [(s, who) for s, who in held if who != "server=m2"]
    assert others, held

    results = []  # (time, ok, answer)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t = time.monotonic()
            try:
                answer = lab.curl("mac", 1, timeout=2.0)[0]
                results.append((t, answer.startswith("server="), answer))
            except Exception as exc:  # noqa: BLE001 - a failed request is what we count
                results.append((t, False, str(exc)))
            stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        t_stop = time.monotonic()
        lab.servers["m2"].stop()
        took = _wait_for(lambda: _health(lab, m2) == "down", FALL * INTERVAL + TIMEOUT + APPLY + 3)
        assert took is not None, lab.dispatcher_log()
        assert took <= FALL * INTERVAL + TIMEOUT + APPLY, f"marked down after {took:.2f} s"
        t_down = t_stop + took
        time.sleep(2.0)
        before = lab.report()["servers"][m2]["packets"]
        t_start = time.monotonic()
        lab.servers["m2"].start()
        back = _wait_for(lambda: _health(lab, m2) == "up", RISE * INTERVAL + APPLY + 3)
        assert back is not None and back <= RISE * INTERVAL + APPLY, f"back after {back} s"
        time.sleep(2.0)
    finally:
        stop.set()
        thread.join(5)
    print(f"\nm2 marked down {took:.2f} s after its httpd stopped, up {back:.2f} s after it started; "
          f"{len(results)} requests, {sum(1 for r in results if not r[1])} failed before the verdict")
    # from the moment it was marked down, no request failed (before that, those hashed to m2 could)
    after_down = [r for r in results if r[0] >= t_down + APPLY]
    assert after_down and all(ok for _, ok, _ in after_down), [r for r in after_down if not r[1]][:3]
    # it came back and takes new flows again
    assert lab.report()["servers"][m2]["packets"] > before
    assert any(a.startswith("server=m2") for t, ok, a in results if t > t_start + back + APPLY)
    # the connections to the other servers were never reset and stayed on their server
    for sock, who in others:
        assert lab.http_get(sock).split()[0] == who
        sock.close()
    health = lab.report()["health"][m2]
    assert health["changes"] >= 2 and health["last"]["ok"]


def test_the_report_and_the_cli_show_health(lab):
    proc = lab.cli("advisor", "report", "--json", "--control", lab.control_path)
    assert "connect" in proc.stdout and "10.0.2.11" in proc.stdout
