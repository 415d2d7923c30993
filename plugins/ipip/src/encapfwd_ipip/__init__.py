"""encapfwd-ipip: IP-in-IP forwarding (RFC 2003) and its back-end setup generators."""

from encapfwd import hookimpl
from encapfwd.records import Forwarder

NAME = "ipip"


@hookimpl
def encapfwd_register_forwarders(register):
    register(
        Forwarder(
            name=NAME,
            overhead=20,
            ipv4_only=True,
            operating_systems=("linux", "aix", "solaris", "windows"),
            template=True,
            description="IP-in-IP (RFC 2003): outer IPv4 header, protocol 4",
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
