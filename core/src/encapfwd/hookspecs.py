"""Every hook of encapfwd, with its contract (hook specifications only: the records they take and return
are in :mod:`encapfwd.records`, re-exported here).

Hooks run when configuration is loaded or changed. They return plain callables and byte templates that
the dispatcher keeps; the per-packet path never calls pluggy. Call hooks with keyword arguments only.
``docs/hooks.md`` documents each hook with an example (a test keeps the two in step).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import pluggy

from encapfwd import records
from encapfwd.model import Executor, Port, Server

# The records of the plugin contract live in encapfwd.records; they are re-exported here (the names plugins
# import from encapfwd.hookspecs, one_line included) so that plugins written against this module keep
# working. New code imports them from encapfwd.records.
from encapfwd.records import (  # noqa: F401 - re-exported
    ADVISOR_FIELDS,
    MAX_DETAIL,
    OPERATING_SYSTEMS,
    TEMPLATE_FIELDS,
    XDP_MAX_HEADER,
    AdvisorType,
    Egress,
    Forwarder,
    ProbeResult,
    SetupTarget,
    Template,
    Transform,
    detail_line,
)
from encapfwd.records import detail_line as one_line  # noqa: F401 - the old name of ProbeResult.detail's line

hookspec = pluggy.HookspecMarker("encapfwd")
hookimpl = pluggy.HookimplMarker("encapfwd")


@hookspec
def encapfwd_register_advisors(register: Callable[[AdvisorType], None]) -> None:
    """Register advisors (health checks) by calling ``register(AdvisorType(...))`` once for each.

    Called once when the registry is built. The core's own advisors (``connect``, ``http``, ``udp``) are
    registered the same way (``encapfwd.health.probes``).

    :param register: the core's callback; a name registered by two distributions is an error that names
        both.
    """


@hookspec
def encapfwd_register_forwarders(register: Callable[[Forwarder], None]) -> None:
    """Register forwarding methods by calling ``register(Forwarder(...))`` once for each.

    :param register: the core's callback; a name registered by two distributions is an error that names
        both.
    """


@hookspec(firstresult=True)
def encapfwd_build_template(forwarder: str, server: Server, egress: Egress) -> Optional[Template]:
    """Describe the method *forwarder* to *server* as a :class:`Template`: the recommended way.

    Called once per server each time configuration is loaded or changed, before
    ``encapfwd_build_transform``; stops at the first non-None result. The core derives the Python transform
    from the template (:func:`encapfwd.datapath.templates.template_transform`) and the XDP engine runs the same bytes, so
    the plugin writes no per-packet code and no eBPF. Set ``Forwarder(template=True)`` for the listing.

    Return None when *forwarder* is not a method of this plugin, or when the method cannot be described as
    data for this server: ``encapfwd_build_transform`` is then asked (Python engine only).

    :param forwarder: the method name (``mac``, ``ipip``, ``gre``, or a third party's).
    :param server: the server's configuration (``grekey``, ``encapsource`` …).
    :param egress: resolved MACs, addresses, TTL and MTU (the constant parts of the header).
    :returns: a :class:`Template`; a header of at most :data:`XDP_MAX_HEADER` bytes, a multiple of 4, also
        runs in the XDP program.
    """


@hookspec(firstresult=True)
def encapfwd_build_transform(forwarder: str, server: Server, egress: Egress) -> Optional[Transform]:
    """Compile the per-packet transform that sends P' to *server* with method *forwarder*.

    For methods that cannot be described as a :class:`Template` (Python engine only): the core asks
    ``encapfwd_build_template`` first. Called once per server each time configuration is loaded or changed;
    stops at the first non-None result. Return None when *forwarder* is not a method of this plugin. The
    core answers last (``trylast``) for methods that have a template, with the transform derived from it,
    so every caller of this hook gets a transform for every method.

    :param forwarder: the method name (``mac``, ``ipip``, ``gre``, or a third party's).
    :param server: the server's configuration (``grekey``, ``encapsource`` …).
    :param egress: resolved MACs, addresses, TTL and MTU.
    :returns: a callable ``transform(p_prime: bytes) -> bytes`` returning the whole Ethernet frame. It must
        not raise for any IP packet the dispatcher hands it, and should prepare templates up front.
    """


@hookspec(firstresult=True)
def encapfwd_backend_setup(forwarder: str, os: str, target: SetupTarget, undo: bool) -> Optional[str]:
    """Return the shell commands a back-end server needs for *forwarder* on operating system *os*.

    Stops at the first non-None result; return None when *forwarder* is not a method of this plugin.
    Raise :class:`encapfwd.errors.SetupRefused` with a clear message when there is no working recipe
    (e.g. tunnels on Windows). Use :mod:`encapfwd.backend_setup` to quote every value.

    :param forwarder: the method name.
    :param os: one of :data:`OPERATING_SYSTEMS`.
    :param target: validated addresses and options.
    :param undo: True to return the commands that remove exactly what the setup added.
    :returns: the script text.
    """


@hookspec
def encapfwd_selection_algorithms() -> Sequence[str]:
    """Return the names of the selection algorithms this plugin can build (for validation and listing)."""


@hookspec(firstresult=True)
def encapfwd_build_selector(algorithm: str, port: Port, servers: Sequence[Server], connections: list):
    """Build the selector that picks a server for a new flow on *port*.

    Called once per port each time configuration is loaded or changed; stops at the first non-None result.
    The core's own algorithms (``maglev``, ``wrr``, ``wlc``) are registered last, so a plugin can replace
    them.

    :param algorithm: the port's ``selectionalgorithm``.
    :param port: the port's configuration.
    :param servers: the servers that may take new flows (up, weight > 0), in configuration order.
    :param connections: live count of active flows per entry of *servers*, kept by the core's flow table.
    :returns: a callable ``select(flow_hash: int) -> int`` giving an index into *servers*, or -1 when none
        can be chosen; *flow_hash* is a deterministic 32-bit hash of the flow's 5-tuple.
    """


__all__ = ["Executor", "MAX_DETAIL", "hookimpl", "hookspec", "one_line", *records.__all__]
