"""encapfwd-mac: MAC forwarding (P' re-addressed to the server's MAC) and its back-end setup generators."""

from encapfwd import hookimpl
from encapfwd.records import Forwarder

NAME = "mac"


@hookimpl
def encapfwd_register_forwarders(register):
    register(
        Forwarder(
            name=NAME,
            overhead=0,
            ipv4_only=False,
            operating_systems=("linux", "aix", "solaris", "windows"),
            encapsulates=False,
            template=True,
            description="MAC forwarding: P' in a frame to the server's MAC; the server holds the VIP on loopback",
        )
    )


@hookimpl
def encapfwd_build_template(forwarder, server, egress):
    # Data, not code: the core runs it in Python (encapfwd.datapath.templates.template_transform) and in the XDP program.
    if forwarder != NAME:
        return None
    from .template import template

    return template(server, egress)


@hookimpl
def encapfwd_backend_setup(forwarder, os, target, undo):
    if forwarder != NAME:
        return None
    from .backend import script

    return script(os, target, undo)
