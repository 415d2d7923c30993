"""Rows for ``encapfwd server report``: configuration joined with live counters when a dispatcher runs."""

from __future__ import annotations

from typing import Optional

from encapfwd import config as cfg
from encapfwd.model import (
    forwarding_method,
    server_key,  # defined in model; report.server_key stays importable
)


def live_counters(control: Optional[str]) -> Optional[dict]:
    """Counters of a running ``encapfwd run``, or None when none runs (no socket at the path, or a stale one
    nobody listens on). A dispatcher that is there but gives no answer — busy, too slow, an error answer,
    not ours to ask — is an error (:class:`~encapfwd.errors.EncapfwdError`, one line, a non-zero exit),
    never taken for "no dispatcher"."""
    try:
        from encapfwd.control import default_control_path, query_control
    except ImportError:
        return None
    from encapfwd.errors import EncapfwdError

    path = control or default_control_path()
    try:
        return query_control(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise EncapfwdError(f"the dispatcher on {path} gave no answer: {reason}") from None


def saved_counters(path: str) -> dict:
    """Counters from a JSON summary written by ``encapfwd replay --json``."""
    import json

    from encapfwd.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read counters from {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
        raise ConfigError(f"{path} is not an 'encapfwd replay --json' summary")
    return data


def server_rows(config, target: Optional[str], live: Optional[dict]) -> list:
    """One row per server of *config*. With *live* (a running dispatcher's report) the ``status`` is the
    running plan's (``down`` when an advisor holds it down or its MAC is unknown, with the ``reason``),
    the same fact the metrics and the forwarding show; ``configured`` is what the file says."""
    counters = (live or {}).get("servers") or {}
    rows = []
    for cluster, port, server in cfg.iter_servers(config, target):
        key = server_key(cluster.address, port.number, server.address)
        configured = "down" if server.down else ("quiesced" if server.weight == 0 else "up")
        count = counters.get(key) or {}
        status, reason = configured, ("down in the configuration" if server.down else None)
        if count.get("state") in ("up", "down"):  # the running plan's, which may differ until a reload
            status = "down" if count["state"] == "down" else ("quiesced" if server.weight == 0 else "up")
            reason = count.get("reason")
        rows.append(
            {
                "server": key,
                "method": forwarding_method(config.executor, server),
                "weight": server.weight,
                "status": status,
                "configured": configured,
                "reason": reason,
                "packets": count.get("packets"),
                "bytes": count.get("bytes"),
            }
        )
    return rows
