"""The configuration file: where it is by default, :func:`load`, and :func:`edit` and :func:`save`, which
change it under its lock."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import attrs

from encapfwd.config.files import _read, _target, _write
from encapfwd.config.lock import _locked
from encapfwd.config.preserve import render
from encapfwd.config.toml import loads
from encapfwd.errors import ConfigError, shown_path
from encapfwd.model import Config

DEFAULT_PATH = "encapfwd.toml"
ENV_CONFIG = "ENCAPFWD_CONFIG"


def default_path() -> str:
    return os.environ.get(ENV_CONFIG) or DEFAULT_PATH


def _parse(text: str, shown) -> Config:
    try:
        return loads(text)
    except ConfigError as exc:
        raise ConfigError(f"{shown}: {exc}") from None


def load(path) -> Config:
    """Load *path*; a missing file is an empty configuration."""
    shown = shown_path(path)
    text = _read(Path(path), shown, writing=False)
    return Config() if text is None else _parse(text, shown)


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
    shown = shown_path(path)
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
    shown = shown_path(path)
    target = _target(Path(path), shown, writing=True)
    with _locked(target, shown):
        text = _read(target, shown, writing=True)
        try:
            old = None if text is None else loads(text)
        except ConfigError:
            old = None  # an invalid file is replaced as a whole
        _write(target, render(config, old, text), shown)
