"""The dscontrol grammar through the real console script: what users type, what lands in the file."""

import json
import os

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


def build(cli):
    cli("executor", "set", "nfa", "10.0.2.1", "mac", "02:00:00:00:00:01", "networks", "10.0.2.0/24",
        "gateway", "10.0.2.254", "gatewaymac", "02:00:00:00:00:fe", check=0)
    cli("cluster", "add", "10.0.9.9", check=0)
    cli("port", "add", "10.0.9.9@80", check=0)
    cli("server", "add", "10.0.9.9@80@10.0.2.10", "weight", "5", "mac", "02:00:00:00:00:10", check=0)
    cli("server", "add", "10.0.9.9@80@10.0.3.10", "encapforward", "yes", "encaptype", "gre",
        "encapcond", "auto", check=0)


def test_whole_grammar_lands_in_toml(cli):
    build(cli)
    cli("server", "set", "10.0.9.9@80@10.0.3.10", "encapforward", "yes", "encaptype", "ipip",
        "encapcond", "always", check=0)
    cli("port", "set", "10.0.9.9@80", "selectionalgorithm", "wrr", "stickytime", "60", check=0)
    cli("executor", "set", "mtu", "9000", "encapttl", "32", "maxflows", "1000", check=0)
    cli("server", "add", "10.0.9.9@80@10.0.3.11+10.0.3.12", "encapforward", "yes", "encaptype", "gre",
        "grekey", "42", check=0)
    data = tomllib.loads(cli.config.read_text())
    assert data["executor"] == {
        "nfa": "10.0.2.1", "mac": "02:00:00:00:00:01", "networks": ["10.0.2.0/24"],
        "gateway": "10.0.2.254", "gatewaymac": "02:00:00:00:00:fe", "mtu": 9000, "encapttl": 32,
        "maxflows": 1000}
    port = data["clusters"][0]["ports"][0]
    assert port["selectionalgorithm"] == "wrr" and port["stickytime"] == 60
    servers = {s["address"]: s for s in port["servers"]}
    assert servers["10.0.3.10"].get("encaptype", "ipip") == "ipip" and servers["10.0.3.10"].get("encapcond", "always") == "always"
    assert servers["10.0.3.12"]["grekey"] == 42
    assert servers["10.0.2.10"]["weight"] == 5

    report = json.loads(cli("server", "report", "--json", check=0).stdout)
    methods = {row["server"]: row["method"] for row in report["servers"]}
    assert methods == {"10.0.9.9@80@10.0.2.10": "mac", "10.0.9.9@80@10.0.3.10": "ipip",
                       "10.0.9.9@80@10.0.3.11": "gre", "10.0.9.9@80@10.0.3.12": "gre"}

    cli("server", "down", "10.0.9.9@80@10.0.3.11", check=0)
    cli("server", "set", "10.0.9.9@80@10.0.3.12", "weight", "0", check=0)
    rows = {r["server"]: r["status"] for r in json.loads(cli("server", "report", "--json", check=0).stdout)["servers"]}
    assert rows["10.0.9.9@80@10.0.3.11"] == "down" and rows["10.0.9.9@80@10.0.3.12"] == "quiesced"
    cli("server", "up", "10.0.9.9@80@10.0.3.11", check=0)
    cli("server", "remove", "10.0.9.9@80@10.0.3.12", check=0)
    cli("port", "remove", "10.0.9.9@80", check=0)
    cli("cluster", "remove", "10.0.9.9", check=0)
    assert tomllib.loads(cli.config.read_text())["clusters"] == []


def test_encapcond_auto_resolves_by_attached_networks(cli):
    build(cli)
    cli("server", "add", "10.0.9.9@80@10.0.2.20", "mac", "02:00:00:00:00:20", "encapforward", "yes",
        "encapcond", "auto", check=0)
    rows = {r["server"]: r["method"] for r in json.loads(cli("server", "report", "--json", check=0).stdout)["servers"]}
    assert rows["10.0.9.9@80@10.0.2.20"] == "mac"  # on 10.0.2.0/24: MAC-forwarded
    assert rows["10.0.9.9@80@10.0.3.10"] == "gre"  # elsewhere: encapsulated


def test_ipv6_cluster_with_mac_forwarding_is_fine(cli):
    cli("cluster", "add", "2001:db8::9", check=0)
    cli("port", "add", "2001:db8::9@443", check=0)
    cli("server", "add", "2001:db8::9@443@2001:db8::10", "mac", "02:00:00:00:00:10", check=0)


ERRORS = [
    (("server", "add", "10.0.9.9@80@2001:db8::1", "encapforward", "yes"), "encapsulation forwarding is only valid for IPv4"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "encapforward", "yes", "encaptype", "vxlan"), "install the distribution"),
    (("server", "add", "10.0.9.9@81@10.0.2.11"), "port 10.0.9.9@81 does not exist"),
    (("server", "add", "10.0.9.9@80@10.0.2.300"), "invalid IP address"),
    (("server", "add", "10.0.9.9@80"), "expected CLUSTER@PORT@SERVER"),
    (("server", "add", "10.0.9.9@http@10.0.2.11"), "invalid port"),
    (("port", "add", "10.0.9.9@70000"), "port must be between 0 and 65535"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "colour", "blue"), "unknown server keyword"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "weight"), "needs a value"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "weight", "heavy"), "weight must be a whole number"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "mac", "02:00:00:00:00"), "invalid MAC address"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "encapforward", "maybe"), "expected yes or no"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "encapcond", "sometimes"), "encapcond must be one of"),
    (("server", "add", "10.0.9.9@80@10.0.2.10"), "already exists"),
    (("server", "remove", "10.0.9.9@80@10.0.2.99"), "does not exist"),
    (("port", "add", "10.9.9.9@80"), "cluster 10.9.9.9 does not exist"),
    (("port", "set", "10.0.9.9@80", "selectionalgorithm", "random"), "unknown selectionalgorithm"),
    (("executor", "set", "networks", "10.0.2.0/33"), "invalid network"),
    (("executor", "set", "nfa", "2001:db8::1"), "not an IPv4 address"),
    (("cluster", "add", "10.0.9.9"), "already exists"),
    (("server", "set", "10.0.9.9@80@10.0.2.10", "grekey", "5"), "grekey is only valid with encaptype gre"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[" ".join(a[:2]) + ":" + m[:20] for a, m in ERRORS])
def test_errors_are_one_line_and_leave_the_file_untouched(cli, args, message):
    build(cli)
    before = cli.config.read_bytes()
    stat = os.stat(cli.config)
    proc = cli(*args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("encapfwd: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert cli.config.read_bytes() == before and os.stat(cli.config).st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in cli.config.parent.iterdir()) == ["encapfwd.toml"]  # no temp files


def test_missing_encaptype_plugin_names_distribution(cli):
    build(cli)
    proc = cli("server", "set", "10.0.9.9@80@10.0.2.10", "encapforward", "yes", "encaptype", "gre",
               env={"ENCAPFWD_PLUGINS": "encapfwd-mac,encapfwd-ipip"})
    assert proc.returncode == 1 and "install the encapfwd-gre distribution" in proc.stderr


def test_corrupt_config_is_one_line_error(cli):
    cli.config.write_text("[executor\nnfa = 1\n")
    proc = cli("server", "report")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "invalid TOML" in proc.stderr
    assert cli.config.read_text() == "[executor\nnfa = 1\n"


def test_config_path_from_environment(tmp_path):
    from conftest import run_cli

    path = tmp_path / "elsewhere.toml"
    run_cli("cluster", "add", "10.0.9.9", env={"ENCAPFWD_CONFIG": str(path)}, cwd=tmp_path, check=0)
    assert 'address = "10.0.9.9"' in path.read_text()
    assert not (tmp_path / "encapfwd.toml").exists()


def test_save_keeps_permissions_and_is_atomic(tmp_path):
    from encapfwd import config as cfg

    path = tmp_path / "c.toml"
    cfg.save(path, cfg.cluster_add(cfg.Config(), ["10.0.9.9"]))
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
    cfg.save(path, cfg.cluster_add(cfg.load(path), ["10.0.9.10"]))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path).st_ino != inode  # replaced by rename, never rewritten in place
    assert len(cfg.load(path).clusters) == 2
