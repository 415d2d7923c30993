"""Configuration: TOML load/save (atomic) and IBM ``dscontrol``-style commands that produce a new Config.

Every command is a pure function ``Config -> Config``; the CLI saves the result only when the command
succeeded, so a failed command leaves the file untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import attrs
import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from .errors import ConfigError, PluginError
from .model import Cluster, Config, Executor, Port, Server, parse_ip

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
}
PORT_KEYWORDS = {
    "porttype": "tcp, udp or both (default both)",
    "selectionalgorithm": "maglev (default), wrr or wlc, or one a plugin provides",
    "stickytime": "seconds a client keeps its server after its last packet (0 = off)",
    "staletimeout": "seconds an idle flow is kept (default 300)",
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


def _plain(value):
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)):
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


def to_dict(config: Config) -> dict:
    data: dict = {"executor": _table(config.executor)}
    clusters = []
    for cluster in config.clusters:
        ports = []
        for port in cluster.ports:
            entry = {"number": port.number, **_table(port, skip=("number", "servers"))}
            entry["servers"] = [
                {"address": str(s.address), **_table(s, skip=("address",))} for s in port.servers
            ]
            ports.append(entry)
        clusters.append({"address": str(cluster.address), "ports": ports})
    data["clusters"] = clusters
    return data


def _build(cls, raw, what: str, **extra):
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: expected a table")
    known = {a.name for a in attrs.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown keyword {unknown[0]!r}")
    return cls(**{**raw, **extra})


def from_dict(data: dict) -> Config:
    unknown = sorted(set(data) - {"executor", "clusters"})
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
    config = Config(executor=executor, clusters=tuple(clusters))
    validate(config)
    return config


def loads(text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}") from None
    try:
        return from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def dumps(config: Config) -> str:
    return tomli_w.dumps(to_dict(config))


def load(path) -> Config:
    """Load *path*; a missing file is an empty configuration."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return loads(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save(path, config: Config) -> None:
    """Write atomically: a temporary file in the same folder, fsync, rename over the old one."""
    path = Path(path)
    text = dumps(config)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------------------------------- validate


def validate(config: Config, registry=None) -> None:
    """Checks across objects (the attrs converters check single fields)."""
    seen_clusters = set()
    for cluster in config.clusters:
        if cluster.address in seen_clusters:
            raise ConfigError(f"cluster {cluster.address} is defined twice")
        seen_clusters.add(cluster.address)
        seen_ports = set()
        for port in cluster.ports:
            where = f"{cluster.address}@{port.number}"
            if port.number in seen_ports:
                raise ConfigError(f"port {where} is defined twice")
            seen_ports.add(port.number)
            if registry is not None:
                algorithms = registry.selection_algorithms()
                if port.selectionalgorithm not in algorithms:
                    raise ConfigError(
                        f"port {where}: unknown selectionalgorithm {port.selectionalgorithm!r} "
                        f"(available: {', '.join(algorithms)})"
                    )
            seen_servers = set()
            for server in port.servers:
                name = f"{where}@{server.address}"
                if server.address in seen_servers:
                    raise ConfigError(f"server {name} is defined twice")
                seen_servers.add(server.address)
                check_server(cluster, server, name, registry)


def check_server(cluster: Cluster, server: Server, name: str, registry=None) -> None:
    if server.encapforward:
        if cluster.address.version != 4 or server.address.version != 4:
            raise ConfigError(f"server {name}: encapsulation forwarding is only valid for IPv4")
        if registry is not None:
            try:
                forwarder = registry.forwarder(server.encaptype)
            except PluginError as exc:  # names the distribution to install
                raise ConfigError(f"server {name}: encaptype {server.encaptype}: {exc}") from None
            if not forwarder.encapsulates:
                raise ConfigError(f"server {name}: encaptype {server.encaptype!r} is not an encapsulation")
    if server.grekey is not None and server.encaptype != "gre":
        raise ConfigError(f"server {name}: grekey is only valid with encaptype gre")


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
        port = int(pieces[1])
    except ValueError:
        raise ConfigError(f"invalid port {pieces[1]!r} in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {port} in {text!r}")
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
    return attrs.evolve(config, executor=attrs.evolve(config.executor, **values))


def cluster_add(config: Config, addresses: Iterable[str], registry=None) -> Config:
    clusters = list(config.clusters)
    for text in addresses:
        (address,) = split_target(text, 1)
        if config.cluster(address) is not None or any(c.address == address for c in clusters):
            raise ConfigError(f"cluster {address} already exists")
        clusters.append(Cluster(address=address))
    return attrs.evolve(config, clusters=tuple(clusters))


def cluster_remove(config: Config, addresses: Iterable[str], registry=None) -> Config:
    for text in addresses:
        (address,) = split_target(text, 1)
        _need_cluster(config, address)
        config = attrs.evolve(config, clusters=tuple(c for c in config.clusters if c.address != address))
    return config


def port_add(config: Config, target: str, words: Sequence[str], registry=None) -> Config:
    address, number = split_target(target, 2)
    cluster = _need_cluster(config, address)
    if cluster.port(number) is not None:
        raise ConfigError(f"port {address}@{number} already exists: change it with 'encapfwd port set'")
    port = Port(number=number, **parse_keywords(words, PORT_KEYWORDS, "port"))
    config = _replace_cluster(config, attrs.evolve(cluster, ports=cluster.ports + (port,)))
    validate(config, registry)
    return config


def port_set(config: Config, target: str, words: Sequence[str], registry=None) -> Config:
    address, number = split_target(target, 2)
    cluster = _need_cluster(config, address)
    port = _need_port(cluster, number)
    values = parse_keywords(words, PORT_KEYWORDS, "port")
    if not values:
        raise ConfigError("port set needs at least one keyword and value")
    config = _replace_cluster(config, _replace_port(cluster, attrs.evolve(port, **values)))
    validate(config, registry)
    return config


def port_remove(config: Config, target: str, registry=None) -> Config:
    address, number = split_target(target, 2)
    cluster = _need_cluster(config, address)
    _need_port(cluster, number)
    return _replace_cluster(
        config, attrs.evolve(cluster, ports=tuple(p for p in cluster.ports if p.number != number))
    )


def _servers_edit(config: Config, target: str, edit, registry) -> Config:
    address, number, servers = split_target(target, 3)
    cluster = _need_cluster(config, address)
    port = _need_port(cluster, number)
    for server_address in servers:
        name = f"{address}@{number}@{server_address}"
        port = edit(port, server_address, name)
    config = _replace_cluster(config, _replace_port(cluster, port))
    validate(config, registry)
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
        try:
            server = Server(address=server_address, **values)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"server {server_address}:", f"server {name}:")) from None
        return attrs.evolve(port, servers=port.servers + (server,))

    return _servers_edit(config, target, edit, registry)


def server_set(config: Config, target: str, words: Sequence[str], registry=None) -> Config:
    values = parse_keywords(words, SERVER_KEYWORDS, "server")
    if not values:
        raise ConfigError("server set needs at least one keyword and value")

    def edit(port, server_address, name):
        try:
            server = attrs.evolve(_existing(port, server_address, name), **values)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"server {server_address}:", f"server {name}:")) from None
        return _replace_server(port, server)

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
