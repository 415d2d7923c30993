"""encapfwd-gre: GRE forwarding (RFC 2784, optional key per RFC 2890) and its back-end setup generators."""

from encapfwd import hookimpl
from encapfwd.records import Forwarder

NAME = "gre"


@hookimpl
def encapfwd_register_forwarders(register):
    register(
        Forwarder(
            name=NAME,
            overhead=24,
            ipv4_only=True,
            operating_systems=("linux", "aix", "solaris", "windows"),
            template=True,
            description="GRE (RFC 2784): outer IPv4 header, protocol 47, GRE protocol 0x0800; +4 bytes with a key",
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
