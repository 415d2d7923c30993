"""Reading and writing a configuration file safely: regular files only, UTF-8, a size limit, and an atomic
replace (temporary file beside the target, fsync, rename) that keeps the owner, group and mode."""

from __future__ import annotations

import codecs
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Optional

from encapfwd.errors import ConfigError, shown_path

#: A configuration file larger than this is refused (a dispatcher with 100,000 servers needs about 10 MiB).
MAX_BYTES = 16 * 1024 * 1024


# ---- files: what may be read and written

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_unless_regular(st: os.stat_result, shown, writing: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise ConfigError(f"{shown} is {kind}, not a regular file: a configuration must be a regular file")
    if writing and st.st_nlink > 1:
        raise ConfigError(
            f"{shown} has {st.st_nlink} hard links: saving would separate it from the other names; "
            "edit it through a single name (or use a symbolic link)"
        )


def _target(path: Path, shown: str, writing: bool) -> Path:
    """The file *path* names, symbolic links resolved; refuses what cannot be (re)written as a regular file.

    A file that does not exist yet is fine (it is created); a dangling symbolic link is not.
    """
    target = Path(os.path.realpath(path))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(
                f"{shown} is a symbolic link to {shown_path(target)}, which does not exist"
            ) from None
        return target
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror}") from None
    _refuse_unless_regular(st, shown, writing)
    return target


def _decode(data: bytes, shown) -> str:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(
            f"{shown}: not UTF-8 (it starts with a UTF-16 or UTF-32 byte-order mark); save it as UTF-8"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start]
        raise ConfigError(f"{shown}: not UTF-8 (invalid byte 0x{bad:02x} on line {line})") from None


def _read(path: Path, shown, writing: bool) -> Optional[str]:
    """The text of *path*, or None when it does not exist. Only regular files are opened for reading."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if writing:
        flags |= getattr(os, "O_NOFOLLOW", 0)  # *path* is the resolved target: it must not turn into a link
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            target = shown_path(os.path.realpath(path))
            raise ConfigError(f"{shown} is a symbolic link to {target}, which does not exist") from None
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        try:
            st = os.fstat(fd)
            _refuse_unless_regular(st, shown, writing)
            if st.st_size > MAX_BYTES:
                raise ConfigError(
                    f"{shown} is too large for a configuration ({st.st_size} bytes; at most {MAX_BYTES})"
                )
            data = handle.read(MAX_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read {shown}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{shown} is too large for a configuration (more than {MAX_BYTES} bytes)")
    return _decode(data, shown)


# ---- writing

# the names tempfile.mkstemp gives: prefix, 8 characters of [a-z0-9_], suffix
_TEMP_TAIL = r"[a-z0-9_]{8}\.tmp"


def _remove_stale_temps(target: Path) -> None:
    """Remove the temporary files an interrupted save of *target* left (only called under the lock)."""
    pattern = re.compile(re.escape(f".{target.name}.") + _TEMP_TAIL)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if pattern.fullmatch(name):
            stale = target.parent / name
            try:
                if stat.S_ISREG(os.lstat(stale).st_mode):
                    os.unlink(stale)
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write(target: Path, text: str, shown) -> None:
    """Replace *target* by *text* atomically (call under the lock): temporary file beside it with the same
    owner, group and mode, fsync, rename, fsync of the folder. On any error the temporary file is removed
    and *target* is untouched."""
    _remove_stale_temps(target)
    try:
        st: Optional[os.stat_result] = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ConfigError(f"cannot write {shown}: {exc.strerror}") from None
    if st is not None:
        _refuse_unless_regular(st, shown, writing=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {shown}: {exc.strerror}") from None
    try:
        try:
            _write_all(fd, text.encode("utf-8"))
            if st is not None:
                mine = os.fstat(fd)
                if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
                    try:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    except OSError as exc:
                        raise ConfigError(
                            f"cannot write {shown}: cannot keep its owner and group "
                            f"({st.st_uid}:{st.st_gid}): {exc.strerror}"
                        ) from None
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            else:
                os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {shown}: {exc.strerror or exc}") from None
        raise
    try:
        dirfd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dirfd)
    except OSError:
        pass
    finally:
        os.close(dirfd)
