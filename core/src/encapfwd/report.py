"""Rows for ``encapfwd server report``: configuration joined with live counters when a dispatcher runs."""

from __future__ import annotations

from typing import Optional

from . import config as cfg
from .model import forwarding_method
from .model import server_key  # defined in model; report.server_key stays importable


def live_counters(control: Optional[str]) -> Optional[dict]:
    """Counters of a running ``encapfwd run``, or None when none answers."""
    try:
        from .engines.control import query_control
    except ImportError:
        return None
    try:
        return query_control(control)
    except (OSError, ValueError):
        return None


def saved_counters(path: str) -> dict:
    """Counters from a JSON summary written by ``encapfwd replay --json``."""
    import json

    from .errors import ConfigError

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read counters from {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
        raise ConfigError(f"{path} is not an 'encapfwd replay --json' summary")
    return data


def server_rows(config, target: Optional[str], live: Optional[dict]) -> list:
    counters = (live or {}).get("servers") or {}
    rows = []
    for cluster, port, server in cfg.iter_servers(config, target):
        key = server_key(cluster.address, port.number, server.address)
        status = "down" if server.down else ("quiesced" if server.weight == 0 else "up")
        count = counters.get(key) or {}
        rows.append(
            {
                "server": key,
                "method": forwarding_method(config.executor, server),
                "weight": server.weight,
                "status": status,
                "packets": count.get("packets"),
                "bytes": count.get("bytes"),
            }
        )
    return rows
