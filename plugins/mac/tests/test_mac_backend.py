"""Unit tests of the MAC forwarding back-end setup generators (core + encapfwd-mac only; no root needed).

The generated Linux scripts are run in a namespace's kernel by tests/test_backend_mac_netns.py; here:
content, quoting, hostile input, undo, every operating system, and a shell syntax check.
"""


import pytest
from encapfwd.errors import ConfigError, SetupRefused
from encapfwd.hookspecs import SetupTarget
from encapfwd.model import Server
from encapfwd.testing import assert_shell_syntax as syntax_ok
from encapfwd_mac.backend import script

VIP = "203.0.113.80"
SERVER = "192.0.2.10"


def target(cluster=VIP, server=SERVER, **options):
    return SetupTarget(server=Server(address=server), cluster=cluster, port=80, dispatcher=None, options=options)




def test_linux_setup(tmp_path):
    text = script("linux", target(), False)
    body = text[text.index("OWNER="):].splitlines()
    assert body[:5] == [
        f"OWNER=mac-{VIP}",
        "efw_up lo",
        f"efw_addr lo {VIP}/32",
        "efw_sysctl net.ipv4.conf.all.arp_ignore 3",
        "efw_sysctl net.ipv4.conf.all.arp_announce 2",
    ]
    assert "rp_filter" not in text[text.index("OWNER="):]  # packets arrive where the route back goes
    assert "modprobe" not in text[text.index("OWNER="):]
    syntax_ok(text, tmp_path / "setup.sh")
    syntax_ok(script("linux", target(), True), tmp_path / "undo.sh")


def test_linux_ipv6():
    text = script("linux", target(cluster="2001:db8:80::80", server="2001:db8::10"), False)
    body = text[text.index("OWNER="):].splitlines()
    assert body[:3] == ["OWNER=mac-2001_db8_80__80", "efw_up lo", "efw_addr lo 2001:db8:80::80/128"]
    assert "arp_ignore" not in text[text.index("OWNER="):]


def test_linux_persistent(tmp_path):
    text = script("linux", target(persistent=True), False)
    assert "modules-load.d" not in text
    assert f"ExecStart=ip addr replace {VIP}/32 dev lo scope host" in text
    assert f"ExecStop=-ip addr del {VIP}/32 dev lo" in text
    syntax_ok(text, tmp_path / "p.sh")
    syntax_ok(script("linux", target(persistent=True), True), tmp_path / "pu.sh")


@pytest.mark.parametrize("os_name", ["linux", "aix", "solaris", "windows"])
@pytest.mark.parametrize("bad", ["1.2.3.4; rm -rf /", "$(reboot)", "1.2.3.4 && reboot", "fe80::1%eth0"])
def test_hostile_cluster_rejected(os_name, bad):
    with pytest.raises(ConfigError):
        script(os_name, target(cluster=bad), False)


def test_aix_and_solaris(tmp_path):
    aix = script("aix", target(), False)
    assert aix.splitlines()[-1] == f"ifconfig lo0 alias {VIP} netmask 255.255.255.255"
    assert script("aix", target(), True).splitlines()[-1] == f"ifconfig lo0 delete {VIP}"
    solaris = script("solaris", target(), False)
    assert solaris.splitlines()[-1] == f"/sbin/ifconfig lo0:1 plumb {VIP} netmask 255.255.255.255 up"
    assert script("solaris", target(), True).splitlines()[-1] == "/sbin/ifconfig lo0:1 unplumb"
    for text in (aix, solaris):
        syntax_ok(text, tmp_path / "x.sh")
    with pytest.raises(SetupRefused, match="IPv6"):
        script("aix", target(cluster="2001:db8:80::80", server="2001:db8::10"), False)


def test_windows_loopback_steps():
    text = script("windows", target(loopback_adapter="LB 1", nic="Ethernet 2"), False)
    lines = text.split("\r\n")
    assert f'netsh interface ipv4 add address "LB 1" {VIP} 255.255.255.255' in lines
    assert 'netsh interface ipv4 set interface "LB 1" weakhostreceive=enabled weakhostsend=enabled' in lines
    assert 'netsh interface ipv4 set interface "Ethernet 2" weakhostreceive=enabled' in lines
    assert all(line.startswith(("rem", "netsh")) for line in lines if line)
    undo = script("windows", target(), True)
    assert f'netsh interface ipv4 delete address "Loopback" {VIP}' in undo


@pytest.mark.parametrize("bad", ['Loopback" & del /q c:\\', "a|b", "x%PATH%", "^", " lead", "a\nb"])
def test_windows_hostile_names(bad):
    with pytest.raises(ConfigError):
        script("windows", target(loopback_adapter=bad), False)
    with pytest.raises(ConfigError):
        script("windows", target(nic=bad), False)


def test_hook_routes_only_mac():
    from encapfwd.plugins import get_plugin_manager

    registry = get_plugin_manager()
    assert "efw_addr lo" in registry.hook.encapfwd_backend_setup(forwarder="mac", os="linux", target=target(),
                                                                 undo=False)
