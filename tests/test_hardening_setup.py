"""Hardening of ``encapfwd backend-setup`` against values that would escape into the printed script.

An IPv6 address may carry a zone ID, and Python's ``ipaddress`` lets a zone ID hold a newline, ``;``, quotes,
``$()`` and backticks. The configuration grammar now refuses zone IDs; these tests also plant such an address
behind the converters' back, in a server and in a cluster, and require that ``backend-setup`` prints nothing
at all (not even its grouping comments) when any value of its output fails validation, so what reaches a
``| sh`` pipe can never run anything.
"""

import ipaddress
import subprocess

import pytest
from encapfwd import cli as cli_module
from encapfwd import config as cfg
from encapfwd.model import Cluster, Config, Executor, Port, Server

MARKER = "encapfwd-pwned"
HOSTILE = f"fe80::1%x\ntouch {MARKER} #"  # ipaddress accepts it (a zone ID may hold anything but '%')


def plant(obj, attribute, value):
    """Set a field of a frozen attrs object, bypassing its converter (as a third party or a bug could)."""
    object.__setattr__(obj, attribute, value)
    return obj


def hostile_config(where: str, hostile_first: bool = True) -> Config:
    """One good server and one planted address, in a server or a cluster, in either order."""
    bad = ipaddress.IPv6Address(HOSTILE)
    assert str(bad).endswith(f"touch {MARKER} #")
    good = Cluster(address="10.0.9.9", ports=[Port(number=80, servers=[Server(address="10.0.3.10")])])
    server = Server(address="10.0.3.11", encapforward=True, encaptype="ipip")
    cluster = Cluster(address="10.0.9.10", ports=[Port(number=80, servers=[server])])
    if where == "server":
        plant(server, "address", bad)
    else:
        plant(cluster, "address", bad)
    clusters = [cluster, good] if hostile_first else [good, cluster]
    return Config(executor=Executor(nfa="10.0.2.1"), clusters=clusters)


def run_main(monkeypatch, capsys, tmp_path, config, *args):
    monkeypatch.setattr(cfg, "load", lambda path: config)
    rc = cli_module.main(["--config", str(tmp_path / "unused.toml"), "backend-setup", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_inert(script: str, tmp_path):
    """``sh -n`` accepts *script*, and running it with ``sh`` in a scratch folder creates no file there.

    Only ever called with output that holds no setup commands (an empty output, or what the old renderer
    printed before failing on a planted address that comes first: comment lines, and the injected line).
    """
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = tmp_path / "out.sh"
    path.write_text(script)
    check = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, cwd=scratch, timeout=30)
    assert check.returncode == 0, check.stderr
    subprocess.run(["sh", str(path)], capture_output=True, text=True, cwd=scratch, timeout=30)
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("where", ["server", "cluster"])
@pytest.mark.parametrize("os_name, extra", [
    ("linux", []), ("linux", ["--undo"]), ("linux", ["--persistent"]), ("linux", ["--persistent", "--undo"]),
    ("aix", []), ("solaris", ["--undo"]),
])
def test_planted_address_prints_nothing(monkeypatch, capsys, tmp_path, where, os_name, extra):
    rc, out, err = run_main(monkeypatch, capsys, tmp_path, hostile_config(where), "--os", os_name, *extra)
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("encapfwd: error: ")
    assert MARKER not in err
    assert_inert(out, tmp_path)  # before this fix: the header's injected line ran `touch`
    assert out == ""


@pytest.mark.parametrize("where", ["server", "cluster"])
@pytest.mark.parametrize("os_name", ["linux", "aix", "solaris", "windows"])
def test_planted_address_after_a_good_server_prints_nothing(monkeypatch, capsys, tmp_path, where, os_name):
    """The good server's whole script would come first: it must not be printed either."""
    config = hostile_config(where, hostile_first=False)
    rc, out, err = run_main(monkeypatch, capsys, tmp_path, config, "--os", os_name)
    assert out == ""  # checked first: this output is never run
    assert rc != 0 and len(err.splitlines()) == 1 and MARKER not in err


def test_planted_method_prints_nothing(monkeypatch, capsys, tmp_path):
    server = Server(address="10.0.3.11", encapforward=True)
    plant(server, "encaptype", f"ipip\ntouch {MARKER} #")
    config = Config(executor=Executor(nfa="10.0.2.1"),
                    clusters=[Cluster(address="10.0.9.10", ports=[Port(number=80, servers=[server])])])
    rc, out, err = run_main(monkeypatch, capsys, tmp_path, config, "--os", "linux")
    assert rc != 0 and out == "" and len(err.splitlines()) == 1 and MARKER not in err


def test_refused_setup_still_prints_then_fails(monkeypatch, capsys, tmp_path):
    """A refusal is not a validation failure: the rest is printed, the refusal as a comment, exit 1."""
    config = Config(executor=Executor(nfa="10.0.2.1"), clusters=[Cluster(address="10.0.9.9", ports=[Port(
        number=80, servers=[Server(address="10.0.3.10"),
                            Server(address="10.0.3.11", encapforward=True, encaptype="ipip")])])])
    rc, out, err = run_main(monkeypatch, capsys, tmp_path, config, "--os", "windows")
    assert rc == 1
    assert "rem ===== server 10.0.3.10 =====" in out and "netsh interface ipv4 add address" in out
    assert "rem refused: Tunneling is not supported on Windows operating systems" in out
    assert err.splitlines() == ["encapfwd: error: 1 setup(s) refused; first: 10.0.9.9@80@10.0.3.11: "
                                "Tunneling is not supported on Windows operating systems"]


def test_refusal_and_planted_address_prints_nothing(monkeypatch, capsys, tmp_path):
    """A refused setup before a bad value: still nothing on stdout, the validation error on stderr."""
    refused = Cluster(address="10.0.9.8", ports=[Port(number=80, servers=[
        Server(address="10.0.3.12", encapforward=True, encaptype="gre")])])
    config = hostile_config("server", hostile_first=False)
    config = Config(executor=config.executor, clusters=[refused, *config.clusters])
    rc, out, err = run_main(monkeypatch, capsys, tmp_path, config, "--os", "windows")
    assert rc == 1 and out == "" and "invalid server address" in err and len(err.splitlines()) == 1


def test_good_config_still_renders_every_server(monkeypatch, capsys, tmp_path):
    config = Config(executor=Executor(nfa="10.0.2.1"), clusters=[
        Cluster(address="10.0.9.9", ports=[Port(number=80, servers=[Server(address="10.0.3.10")]),
                                           Port(number=443, servers=[Server(address="10.0.3.10")])]),
        Cluster(address="2001:db8::9", ports=[Port(number=80, servers=[Server(address="2001:db8::10")])])])
    rc, out, err = run_main(monkeypatch, capsys, tmp_path, config, "--os", "linux")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "# ===== server 10.0.3.10 ====="
    assert lines[1] == "# --- cluster 10.0.9.9 port(s) 80,443: mac ---"
    assert "# ===== server 2001:db8::10 =====" in lines and "" in lines
    path = tmp_path / "all.sh"
    path.write_text(out)
    check = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


# ------------------------------------------------------------------------ through the console script


def test_hand_written_toml_with_zone_id(cli, tmp_path):
    cli.config.write_text('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
                          '[[clusters.ports.servers]]\n'
                          f'address = "fe80::1%x\\ntouch {MARKER} #"\n')
    proc = cli("backend-setup", "--os", "linux")
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and MARKER not in proc.stderr
    assert_inert(proc.stdout, tmp_path)


@pytest.mark.parametrize("args", [
    ["server", "add", f"10.0.9.9@80@fe80::1%x\ntouch {MARKER} #"],
    ["server", "add", "10.0.9.9@80@fe80::1%x;id"],
    ["server", "add", "10.0.9.9@80@fe80::1%eth0"],
    ["cluster", "add", "fe80::1%x;id"],
    ["cluster", "add", f"fe80::1%x\ntouch {MARKER} #"],
    ["port", "add", "fe80::1%x$(id)@80"],
])
def test_cli_refuses_zone_ids(cli, args):
    cli("cluster", "add", "10.0.9.9", check=0)
    cli("port", "add", "10.0.9.9@80", check=0)
    before = cli.config.read_bytes()
    proc = cli(*args)
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and MARKER not in proc.stderr
    assert cli.config.read_bytes() == before
