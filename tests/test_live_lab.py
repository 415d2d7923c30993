"""``encapfwd lab``: builds the topology, sends requests through each method, tears everything down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
topology = pytest.importorskip("encapfwd.lab.topology")

REASON = topology.unavailable_reason(("mac", "ipip", "gre"))


@pytest.mark.skipif(REASON is not None, reason=f"encapfwd lab needs: {REASON}")
def test_lab_runs_and_cleans_up():
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    exe = Path(sys.executable).parent / "encapfwd"
    proc = subprocess.run(
        [str(exe), "lab", "--requests", "3", "--json"], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for text in (
        "client ns",
        "router ns",
        "dispatcher ns",
        "10.0.9.1",
        "10.0.9.2",
        "10.0.9.3",
        "encapfwd server add 10.0.9.2@80@10.0.3.11 encapforward yes encaptype ipip",
        "3/3 HTTP requests to 10.0.9.3 answered by the gre server",
        "0 frames from a VIP",
        "every request succeeded",
        "Engine: ",
    ):
        assert text in out, text
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert {n for n in after - before if n.startswith("efw")} == set(), "namespaces left behind"
    # a user-mode-linux whose work folder is gone was not stopped (the lab removes the folder after the kill)
    leaked = []
    for pid in subprocess.run(["pgrep", "-f", "linux.uml"], capture_output=True, text=True).stdout.split():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")
        except OSError:
            continue
        init = [a[len("init=") :] for a in args if a.startswith("init=")]
        if init and not os.path.exists(init[0]):
            leaked.append(pid)
    assert leaked == []


@pytest.mark.skipif(topology.unavailable_reason(("mac",)) is not None,
                    reason=f"encapfwd lab --failover needs: {topology.unavailable_reason(('mac',))}")
def test_lab_failover_shows_a_server_going_down_and_back():
    exe = Path(sys.executable).parent / "encapfwd"
    proc = subprocess.run([str(exe), "lab", "--methods", "mac", "--failover", "--requests", "4", "--json"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    result = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    failover = result["failover"]
    assert failover["ok"] and failover["ok_while_down"] == 4
    assert 0 < failover["down_after"] <= 2 * 1.0 + 0.5 + 0.6  # fall x interval + timeout (+ applying)
    assert 0 < failover["up_after"] <= 2 * 1.0 + 0.6  # rise x interval (+ applying)
    assert "m2 marked down after" in proc.stdout and "m2 back up after" in proc.stdout
