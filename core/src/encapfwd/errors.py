"""Exceptions that reach the user as one clear line, and the helpers that make such lines.

Every exception encapfwd raises for the user is a subclass of :class:`EncapfwdError`, defined here (each
module that raises one re-exports it under its old name). Code that must tell errors apart does so by
subclass, never by the text of the message.

The helpers: :func:`one_line` turns any text (an exception's, a program's output) into one line for a log
or an error message; :func:`shown` puts a value the user gave into an error message without echoing
characters that could mislead a terminal or a shell.
"""

from __future__ import annotations

import os
import re
from typing import Optional

# ------------------------------------------------------------------------------------------- helpers


def one_line(text, limit: Optional[int] = 500, *, first: bool = False, strip: bool = False,
             printable: bool = False) -> str:
    """*text* (anything; None is ``""``) as one line of at most *limit* characters (None: no limit), cut
    with ``…``.

    By default every run of whitespace, line breaks included, becomes one space (log lines, reload
    errors, systemd's STATUS=). With *first*, only the first line is kept instead (``"ValueError: x"`` of
    a longer message); with *strip* the text is stripped before that, so a leading blank line is not the
    first line. With *printable*, every character that is not printable becomes ``?``: alone (without
    *first*) it keeps the text as it is otherwise, a line break becoming ``?`` too (a comment in a shell
    script).
    """
    text = "" if text is None else str(text)
    if strip:
        text = text.strip()
    if first:
        lines = text.splitlines()
        text = lines[0] if lines else ""
    elif not printable:
        text = " ".join(text.split())
    if printable:
        text = "".join(c if c.isprintable() else "?" for c in text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


#: what a shell-safe value shown as is may contain (with *shell*, see :func:`shown`)
_SHELL_PLAIN = re.compile(r"^[A-Za-z0-9.:_/ -]{0,64}$")


def shown(value, *, shell: bool = False) -> str:
    """*value* for an error message: quoted (``repr``) when safe to echo, else described, never echoed.

    Safe by default: printable ASCII of at most 64 characters; anything else is ``a value with control or
    non-ASCII characters (not shown)``. With *shell* (values meant for a shell script): safe is a string of
    letters, digits, ``.:_/-`` and single spaces (at most 64 characters); another string is described by
    the characters it should not contain (``a value containing ';', '$' (not shown)``), a value that is
    not a string by its type (``a int``).
    """
    text = str(value)
    if not shell:
        if text.isascii() and text.isprintable() and len(text) <= 64:
            return repr(text)
        return "a value with control or non-ASCII characters (not shown)"
    if isinstance(value, str) and _SHELL_PLAIN.match(text) and "  " not in text:
        return repr(text)
    if not isinstance(value, str):
        return f"a {type(value).__name__}"
    odd = sorted({c for c in text if not (c.isalnum() or c in ".:_-")})
    return f"a value containing {', '.join(repr(c) for c in odd[:6])} (not shown)"


def plain(value) -> str:
    """*value* in a message as is (unquoted) when it is short printable ASCII (1 to 64 characters), else ``?``
    (a configuration file's keys and table names)."""
    text = str(value)
    return text if text.isascii() and text.isprintable() and 0 < len(text) <= 64 else "?"


def shown_path(path) -> str:
    """*path* (str, bytes or os.PathLike) for a one-line message: as is when printable, else quoted with
    escapes."""
    text = os.fsdecode(path) if not isinstance(path, str) else path
    return text if text.isprintable() else repr(text)


# ---------------------------------------------------------------------------------------- exceptions


class EncapfwdError(Exception):
    """Base class: the CLI prints ``str(exc)`` on one line and exits non-zero."""


class ConfigError(EncapfwdError):
    """The configuration or a command's words are invalid."""


class PluginError(EncapfwdError):
    """A plugin is missing, broken, or collides with another."""


class SetupRefused(EncapfwdError):
    """A back-end setup generator cannot produce a working recipe for this case."""


class LiveError(EncapfwdError):
    """A one-line reason why live forwarding cannot start (or why a reload is refused)."""


class InterfaceBusy(LiveError):
    """The interface already has a kernel program that this dispatcher must not replace (another running
    ``encapfwd run``'s, or a program that is not encapfwd's): never a reason to fall back to another engine."""


class NoSuchInterface(LiveError):
    """The interface named (``--interface``, ``encapfwd run``) does not exist in this network namespace:
    raised by :func:`encapfwd.runtime.netlink.interface_info` and :func:`encapfwd.runtime.link.inspect`, and never
    a reason to guess another engine or mode."""


class MetricsError(LiveError):
    """``--metrics`` cannot be used: a bad ``HOST:PORT``, a host that does not resolve, or a port that cannot
    be bound (raised by :mod:`encapfwd.runtime.metrics`; one line)."""


class ControlError(EncapfwdError):
    """The control socket of ``encapfwd run`` cannot be set up: its path holds something that is not a
    stale socket (a file, a directory, a link, a live socket), or it cannot be created or bound
    (raised by :mod:`encapfwd.control`; one line)."""


class ControlBusy(ValueError):
    """The dispatcher answered "busy" (too many control connections), or its listen queue was full
    (raised by :func:`encapfwd.control.query_control`)."""


class NoAnswer(TimeoutError):
    """A dispatcher is there (its socket accepts connections) but gave no answer in time
    (raised by :func:`encapfwd.control.query_control`)."""


class ForeignAnswer(ValueError):
    """Something answered on the control socket, but not with a JSON object: not an encapfwd dispatcher
    (raised by :func:`encapfwd.control.query_control`)."""


class BPFError(EncapfwdError):
    """A BPF build, load, map or attach operation failed (raised by :mod:`encapfwd.xdp.build` and
    :mod:`encapfwd.xdp.libbpf`); the message is one line naming the operation.

    ``errno`` is the error number when the kernel or libbpf gave one; ``log`` holds the verifier's or
    libbpf's full output when there is one (the message carries only its most telling line).
    """

    def __init__(self, message: str, *, errno: int = 0, log: str = ""):
        super().__init__(message)
        self.errno = errno
        self.log = log


class CaptureError(EncapfwdError):
    """The input is not a capture this engine can read (raised by :mod:`encapfwd.replay.capture` for a
    truncated, corrupt or unsupported pcap/pcapng file)."""


class LabUnavailable(EncapfwdError):
    """This machine cannot run the lab: not root, or a package is missing (the message says which); raised
    by :mod:`encapfwd.lab` before anything is built, so tests skip rather than fail."""


class LabError(EncapfwdError):
    """A lab (``encapfwd lab``, the scale-out lab) was asked for something invalid, or failed while it ran
    (raised by :mod:`encapfwd.lab.topology` and :mod:`encapfwd.lab.scaleout`; one line)."""


class GuestError(EncapfwdError):
    """A lab guest (user-mode Linux or QEMU) did not boot, did not answer in time, or died (raised by
    :mod:`encapfwd.lab.guest`)."""
