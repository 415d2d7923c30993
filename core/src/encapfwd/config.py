"""Configuration: TOML load/save and IBM ``dscontrol``-style commands that produce a new Config.

Every command is a pure function ``Config -> Config``. The CLI runs it inside :func:`edit`, which holds an
advisory lock on the file for the whole load → command → save sequence (so parallel edits are serialised,
none is lost) and saves only when the command succeeded, so a failed command leaves the file untouched.

Saving writes through symbolic links to their target, atomically (temporary file beside the target, fsync,
rename), keeps the file's owner, group and mode, and keeps the comments and layout of a hand-written file:
the new configuration is applied to the existing document (``tomlkit``) as a minimal change.

:func:`check` is the one place where rules across objects are checked.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import attrs
import tomlkit
from tomlkit.container import Container
from tomlkit.items import AoT, Array, InlineTable, Null, Table, Whitespace

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from encapfwd.errors import ConfigError, PluginError
from encapfwd.model import (
    Advisor,
    Cluster,
    Config,
    Executor,
    Port,
    Server,
    _name,
    _shown,
    advisor_option_key,
    forwarding_method,
    parse_int,
    parse_ip,
    server_key,
)

DEFAULT_PATH = "encapfwd.toml"
ENV_CONFIG = "ENCAPFWD_CONFIG"

EXECUTOR_KEYWORDS = {
    "nfa": "the dispatcher's own IPv4 address; default outer source of tunnels",
    "mac": "the dispatcher's MAC (source of frames it sends; live mode reads the interface's)",
    "interface": "the interface live mode listens and sends on",
    "networks": "comma-separated networks the dispatcher is attached to (e.g. 10.0.2.0/24,10.0.3.0/24)",
    "gateway": "next hop (router) for servers not on an attached network",
    "gatewaymac": "the gateway's MAC (offline replay, or to pin it)",
    "mtu": "egress MTU (default 1500)",
    "encapttl": "TTL of outer encapsulation headers (default 64)",
    "maxflows": "bound of the flow table (default 1000000; LRU eviction beyond it)",
    "bgppeer": "the BGP peer (router) the cluster addresses are announced to (none: no BGP)",
    "bgpasn": "this dispatcher's AS number",
    "bgppeerasn": "the peer's AS number",
    "bgprouterid": "this speaker's BGP router ID (default nfa)",
    "bgpnexthop": "the next hop announced for the IPv4 cluster addresses (default nfa)",
    "bgpnexthop6": "the next hop announced for the IPv6 cluster addresses (required when there are any)",
    "bgpholdtime": "BGP hold time in seconds, 3 or more (default 9; keepalives every third of it)",
    "syncpeers": "comma-separated addresses of the other dispatchers flows are synchronised with (none: off)",
    "syncport": "UDP port of flow synchronisation, here and on the peers (default 7900)",
    "synckey": "file of the group's HMAC-SHA256 key for flow synchronisation (mode 0600)",
}
PORT_KEYWORDS = {
    "porttype": "tcp, udp or both (default both)",
    "selectionalgorithm": "maglev (default), wrr or wlc, or one a plugin provides",
    "stickytime": "seconds a client keeps its server after its last packet (0 = off)",
    "staletimeout": "seconds an idle flow is kept (default 300)",
}
ADVISOR_KEYWORDS = {
    "interval": "seconds between two probes of a server (default 5; e.g. 0.5)",
    "timeout": "seconds a probe may take in total, at most the interval (default 3)",
    "rise": "good probes in a row that mark a down server up (default 2)",
    "fall": "failed probes in a row that mark a server down (default 3)",
    "via": "address (default: probe the server's address) or forwarding (the cluster address, through "
           "the server's forwarding method; IPv4)",
    "hold": "least seconds between two state changes of one server (flap damping; default 2, 0 = none)",
}
SERVER_KEYWORDS = {
    "weight": "0-100 (default 1); 0 quiesces: no new flows, existing ones continue",
    "mac": "the server's MAC (required for servers on an attached network in replay mode)",
    "encapforward": "yes or no (default no): encapsulate instead of MAC forwarding",
    "encaptype": "ipip (default), gre, or one a plugin provides",
    "encapcond": "always (default) or auto (encapsulate only when not on an attached network)",
    "encapsource": "outer IPv4 source for this server's tunnel (default: executor nfa)",
    "grekey": "RFC 2890 GRE key, 0-4294967295 (GRE only)",
}


def default_path() -> str:
    return os.environ.get(ENV_CONFIG) or DEFAULT_PATH


# --------------------------------------------------------------------------------------------- TOML

#: A configuration file larger than this is refused (a dispatcher with 100,000 servers needs about 10 MiB).
MAX_BYTES = 16 * 1024 * 1024
#: Deepest nesting of arrays and inline tables accepted (the configuration needs 2; parsers recurse on it).
MAX_NESTING = 32
#: How long an edit waits for another one to finish before giving up.
LOCK_TIMEOUT = 60.0


def _plain(value):
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return str(value)


def _table(obj, skip=()) -> dict:
    """The fields of *obj* that differ from their defaults, as TOML-ready values."""
    defaults = type(obj)(**{a.name: getattr(obj, a.name) for a in attrs.fields(type(obj)) if a.default is attrs.NOTHING})
    out = {}
    for a in attrs.fields(type(obj)):
        value = getattr(obj, a.name)
        if a.name in skip or value is None or value == getattr(defaults, a.name):
            continue
        out[a.name] = _plain(value)
    return out


def _server_dict(server: Server) -> dict:
    return {"address": str(server.address), **_table(server, skip=("address",))}


def _port_dict(port: Port) -> dict:
    return {"number": port.number, **_table(port, skip=("number", "servers")),
            "servers": [_server_dict(s) for s in port.servers]}


def _cluster_dict(cluster: Cluster) -> dict:
    return {"address": str(cluster.address), "ports": [_port_dict(p) for p in cluster.ports]}


def _advisor_dict(advisor: Advisor) -> dict:
    out = {"name": advisor.name, "port": advisor.port, **_table(advisor, skip=("name", "port", "options"))}
    if advisor.options:
        out["options"] = dict(advisor.options)
    return out


def _advisor_toml(advisor: Advisor) -> dict:
    """:func:`_advisor_dict` with the options as an inline table (``options = { path = "/" }``)."""
    out = _advisor_dict(advisor)
    if "options" in out:
        out["options"] = _inline(out["options"])
    return out


def _inline(options: dict):
    table = tomlkit.inline_table()
    table.update(options)
    return table


def to_dict(config: Config) -> dict:
    """The configuration as plain data (what the file holds and ``--json`` reports show); ``advisors``
    only when there are some."""
    out = {"executor": _table(config.executor), "clusters": [_cluster_dict(c) for c in config.clusters]}
    if config.advisors:
        out["advisors"] = [_advisor_dict(a) for a in config.advisors]
    return out


def _build(cls, raw, what: str, **extra):
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: expected a table")
    known = {a.name for a in attrs.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown keyword {unknown[0]!r}")
    return cls(**{**raw, **extra})


def _plain_text(value) -> str:
    """*value* in a message as is when it is short printable ASCII, else ``?``."""
    text = str(value)
    return text if text.isascii() and text.isprintable() and 0 < len(text) <= 64 else "?"


def from_dict(data: dict) -> Config:
    unknown = sorted(set(data) - {"executor", "clusters", "advisors"})
    if unknown:
        raise ConfigError(f"unknown top-level table {unknown[0]!r}")
    executor = _build(Executor, data.get("executor", {}), "executor")
    clusters = []
    for raw_cluster in data.get("clusters", []):
        raw_cluster = dict(raw_cluster)
        address = raw_cluster.pop("address", None)
        what = f"cluster {address}"
        ports = []
        for raw_port in raw_cluster.pop("ports", []):
            raw_port = dict(raw_port)
            servers = [
                _build(Server, raw, f"{what} port {raw_port.get('number')} server")
                for raw in raw_port.pop("servers", [])
            ]
            ports.append(_build(Port, raw_port, f"{what} port", servers=tuple(servers)))
        clusters.append(_build(Cluster, raw_cluster, what, address=address, ports=tuple(ports)))
    advisors = []
    raw_advisors = data.get("advisors", [])
    if not isinstance(raw_advisors, list):
        raise ConfigError("advisors: expected [[advisors]] tables")
    known = {a.name for a in attrs.fields(Advisor)}
    for raw in raw_advisors:
        if not isinstance(raw, dict):
            raise ConfigError("advisors: expected [[advisors]] tables")
        if "name" not in raw or "port" not in raw:
            raise ConfigError("advisor: name and port are required in every [[advisors]] table")
        what = f"advisor {_plain_text(raw['name'])} {_plain_text(raw['port'])}"
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{what}: unknown keyword {unknown[0]!r}")
        if not isinstance(raw.get("options", {}), dict):
            raise ConfigError(f"{what}: options must be a table (options = {{ key = \"value\" }})")
        try:
            advisors.append(Advisor(**raw))
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None
    config = Config(executor=executor, clusters=tuple(clusters), advisors=tuple(advisors))
    check(config)
    return config


# Strings and comments (skipped) or one bracket: enough to measure nesting without parsing.
_NESTING_TOKENS = re.compile(
    r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*|[\[\]{}]'
)


def _nesting(text: str, limit: int) -> int:
    """How deeply arrays and inline tables nest in *text* (stops counting beyond *limit*)."""
    depth = peak = 0
    for match in _NESTING_TOKENS.finditer(text):
        token = match.group()
        if token == "[" or token == "{":
            depth += 1
            if depth > peak:
                peak = depth
                if peak > limit:
                    break
        elif token == "]" or token == "}":
            depth = max(0, depth - 1)
    return peak


def loads(text: str) -> Config:
    if _nesting(text, MAX_NESTING) > MAX_NESTING:
        raise ConfigError(f"invalid TOML: arrays or tables nested more than {MAX_NESTING} levels deep")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError("invalid TOML: nested too deeply") from None
    try:
        return from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration: {' '.join(str(exc).split())}") from None


def dumps(config: Config) -> str:
    """A fresh document for *config* (no comments); :func:`save` keeps an existing file's layout instead."""
    data = to_dict(config)
    if config.advisors:
        data["advisors"] = [_advisor_toml(a) for a in config.advisors]
    return tomlkit.dumps(data)


# ---- files: what may be read and written

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def _display(path) -> str:
    """*path* for a one-line message: as is when printable, else quoted with escapes."""
    text = os.fsdecode(path) if not isinstance(path, str) else path
    return text if text.isprintable() else repr(text)


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
                f"{shown} is a symbolic link to {_display(target)}, which does not exist"
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
            target = _display(os.path.realpath(path))
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


def _parse(text: str, shown) -> Config:
    try:
        return loads(text)
    except ConfigError as exc:
        raise ConfigError(f"{shown}: {exc}") from None


def load(path) -> Config:
    """Load *path*; a missing file is an empty configuration."""
    shown = _display(path)
    text = _read(Path(path), shown, writing=False)
    return Config() if text is None else _parse(text, shown)


# ---- the lock

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
            f"{_display(lock)}"
        )

    while True:
        try:
            fd = os.open(lock, flags, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock {shown}: {_display(lock)}: {exc.strerror}") from None
        try:
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigError(f"cannot lock {shown}: {_display(lock)} is not a regular file")
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise busy() from None
                        time.sleep(0.02)
            except OSError as exc:
                raise ConfigError(f"cannot lock {shown}: {_display(lock)}: {exc.strerror}") from None
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


@attrs.define
class Edit:
    """What :func:`edit` yields: set :attr:`config` to the new configuration."""

    path: Path
    #: the configuration as loaded; replace it with the result of a command
    config: Config
    #: the configuration as loaded, unchanged
    original: Config
    #: the file's text as loaded (None: the file does not exist yet)
    text: Optional[str]


@contextlib.contextmanager
def edit(path, *, timeout: Optional[float] = None) -> Iterator[Edit]:
    """Load → change → save *path* under its lock; nothing is written when the block raises.

    ::

        with config.edit(path) as session:
            session.config = server_add(session.config, "10.0.9.9@80@10.0.2.10", [])

    The lock (``flock`` on ``.NAME.lock`` beside the file, symbolic links resolved) serialises edits of
    the same file, so that none is lost; it is waited for up to *timeout* seconds (``LOCK_TIMEOUT``).
    """
    shown = _display(path)
    target = _target(Path(path), shown, writing=True)
    with _locked(target, shown, timeout):
        text = _read(target, shown, writing=True)
        original = Config() if text is None else _parse(text, shown)
        session = Edit(path=Path(path), config=original, original=original, text=text)
        yield session
        if not isinstance(session.config, Config):
            raise TypeError(f"edit: expected a Config, got {type(session.config).__name__}")
        if session.config != original:
            _write(target, render(session.config, original, text), shown)


def save(path, config: Config) -> None:
    """Write *config* to *path* (under its lock, atomically, comments of the existing file kept)."""
    shown = _display(path)
    target = _target(Path(path), shown, writing=True)
    with _locked(target, shown):
        text = _read(target, shown, writing=True)
        try:
            old = None if text is None else loads(text)
        except ConfigError:
            old = None  # an invalid file is replaced as a whole
        _write(target, render(config, old, text), shown)


# ---- keeping comments: the new configuration as a minimal change of the existing document


class _Unmergeable(Exception):
    """The existing document has a shape the minimal change does not handle: write a fresh one."""


def render(new: Config, old: Optional[Config] = None, old_text: Optional[str] = None) -> str:
    """The text to save for *new*: *old_text* (which loads as *old*) changed as little as possible, so its
    comments and layout stay; a fresh document when there is none or when that fails."""
    if old is None or old_text is None:
        return dumps(new)
    try:
        doc = tomlkit.parse(old_text)
        _attach_comments(doc, old_text)
        _merge_document(doc, old, new)
        text = doc.as_string()
    except Exception:  # a tomlkit surprise costs the comments, never the edit
        return dumps(new)
    crlf = "\r\n" in old_text and old_text.count("\r\n") == old_text.count("\n")
    if crlf:
        text, old_text = text.replace("\r\n", "\n"), old_text.replace("\r\n", "\n")
    if text.endswith("\n\n") and not old_text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n"  # what followed a removed table: no blank lines at the end
    if crlf:
        text = text.replace("\n", "\r\n")  # the file's line endings, for the new lines too
    try:
        if loads(text) == new:
            return text
    except ConfigError:
        pass
    return dumps(new)


def _run(container: Container, end: int) -> Tuple[int, int]:
    """The run of comment/whitespace items that ends at *end* in *container*."""
    body = container.body
    start = end
    while start > 0 and body[start - 1][0] is None:
        start -= 1
    return start, end


def _entry_container(item) -> Optional[Container]:
    if isinstance(item, Table):
        return item.value
    if isinstance(item, AoT) and item.body:
        return item.body[-1].value
    return None


def _tail(container: Container) -> Tuple[Container, int, int]:
    """Where the text at the very end of *container* (in document order, sub-tables included) lives."""
    body = container.body
    start, end = _run(container, len(body))
    if start == end and body:
        inner = _entry_container(body[-1][1])
        if inner is not None:
            return _tail(inner)
    return container, start, end


def _run_text(container: Container, start: int, end: int) -> str:
    return "".join(item.as_string() for _, item in container.body[start:end])


def _set_run(container: Container, start: int, end: int, text: str) -> None:
    """Replace the comment/whitespace items ``body[start:end]`` by *text* (indices of keys do not move)."""
    body = container.body
    for i in range(start, end):
        body[i] = (None, Null())
    if not text:
        return
    if start < end:
        body[start] = (None, Whitespace(text))
        return
    body.insert(start, (None, Whitespace(text)))
    for key, index in list(container._map.items()):  # tomlkit has no public insert for trivia
        if isinstance(index, tuple):
            container._map[key] = tuple(i + 1 if i >= start else i for i in index)
        elif index >= start:
            container._map[key] = index + 1


def _split_attached(text: str) -> Tuple[str, str]:
    """(kept, attached): *attached* is the block of comment lines right above a header (no blank line in
    between); it belongs to that header's object."""
    lines = text.splitlines(keepends=True)
    cut = len(lines)
    while cut > 0 and lines[cut - 1].lstrip().startswith("#"):
        cut -= 1
    return "".join(lines[:cut]), "".join(lines[cut:])


def _attach(location: Tuple[Container, int, int], table: Table) -> None:
    container, start, end = location
    kept, attached = _split_attached(_run_text(container, start, end))
    if attached:
        _set_run(container, start, end, kept)
        table.trivia.indent = attached + table.trivia.indent


def _before(container: Container, index: int) -> Tuple[Container, int, int]:
    """Where the text right before the item ``body[index]`` of *container* lives (the end of the previous
    table, when that is a table)."""
    start, end = _run(container, index)
    if start == end and start > 0:
        inner = _entry_container(container.body[start - 1][1])
        if inner is not None:
            return _tail(inner)
    return container, start, end


def _attach_comments(doc, text: str) -> None:
    """Move the comments right above each ``[table]``/``[[table]]`` header into that table (they are kept
    at the end of the previous table by the parser), so that they go with it when it is removed and stay
    with it when something is added before it. The document renders exactly as before."""

    def walk(container: Container) -> None:
        body = container.body
        for index, (key, item) in enumerate(list(body)):
            if key is None:
                continue
            if isinstance(item, Table):
                if not item.is_super_table():
                    _attach(_before(container, index), item)
                walk(item.value)
            elif isinstance(item, AoT):
                for n, entry in enumerate(item.body):
                    location = _before(container, index) if n == 0 else _tail(item.body[n - 1].value)
                    _attach(location, entry)
                    walk(entry.value)

    walk(doc)
    # what follows the last table (end-of-file comments) belongs to the document, not to that table
    container, start, end = _tail(doc)
    if container is not doc:
        trailing = _run_text(container, start, end)
        _set_run(container, start, end, "")
        _set_run(doc, len(doc.body), len(doc.body), trailing)
    if doc.as_string() != text:
        raise _Unmergeable("moving comments changed the document")


def _container(holder) -> Optional[Container]:
    if isinstance(holder, Table):
        return holder.value
    if isinstance(holder, Container):
        return holder
    return None  # an inline table


def _add_key(holder, key: str, value) -> None:
    """Add *key* after the last key/value of *holder* (before its comments and sub-tables; a table goes
    before the first sub-table), with a blank line above a table it ends up in front of.

    Works on the container, not through ``Table.__setitem__``, which guesses an indentation from the text
    above the table's header (where the comments that belong to the table are kept).
    """
    container = _container(holder)
    if container is None:
        holder[key] = value
        return
    body = container.body
    pairs = [i for i, (k, v) in enumerate(body) if k is not None and not isinstance(v, (Table, AoT))]
    tables = [i for i, (k, v) in enumerate(body) if k is not None and isinstance(v, (Table, AoT))]
    if pairs and not isinstance(value, (Table, AoT)):
        index = pairs[-1] + 1
    elif tables:
        index = tables[0]
    else:
        index = len(body) if holder is container else 0
    if index >= len(body):
        container.append(key, value)
    else:
        container._insert_at(index, key, value)  # tomlkit's positional insert
        following = body[index + 1][1]
        if isinstance(following, AoT) and following.body:
            following = following.body[0]
        if isinstance(following, Table) and not following.trivia.indent.startswith(("\n", "\r\n")):
            following.trivia.indent = "\n" + following.trivia.indent
    if isinstance(holder, Table):
        dict.__setitem__(holder, key, container[key])


def _merge_fields(table, old, new, skip=()) -> None:
    for a in attrs.fields(type(new)):
        if a.name in skip:
            continue
        before, after = getattr(old, a.name), getattr(new, a.name)
        if before == after:
            continue  # whatever the file says, it means this: leave it as written
        if after is None:
            if a.name in table:
                del table[a.name]
        elif a.name in table:
            table[a.name] = _plain(after)
        else:
            _add_key(table, a.name, _plain(after))


def _ends_with_blank_line(container: Container) -> bool:
    lines = _run_text(*_tail(container)).splitlines()
    return bool(lines) and not lines[-1].strip()


def _join(first: str, second: str) -> str:
    """*first* then *second*, without doubling the blank line where they meet."""
    first_lines, second_lines = first.splitlines(keepends=True), second.splitlines(keepends=True)
    if first_lines and not first_lines[-1].strip() and second_lines and not second_lines[0].strip():
        second_lines = second_lines[1:]
    return first + "".join(second_lines)


def _space_out(table: Table) -> None:
    """Give every ``[[table]]`` inside a new *table* a blank line above it, like the rest of the file."""
    for _, item in table.value.body:
        if isinstance(item, AoT):
            for entry in item.body:
                if "\n" not in entry.trivia.indent:
                    entry.trivia.indent = "\n" + entry.trivia.indent
                _space_out(entry)


def _remove_entry(holder, key: str, entries, index: int) -> None:
    """Remove ``entries[index]``; the text after it (which belongs to what follows) takes the place of the
    text before it."""
    if isinstance(entries, AoT):
        if index > 0:
            location = _tail(entries.body[index - 1].value)
        else:
            container = holder.value if isinstance(holder, Table) else holder
            where = container._map.get(tomlkit.key(key))
            location = _before(container, where) if isinstance(where, int) else None
        if location is not None:
            following = _tail(entries.body[index].value)
            text = _join(_run_text(*location), _run_text(*following))
            _set_run(*following, "")
            _set_run(*location, text)
    del entries[index]


def _merge_list(holder, key: str, old_items, new_items, ident, merge_one, as_dict) -> None:
    """Change the array *key* of *holder* (whose entries load as *old_items*) into *new_items*: entries that
    stay are merged in place, removed ones go (with the comments above them), new ones are appended."""
    if list(old_items) == list(new_items):
        return
    entries = holder.get(key)
    if old_items and (not isinstance(entries, (AoT, Array)) or len(entries) != len(old_items)):
        raise _Unmergeable(key)
    old_ids = [ident(o) for o in old_items]
    new_ids = [ident(n) for n in new_items]
    new_set = set(new_ids)
    old_by_id = dict(zip(old_ids, old_items))
    kept = [i for i in old_ids if i in new_set]
    if new_ids[: len(kept)] != kept:
        raise _Unmergeable(f"{key}: order changed")
    for index in reversed(range(len(old_items))):
        if old_ids[index] not in new_set:
            _remove_entry(holder, key, entries, index)
    for index, item in enumerate(new_items[: len(kept)]):
        before = old_by_id[ident(item)]
        if before != item:
            merge_one(entries[index], before, item)
    added = new_items[len(kept):]
    if not new_items:
        if isinstance(entries, AoT):  # an emptied [[key]] list renders as nothing: say "key = []"
            del holder[key]
            _add_key(holder, key, tomlkit.array())
        return
    if not added:
        return
    # nothing above the first new [[table]] of the document is as good as a blank line
    top_blank = isinstance(holder, Container) and not holder.as_string().strip()
    if entries is None or (len(entries) == 0 and not isinstance(entries, AoT)):
        if entries is not None:
            del holder[key]
        entries = tomlkit.aot()
        container = _container(holder)
        if container is None:
            raise _Unmergeable(f"{key}: [[{key}]] inside an inline table")
        container.append(key, entries)
        if isinstance(holder, Table):
            dict.__setitem__(holder, key, entries)
    for item in added:
        if isinstance(entries, AoT):
            table = tomlkit.item(as_dict(item))
            _space_out(table)
            if entries.body:
                blank = _ends_with_blank_line(entries.body[-1].value)
            elif isinstance(holder, Table):
                blank = _ends_with_blank_line(holder.value)
            else:
                blank = top_blank or _ends_with_blank_line(holder)
            if not blank and "\n" not in table.trivia.indent:
                table.trivia.indent = "\n" + table.trivia.indent
            entries.append(table)
        else:
            entries.append(as_dict(item))


def _merge_server(table, old: Server, new: Server) -> None:
    _merge_fields(table, old, new, skip=("address",))


def _merge_port(table, old: Port, new: Port) -> None:
    _merge_fields(table, old, new, skip=("number", "servers"))
    _merge_list(table, "servers", old.servers, new.servers, lambda s: s.address, _merge_server, _server_dict)


def _merge_cluster(table, old: Cluster, new: Cluster) -> None:
    _merge_list(table, "ports", old.ports, new.ports, lambda p: p.number, _merge_port, _port_dict)


def _merge_advisor(table, old: Advisor, new: Advisor) -> None:
    before_keys = set(table.keys())
    _merge_fields(table, old, new, skip=("name", "port", "options"))
    options = table.get("options")
    if isinstance(options, InlineTable) and set(table.keys()) - before_keys:
        # a keyword added after "options = { … }": keep the options last, where they were
        del table["options"]
        _add_key(table, "options", options)
    if old.options == new.options:
        return
    if not new.options:
        if "options" in table:
            del table["options"]
        return
    if "options" not in table or isinstance(options, InlineTable):
        if "options" in table:
            table["options"] = _inline(dict(new.options))  # one line, no comments inside: replaced whole
        else:
            _add_key(table, "options", _inline(dict(new.options)))
        return
    if not isinstance(options, Table):
        raise _Unmergeable("advisors: options is not a table")
    before, after = dict(old.options), dict(new.options)
    for key in list(options.keys()):
        if key not in after:
            del options[key]
    for key, value in after.items():
        if before.get(key) != value or key not in options:
            options[key] = value


def _merge_document(doc, old: Config, new: Config) -> None:
    if old.executor != new.executor:
        if "executor" in doc:
            _merge_fields(doc["executor"], old.executor, new.executor)
        else:
            table = tomlkit.table()
            for name, value in _table(new.executor).items():
                table[name] = value
            _add_key(doc, "executor", table)
    _merge_list(
        doc, "clusters", old.clusters, new.clusters, lambda c: c.address, _merge_cluster, _cluster_dict
    )
    if old.advisors and not new.advisors:
        # the last advisor stopped: the tables go (with their comments), no "advisors = []" is left behind
        entries = doc.get("advisors")
        if isinstance(entries, AoT):
            if len(entries) != len(old.advisors):
                raise _Unmergeable("advisors")
            for index in reversed(range(len(entries))):
                _remove_entry(doc, "advisors", entries, index)
        if "advisors" in doc:
            del doc["advisors"]
        return
    _merge_list(
        doc, "advisors", old.advisors, new.advisors, lambda a: (a.name, a.port), _merge_advisor, _advisor_toml
    )


# ----------------------------------------------------------------------------------------- check


def check(config: Config, registry=None) -> None:
    """Every rule across objects, checked in one place with one message each (the attrs converters check
    single fields). Raises :class:`ConfigError` for the first rule broken.

    Without *registry*: no object defined twice; ``encapforward yes`` only with an IPv4 cluster and an IPv4
    server; ``grekey`` only with ``encaptype gre``; every advisor's timeout at most its interval, its port
    with servers on some cluster, ``via forwarding`` only for IPv4 clusters and servers with an ``nfa``. With the plugin *registry* as well: every port's
    ``selectionalgorithm`` is provided; every ``encapforward yes`` server's ``encaptype`` is an installed
    encapsulation; the forwarding method each server gets (``model.forwarding_method``, ``mac`` included) is
    installed and can carry the cluster's address family; every advisor is installed, and its keys are its
    own and pass its ``check``.
    """
    servers = []
    seen_clusters = set()
    for cluster in config.clusters:
        if cluster.address in seen_clusters:
            raise ConfigError(f"cluster {cluster.address} is defined twice")
        seen_clusters.add(cluster.address)
        seen_ports = set()
        for port in cluster.ports:
            if port.number in seen_ports:
                raise ConfigError(f"port {cluster.address}@{port.number} is defined twice")
            seen_ports.add(port.number)
            seen_servers = set()
            for server in port.servers:
                name = server_key(cluster.address, port.number, server.address)
                if server.address in seen_servers:
                    raise ConfigError(f"server {name} is defined twice")
                seen_servers.add(server.address)
                servers.append((name, cluster, server))
    for name, cluster, server in servers:
        if server.encapforward and (cluster.address.version != 4 or server.address.version != 4):
            raise ConfigError(f"server {name}: encapsulation forwarding is only valid for IPv4")
        if server.grekey is not None and server.encaptype != "gre":
            raise ConfigError(f"server {name}: grekey is only valid with encaptype gre")
    _check_advisors(config)
    _check_bgp(config.executor, config.clusters)
    _check_sync(config.executor)
    if registry is None:
        return
    algorithms = None
    for cluster in config.clusters:
        for port in cluster.ports:
            if algorithms is None:
                algorithms = registry.selection_algorithms()
            if port.selectionalgorithm not in algorithms:
                raise ConfigError(
                    f"port {cluster.address}@{port.number}: unknown selectionalgorithm "
                    f"{port.selectionalgorithm!r} (available: {', '.join(algorithms)})"
                )
    for name, _, server in servers:
        if server.encapforward:
            try:
                forwarder = registry.forwarder(server.encaptype)
            except PluginError as exc:  # names the distribution to install
                raise ConfigError(f"server {name}: encaptype {server.encaptype}: {exc}") from None
            if not forwarder.encapsulates:
                raise ConfigError(f"server {name}: encaptype {server.encaptype!r} is not an encapsulation")
    for name, cluster, server in servers:
        method = forwarding_method(config.executor, server)
        try:
            forwarder = registry.forwarder(method)
        except PluginError as exc:
            raise ConfigError(f"server {name}: forwarding method {method}: {exc}") from None
        if forwarder.ipv4_only and 6 in (cluster.address.version, server.address.version):
            raise ConfigError(
                f"server {name}: forwarding method {method!r} carries IPv4 only; use MAC forwarding for IPv6"
            )
    _check_advisor_types(config, registry)


#: the advisors that ``via forwarding`` runs (as a TCP handshake through the method: engines/through.py)
FORWARDING_ADVISORS = ("connect",)


def _probed_ports(config: Config, number: int) -> List[Tuple[Cluster, Port]]:
    """The (cluster, port) pairs an advisor on port *number* probes: that port of every cluster, when it has
    servers (IBM: an advisor on a port probes the servers of that port number on every cluster)."""
    return [(c, p) for c in config.clusters for p in c.ports if p.number == number and p.servers]


def _check_advisors(config: Config) -> None:
    """The advisors' rules that need no plugin."""
    seen = set()
    for advisor in config.advisors:
        label = f"advisor {advisor.label}"
        if (advisor.name, advisor.port) in seen:
            raise ConfigError(f"{label} is defined twice")
        seen.add((advisor.name, advisor.port))
        if advisor.timeout > advisor.interval:
            raise ConfigError(
                f"{label}: timeout {advisor.timeout:g} s is longer than the interval {advisor.interval:g} s "
                "(a probe must end before the next one starts)"
            )
        probed = _probed_ports(config, advisor.port)
        if not probed:
            raise ConfigError(
                f"{label}: no cluster has port {advisor.port} with servers, so it has nothing to probe: stop "
                f"it first ('encapfwd advisor stop {advisor.label}') or keep a server on port {advisor.port}"
            )
        if advisor.via == "forwarding":
            if advisor.name not in FORWARDING_ADVISORS:
                raise ConfigError(
                    f"{label}: via forwarding is a TCP handshake with the cluster address through each "
                    f"server's method, which only the connect advisor does; add 'advisor start connect "
                    f"{advisor.port} via forwarding' beside this one (via address)"
                )
            for cluster, port in probed:
                for address in [cluster.address] + [server.address for server in port.servers]:
                    if address.version != 4:
                        raise ConfigError(
                            f"{label}: via forwarding is only valid for IPv4 ({address} on "
                            f"{cluster.address}@{port.number}); use via address"
                        )
            if config.executor.nfa is None:
                raise ConfigError(
                    f"{label}: via forwarding needs the executor's nfa, the address the probes are sent from "
                    "('encapfwd executor set nfa ADDRESS')"
                )


def _check_sync(ex) -> None:
    """Flow synchronisation needs its key file (docs/scale-out.md)."""
    if ex.syncpeers and ex.synckey is None:
        raise ConfigError("syncpeers needs synckey, the file of the group's key ('encapfwd executor set synckey "
                          "/etc/encapfwd/sync.key'; mode 0600)")


def _check_bgp(ex, clusters=()) -> None:
    """Announcing over BGP needs both AS numbers, a router ID and a next hop (the nfa by default)."""
    if ex.bgppeer is None:
        return
    if ex.bgppeer.version != 4:
        raise ConfigError(f"bgppeer {ex.bgppeer}: the BGP session runs over IPv4 in this version")
    missing = [k for k in ("bgpasn", "bgppeerasn") if getattr(ex, k) is None]
    if missing:
        raise ConfigError(f"bgppeer {ex.bgppeer} needs {' and '.join(missing)} ('encapfwd executor set "
                          f"{' '.join(k + ' ASN' for k in missing)}')")
    for key in ("bgprouterid", "bgpnexthop"):
        if getattr(ex, key) is None and ex.nfa is None:
            raise ConfigError(f"bgppeer {ex.bgppeer} needs {key} or the executor's nfa ('encapfwd executor "
                              f"set nfa ADDRESS')")
    if ex.bgpnexthop6 is None:
        for cluster in clusters:
            if cluster.address.version == 6:
                raise ConfigError(
                    f"bgppeer {ex.bgppeer}: cluster {cluster.address} is IPv6 and is announced with an IPv6 next "
                    "hop: set executor bgpnexthop6 (this dispatcher's IPv6 address on the router's network)"
                )


def _check_advisor_types(config: Config, registry) -> None:
    """The advisors' rules that need the plugins: the advisor is installed, knows its keys and accepts
    their values."""
    if not config.advisors or not hasattr(registry, "advisors"):
        return
    from encapfwd.hookspecs import one_line

    types = registry.advisors()
    for advisor in config.advisors:
        label = f"advisor {advisor.label}"
        kind = types.get(advisor.name)
        if kind is None:
            raise ConfigError(f"{label}: {_unknown_advisor(advisor.name, types)}")
        options = dict(advisor.options)
        unknown = sorted(set(options) - set(kind.keys))
        if unknown:
            raise ConfigError(f"{label}: {_unknown_key(unknown[0], advisor.name, kind)}")
        if kind.check is None:
            continue
        try:
            kind.check(options)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a plugin's bug is one line too
            raise ConfigError(
                f"{label}: the advisor's check failed: {one_line(f'{type(exc).__name__}: {exc}')}"
            ) from None


def _unknown_advisor(name: str, types) -> str:
    available = ", ".join(sorted(types)) or "none"
    return f"unknown advisor {name!r}: no installed plugin provides it (available: {available})"


def _unknown_key(key: str, name: str, kind) -> str:
    known = sorted(set(ADVISOR_KEYWORDS) | set(kind.keys)) if kind is not None else sorted(ADVISOR_KEYWORDS)
    return f"unknown advisor {name} keyword {_shown(key)} (known: {', '.join(known)})"


#: The former name of :func:`check`.
validate = check


# ------------------------------------------------------------------------------------------ grammar


def split_target(text: str, parts: int) -> Tuple:
    """Parse ``cluster``, ``cluster@port`` or ``cluster@port@server`` (IBM ``+`` lists in the last part)."""
    pieces = text.split("@")
    if len(pieces) != parts or not all(pieces):
        shapes = {1: "CLUSTER", 2: "CLUSTER@PORT", 3: "CLUSTER@PORT@SERVER"}
        raise ConfigError(f"expected {shapes[parts]}, got {text!r}")
    cluster = parse_ip(pieces[0])
    if parts == 1:
        return (cluster,)
    try:
        port = parse_int(pieces[1], 0, 65535, "port")
    except ConfigError as exc:
        raise ConfigError(f"invalid port in {_shown(text)}: {exc}") from None
    if parts == 2:
        return cluster, port
    servers = [parse_ip(s) for s in pieces[2].split("+")]
    return cluster, port, servers


def parse_keywords(words: Sequence[str], allowed: Dict[str, str], what: str) -> Dict[str, str]:
    """``key value key value`` → dict, rejecting unknown or repeated keywords and missing values."""
    words = list(words)
    out: Dict[str, str] = {}
    i = 0
    while i < len(words):
        key = words[i].lower()
        if key not in allowed:
            raise ConfigError(
                f"unknown {what} keyword {words[i]!r} (known: {', '.join(sorted(allowed))})"
            )
        if i + 1 >= len(words):
            raise ConfigError(f"{what} keyword {key!r} needs a value")
        if key in out:
            raise ConfigError(f"{what} keyword {key!r} given twice")
        out[key] = words[i + 1]
        i += 2
    return out


def _replace_cluster(config: Config, cluster: Cluster) -> Config:
    clusters = tuple(cluster if c.address == cluster.address else c for c in config.clusters)
    return attrs.evolve(config, clusters=clusters)


def _replace_port(cluster: Cluster, port: Port) -> Cluster:
    return attrs.evolve(cluster, ports=tuple(port if p.number == port.number else p for p in cluster.ports))


def _need_cluster(config: Config, address) -> Cluster:
    cluster = config.cluster(address)
    if cluster is None:
        raise ConfigError(f"cluster {address} does not exist: add it with 'encapfwd cluster add {address}'")
    return cluster


def _need_port(cluster: Cluster, number: int) -> Port:
    port = cluster.port(number)
    if port is None:
        where = f"{cluster.address}@{number}"
        raise ConfigError(f"port {where} does not exist: add it with 'encapfwd port add {where}'")
    return port


def executor_set(config: Config, words: Sequence[str], registry=None) -> Config:
    values = parse_keywords(words, EXECUTOR_KEYWORDS, "executor")
    if not values:
        raise ConfigError("executor set needs at least one keyword and value")
    config = attrs.evolve(config, executor=attrs.evolve(config.executor, **values))
    check(config, registry)
    if values.get("synckey") is not None:  # the key file as it is now (read again by encapfwd run)
        from encapfwd.flowsync.service import read_key

        read_key(config.executor.synckey)
    return config


def cluster_add(config: Config, addresses: Iterable[str], registry=None) -> Config:
    clusters = list(config.clusters)
    for text in addresses:
        (address,) = split_target(text, 1)
        if config.cluster(address) is not None or any(c.address == address for c in clusters):
            raise ConfigError(f"cluster {address} already exists")
        clusters.append(Cluster(address=address))
    config = attrs.evolve(config, clusters=tuple(clusters))
    check(config, registry)
    return config


def cluster_remove(config: Config, addresses: Iterable[str], registry=None) -> Config:
    for text in addresses:
        (address,) = split_target(text, 1)
        _need_cluster(config, address)
        config = attrs.evolve(config, clusters=tuple(c for c in config.clusters if c.address != address))
    check(config, registry)
    return config


def port_add(config: Config, target: str, words: Sequence[str], registry=None) -> Config:
    address, number = split_target(target, 2)
    cluster = _need_cluster(config, address)
    if cluster.port(number) is not None:
        raise ConfigError(f"port {address}@{number} already exists: change it with 'encapfwd port set'")
    port = Port(number=number, **parse_keywords(words, PORT_KEYWORDS, "port"))
    config = _replace_cluster(config, attrs.evolve(cluster, ports=cluster.ports + (port,)))
    check(config, registry)
    return config


def port_set(config: Config, target: str, words: Sequence[str], registry=None) -> Config:
    address, number = split_target(target, 2)
    cluster = _need_cluster(config, address)
    port = _need_port(cluster, number)
    values = parse_keywords(words, PORT_KEYWORDS, "port")
    if not values:
        raise ConfigError("port set needs at least one keyword and value")
    config = _replace_cluster(config, _replace_port(cluster, attrs.evolve(port, **values)))
    check(config, registry)
    return config


def port_remove(config: Config, target: str, registry=None) -> Config:
    address, number = split_target(target, 2)
    cluster = _need_cluster(config, address)
    _need_port(cluster, number)
    config = _replace_cluster(
        config, attrs.evolve(cluster, ports=tuple(p for p in cluster.ports if p.number != number))
    )
    check(config, registry)
    return config


def _servers_edit(config: Config, target: str, edit, registry) -> Config:
    address, number, servers = split_target(target, 3)
    cluster = _need_cluster(config, address)
    port = _need_port(cluster, number)
    for server_address in servers:
        name = f"{address}@{number}@{server_address}"
        port = edit(port, server_address, name)
    config = _replace_cluster(config, _replace_port(cluster, port))
    check(config, registry)
    return config


def _existing(port: Port, server_address, name: str) -> Server:
    server = port.server(server_address)
    if server is None:
        raise ConfigError(f"server {name} does not exist: add it with 'encapfwd server add {name}'")
    return server


def _replace_server(port: Port, server: Server) -> Port:
    return attrs.evolve(
        port, servers=tuple(server if s.address == server.address else s for s in port.servers)
    )


def server_add(config: Config, target: str, words: Sequence[str], registry=None) -> Config:
    values = parse_keywords(words, SERVER_KEYWORDS, "server")

    def edit(port, server_address, name):
        if port.server(server_address) is not None:
            raise ConfigError(f"server {name} already exists: change it with 'encapfwd server set'")
        return attrs.evolve(port, servers=port.servers + (Server(address=server_address, **values),))

    return _servers_edit(config, target, edit, registry)


def server_set(config: Config, target: str, words: Sequence[str], registry=None) -> Config:
    values = parse_keywords(words, SERVER_KEYWORDS, "server")
    if not values:
        raise ConfigError("server set needs at least one keyword and value")

    def edit(port, server_address, name):
        return _replace_server(port, attrs.evolve(_existing(port, server_address, name), **values))

    return _servers_edit(config, target, edit, registry)


def server_status(config: Config, target: str, down: bool, registry=None) -> Config:
    def edit(port, server_address, name):
        return _replace_server(port, attrs.evolve(_existing(port, server_address, name), down=down))

    return _servers_edit(config, target, edit, registry)


def server_remove(config: Config, target: str, registry=None) -> Config:
    def edit(port, server_address, name):
        _existing(port, server_address, name)
        return attrs.evolve(port, servers=tuple(s for s in port.servers if s.address != server_address))

    return _servers_edit(config, target, edit, registry)


# ---- advisors (IBM: advisor start NAME PORT …, advisor set, advisor stop)


def _advisor_key(name, port) -> Tuple[str, int]:
    """*name* and *port* as typed (``HTTP``, ``"80"``) → (``http``, 80), or a one-line error."""
    name = _name("advisor name")(name)
    port = parse_int(port, 1, 65535, "advisor port")
    return name, port


def _advisor_kind(name: str, registry):
    """The installed advisor *name* (None without a registry: nothing to check against)."""
    if registry is None or not hasattr(registry, "advisors"):
        return None
    types = registry.advisors()
    if name not in types:
        raise ConfigError(_unknown_advisor(name, types))
    return types[name]


def _advisor_words(words: Sequence[str], name: str, kind) -> Tuple[Dict[str, str], Dict[str, Optional[str]]]:
    """``KEY VALUE …`` of ``advisor start``/``set`` → (fields of every advisor, the advisor's own keys).

    An own key given ``none`` maps to None (``advisor set`` clears it). Without *kind* (no registry) any
    well-formed key is taken as the advisor's own; ``check`` with a registry decides."""
    words = list(words)
    fields: Dict[str, str] = {}
    options: Dict[str, Optional[str]] = {}
    i = 0
    while i < len(words):
        word = words[i]
        key = word.lower()
        own = kind is not None and key in kind.keys
        if key not in ADVISOR_KEYWORDS and not own:
            if kind is not None:
                raise ConfigError(_unknown_key(word, name, kind))
            key = advisor_option_key(word)
        if i + 1 >= len(words):
            raise ConfigError(f"advisor keyword {key!r} needs a value")
        if key in fields or key in options:
            raise ConfigError(f"advisor keyword {key!r} given twice")
        value = words[i + 1]
        if key in ADVISOR_KEYWORDS:
            fields[key] = value
        else:
            options[key] = None if value.strip().lower() in ("", "none") else value
        i += 2
    return fields, options


def advisor_start(config: Config, name, port, words: Sequence[str] = (), registry=None) -> Config:
    """``advisor start NAME PORT [interval S] [timeout S] [rise N] [fall N] [via address|forwarding]
    [hold S] [KEY VALUE …]``: a new advisor on *port* (every cluster's servers of that port are probed)."""
    name, port = _advisor_key(name, port)
    kind = _advisor_kind(name, registry)
    if config.advisor(name, port) is not None:
        raise ConfigError(
            f"advisor {name} {port} is already started: change it with 'encapfwd advisor set {name} {port} "
            "KEY VALUE'"
        )
    fields, options = _advisor_words(words, name, kind)
    options = {key: value for key, value in options.items() if value is not None}
    advisor = Advisor(name=name, port=port, options=options, **fields)
    if not _probed_ports(config, port):
        raise ConfigError(
            f"advisor {name} {port}: no cluster has port {port} with servers to probe: add them first "
            f"('encapfwd server add CLUSTER@{port}@SERVER')"
        )
    config = attrs.evolve(config, advisors=config.advisors + (advisor,))
    check(config, registry)
    return config


def _need_advisor(config: Config, name: str, port: int) -> Advisor:
    advisor = config.advisor(name, port)
    if advisor is None:
        raise ConfigError(
            f"advisor {name} {port} is not started (start it with 'encapfwd advisor start {name} {port}')"
        )
    return advisor


def advisor_set(config: Config, name, port, words: Sequence[str], registry=None) -> Config:
    """``advisor set NAME PORT KEY VALUE …``: change an advisor; ``KEY none`` clears one of its own keys."""
    name, port = _advisor_key(name, port)
    advisor = _need_advisor(config, name, port)
    kind = _advisor_kind(name, registry)
    fields, changes = _advisor_words(words, name, kind)
    if not fields and not changes:
        raise ConfigError("advisor set needs at least one keyword and value")
    options = dict(advisor.options)
    for key, value in changes.items():
        if value is None:
            options.pop(key, None)
        else:
            options[key] = value
    changed = attrs.evolve(advisor, options=options, **fields)
    config = attrs.evolve(
        config, advisors=tuple(changed if a is advisor else a for a in config.advisors)
    )
    check(config, registry)
    return config


def advisor_stop(config: Config, name, port, registry=None) -> Config:
    """``advisor stop NAME PORT``: remove an advisor (its servers' health is forgotten)."""
    name, port = _advisor_key(name, port)
    advisor = _need_advisor(config, name, port)
    config = attrs.evolve(config, advisors=tuple(a for a in config.advisors if a is not advisor))
    check(config, registry)
    return config


def advisor_servers(config: Config, advisor: Advisor) -> List[str]:
    """The servers *advisor* probes, as ``cluster@port@server``."""
    return [
        server_key(cluster.address, port.number, server.address)
        for cluster, port in _probed_ports(config, advisor.port)
        for server in port.servers
    ]


def find_server(config: Config, target: str) -> Tuple[Cluster, Port, List[Server]]:
    address, number, servers = split_target(target, 3)
    cluster = _need_cluster(config, address)
    port = _need_port(cluster, number)
    return cluster, port, [_existing(port, s, f"{address}@{number}@{s}") for s in servers]


def iter_servers(config: Config, target: Optional[str] = None):
    """Yield (cluster, port, server) for all servers, or those *target* names."""
    if target:
        cluster, port, servers = find_server(config, target)
        for server in servers:
            yield cluster, port, server
        return
    for cluster in config.clusters:
        for port in cluster.ports:
            for server in port.servers:
                yield cluster, port, server
