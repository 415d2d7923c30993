"""The advisory lock (``flock`` on ``.NAME.lock`` beside the file) that serialises edits of one
configuration file."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

from encapfwd.errors import ConfigError, shown_path

#: How long an edit waits for another one to finish before giving up.
LOCK_TIMEOUT = 60.0

_held: Dict[str, int] = {}  # lock files this process holds -> thread holding it (an edit inside an edit)


def lock_path(target: Path) -> Path:
    """The lock file of the configuration file *target*: ``.NAME.lock`` in the same folder (it exists
    only while an edit runs)."""
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def _locked(target: Path, shown, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the advisory lock (``flock``) of *target* (already resolved) while the block runs."""
    import fcntl

    lock = lock_path(target)
    key = str(lock)
    if _held.get(key) == threading.get_ident():
        yield
        return
    wait = LOCK_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + wait
    flags = os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)

    def busy() -> ConfigError:
        return ConfigError(
            f"{shown} is being changed by another process: gave up after {wait:g} s waiting for "
            f"{shown_path(lock)}"
        )

    while True:
        try:
            fd = os.open(lock, flags, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock {shown}: {shown_path(lock)}: {exc.strerror}") from None
        try:
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigError(f"cannot lock {shown}: {shown_path(lock)} is not a regular file")
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise busy() from None
                        time.sleep(0.02)
            except OSError as exc:
                raise ConfigError(f"cannot lock {shown}: {shown_path(lock)}: {exc.strerror}") from None
            try:
                mine, current = os.fstat(fd), os.lstat(lock)
                same = (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)
            except OSError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the lock file was removed or replaced while we waited: lock the current one
        if time.monotonic() >= deadline:
            raise busy()
    _held[key] = threading.get_ident()
    try:
        yield
    finally:
        _held.pop(key, None)
        # Removed while still held, so that no lock file is left behind: a process that was waiting on this
        # (now nameless) file notices after it gets the lock (the inode check above) and locks a fresh one.
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)  # releases the lock
