"""What the command groups share: the plugin registry, the one edit of the configuration file, tables."""

from __future__ import annotations

import click

from encapfwd import config as cfg


def registry():
    from encapfwd.plugins import get_plugin_manager

    return get_plugin_manager()


def edit_config(ctx, change, message: str) -> None:
    """The one load → *change(config, registry)* → save of every edit command, under the file's lock
    (parallel edits are serialised, none is lost); saved only on success; then say what was done."""
    path = ctx.obj["config_path"]
    reg = registry()  # plugins are loaded before the lock is taken: it is held only for the edit itself
    with cfg.edit(path) as session:
        session.config = change(session.config, reg)
    click.echo(message)


def echo_table(table) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
