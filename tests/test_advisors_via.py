"""``via forwarding`` against ``via address`` with real kernels: the user-mode-linux IPIP and GRE back-ends and
the MAC back-end namespace, probed by ``encapfwd run``'s manager.

The IPIP back-end is silenced with the project's own generated ``--undo`` script: its own address still
answers, so ``via address`` keeps it up, while ``via forwarding`` (a SYN to the VIP through IPIP, built by the
plan's transform) gets no answer and marks it down; the other servers stay up throughout.
"""

from __future__ import annotations

import signal
import time

import pytest

pytestmark = pytest.mark.slow

topology = pytest.importorskip("encapfwd.lab.topology")

REASON = topology.unavailable_reason(("mac", "ipip", "gre"))
if REASON:
    pytest.skip(f"via forwarding tests need: {REASON}", allow_module_level=True)

INTERVAL, TIMEOUT, FALL, RISE = 0.5, 0.4, 2, 2
NAMES = {m: f"{topology.SERVERS[m][0]}@80@{topology.SERVERS[m][1]}" for m in ("mac", "ipip", "gre")}


@pytest.fixture(scope="module")
def lab():
    with topology.Topology(("mac", "ipip", "gre")) as built:
        built.cli("advisor", "start", "connect", "80", "interval", str(INTERVAL), "timeout", str(TIMEOUT),
                  "fall", str(FALL), "rise", str(RISE), "via", "forwarding")
        built.start_dispatcher()
        yield built


def _health(lab):
    return {m: ((lab.report().get("health") or {}).get(n) or {}) for m, n in NAMES.items()}


def _wait(lab, wanted, timeout):
    """Seconds until every method in *wanted* has its state, or None."""
    start = time.monotonic()
    while True:
        health = _health(lab)
        if all(health[m].get("state") == s for m, s in wanted.items()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.05)


def _reload(lab, *words):
    lab.cli("advisor", "set", "connect", "80", *words)
    lab.dispatcher.send_signal(signal.SIGHUP)


def test_via_forwarding_reaches_every_method_and_catches_an_undone_backend(lab):
    ups = {"mac": "up", "ipip": "up", "gre": "up"}
    assert _wait(lab, ups, 10) is not None, _health(lab)
    detail = {m: h["last"]["detail"] for m, h in _health(lab).items()}
    for method in ("mac", "ipip", "gre"):
        assert detail[method].startswith("SYN-ACK from") and detail[method].endswith(method), detail

    guest = lab.guests["ipip"]
    undo = guest.run(lab.setup_script("ipip", undo=True))
    assert undo.ok, undo.output
    try:
        # the server's own address still answers (the back-end's httpd is untouched)
        assert lab.ns["router"].run(["curl", "-s", "-m", "2", f"http://{topology.SERVERS['ipip'][1]}/"],
                                    check=False).stdout.startswith("server=ipip")
        took = _wait(lab, {"ipip": "down", "mac": "up", "gre": "up"}, FALL * INTERVAL + TIMEOUT + 3)
        assert took is not None, _health(lab)
        health = _health(lab)
        assert health["ipip"]["last"]["detail"].startswith("timeout"), health["ipip"]
        print(f"\nvia forwarding: the undone IPIP back-end is down after {took:.2f} s")

        # via address: the same server is up (its own address answers)
        _reload(lab, "via", "address")
        took = _wait(lab, {"ipip": "up", "mac": "up", "gre": "up"}, RISE * INTERVAL + TIMEOUT + 5)
        assert took is not None, (_health(lab), lab.dispatcher_log())
        assert _health(lab)["ipip"]["last"]["detail"] == "connected"
        time.sleep(FALL * INTERVAL + TIMEOUT)  # and stays up
        assert _health(lab)["ipip"]["state"] == "up"

        # back to via forwarding: down again
        _reload(lab, "via", "forwarding")
        assert _wait(lab, {"ipip": "down", "mac": "up", "gre": "up"}, FALL * INTERVAL + TIMEOUT + 5) is not None, \
            _health(lab)
    finally:
        redo = guest.run(lab.setup_script("ipip"))
    assert redo.ok, redo.output
    # set up again: it comes back through the tunnel
    took = _wait(lab, ups, RISE * INTERVAL + TIMEOUT + 3)
    assert took is not None, _health(lab)
    print(f"via forwarding: the IPIP back-end set up again is up after {took:.2f} s")
    assert lab.curl("ipip", 1)[0].startswith("server=ipip")


def test_the_probe_leaves_no_half_open_connection(lab):
    """After the SYN-ACK the probe sends a RST the same way: the MAC server holds no SYN-RECV socket."""
    assert _wait(lab, {"mac": "up"}, 5) is not None
    time.sleep(INTERVAL * 4)
    out = lab.ns["mac"].run(["ss", "-Htn", "state", "syn-recv"], check=False).stdout
    assert out.strip() == "", out
