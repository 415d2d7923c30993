"""Back-end setup rendering shared by the forwarder plugins: validation, quoting, targets, Linux fragments.

Every value that a generator places in a script goes through a validator here first (IPv4/IP addresses,
interface names, numbers, Windows adapter names) and is then shell-quoted. A value that is not exactly an
address, a name or a number -- ``1.2.3.4; rm -rf /`` -- raises :class:`~encapfwd.errors.ConfigError` and
never reaches a script.

Linux scripts are built from one small shell library (:data:`LINUX_LIBRARY`) so every plugin gets the same
guarantees, proven on a real kernel by ``tests/test_backend_uml.py`` and ``tests/test_backend_mac_netns.py``:

- idempotent: running a script twice changes nothing the second time;
- ``--undo`` removes exactly what the setup added: before changing anything, the setup records the value it
  replaces under ``$ENCAPFWD_STATE_DIR`` (default ``/run/encapfwd``, cleared at reboot like the changes
  themselves), with one marker per user, so two setups that share a setting (two clusters on one server)
  do not undo each other: the last one to go restores the original value.

``docs/backend-setup.md`` explains each decision per operating system and method.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from typing import Dict, List, Optional, Sequence, Tuple

from attrs import frozen

from encapfwd.errors import ConfigError, SetupRefused, shown
from encapfwd.model import Cluster, Config, Executor, Port, Server, forwarding_method
from encapfwd.records import OPERATING_SYSTEMS, SetupTarget

WINDOWS_TUNNELS_REFUSED = "Tunneling is not supported on Windows operating systems"

#: Options a SetupTarget may carry, with their validators (see :func:`check_options`).
OPTION_HELP = {
    "tunnel_address": "a free IPv4 address for the server's tunnel interface (AIX gre0, Solaris ip.tun0)",
    "tunnel_peer": "a free IPv4 address for the far end of Solaris ip.tun0 (point-to-point)",
    "loopback_adapter": "Windows: name of the loopback adapter that holds the cluster address",
    "nic": "Windows: name of the adapter that receives the forwarded traffic",
    "persistent": "Linux: also install files that redo the setup at every boot",
}

_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_WINDOWS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()-]{0,63}$")


# ---------------------------------------------------------------------------------------- validators


def ipv4(value, what: str = "address") -> str:
    """*value* as a dotted-quad IPv4 address string, or ConfigError."""
    if isinstance(value, ipaddress.IPv4Address):
        return str(value)
    if isinstance(value, str):
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            pass
    raise ConfigError(f"invalid {what}: {shown(value, shell=True)} is not an IPv4 address")


def ip(value, what: str = "address") -> str:
    """*value* as an IPv4 or IPv6 address string (no zone), or ConfigError."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = value
    elif isinstance(value, str):
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            addr = None
    else:
        addr = None
    if addr is None or getattr(addr, "scope_id", None):
        raise ConfigError(f"invalid {what}: {shown(value, shell=True)} is not an IP address")
    return str(addr)


def ifname(value, what: str = "interface name") -> str:
    """A Linux/Unix interface name: 1-15 of ``A-Z a-z 0-9 _ . -``, not starting with ``-`` or ``.``."""
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise ConfigError(f"invalid {what}: {shown(value, shell=True)} (1-15 letters, digits, '_', '.', '-')")
    return value


def forwarder_name(value, what: str = "forwarder name") -> str:
    """A forwarder or algorithm name as the configuration grammar spells it: 1-32 of ``a-z 0-9 _ . -``."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"invalid {what}: {shown(value, shell=True)} (1-32 lower-case letters, digits, '_', '.', '-')")
    return value


def number(value, lo: int, hi: int, what: str = "number") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        if isinstance(value, str) and value.isdigit() and lo <= int(value) <= hi:
            return int(value)
        raise ConfigError(f"invalid {what}: {shown(value, shell=True)} (a whole number from {lo} to {hi})")
    return value


def windows_name(value, what: str = "adapter name") -> str:
    """A Windows adapter name: letters, digits, space, ``_ . ( ) -`` (nothing ``cmd.exe`` interprets)."""
    if not isinstance(value, str) or not _WINDOWS_NAME.match(value) or value != value.strip():
        raise ConfigError(f"invalid {what}: {shown(value, shell=True)} (letters, digits, spaces, '_', '.', '(', ')', '-')")
    return value


def quote(value) -> str:
    """POSIX shell quoting for an already validated value (validated values come out unchanged)."""
    return shlex.quote(str(value))


def check_options(options: Optional[dict]) -> dict:
    """Validate the extra values a recipe may need; unknown keys are an error."""
    out: dict = {}
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key in ("tunnel_address", "tunnel_peer"):
            out[key] = ipaddress.IPv4Address(ipv4(value if not isinstance(value, str) else value.strip(),
                                                  key.replace("_", " ")))
        elif key in ("loopback_adapter", "nic"):
            out[key] = windows_name(value, key.replace("_", " "))
        elif key == "persistent":
            if not isinstance(value, bool):
                raise ConfigError(f"invalid persistent: {shown(value, shell=True)} (true or false)")
            out[key] = value
        else:
            raise ConfigError(f"unknown back-end setup option {key!r}; known: {', '.join(OPTION_HELP)}")
    return out


def check_target(target: SetupTarget) -> SetupTarget:
    """Validate every field of *target* again (plugins may be handed targets built by third parties)."""
    if not isinstance(target, SetupTarget):
        raise ConfigError("back-end setup needs an encapfwd.hookspecs.SetupTarget")
    ip(target.server.address, "server address")
    ip(target.cluster, "cluster address")
    number(target.port, 0, 65535, "port")
    if target.dispatcher is not None:
        ipv4(target.dispatcher, "dispatcher address")
    check_options(target.options)
    return target


def check_os(os_name) -> str:
    if os_name not in OPERATING_SYSTEMS:
        raise ConfigError(f"unknown operating system {shown(os_name, shell=True)}; choose one of {', '.join(OPERATING_SYSTEMS)}")
    return os_name


# ------------------------------------------------------------------------------------------- targets


def dispatcher_end(executor: Executor, server: Server) -> Optional[ipaddress.IPv4Address]:
    """The tunnel's dispatcher end: the server's ``encapsource``, else the executor's ``nfa``."""
    return server.encapsource or executor.nfa


def make_target(config: Config, cluster: Cluster, port: Port, server: Server,
                options: Optional[dict] = None) -> SetupTarget:
    """The validated :class:`SetupTarget` for one ``cluster@port@server``."""
    method = forwarding_method(config.executor, server)
    dispatcher = dispatcher_end(config.executor, server) if method != "mac" else None
    target = SetupTarget(server=server, cluster=cluster.address, port=port.number, dispatcher=dispatcher,
                         options=check_options(options))
    return check_target(target)


@frozen
class Assignment:
    """What one server needs for one cluster: the setup is per (server, cluster, method), not per port."""

    server: Server
    cluster: Cluster
    ports: Tuple[int, ...]
    method: str
    port: Port  # the first port (its server entry decides the method)


def assignments(config: Config) -> List[Tuple[str, List[Assignment]]]:
    """Every server of the configuration with what it needs, grouped by server address, in config order.

    Ports of one cluster that give a server the same method (and tunnel end) need one setup, not one each.
    """
    groups: Dict[str, Dict[tuple, Assignment]] = {}
    for cluster in config.clusters:
        for port in cluster.ports:
            for server in port.servers:
                method = forwarding_method(config.executor, server)
                key = (str(cluster.address), method, str(dispatcher_end(config.executor, server)), server.grekey)
                per_server = groups.setdefault(str(server.address), {})
                if key in per_server:
                    found = per_server[key]
                    per_server[key] = Assignment(found.server, found.cluster, found.ports + (port.number,),
                                                 method, found.port)
                else:
                    per_server[key] = Assignment(server, cluster, (port.number,), method, port)
    return [(address, list(items.values())) for address, items in groups.items()]


# --------------------------------------------------------------------------------------- text helpers


def comment_block(lines: Sequence[str], prefix: str = "#") -> str:
    out = []
    for line in lines:
        for part in str(line).splitlines() or [""]:
            out.append(f"{prefix} {part}".rstrip())
    return "\n".join(out) + "\n"


def describe(method: str, target: SetupTarget) -> str:
    server = ip(target.server.address, "server address")
    cluster = ip(target.cluster, "cluster address")
    text = f"{method.upper()} forwarding of cluster {cluster} (port {number(target.port, 0, 65535, 'port')}) to server {server}"
    if target.dispatcher is not None:
        text += f"; tunnel from the dispatcher at {ipv4(target.dispatcher, 'dispatcher address')}"
    return text


def refuse_windows_tunnel() -> None:
    raise SetupRefused(WINDOWS_TUNNELS_REFUSED)


def refuse_persistent(os_name: str, target: SetupTarget) -> None:
    if target.options.get("persistent") and os_name != "linux":
        raise SetupRefused(f"--persistent is only available for linux; on {os_name} the printed commands "
                           "last until the next reboot (see docs/backend-setup.md)")


def need_ipv4_target(os_name: str, method: str, target: SetupTarget) -> None:
    for what, value in (("server", target.server.address), ("cluster", target.cluster)):
        if ipaddress.ip_address(str(value)).version != 4:
            raise SetupRefused(f"no {os_name} recipe for {method} with an IPv6 {what} address ({value}): "
                               "only IPv4 is supported here")


def need_option(os_name: str, target: SetupTarget, key: str, why: str) -> str:
    value = target.options.get(key)
    if value is None:
        flag = "--" + key.replace("_", "-")
        raise SetupRefused(f"the {os_name} recipe needs {flag} ADDRESS: {why}")
    return ipv4(value, key.replace("_", " "))


def need_dispatcher(os_name: str, target: SetupTarget) -> str:
    if target.dispatcher is None:
        raise SetupRefused(f"the {os_name} recipe needs the dispatcher's tunnel address: set the executor's nfa "
                           "or the server's encapsource")
    return ipv4(target.dispatcher, "dispatcher address")


# ------------------------------------------------------------------------------------------- Linux

#: The shell library every Linux script starts with. Each ``efw_*`` function records what it replaces
#: before changing it; the ``efw_undo_*`` functions put it back when the last user goes.
LINUX_LIBRARY = r'''set -eu
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
STATE=${ENCAPFWD_STATE_DIR:-/run/encapfwd}

# What a setup replaced is kept in $STATE/<setting>/orig, with one file per user in users/: the undo
# puts a setting back only when its last user goes (two clusters on one server share the sysctls).
efw_claim() {  # SETTING VALUE-BEFORE
    mkdir -p "$STATE/$1/users"
    [ -e "$STATE/$1/orig" ] || printf '%s\n' "$2" > "$STATE/$1/orig"
    : > "$STATE/$1/users/$OWNER"
}
efw_release() {  # SETTING: prints the value to restore when this was its last user, else fails
    [ -e "$STATE/$1/users/$OWNER" ] || return 1
    rm -f "$STATE/$1/users/$OWNER"
    [ -z "$(ls -A "$STATE/$1/users")" ] || return 1
    cat "$STATE/$1/orig"
    rm -rf "${STATE:?}/$1"
}
efw_sysctl() {  # NAME VALUE: sysctl -w NAME=VALUE
    efw_f=/proc/sys/$(echo "$1" | tr . /)
    efw_claim "sysctl.$1" "$(cat "$efw_f")"
    echo "$2" > "$efw_f"
}
efw_undo_sysctl() {  # NAME
    efw_f=/proc/sys/$(echo "$1" | tr . /)
    if efw_v=$(efw_release "sysctl.$1") && [ -e "$efw_f" ]; then echo "$efw_v" > "$efw_f"; fi
}
efw_module() {  # MODULE: modprobe MODULE
    if [ -d "/sys/module/$1" ]; then efw_claim "module.$1" loaded; else efw_claim "module.$1" absent; fi
    modprobe "$1"
}
efw_undo_module() {  # MODULE KIND...: modprobe -r MODULE, only when nothing but its fallback devices exists
    if [ "$(efw_release "module.$1" || :)" = absent ]; then
        efw_m=$1; shift
        for efw_k in "$@"; do
            if [ "$(ip -o link show type "$efw_k" | wc -l)" -gt 1 ]; then
                echo "encapfwd: other $efw_k tunnels exist: module $efw_m stays loaded" >&2
                return 0
            fi
        done
        modprobe -r "$efw_m" || echo "encapfwd: module $efw_m is in use and stays loaded" >&2
    fi
}
efw_up() {  # DEVICE: ip link set DEVICE up
    if [ ! -e "/sys/class/net/$1" ]; then
        echo "encapfwd: no device $1 (in a container, check sysctl net.core.fb_tunnels_only_for_init_net)" >&2
        exit 1
    fi
    if [ $(( $(cat "/sys/class/net/$1/flags") & 1 )) -eq 1 ]; then efw_claim "link.$1" up; else efw_claim "link.$1" down; fi
    ip link set dev "$1" up
}
efw_undo_up() {  # DEVICE
    if [ "$(efw_release "link.$1" || :)" = down ] && [ -e "/sys/class/net/$1" ]; then ip link set dev "$1" down; fi
}
efw_addr() {  # DEVICE ADDRESS/PREFIX: ip addr add ADDRESS/PREFIX dev DEVICE scope host
    if [ -n "$(ip -o addr show dev "$1" to "$2")" ]; then
        efw_claim "addr.$1.${2%/*}" present
    else
        efw_claim "addr.$1.${2%/*}" absent
        ip addr add "$2" dev "$1" scope host
    fi
}
efw_undo_addr() {  # DEVICE ADDRESS/PREFIX
    if [ "$(efw_release "addr.$1.${2%/*}" || :)" = absent ] && [ -e "/sys/class/net/$1" ] \
        && [ -n "$(ip -o addr show dev "$1" to "$2")" ]; then
        ip addr del "$2" dev "$1"
    fi
}
'''


@frozen
class LinuxPlan:
    """What one method needs on Linux; :func:`linux_script` turns it into a script.

    :param method: the forwarder name (``ipip``).
    :param device: where the VIP goes (``tunl0``, ``gre0``, ``lo``).
    :param module: the kernel module that provides *device*, or None (``lo``).
    :param module_kinds: link kinds whose fallback devices the module creates; the undo unloads the module only
        when no other device of these kinds exists (unloading would delete them).
    :param rp_filter: True when decapsulated packets arrive on *device*: reverse-path filtering is switched
        off there and for ``all`` (the kernel uses the larger of the two).
    """

    method: str
    device: str
    module: Optional[str] = None
    module_kinds: Tuple[str, ...] = ()
    rp_filter: bool = False


def _linux_steps(plan: LinuxPlan, vip: str) -> List[Tuple[str, str, str]]:
    """(setup line, undo line, plain command) in setup order."""
    dev = ifname(plan.device, "device")
    if "." in dev:
        raise ConfigError(f"device {dev!r}: a dot would make its sysctl names ambiguous")
    v6 = ipaddress.ip_address(vip).version == 6
    prefix = f"{vip}/{128 if v6 else 32}"
    steps = []
    if plan.module:
        mod = ifname(plan.module, "module name")
        kinds = " ".join(quote(ifname(k, "link kind")) for k in plan.module_kinds)
        steps.append((f"efw_module {quote(mod)}", f"efw_undo_module {quote(mod)} {kinds}".rstrip(),
                      f"modprobe {mod}"))
    steps.append((f"efw_up {quote(dev)}", f"efw_undo_up {quote(dev)}", f"ip link set {dev} up"))
    steps.append((f"efw_addr {quote(dev)} {quote(prefix)}", f"efw_undo_addr {quote(dev)} {quote(prefix)}",
                  f"ip addr add {prefix} dev {dev} scope host"))
    for name, value in linux_sysctls(plan, vip):
        steps.append((f"efw_sysctl {quote(name)} {value}", f"efw_undo_sysctl {quote(name)}",
                      f"sysctl -w {name}={value}"))
    return steps


def linux_sysctls(plan: LinuxPlan, vip: str) -> List[Tuple[str, int]]:
    """The sysctls a Linux back-end needs, in order (IPv4 only: IPv6 has no ARP to silence)."""
    if ipaddress.ip_address(vip).version == 6:
        return []
    out = [("net.ipv4.conf.all.arp_ignore", 3), ("net.ipv4.conf.all.arp_announce", 2)]
    if plan.rp_filter:
        out += [("net.ipv4.conf.all.rp_filter", 0), (f"net.ipv4.conf.{plan.device}.rp_filter", 0)]
    return out


def linux_owner(plan: LinuxPlan, vip: str) -> str:
    return f"{plan.method}-{vip.replace(':', '_')}"


def _command_for(target_text: str, undo: bool, persistent: bool) -> str:
    words = [f"encapfwd backend-setup {target_text} --os linux"]
    if persistent:
        words.append("--persistent")
    if undo:
        words.append("--undo")
    return " ".join(words)


def linux_script(plan: LinuxPlan, target: SetupTarget, undo: bool) -> str:
    """The one-shot (or, with ``options["persistent"]``, the boot-persistent) Linux script."""
    check_target(target)
    if target.options.get("persistent"):
        return linux_persistent(plan, target, undo)
    vip = ip(target.cluster, "cluster address")
    steps = _linux_steps(plan, vip)
    name = f"{vip}@{target.port}@{ip(target.server.address, 'server address')}"
    head = [
        "encapfwd back-end " + ("undo" if undo else "setup") + " for Linux",
        describe(plan.method, target),
    ]
    if undo:
        head += ["Removes exactly what the setup added (recorded under $ENCAPFWD_STATE_DIR, default /run/encapfwd);",
                 "settings shared with another cluster's setup stay until the last one is undone."]
    else:
        head += ["Idempotent: running it again changes nothing. Undo: " + _command_for(name, True, False),
                 "Plain commands, for reading (the functions below also record what they replace):"]
        head += ["  " + plain for _, _, plain in steps]
    body = [f"OWNER={quote(linux_owner(plan, vip))}"]
    if undo:
        body += [u for _, u, _ in reversed(steps)]
        body.append(f"echo {quote(f'encapfwd: {plan.method} setup for {vip} removed')}")
    else:
        body += [s for s, _, _ in steps]
        body.append(f"echo {quote(f'encapfwd: this server accepts {vip} on {plan.device} ({plan.method})')}")
    return "#!/bin/sh\n" + comment_block(head) + LINUX_LIBRARY + "\n".join(body) + "\n"


def linux_unit_name(plan: LinuxPlan, vip: str) -> str:
    return f"encapfwd-{linux_owner(plan, vip)}"


def linux_persistent_files(plan: LinuxPlan, target: SetupTarget) -> List[Tuple[str, str]]:
    """(path, content) of the files that redo the setup at every boot."""
    vip = ip(target.cluster, "cluster address")
    base = linux_unit_name(plan, vip)
    dev = plan.device
    v6 = ipaddress.ip_address(vip).version == 6
    prefix = f"{vip}/{128 if v6 else 32}"
    files = []
    if plan.module:
        files.append((f"/etc/modules-load.d/{base}.conf",
                      f"# encapfwd: {describe(plan.method, target)}\n{plan.module}\n"))
    sysctls = linux_sysctls(plan, vip)
    if sysctls:
        lines = [f"# encapfwd: {describe(plan.method, target)}"]
        lines += [f"{name} = {value}" for name, value in sysctls]
        files.append((f"/etc/sysctl.d/90-{base}.conf", "\n".join(lines) + "\n"))
    exec_start = []
    if plan.module:
        exec_start.append(f"ExecStart=modprobe {plan.module}")
    exec_start.append(f"ExecStart=ip link set dev {dev} up")
    exec_start.append(f"ExecStart=ip addr replace {prefix} dev {dev} scope host")
    for name, value in sysctls:
        if not name.startswith("net.ipv4.conf.all."):
            # a device that appears with its module may miss systemd-sysctl's pass: set it here too
            exec_start.append(f"ExecStart=sysctl -q -w {name}={value}")
    unit = "\n".join([
        f"# encapfwd: {describe(plan.method, target)}",
        "# Written by encapfwd backend-setup --persistent; see encapfwd's docs/backend-setup.md",
        "[Unit]",
        f"Description=encapfwd back-end: accept {vip} on {dev} ({plan.method})",
        "After=systemd-modules-load.service systemd-sysctl.service network-pre.target",
        "Before=network.target",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        *exec_start,
        f"ExecStop=-ip addr del {prefix} dev {dev}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
    files.append((f"/etc/systemd/system/{base}.service", unit))
    return files


def linux_persistent(plan: LinuxPlan, target: SetupTarget, undo: bool) -> str:
    """Setup now (the one-shot script, with its undo record) plus boot files; or remove both."""
    vip = ip(target.cluster, "cluster address")
    files = linux_persistent_files(plan, target)
    unit = linux_unit_name(plan, vip) + ".service"
    name = f"{vip}@{target.port}@{ip(target.server.address, 'server address')}"
    oneshot = linux_script(plan, _without_persistent(target), undo)
    # drop the one-shot's shebang and header: this script has its own
    body = oneshot[oneshot.index(LINUX_LIBRARY):]
    head = [
        "encapfwd back-end " + ("undo" if undo else "setup") + " for Linux, persistent",
        describe(plan.method, target),
    ]
    if undo:
        head += ["Disables and removes the boot files, then undoes the running setup. Settings made at boot by",
                 "the sysctl.d file (after a reboot) keep their values until the next reboot."]
    else:
        head += ["Applies the setup now and installs files that redo it at every boot:"]
        head += ["  " + path for path, _ in files]
        head += ["Idempotent. Undo: " + _command_for(name, True, True)]
    out = ["#!/bin/sh", comment_block(head).rstrip("\n")]
    if undo:
        out += [
            "if [ -d /run/systemd/system ]; then",
            f"    systemctl disable --now {quote(unit)} 2>/dev/null || :",
            "elif command -v systemctl >/dev/null 2>&1; then",
            f"    systemctl disable {quote(unit)} 2>/dev/null || :",
            "fi",
        ]
        out += [f"rm -f {quote(path)}" for path, _ in files]
        out += ["if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi", body.rstrip("\n")]
    else:
        out.append(body.rstrip("\n"))
        for path, content in files:
            directory = path.rsplit("/", 1)[0]
            out.append(f"mkdir -p {quote(directory)}")
            out.append(f"cat > {quote(path)} <<'ENCAPFWD_EOF'\n{content}ENCAPFWD_EOF")
        out += [
            "if [ -d /run/systemd/system ]; then",
            "    systemctl daemon-reload",
            f"    systemctl enable --now {quote(unit)}",
            "elif command -v systemctl >/dev/null 2>&1; then",
            f"    systemctl enable {quote(unit)}",
            "else",
            f"    echo {quote(f'encapfwd: systemd not found: run the ExecStart lines of {unit} at boot')} >&2",
            "fi",
        ]
    return "\n".join(out) + "\n"


def _without_persistent(target: SetupTarget) -> SetupTarget:
    options = dict(target.options)
    options.pop("persistent", None)
    return SetupTarget(server=target.server, cluster=target.cluster, port=target.port,
                       dispatcher=target.dispatcher, options=options)


__all__ = [
    "Assignment",
    "LINUX_LIBRARY",
    "LinuxPlan",
    "OPTION_HELP",
    "WINDOWS_TUNNELS_REFUSED",
    "assignments",
    "check_options",
    "check_os",
    "check_target",
    "comment_block",
    "describe",
    "dispatcher_end",
    "forwarder_name",
    "ifname",
    "ip",
    "ipv4",
    "linux_persistent",
    "linux_persistent_files",
    "linux_script",
    "make_target",
    "need_dispatcher",
    "need_ipv4_target",
    "need_option",
    "number",
    "quote",
    "refuse_persistent",
    "refuse_windows_tunnel",
    "windows_name",
]
