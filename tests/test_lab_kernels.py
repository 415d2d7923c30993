"""The lab's real kernel is chosen by booting it: a kernel that panics or hangs at boot is passed over for the
next kind, with its reason kept; when none boots, one line says why each failed.

A user-mode-linux that cannot boot is what a host CPU with AMX gives (Debian's UML 6.1 panics at once:
``ptrace set fp regs failed, errno = 14``). This machine's UML may boot, so the failing one is a stand-in
binary that behaves as the real one does there (it prints the panic and exits, or hangs printing nothing);
the kind selected after it is a real QEMU boot of Debian's kernel.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from encapfwd.lab import LabUnavailable, kernels
from encapfwd.lab import uml as umllab

QEMU_REASON = kernels.make("qemu-tcg", None, None).unavailable_reason()
UML_MODULES_REASON = None if umllab._module_versions() else "no user-mode-linux modules (Debian user-mode-linux)"

PANICS = """#!/bin/sh
echo "Checking PROT_EXEC mmap in /dev/shm...OK"
echo "userspace - ptrace set fp regs failed, errno = 14"
echo "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b"
exit 1
"""
HANGS = """#!/bin/sh
exec sleep 600
"""


@pytest.fixture
def fresh_selection(monkeypatch):
    """Forget this process's selection for the test, and put it back after."""
    saved = kernels._selected, kernels._failure
    monkeypatch.setattr(kernels, "_selected", None)
    monkeypatch.setattr(kernels, "_failure", None)
    yield
    kernels._selected, kernels._failure = saved


def _fake_uml(tmp_path, monkeypatch, text):
    binary = tmp_path / "linux.uml"
    binary.write_text(text)
    binary.chmod(0o755)
    monkeypatch.setattr(umllab, "UML_BINARY", str(binary))
    return binary


NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="guest kernels need root (TAP devices, namespaces)")


def _left_running(tmp_path):
    """Processes of a guest started from *tmp_path* (the stand-in binary) that are still running."""
    return subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()


@NEEDS_ROOT
@pytest.mark.skipif(UML_MODULES_REASON is not None, reason=str(UML_MODULES_REASON))
@pytest.mark.skipif(QEMU_REASON is not None, reason=f"QEMU+TCG: {QEMU_REASON}")
def test_a_kernel_that_panics_is_passed_over_for_the_next_kind(tmp_path, monkeypatch, fresh_selection):
    _fake_uml(tmp_path, monkeypatch, PANICS)
    monkeypatch.setenv(kernels.ENV, "uml,qemu-tcg")
    started = time.monotonic()
    selection = kernels.select()
    print(selection.describe(), f"({time.monotonic() - started:.1f} s)")
    assert selection.kind == "qemu-tcg" and selection.label.startswith("QEMU+TCG ")
    (kind, why), = selection.tried
    assert kind == "uml" and "exited during boot" in why and "Kernel panic" in why, why
    assert selection.describe().startswith(f"real kernel: {selection.label}") and "not uml: " in selection.describe()
    # the answer is kept: the next guest of this process is of the same kind, without a second probe
    assert kernels.select() is selection
    assert kernels.guest(None, None).kind == "QEMU+TCG"
    assert _left_running(tmp_path) == []


@NEEDS_ROOT
@pytest.mark.skipif(UML_MODULES_REASON is not None, reason=str(UML_MODULES_REASON))
def test_a_kernel_that_hangs_is_given_up_at_the_deadline_and_killed(tmp_path, monkeypatch):
    """A guest that prints nothing (a KVM guest on a host with broken nested virtualisation does that) costs
    the probe its deadline, no more, and leaves no process behind."""
    _fake_uml(tmp_path, monkeypatch, HANGS)
    monkeypatch.setitem(kernels.PROBE_DEADLINE, "uml", 3.0)
    started = time.monotonic()
    selection, why = kernels._probe("uml")
    took = time.monotonic() - started
    assert selection is None and "no answer within 3 s (boot)" in why, why
    print(f"gave up after {took:.1f} s: {why}")
    assert _left_running(tmp_path) == []


def test_when_nothing_boots_one_line_says_why(tmp_path, monkeypatch, fresh_selection):
    _fake_uml(tmp_path, monkeypatch, PANICS)
    monkeypatch.setenv(kernels.ENV, "uml")
    with pytest.raises(LabUnavailable) as raised:
        kernels.select()
    text = str(raised.value)
    assert text.startswith("no real kernel boots here: uml: ") and "\n" not in text, text
    with pytest.raises(LabUnavailable):  # remembered: no second probe
        kernels.select()
    assert kernels.unavailable_reason() == text


def test_unknown_kind_is_one_line(monkeypatch, fresh_selection):
    monkeypatch.setenv(kernels.ENV, "vmware")
    with pytest.raises(LabUnavailable, match=r"^ENCAPFWD_LAB_KERNEL='vmware': unknown kind 'vmware' \(known: auto, uml, qemu-kvm, qemu-tcg\)$"):
        kernels.select()
    assert "unknown kind" in kernels.unavailable_reason()
