"""Configuration: TOML load/save and IBM ``dscontrol``-style commands that produce a new Config.

Every command is a pure function ``Config -> Config``. The CLI runs it inside :func:`edit`, which holds an
advisory lock on the file for the whole load → command → save sequence (so parallel edits are serialised,
none is lost) and saves only when the command succeeded, so a failed command leaves the file untouched.

Saving writes through symbolic links to their target, atomically (temporary file beside the target, fsync,
rename), keeps the file's owner, group and mode, and keeps the comments and layout of a hand-written file:
the new configuration is applied to the existing document (``tomlkit``) as a minimal change.

:func:`check` is the one place where rules across objects are checked.

The modules, one concern each: :mod:`.keywords` (the commands' keywords), :mod:`.toml` (TOML <-> Config),
:mod:`.files` (safe reads, atomic writes), :mod:`.lock` (the edit lock), :mod:`.preserve` (keeping
comments), :mod:`.store` (load, edit, save), :mod:`.rules` (:func:`check`), :mod:`.commands` (the grammar)
and :mod:`.text` (values and paths in messages). The names below are re-exported from them; the limits
(``MAX_NESTING``, ``MAX_BYTES``, ``LOCK_TIMEOUT``) are read from their own module, so change them there.
"""

from encapfwd.config.commands import (
    advisor_servers,
    advisor_set,
    advisor_start,
    advisor_stop,
    cluster_add,
    cluster_remove,
    executor_set,
    find_server,
    iter_servers,
    parse_keywords,
    port_add,
    port_remove,
    port_set,
    server_add,
    server_remove,
    server_set,
    server_status,
    split_target,
)
from encapfwd.config.files import MAX_BYTES
from encapfwd.config.keywords import ADVISOR_KEYWORDS, EXECUTOR_KEYWORDS, PORT_KEYWORDS, SERVER_KEYWORDS
from encapfwd.config.lock import LOCK_TIMEOUT, lock_path
from encapfwd.config.preserve import render
from encapfwd.config.rules import FORWARDING_ADVISORS, check
from encapfwd.config.store import DEFAULT_PATH, ENV_CONFIG, Edit, default_path, edit, load, save
from encapfwd.config.toml import MAX_NESTING, dumps, from_dict, loads, to_dict
from encapfwd.model import Config  # callers build configurations as cfg.Config()

__all__ = [
    "ADVISOR_KEYWORDS",
    "Config",
    "DEFAULT_PATH",
    "ENV_CONFIG",
    "EXECUTOR_KEYWORDS",
    "Edit",
    "FORWARDING_ADVISORS",
    "LOCK_TIMEOUT",
    "MAX_BYTES",
    "MAX_NESTING",
    "PORT_KEYWORDS",
    "SERVER_KEYWORDS",
    "advisor_servers",
    "advisor_set",
    "advisor_start",
    "advisor_stop",
    "check",
    "cluster_add",
    "cluster_remove",
    "default_path",
    "dumps",
    "edit",
    "executor_set",
    "find_server",
    "from_dict",
    "iter_servers",
    "load",
    "loads",
    "lock_path",
    "parse_keywords",
    "port_add",
    "port_remove",
    "port_set",
    "render",
    "save",
    "server_add",
    "server_remove",
    "server_set",
    "server_status",
    "split_target",
    "to_dict",
]
