"""``encapfwd forwarders``: the loaded forwarding methods, advisors and selection algorithms, and their plugins."""

from __future__ import annotations

import json

import click

from encapfwd.cli.common import echo_table, registry


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def forwarders(as_json):
    """List the forwarding methods (and advisors) the installed plugins provide.

    ENGINES: where a method can run: xdp,python when its plugin describes it as a template (the XDP
    program and the Python dispatcher run the same bytes), python when it is Python code only.
    """
    from encapfwd.plugins import KNOWN_DISTRIBUTIONS

    reg = registry()
    rows = []
    for record in reg.records:
        if not record.ok:
            rows.append(
                {"name": None, "distribution": record.distribution, "version": record.version,
                 "overhead": None, "ipv4_only": None, "operating_systems": [], "engines": [],
                 "status": record.status, "description": "", "hooks": record.hooks}
            )
            continue
        for name in record.forwarders:
            fwd = reg.forwarders[name]
            rows.append(
                {"name": fwd.name, "distribution": record.distribution, "version": record.version,
                 "overhead": fwd.overhead, "ipv4_only": fwd.ipv4_only,
                 "operating_systems": list(fwd.operating_systems), "engines": list(reg.engines(name)),
                 "status": "ok",
                 "description": fwd.description, "hooks": record.hooks}
            )
    missing = [f"{dist} ({name})" for name, dist in KNOWN_DISTRIBUTIONS.items() if name not in reg.forwarders]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        if not reg.forwarders:
            click.echo("encapfwd: no forwarders installed; install " + ", ".join(missing), err=True)
        return
    if rows:
        header = ("FORWARDER", "DISTRIBUTION", "VERSION", "OVERHEAD", "IPV4-ONLY", "OS", "ENGINES", "STATUS")
        table = [header] + [
            (r["name"] or "-", r["distribution"], r["version"],
             "-" if r["overhead"] is None else str(r["overhead"]),
             "-" if r["ipv4_only"] is None else ("yes" if r["ipv4_only"] else "no"),
             ",".join(r["operating_systems"]) or "-", ",".join(r["engines"]) or "-", r["status"])
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not reg.forwarders:
        click.echo("No forwarders installed. Install the distributions you need: " + ", ".join(missing) + ".")
    advisors = reg.advisors()
    if advisors:  # the health checks 'encapfwd advisor start' can use (not in --json: that lists forwarders)
        click.echo("")
        echo_table([("ADVISOR", "DISTRIBUTION", "KEYS", "DESCRIPTION")] + [
            (name, reg.advisor_owners.get(name, "?"), ",".join(kind.keys) or "-", kind.description)
            for name, kind in advisors.items()
        ])
