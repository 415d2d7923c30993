"""Unit tests of the IPIP back-end setup generators (core + encapfwd-ipip only; no root needed).

The generated Linux scripts are run on a real kernel by tests/test_backend_uml.py; here: content, quoting,
hostile input, undo, refusals, and a shell syntax check (dash -n, bash -n, shellcheck when installed).
"""

import ipaddress
import shutil
import subprocess

import pytest
from encapfwd.errors import ConfigError, SetupRefused
from encapfwd.hookspecs import SetupTarget
from encapfwd.model import Server
from encapfwd.testing import assert_shell_syntax as syntax_ok
from encapfwd_ipip.backend import script

VIP = "203.0.113.80"
SERVER = "192.0.2.10"
DISPATCHER = "192.0.2.1"


def target(cluster=VIP, server=SERVER, dispatcher=DISPATCHER, **options):
    return SetupTarget(server=Server(address=server, encapforward=True, encaptype="ipip"),
                       cluster=cluster,  # a string on purpose: the generators validate it themselves
                       port=80, dispatcher=ipaddress.ip_address(dispatcher) if dispatcher else None, options=options)




def test_linux_setup(tmp_path):
    text = script("linux", target(), False)
    assert text.startswith("#!/bin/sh\n")
    body = text[text.index("OWNER="):]
    assert body.splitlines()[:8] == [
        f"OWNER=ipip-{VIP}",
        "efw_module ipip",
        "efw_up tunl0",
        f"efw_addr tunl0 {VIP}/32",
        "efw_sysctl net.ipv4.conf.all.arp_ignore 3",
        "efw_sysctl net.ipv4.conf.all.arp_announce 2",
        "efw_sysctl net.ipv4.conf.all.rp_filter 0",
        "efw_sysctl net.ipv4.conf.tunl0.rp_filter 0",
    ]
    # the plain commands, for reading
    for line in ("modprobe ipip", "ip link set tunl0 up", f"ip addr add {VIP}/32 dev tunl0 scope host",
                 "sysctl -w net.ipv4.conf.tunl0.rp_filter=0"):
        assert f"#   {line}\n" in text
    assert "set -eu" in text
    syntax_ok(text, tmp_path / "setup.sh")


def test_linux_undo_reverses(tmp_path):
    text = script("linux", target(), True)
    body = text[text.index("OWNER="):].splitlines()
    assert body[1:8] == [
        "efw_undo_sysctl net.ipv4.conf.tunl0.rp_filter",
        "efw_undo_sysctl net.ipv4.conf.all.rp_filter",
        "efw_undo_sysctl net.ipv4.conf.all.arp_announce",
        "efw_undo_sysctl net.ipv4.conf.all.arp_ignore",
        f"efw_undo_addr tunl0 {VIP}/32",
        "efw_undo_up tunl0",
        "efw_undo_module ipip ipip",
    ]
    syntax_ok(text, tmp_path / "undo.sh")


def test_linux_persistent(tmp_path):
    text = script("linux", target(persistent=True), False)
    assert f"/etc/modules-load.d/encapfwd-ipip-{VIP}.conf" in text
    assert f"/etc/sysctl.d/90-encapfwd-ipip-{VIP}.conf" in text
    assert f"ExecStart=ip addr replace {VIP}/32 dev tunl0 scope host" in text
    assert "ExecStart=modprobe ipip" in text
    assert f"systemctl enable --now encapfwd-ipip-{VIP}.service" in text
    syntax_ok(text, tmp_path / "persistent.sh")
    undo = script("linux", target(persistent=True), True)
    assert f"rm -f /etc/systemd/system/encapfwd-ipip-{VIP}.service" in undo
    syntax_ok(undo, tmp_path / "persistent-undo.sh")


@pytest.mark.parametrize("bad", ["1.2.3.4; rm -rf /", "$(reboot)", "10.0.0.1\nreboot", "`id`", "1.2.3.4 ", ""])
def test_hostile_cluster_rejected(bad):
    with pytest.raises(ConfigError) as info:
        script("linux", target(cluster=bad), False)
    assert "IP address" in str(info.value)


@pytest.mark.parametrize("key", ["tunnel_address", "tunnel_peer"])
def test_hostile_option_rejected(key):
    with pytest.raises(ConfigError):
        script("solaris", target(**{key: "9.9.9.9; rm -rf /"}), False)


def test_unknown_option_rejected():
    with pytest.raises(ConfigError):
        script("linux", target(evil="x"), False)


def test_windows_refused():
    with pytest.raises(SetupRefused) as info:
        script("windows", target(), False)
    assert str(info.value) == "Tunneling is not supported on Windows operating systems"


def test_aix_refused_with_reason():
    with pytest.raises(SetupRefused) as info:
        script("aix", target(tunnel_address="192.0.2.77"), False)
    assert "encaptype gre" in str(info.value)


def test_solaris_recipe_corrected(tmp_path):
    text = script("solaris", target(tunnel_address="192.0.2.77", tunnel_peer="192.0.2.78"), False)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "/sbin/ifconfig ip.tun0 plumb 192.0.2.77 netmask 255.255.255.255 up",
        "/sbin/ifconfig ip.tun0 192.0.2.77 192.0.2.78 up",
        f"/sbin/ifconfig ip.tun0 tsrc {SERVER} tdst {DISPATCHER} up",
        f"/sbin/ifconfig lo0:1 plumb {VIP} netmask 255.255.255.255 up",
    ]
    syntax_ok(text, tmp_path / "solaris.sh")
    undo = script("solaris", target(tunnel_address="192.0.2.77", tunnel_peer="192.0.2.78"), True)
    assert [line for line in undo.splitlines() if not line.startswith("#")] == [
        "/sbin/ifconfig lo0:1 unplumb", "/sbin/ifconfig ip.tun0 unplumb"]


def test_solaris_needs_addresses():
    with pytest.raises(SetupRefused, match="--tunnel-address"):
        script("solaris", target(), False)
    with pytest.raises(SetupRefused, match="--tunnel-peer"):
        script("solaris", target(tunnel_address="192.0.2.77"), False)
    with pytest.raises(SetupRefused, match="nfa"):
        script("solaris", target(dispatcher=None, tunnel_address="192.0.2.77", tunnel_peer="192.0.2.78"), False)


def test_persistent_only_linux():
    with pytest.raises(SetupRefused, match="only available for linux"):
        script("solaris", target(persistent=True, tunnel_address="192.0.2.77", tunnel_peer="192.0.2.78"), False)


def test_unknown_os():
    with pytest.raises(ConfigError):
        script("plan9", target(), False)


def test_hook_routes_only_ipip():
    from encapfwd.plugins import get_plugin_manager

    registry = get_plugin_manager()
    out = registry.hook.encapfwd_backend_setup(forwarder="ipip", os="linux", target=target(), undo=False)
    assert "efw_module ipip" in out
    assert registry.hook.encapfwd_backend_setup(forwarder="nonesuch", os="linux", target=target(), undo=False) is None


def test_cli(tmp_path):
    from click.testing import CliRunner
    from encapfwd.cli import cli

    config = tmp_path / "c.toml"
    config.write_text(f'[executor]\nnfa = "{DISPATCHER}"\n[[clusters]]\naddress = "{VIP}"\n[[clusters.ports]]\n'
                      f'number = 80\n[[clusters.ports.servers]]\naddress = "{SERVER}"\nencapforward = true\n'
                      'encaptype = "ipip"\n[[clusters.ports]]\nnumber = 443\n[[clusters.ports.servers]]\n'
                      f'address = "{SERVER}"\nencapforward = true\nencaptype = "ipip"\n')
    run = CliRunner().invoke
    one = run(cli, ["--config", str(config), "backend-setup", f"{VIP}@80@{SERVER}", "--os", "linux"])
    assert one.exit_code == 0 and "efw_module ipip" in one.output
    grouped = run(cli, ["--config", str(config), "backend-setup", "--os", "linux"])
    assert grouped.exit_code == 0
    assert grouped.output.count("efw_module ipip") == 1  # two ports, one setup
    assert "port(s) 80,443" in grouped.output
    hostile = run(cli, ["--config", str(config), "backend-setup", "1.2.3.4;reboot@80@1.1.1.1", "--os", "linux"])
    assert hostile.exit_code != 0 and "reboot" not in hostile.output
    assert isinstance(hostile.exception, ConfigError)
    bad = run(cli, ["--config", str(config), "backend-setup", f"{VIP}@80@{SERVER}", "--os", "solaris",
                    "--tunnel-address", "1.2.3.4; rm -rf /", "--tunnel-peer", "192.0.2.78"])
    assert bad.exit_code == 1 and "ifconfig" not in bad.output and isinstance(bad.exception, ConfigError)
    windows = run(cli, ["--config", str(config), "backend-setup", f"{VIP}@80@{SERVER}", "--os", "windows"])
    assert windows.exit_code == 1
    assert str(windows.exception) == "Tunneling is not supported on Windows operating systems"


def test_hostile_value_never_echoed():
    for bad in ("1.2.3.4; rm -rf /", "$(reboot)"):
        with pytest.raises(ConfigError) as info:
            script("linux", target(cluster=bad), False)
        assert "rm -rf" not in str(info.value) and "reboot" not in str(info.value)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_persistent_unit_verifies(tmp_path):
    import re

    text = script("linux", target(persistent=True), False)
    files = dict(re.findall(r"cat > (\S+) <<'ENCAPFWD_EOF'\n(.*?)ENCAPFWD_EOF\n", text, re.S))
    unit_path = f"/etc/systemd/system/encapfwd-ipip-{VIP}.service"
    assert set(files) == {unit_path, f"/etc/modules-load.d/encapfwd-ipip-{VIP}.conf",
                          f"/etc/sysctl.d/90-encapfwd-ipip-{VIP}.conf"}
    unit = tmp_path / unit_path.rsplit("/", 1)[1]
    unit.write_text(files[unit_path])
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
