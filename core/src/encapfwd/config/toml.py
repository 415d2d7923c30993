"""TOML <-> :class:`~encapfwd.model.Config`: the file's data as plain values and back, parsing with a
nesting limit, and a fresh document for a configuration."""

from __future__ import annotations

import re

import attrs
import tomlkit

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from encapfwd.config.rules import check
from encapfwd.errors import ConfigError, plain
from encapfwd.model import Advisor, Cluster, Config, Executor, Port, Server

#: Deepest nesting of arrays and inline tables accepted (the configuration needs 2; parsers recurse on it).
MAX_NESTING = 32


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
        what = f"advisor {plain(raw['name'])} {plain(raw['port'])}"
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
