"""Which real kernel the lab boots for its IPIP/GRE back-ends: decided by booting one, not by looking.

Kinds, tried in this order (``ENCAPFWD_LAB_KERNEL=qemu-tcg`` or a comma list such as ``uml,qemu-tcg``
chooses and orders them):

========== ==================================================== ===============================================
kind       what                                                 where it fails
========== ==================================================== ===============================================
uml        Debian's user-mode-linux 6.1: a process, ~2 s boot   panics at once on a host CPU with AMX
qemu-kvm   linux-image-amd64 under QEMU with KVM                hangs where nested virtualisation is broken
qemu-tcg   the same kernel under QEMU's software CPU, ~6 s      needs only the packages
========== ==================================================== ===============================================

:func:`select` boots each kind in turn with a deadline (the guest must reach its runner and load ``ipip``
and ``ip_gre``), takes the first that works and remembers the answer for the rest of the process, so every
test module and ``encapfwd lab`` use the same kind. :func:`guest` makes an (unstarted) guest of that kind.
When none boots, :class:`~encapfwd.lab.netns.LabUnavailable` says why each failed.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import List, Optional, Tuple

from attrs import frozen

from encapfwd.lab.guest import Guest, GuestError, cleanup_stale
from encapfwd.lab.netns import LabUnavailable, Namespace

KINDS = ("uml", "qemu-kvm", "qemu-tcg")
ENV = "ENCAPFWD_LAB_KERNEL"
#: how long a probe boot may take before the kind counts as not booting (a hung KVM guest prints nothing)
PROBE_DEADLINE = {"uml": 30.0, "qemu-kvm": 8.0, "qemu-tcg": 120.0}
PROBE_SCRIPT = "modprobe ipip && modprobe ip_gre && uname -r"


@frozen
class Selection:
    kind: str  # one of KINDS
    label: str  # e.g. "UML 6.1.176", "QEMU+TCG 6.1.0-57-amd64"
    boot_seconds: float  # the probe's boot
    tried: Tuple[Tuple[str, str], ...]  # (kind, why it was not taken) for the kinds before it

    def describe(self) -> str:
        text = f"real kernel: {self.label} (probe boot {self.boot_seconds:.1f} s)"
        if self.tried:
            text += "; not " + "; not ".join(f"{kind}: {why}" for kind, why in self.tried)
        return text


_lock = threading.Lock()
_selected: Optional[Selection] = None
_failure: Optional[str] = None


def wanted() -> List[str]:
    """The kinds to try, in order (``ENCAPFWD_LAB_KERNEL`` or all of :data:`KINDS`)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw or raw == "auto":
        return list(KINDS)
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise LabUnavailable(f"{ENV}={raw!r}: unknown kind {unknown[0]!r} (known: auto, {', '.join(KINDS)})")
    return kinds


def make(kind: str, ns: Optional[Namespace], tap: Optional[str], **kwargs) -> Guest:
    """An unstarted guest of *kind*."""
    if kind == "uml":
        from encapfwd.lab.uml import UML

        return UML(ns, tap, **kwargs)
    from encapfwd.lab.qemu import QEMU

    return QEMU(ns, tap, accel=kind.split("-", 1)[1], **kwargs)


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


def _telling_line(text: str) -> str:
    """The line of a console that says most about a failed boot (a panic, an error), without terminal codes."""
    text = _ESCAPES.sub("", text)
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 3]
    for words in (("panic",), ("failed", "error")):
        interesting = [line for line in lines if any(word in line.lower() for word in words)]
        if interesting:
            return interesting[0][:200]
    return (lines or ["no output"])[-1][:200]


def _probe(kind: str) -> Tuple[Optional[Selection], str]:
    guest = make(kind, None, None, boot_timeout=PROBE_DEADLINE[kind], hostname="encapfwd-probe")
    reason = guest.unavailable_reason()
    if reason:
        return None, reason
    started = time.monotonic()
    try:
        guest.start()
        result = guest.run(PROBE_SCRIPT, timeout=30)
        if not result.ok:
            return None, f"booted, but the tunnel modules did not load: {_telling_line(result.output)}"
        return Selection(kind, guest.label, guest.boot_seconds or time.monotonic() - started, ()), ""
    except (GuestError, LabUnavailable, OSError) as exc:
        text = str(exc)
        head, _, console = text.partition("; console:\n")
        return None, f"{head}" + (f" ({_telling_line(console)})" if console.strip() else "")
    finally:
        guest.stop(timeout=2.0)


def select() -> Selection:
    """The kind every guest of this process uses: the first of :func:`wanted` that boots (probed once)."""
    global _selected, _failure
    with _lock:
        if _selected is not None:
            return _selected
        if _failure is not None:
            raise LabUnavailable(_failure)
        cleanup_stale()  # guests left by a test process that was killed
        tried: List[Tuple[str, str]] = []
        for kind in wanted():
            selection, why = _probe(kind)
            if selection is not None:
                _selected = Selection(selection.kind, selection.label, selection.boot_seconds, tuple(tried))
                return _selected
            tried.append((kind, why))
        _failure = "no real kernel boots here: " + "; ".join(f"{kind}: {why}" for kind, why in tried)
        raise LabUnavailable(_failure)


def unavailable_reason() -> Optional[str]:
    """Why no kind can even be started here (every one misses a file or package), or None. Cheap: boots
    nothing, so a kind may still fail its boot (then :func:`select` says so)."""
    if _failure is not None:
        return _failure
    reasons = []
    try:
        kinds = wanted()
    except LabUnavailable as exc:
        return str(exc)
    for kind in kinds:
        reason = make(kind, None, None).unavailable_reason()
        if reason is None:
            return None
        reasons.append(f"{kind}: {reason}")
    return "no real kernel can be started here: " + "; ".join(reasons)


def guest(ns: Optional[Namespace], tap: Optional[str], **kwargs) -> Guest:
    """An unstarted guest of the selected kind (probing first if this process has not yet)."""
    return make(select().kind, ns, tap, **kwargs)


__all__ = ["ENV", "KINDS", "Selection", "guest", "make", "select", "unavailable_reason"]
