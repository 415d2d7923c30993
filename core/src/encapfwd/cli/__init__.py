"""The ``encapfwd`` command line.

Start-up stays light: sub-commands in other modules are imported only when run, and nothing here
imports scapy (a test checks ``--help`` and ``forwarders``).
"""

from __future__ import annotations

import importlib
import sys

import click

from encapfwd import config as cfg
from encapfwd.errors import EncapfwdError

# name -> (module:attribute, one-line help); imported only when the command runs
LAZY_COMMANDS = {
    "replay": ("encapfwd.cli.replay:replay_command", "Forward every frame of a pcap through the dispatcher."),
    "explain": ("encapfwd.cli.replay:explain_command", "Show one packet before and after forwarding."),
    "backend-setup": ("encapfwd.cli.setup:backend_setup_command", "Print the commands a back-end server needs."),
    "run": ("encapfwd.cli.run:run_command", "Forward live traffic (Linux, root)."),
    "lab": ("encapfwd.cli.run:lab_command", "Build a namespace lab, send requests, tear it down (root)."),
    "top": ("encapfwd.cli.top:top_command", "A live view of the running dispatcher (like ipvsadm -Ln --rate)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None or name not in LAZY_COMMANDS:
            return command
        target, _ = LAZY_COMMANDS[name]
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise EncapfwdError(f"the {name!r} command is not available: {exc}") from None
        return getattr(module, attribute)

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                command = super().get_command(ctx, name)
                rows.append((name, command.get_short_help_str(limit=formatter.width - 20)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar=cfg.ENV_CONFIG,
    default=cfg.DEFAULT_PATH,
    show_default=True,
    help=f"Configuration file (TOML); also ${cfg.ENV_CONFIG}.",
)
@click.version_option(package_name="encapfwd", message="encapfwd %(version)s")
@click.pass_context
def cli(ctx, config_path):
    """encapfwd: a Layer-4 load-balancer dispatcher with MAC, IPIP and GRE forwarding plugins.

    The configuration is edited with IBM dscontrol's grammar, e.g.

      encapfwd server set 10.0.9.9@80@10.0.2.10 encapforward yes encaptype ipip encapcond always
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


# the command groups of the configuration and reports (light: click and the configuration only)
from encapfwd.cli.advisor import advisor  # noqa: E402
from encapfwd.cli.configure import cluster, executor, port  # noqa: E402
from encapfwd.cli.forwarders import forwarders  # noqa: E402
from encapfwd.cli.server import server  # noqa: E402

for _command in (forwarders, executor, cluster, port, server, advisor):
    cli.add_command(_command)


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    """Entry point: one-line errors, never a traceback, for user mistakes."""
    try:
        rv = cli.main(args=argv, prog_name="encapfwd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("encapfwd: aborted", err=True)
        return 130
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None):
            click.echo(exc.ctx.get_help())  # bare "encapfwd" or "encapfwd server": help, as click does
            return 2
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "encapfwd"
        click.echo(f"encapfwd: error: {exc.format_message()} (see '{command} --help')", err=True)
        return exc.exit_code
    except EncapfwdError as exc:
        from encapfwd.runtime.sdnotify import (
            journal_priorities,  # systemd: stderr is the journal -> <3> (error)
        )

        click.echo(f"{'<3>' if journal_priorities() else ''}encapfwd: error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("encapfwd: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
