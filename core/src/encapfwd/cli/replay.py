"""``encapfwd replay IN OUT`` and ``encapfwd explain IN``: the data path on capture files, without root.

Nothing here imports scapy at module level: ``explain`` imports it inside the function (``encapfwd --help``
must stay fast). ``replay`` never needs scapy at all.
"""

from __future__ import annotations

import json
import os
import sys

import click

from encapfwd.errors import ConfigError, EncapfwdError

#: Input size from which replay shows a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = 8 << 20

#: Exit status when IN ends in the middle of a record or block (errors exit 1, usage errors 2): replay has
#: forwarded and written the frames before it and printed its summary; explain did not reach the frame.
EXIT_TRUNCATED = 3


def _config_path(ctx) -> str:
    obj = ctx.find_root().obj if ctx is not None else None
    path = (obj or {}).get("config_path")
    if path is None:
        from encapfwd import config as cfg

        path = cfg.default_path()
    return path


def _dispatcher(ctx, engine: str = "python"):
    """Load the configuration and compile a dispatcher (one-line errors for every user mistake); with
    *engine* ``xdp``, the kernel program run by BPF_PROG_TEST_RUN with the dispatcher as its slow path."""
    from encapfwd import config as cfg
    from encapfwd.datapath.dispatcher import Dispatcher
    from encapfwd.plan import compile_plan
    from encapfwd.plugins import get_plugin_manager

    path = _config_path(ctx)
    if not path or not os.path.exists(path):
        raise ConfigError(f"configuration file {path} does not exist (pass --config PATH)")
    config = cfg.load(path)
    if not config.clusters:
        raise ConfigError(f"{path}: no cluster is configured, every frame would be dropped")
    registry = get_plugin_manager()
    cfg.check(config, registry)
    plan = compile_plan(config, registry)  # every executor runs this plan
    if engine == "xdp":
        from encapfwd.xdp import libbpf
        from encapfwd.xdp.offline import XDPExecutor

        ok, why = libbpf.available()
        if not ok:
            raise EncapfwdError(f"--engine xdp: {why}")
        return XDPExecutor(plan, registry)
    if engine == "tc":
        from encapfwd.xdp import libbpf
        from encapfwd.xdp.tc import TCExecutor

        ok, why = libbpf.available()
        if not ok:
            raise EncapfwdError(f"--engine tc: {why}")
        return TCExecutor(plan, registry)
    return Dispatcher(plan, registry)


def _print_summary(summary: dict) -> None:
    secs = summary["seconds"]
    rate = summary.get("frames_per_second")
    click.echo(
        f"replayed {summary['frames_in']} frames from {summary['input']} in {secs:.3f} s"
        + (f" ({rate:,} frames/s)" if rate else "")
        + f": {summary['forwarded']} forwarded, {summary['dropped']} dropped, "
        f"{summary['icmp_sent']} ICMP errors sent; wrote {summary['frames_out']} frames to {summary['output']}"
    )
    engines = summary.get("engines") or {}
    if engines.get("xdp"):
        click.echo(f"engines: {engines['xdp']} frames decided by the XDP program, {engines['python']} handed up "
                   "to the Python dispatcher")
    if engines.get("tc"):
        click.echo(f"engines: {engines['tc']} frames decided by the TC program, {engines['python']} handed up "
                   "to the Python dispatcher")
    servers = summary["servers"]
    if servers:
        width = max(len("server"), *(len(name) for name in servers))
        click.echo("")
        click.echo(f"{'server':<{width}}  {'method':<6}  {'packets':>10}  {'bytes':>12}")
        for name, row in servers.items():
            click.echo(f"{name:<{width}}  {row['method']:<6}  {row['packets']:>10}  {row['bytes']:>12}")
    drops = summary["drops"]
    if drops:
        width = max(len("drop reason"), *(len(name) for name in drops))
        click.echo("")
        click.echo(f"{'drop reason':<{width}}  {'frames':>10}")
        for reason, count in drops.items():
            click.echo(f"{reason:<{width}}  {count:>10}")
    if drops.get("not-for-us") and not summary.get("any_mac"):
        click.echo("")
        click.echo(f"{drops['not-for-us']} frames were not sent to the dispatcher's MAC (executor mac); a "
                   "live dispatcher would not forward them either. For a capture taken elsewhere, --any-mac "
                   "takes every unicast frame as sent to it")


_ANY_MAC_HELP = ("Take every unicast frame as sent to the dispatcher's MAC (for a capture taken where frames "
                 "were addressed to another host); by default, as live, only frames sent to the executor mac "
                 "are forwarded.")


@click.command("replay")
@click.argument("infile", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("outfile", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar on stderr (default: for large inputs on a terminal).")
@click.option("--engine", type=click.Choice(["python", "xdp", "tc"]), default="python", show_default=True,
              help="python: the Python dispatcher; xdp: the XDP program on each frame (BPF_PROG_TEST_RUN, "
                   "root), with the Python dispatcher for the frames it hands up; tc: the same with the TC "
                   "program (the frame as a socket buffer).")
@click.option("--any-mac", is_flag=True, help=_ANY_MAC_HELP)
@click.pass_context
def replay_command(ctx, infile, outfile, as_json, progress, engine, any_mac):
    """Forward every frame of the capture IN (pcap or pcapng) through the dispatcher; write OUT (pcap).

    Prints how many packets went to each server and how many frames were dropped, per reason, and with
    --engine xdp how many frames each engine decided.
    """
    from encapfwd.replay.capture import replay

    _check_input(infile)
    if os.path.abspath(infile) == os.path.abspath(outfile) or (
            os.path.exists(outfile) and os.path.samefile(infile, outfile)):
        raise EncapfwdError("IN and OUT are the same file")
    dispatcher = _dispatcher(ctx, engine)
    size = os.path.getsize(infile)
    if progress is None:
        progress = size >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    try:
        if progress:
            with click.progressbar(length=size, label="replaying", file=sys.stderr) as bar:
                summary = replay(dispatcher, infile, outfile, progress=bar.update, any_mac=any_mac)
        else:
            summary = replay(dispatcher, infile, outfile, any_mac=any_mac)
    finally:
        dispatcher.close()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if summary["truncated"]:
        n = summary["frames_in"]
        click.echo(f"encapfwd: warning: {summary['truncation']['message']}; replayed the {n} "
                   f"frame{'' if n == 1 else 's'} before it", err=True)
        ctx.exit(EXIT_TRUNCATED)


def _check_input(infile: str) -> None:
    if os.path.isdir(infile):
        raise EncapfwdError(f"cannot read {infile}: it is a directory")
    if not os.path.exists(infile):
        raise EncapfwdError(f"cannot read {infile}: no such file")
    if not os.path.isfile(infile):
        raise EncapfwdError(f"cannot read {infile}: not a regular file")


def _diff(before: dict, after: dict) -> str:
    for name, row in after["servers"].items():
        old = before["servers"].get(name, {"packets": 0})
        if row["packets"] != old["packets"]:
            return f"forwarded to {name} by {row['method']}"
    for reason, count in after["drops"].items():
        if count != before["drops"].get(reason, 0):
            return f"dropped: {reason}"
    return "held (a fragment waiting for the first fragment of its datagram)"


def _dissect(frame: bytes) -> str:
    """scapy's layer-by-layer view, with long payloads shortened for a human."""
    from scapy.layers.l2 import Ether

    try:
        shown = Ether(frame).show(dump=True)
    except Exception as exc:  # noqa: BLE001 - scapy on arbitrary bytes; the frame is still worth showing
        return f"(scapy cannot dissect this frame: {type(exc).__name__}: {exc})\n{frame.hex(' ')}"
    lines = []
    for line in shown.rstrip().splitlines():
        if len(line) > 110 and "load" in line and "=" in line:
            line = line[:100] + "...'  (shortened)"
        lines.append(line)
    return "\n".join(lines)


@click.command("explain")
@click.argument("infile", metavar="IN", type=click.Path(dir_okay=False))
@click.option("--index", "-n", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which frame of IN (0 = the first); earlier frames are forwarded first so flows match.")
@click.option("--any-mac", is_flag=True, help=_ANY_MAC_HELP)
@click.pass_context
def explain_command(ctx, infile, index, any_mac):
    """Show one frame of IN before and after the dispatcher, dissected by scapy."""
    from encapfwd.replay.capture import CaptureReader, local_mac, readdress

    _check_input(infile)
    dispatcher = _dispatcher(ctx)
    target = None
    count = 0
    local = local_mac(dispatcher)
    with CaptureReader(infile, local) as reader:
        for ts, frame in reader:
            if any_mac:
                frame = readdress(frame, local)
            if count == index:
                target = (ts, frame)
                break
            count += 1
            dispatcher.process(frame, ts)
        truncation = reader.truncation
    if target is None:
        if truncation is not None:
            click.echo(f"encapfwd: error: {infile} has no frame {index} (it has {count} whole frames, "
                       f"--index counts from 0): {truncation.describe(infile)}", err=True)
            ctx.exit(EXIT_TRUNCATED)
        raise EncapfwdError(f"{infile} has no frame {index} (it has {count} frames)")
    ts, frame = target
    before = dispatcher.report()
    out = dispatcher.process(frame, ts)
    after = dispatcher.report()

    import scapy.layers.all  # noqa: F401 - imported here (slow); binds every layer so GRE/IPIP/ICMP dissect

    click.echo(f"frame {index} in ({len(frame)} bytes, t={ts:.6f}):")
    click.echo(_dissect(frame))
    click.echo("")
    click.echo(f"=> {_diff(before, after)}; {len(out)} frame(s) out")
    for n, o in enumerate(out):
        click.echo("")
        click.echo(f"frame out {n + 1}/{len(out)} ({len(o)} bytes):")
        click.echo(_dissect(o))


__all__ = ["explain_command", "replay_command"]
