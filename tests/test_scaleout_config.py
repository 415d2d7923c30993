"""Scale-out's configuration and its BGP speaker without a router: the executor's bgp* keywords (one-line
errors, file untouched), the ExaBGP configuration judged by ExaBGP itself (``exabgp validate``), which
clusters a plan announces, and the supervised ExaBGP (real process, process API through the relay)."""

from __future__ import annotations

import os
import subprocess
import time

import attrs
import pytest

from encapfwd.bgp.speaker import Speaker, exabgp_config, exabgp_env, exabgp_path
from encapfwd.model import Executor


def _enc(cli, *args, check=0):
    return cli(*args, check=check)


ERRORS = [
    (("executor", "set", "bgppeer", "10.0.2.254"), "needs bgpasn and bgppeerasn"),
    (("executor", "set", "bgppeer", "10.0.2.254", "bgpasn", "65001"), "needs bgppeerasn"),
    (("executor", "set", "bgppeer", "fd00::1", "bgpasn", "1", "bgppeerasn", "2"), "runs over IPv4"),
    (("executor", "set", "bgppeer", "10.0.2.254%x", "bgpasn", "1", "bgppeerasn", "2"), "invalid IP address"),
    (("executor", "set", "bgpasn", "0"), "bgpasn must be between 1 and 4294967295"),
    (("executor", "set", "bgpasn", "4294967296"), "bgpasn must be between 1 and 4294967295"),
    (("executor", "set", "bgpholdtime", "2"), "bgpholdtime must be between 3 and 65535"),
    (("executor", "set", "bgprouterid", "fd00::1"), "IPv4"),
    # values that parse but are not valid in BGP (the hostile-input probe)
    (("executor", "set", "bgprouterid", "0.0.0.0"), "not a valid BGP identifier: it must not be 0 (RFC 6286)"),
    (("executor", "set", "bgpnexthop", "0.0.0.0"), "bgpnexthop 0.0.0.0 is the unspecified address"),
    (("executor", "set", "bgpnexthop", "224.0.0.5"), "bgpnexthop 224.0.0.5 is a multicast address"),
    (("executor", "set", "bgpnexthop6", "::1"), "bgpnexthop6 ::1 is a loopback address"),
    (("executor", "set", "bgppeer", "255.255.255.255", "bgpasn", "1", "bgppeerasn", "2"),
     "bgppeer 255.255.255.255 is the broadcast address"),
    (("executor", "set", "bgppeer", "127.0.0.1", "bgpasn", "1", "bgppeerasn", "2"),
     "bgppeer 127.0.0.1 is a loopback address"),
    (("executor", "set", "bgppeer", "0.0.0.0", "bgpasn", "1", "bgppeerasn", "2"),
     "bgppeer 0.0.0.0 is the unspecified address"),
    (("executor", "set", "bgpasn", "23456"), "bgpasn 23456 is AS_TRANS, reserved by RFC 6793"),
    (("executor", "set", "bgppeerasn", "23456"), "bgppeerasn 23456 is AS_TRANS"),
    (("executor", "set", "bgpasn", "65535"), "bgpasn 65535 is reserved by RFC 7300"),
    (("executor", "set", "bgpasn", "4294967295"), "bgpasn 4294967295 is reserved by RFC 7300"),
]


@pytest.mark.parametrize("text, message", [
    ('[executor]\nbgprouterid = "0.0.0.0"\n', "not a valid BGP identifier"),
    ('[executor]\nbgpasn = 23456\n', "AS_TRANS"),
    ('[executor]\nbgppeer = "127.0.0.1"\n', "loopback"),
])
def test_bad_bgp_values_in_the_file_are_one_line_errors(cli, text, message):
    cli.config.write_text(text)
    proc = cli("executor", "report")
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("args,message", ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_bgp_keywords_refuse_bad_input_in_one_line(cli, args, message):
    _enc(cli, "executor", "set", "nfa", "10.0.2.1")
    before = cli.config.read_bytes()
    proc = cli(*args)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert cli.config.read_bytes() == before


def test_bgp_needs_a_router_id_and_next_hop(cli):
    proc = cli("executor", "set", "bgppeer", "10.0.2.254", "bgpasn", "65001", "bgppeerasn", "65000")
    assert proc.returncode == 1 and "needs bgprouterid or the executor's nfa" in proc.stderr
    _enc(cli, "executor", "set", "bgppeer", "10.0.2.254", "bgpasn", "65001", "bgppeerasn", "65000",
         "bgprouterid", "10.0.2.1", "bgpnexthop", "10.0.2.1", check=0)
    report = cli("executor", "report").stdout
    assert "bgppeer      10.0.2.254" in report and "bgpasn       65001" in report
    _enc(cli, "executor", "set", "bgppeer", "none", check=0)
    assert "bgppeer " not in cli("executor", "report").stdout


def test_ipv6_clusters_need_an_ipv6_next_hop(cli):
    _enc(cli, "executor", "set", "nfa", "10.0.2.1", "bgppeer", "10.0.2.254", "bgpasn", "65001", "bgppeerasn",
         "65000")
    before = cli.config.read_bytes()
    for args, message in (
        (("cluster", "add", "fd00:9::1"), "cluster fd00:9::1 is IPv6 and is announced with an IPv6 next hop"),
        (("executor", "set", "bgpnexthop6", "10.0.2.1"), "not an IPv6 address"),
    ):
        proc = cli(*args)
        assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert cli.config.read_bytes() == before
    _enc(cli, "executor", "set", "bgpnexthop6", "fd00:2::1")
    _enc(cli, "cluster", "add", "fd00:9::1")
    proc = cli("executor", "set", "bgpnexthop6", "none")
    assert proc.returncode == 1 and "cluster fd00:9::1 is IPv6" in proc.stderr


needs_exabgp = pytest.mark.skipif(exabgp_path() is None, reason="ExaBGP is not installed (pip install 'encapfwd[bgp]')")


def _executor(**kw):
    return Executor(**{"nfa": "10.0.2.1", "bgppeer": "10.0.2.254", "bgpasn": 65001, "bgppeerasn": 65000, **kw})


@needs_exabgp
def test_exabgp_accepts_the_configuration_it_is_given(tmp_path):
    good = tmp_path / "good.conf"
    good.write_text(exabgp_config(_executor(bgpholdtime=3, bgprouterid="10.0.2.9", bgpnexthop6="fd00:2::1"),
                                  str(tmp_path / "s")))
    bad = tmp_path / "bad.conf"
    bad.write_text(good.read_text().replace("hold-time 3", "hold-time banana"))
    env = exabgp_env()
    ok = subprocess.run([exabgp_path(), "validate", str(good)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = subprocess.run([exabgp_path(), "validate", str(bad)], capture_output=True, text=True, env=env)
    assert refused.returncode != 0  # the check can fail
    text = good.read_text()
    assert "router-id 10.0.2.9;" in text and "local-address 10.0.2.1;" in text and "peer-as 65000;" in text
    assert "ipv6 unicast;" in text


@needs_exabgp
def test_announced_clusters_follow_the_servers_that_are_up(tmp_path):
    from encapfwd import config as cfg
    from encapfwd.plan import compile_plan
    from encapfwd.plugins import get_plugin_manager

    registry = get_plugin_manager()
    config = cfg.Config(executor=_executor(mac="02:00:00:00:00:01", networks="10.0.2.0/24"))
    for vip, server in (("10.0.9.1", "10.0.2.10"), ("10.0.9.2", "10.0.2.11")):
        config = cfg.cluster_add(config, [vip], registry)
        config = cfg.port_add(config, f"{vip}@80", [], registry)
        config = cfg.server_add(config, f"{vip}@80@{server}", ["mac", "02:00:00:00:00:0a"], registry)
    speaker = Speaker(config.executor)
    plan = compile_plan(config, registry)
    assert speaker.routes_for(plan) == {"10.0.9.1/32": "10.0.2.1", "10.0.9.2/32": "10.0.2.1"}
    down = cfg.server_status(config, "10.0.9.2@80@10.0.2.11", True, registry)
    assert speaker.routes_for(compile_plan(down, registry)) == {"10.0.9.1/32": "10.0.2.1"}
    nexthop = Speaker(attrs.evolve(config.executor, bgpnexthop="10.0.2.99"))
    assert set(nexthop.routes_for(plan).values()) == {"10.0.2.99"}
    # an IPv6 cluster: a /128 with the IPv6 next hop
    six = cfg.executor_set(config, ["bgpnexthop6", "fd00:2::1", "networks", "10.0.2.0/24,fd00:2::/64"], registry)
    six = cfg.cluster_add(six, ["fd00:9::1"], registry)
    six = cfg.port_add(six, "fd00:9::1@80", [], registry)
    six = cfg.server_add(six, "fd00:9::1@80@fd00:2::a", ["mac", "02:00:00:00:00:0a"], registry)
    routes = Speaker(six.executor).routes_for(compile_plan(six, registry))
    assert routes["fd00:9::1/128"] == "fd00:2::1" and routes["10.0.9.1/32"] == "10.0.2.1"


@needs_exabgp
def test_the_supervised_speaker_takes_commands_and_comes_back_after_dying():
    """A real ExaBGP (its peer unreachable: the routes wait in its RIB): commands are acknowledged through
    the relay; killed, it is started again and told everything again; stopped, nothing is left."""
    speaker = Speaker(_executor(bgppeer="192.0.2.1"))  # TEST-NET-1: never answered, nothing is sent there
    speaker.drain = 0
    speaker.start()
    try:
        deadline = time.monotonic() + 20
        while speaker._conn is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert speaker._conn is not None, speaker.log_tail()
        speaker.want({"10.0.9.1/32": "10.0.2.1", "10.0.9.2/32": "10.0.2.1"})
        assert speaker.wait_acked(10) and speaker.acked == 2 and speaker.errors == 0, speaker.log_tail()
        speaker.want({"10.0.9.1/32": "10.0.2.1"})
        assert speaker.wait_acked(10) and speaker.acked == 3
        assert speaker.snapshot()["announced"] == ["10.0.9.1/32"]

        first = speaker.proc.pid
        speaker.proc.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (speaker.restarts and speaker._conn is not None
                                                   and speaker.acked >= 1):
            speaker.poll()
            time.sleep(0.05)
        assert speaker.restarts == 1 and speaker.proc.pid != first
        assert speaker.wait_acked(10) and speaker.snapshot()["announced"] == ["10.0.9.1/32"]
    finally:
        workdir, pid = speaker.dir, speaker.proc.pid
        speaker.stop()
    assert not os.path.exists(workdir)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
