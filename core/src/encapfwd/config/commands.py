"""The ``dscontrol``-style command grammar: each command is a pure function ``Config -> Config`` that
parses its words, changes the configuration and checks the result."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import attrs

from encapfwd.config.keywords import ADVISOR_KEYWORDS, EXECUTOR_KEYWORDS, PORT_KEYWORDS, SERVER_KEYWORDS
from encapfwd.config.rules import _probed_ports, _unknown_advisor, _unknown_key, check
from encapfwd.errors import ConfigError
from encapfwd.model import (
    Advisor,
    Cluster,
    Config,
    Port,
    Server,
    _name,
    _shown,
    advisor_option_key,
    parse_int,
    parse_ip,
    server_key,
)


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
