"""Unit tests of the GRE back-end setup generators (core + encapfwd-gre only; no root needed).

The generated Linux scripts are run on a real kernel by tests/test_backend_uml.py; here: content, quoting,
hostile input, undo, refusals, and a shell syntax check (dash -n, bash -n, shellcheck when installed).
"""

import ipaddress

import pytest
from encapfwd.errors import ConfigError, SetupRefused
from encapfwd.hookspecs import SetupTarget
from encapfwd.model import Server
from encapfwd.testing import assert_shell_syntax as syntax_ok
from encapfwd_gre.backend import script

VIP = "203.0.113.80"
SERVER = "192.0.2.10"
DISPATCHER = "192.0.2.1"


def target(cluster=VIP, dispatcher=DISPATCHER, grekey=None, **options):
    return SetupTarget(server=Server(address=SERVER, encapforward=True, encaptype="gre", grekey=grekey),
                       cluster=cluster, port=80,
                       dispatcher=ipaddress.ip_address(dispatcher) if dispatcher else None, options=options)




@pytest.mark.parametrize("grekey", [None, 7])
def test_linux_setup(tmp_path, grekey):
    text = script("linux", target(grekey=grekey), False)
    body = text[text.index("OWNER="):].splitlines()
    assert body[:8] == [
        f"OWNER=gre-{VIP}",
        "efw_module ip_gre",  # not the seed's "ipgre": no such Linux module
        "efw_up gre0",
        f"efw_addr gre0 {VIP}/32",
        "efw_sysctl net.ipv4.conf.all.arp_ignore 3",
        "efw_sysctl net.ipv4.conf.all.arp_announce 2",
        "efw_sysctl net.ipv4.conf.all.rp_filter 0",
        "efw_sysctl net.ipv4.conf.gre0.rp_filter 0",
    ]
    assert "ipgre" not in text
    assert "#   modprobe ip_gre\n" in text
    syntax_ok(text, tmp_path / "setup.sh")


def test_linux_undo(tmp_path):
    text = script("linux", target(), True)
    body = text[text.index("OWNER="):].splitlines()
    assert body[5:8] == [f"efw_undo_addr gre0 {VIP}/32", "efw_undo_up gre0", "efw_undo_module ip_gre gre gretap erspan"]
    syntax_ok(text, tmp_path / "undo.sh")


def test_linux_persistent(tmp_path):
    text = script("linux", target(persistent=True), False)
    assert "ExecStart=modprobe ip_gre" in text and "ExecStart=sysctl -q -w net.ipv4.conf.gre0.rp_filter=0" in text
    syntax_ok(text, tmp_path / "p.sh")


@pytest.mark.parametrize("bad", ["1.2.3.4; rm -rf /", "$(reboot)", "1.2.3.4\n", "::1]"])
def test_hostile_cluster_rejected(bad):
    with pytest.raises(ConfigError):
        script("linux", target(cluster=bad), False)


def test_hostile_tunnel_address_rejected():
    with pytest.raises(ConfigError):
        script("aix", target(tunnel_address="1.2.3.4; rm -rf /"), False)


def test_windows_refused():
    with pytest.raises(SetupRefused) as info:
        script("windows", target(), False)
    assert str(info.value) == "Tunneling is not supported on Windows operating systems"


def test_solaris_refused():
    with pytest.raises(SetupRefused, match="no GRE recipe for Solaris"):
        script("solaris", target(tunnel_address="192.0.2.77", tunnel_peer="192.0.2.78"), False)


def test_aix_recipe(tmp_path):
    text = script("aix", target(tunnel_address="192.0.2.77"), False)
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        f"ifconfig gre0 tunnel {SERVER} {DISPATCHER}",
        "ifconfig gre0 inet 192.0.2.77",
        f"ifconfig lo0 alias {VIP} netmask 255.255.255.255",
    ]
    syntax_ok(text, tmp_path / "aix.sh")
    undo = script("aix", target(tunnel_address="192.0.2.77"), True)
    assert [line for line in undo.splitlines() if not line.startswith("#")] == [
        f"ifconfig lo0 delete {VIP}", "ifconfig gre0 down", "ifconfig gre0 detach"]


def test_aix_refusals():
    with pytest.raises(SetupRefused, match="--tunnel-address"):
        script("aix", target(), False)
    with pytest.raises(SetupRefused, match="nfa"):
        script("aix", target(dispatcher=None, tunnel_address="192.0.2.77"), False)
    with pytest.raises(SetupRefused, match="GRE key"):
        script("aix", target(grekey=5, tunnel_address="192.0.2.77"), False)
    with pytest.raises(SetupRefused, match="only available for linux"):
        script("aix", target(persistent=True, tunnel_address="192.0.2.77"), False)


def test_hook_routes_only_gre():
    from encapfwd.plugins import get_plugin_manager

    registry = get_plugin_manager()
    assert "efw_module ip_gre" in registry.hook.encapfwd_backend_setup(forwarder="gre", os="linux", target=target(),
                                                                       undo=False)
