"""What every part of the live engine shares: its one-line error and its log line."""

from __future__ import annotations

import sys

from ..errors import EncapfwdError


class LiveError(EncapfwdError):
    """A one-line reason why live forwarding cannot start (or why a reload is refused)."""


def log(message: str) -> None:
    print(f"encapfwd: {message}", file=sys.stderr, flush=True)


def one_line(text: str, limit: int = 500) -> str:
    """*text* on one line (whitespace runs collapsed), at most *limit* characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
