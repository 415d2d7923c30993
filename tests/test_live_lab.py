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
    proc = subprocess.Popen([str(exe), "lab", "--requests", "3", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err
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
    import json

    result = json.loads(out[out.index("\n{") + 1:])
    kernel = result["kernel"]  # which real kernel ran the IPIP/GRE back-ends, said in the output too
    assert kernel == "namespace" or (kernel.split()[0] in ("UML", "QEMU+KVM", "QEMU+TCG")
                                     and f"{kernel} back-ends" in out), kernel
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    # the lab's own namespaces carry its pid (other processes may be running labs of their own)
    assert {n for n in after - before if n.startswith(f"efw{proc.pid}-")} == set(), "namespaces left behind"
    # a guest kernel (user-mode-linux or QEMU) whose work folder is gone was not stopped (the lab removes
    # the folder after the kill)
    from encapfwd.lab.guest import guest_processes

    leaked = [pid for pid, _tag, workdir in guest_processes() if not os.path.exists(workdir)]
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
