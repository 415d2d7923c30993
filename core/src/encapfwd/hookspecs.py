"""Every hook of encapfwd, with its contract.

Hooks run when configuration is loaded or changed. They return plain callables and byte templates that
the dispatcher keeps; the per-packet path never calls pluggy. Call hooks with keyword arguments only.
``docs/hooks.md`` documents each hook with an example (a test keeps the two in step).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import pluggy
from attrs import field, frozen

from .model import Executor, IPAddress, Port, Server

hookspec = pluggy.HookspecMarker("encapfwd")
hookimpl = pluggy.HookimplMarker("encapfwd")

#: The operating systems a back-end setup generator can be asked for.
OPERATING_SYSTEMS = ("linux", "aix", "solaris", "windows")


@frozen
class Forwarder:
    """What a forwarder plugin registers: metadata the core and the CLI need.

    :param name: the forwarding method, as used in ``encaptype`` (``ipip``, ``gre``) or ``mac``.
    :param overhead: bytes this method adds in front of P' (IPIP 20, GRE 24, GRE with key 28, MAC 0);
        the dispatcher compares ``len(P') + overhead`` with the MTU.
    :param ipv4_only: True when the method can only carry IPv4 (every encapsulation in the seed).
    :param operating_systems: the ``--os`` values its setup generator answers.
    :param encapsulates: True for tunnel methods (selected through ``encapforward yes``).
    :param description: one line for ``encapfwd forwarders``.
    """

    name: str
    overhead: int
    ipv4_only: bool = True
    operating_systems: tuple = field(default=OPERATING_SYSTEMS, converter=tuple)
    encapsulates: bool = True
    description: str = ""


@frozen
class Egress:
    """Where and how one server's packets leave the dispatcher; resolved by the core at configuration time.

    :param src_mac: the dispatcher's MAC (source of every frame sent).
    :param dst_mac: next hop MAC: the server's when it is on an attached network, else the gateway's.
    :param outer_src: outer IPv4 source for encapsulation (server's ``encapsource``, else executor ``nfa``).
    :param outer_dst: the server's address (outer destination for encapsulation).
    :param ttl: outer TTL for encapsulation (executor ``encapttl``).
    :param cluster: the cluster address (VIP) this server serves.
    :param mtu: the egress MTU.
    """

    src_mac: str
    dst_mac: str
    outer_src: Optional[IPAddress]
    outer_dst: IPAddress
    ttl: int
    cluster: IPAddress
    mtu: int


@frozen
class SetupTarget:
    """Everything a back-end setup generator may put in a script, already validated by the core.

    :param server: the back-end server.
    :param cluster: the cluster address (VIP) the server must accept.
    :param dispatcher: the tunnel's other end (the outer source the dispatcher uses), or None for MAC.
    :param options: extra validated values some recipes need (e.g. ``tunnel_address`` for AIX/Solaris).
    """

    server: Server
    cluster: IPAddress
    port: int
    dispatcher: Optional[IPAddress]
    options: dict = field(factory=dict, hash=False)


# A compiled transform: P' (an IP packet whose TTL was already decremented, as bytes) -> Ethernet frame.
Transform = Callable[[bytes], bytes]


@hookspec
def encapfwd_register_forwarders(register: Callable[[Forwarder], None]) -> None:
    """Register forwarding methods by calling ``register(Forwarder(...))`` once for each.

    :param register: the core's callback; a name registered by two distributions is an error that names
        both.
    """


@hookspec(firstresult=True)
def encapfwd_build_transform(forwarder: str, server: Server, egress: Egress) -> Optional[Transform]:
    """Compile the per-packet transform that sends P' to *server* with method *forwarder*.

    Called once per server each time configuration is loaded or changed; stops at the first non-None
    result. Return None when *forwarder* is not a method of this plugin.

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
    (e.g. tunnels on Windows). Use :mod:`encapfwd.setup` to quote every value.

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


__all__ = [
    "Egress",
    "Executor",
    "Forwarder",
    "OPERATING_SYSTEMS",
    "SetupTarget",
    "Transform",
    "hookimpl",
    "hookspec",
]
