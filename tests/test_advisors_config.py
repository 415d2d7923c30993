"""Advisors in the dscontrol grammar through the real console script: ``advisor start|set|stop|report``,
what lands in the file (comments kept), every bad input a one-line error that leaves the file untouched,
and advisors registered by plugins like forwarders."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

from encapfwd import config as cfg
from encapfwd import hookimpl
from encapfwd.errors import ConfigError, PluginError
from encapfwd.hookspecs import AdvisorType, ProbeResult
from encapfwd.model import Advisor, Config
from encapfwd.plugins import get_plugin_manager


COMMANDS = [
    ("cluster", "add", "10.0.9.9", "10.0.9.10", "2001:db8::9"),
    *[("port", "add", target) for target in
      ("10.0.9.9@80", "10.0.9.9@53", "10.0.9.9@81", "10.0.9.10@80", "2001:db8::9@443")],
    ("server", "add", "10.0.9.9@80@10.0.2.10+10.0.2.11", "mac", "02:00:00:00:00:10"),
    ("server", "add", "10.0.9.10@80@10.0.2.20"),
    ("server", "add", "10.0.9.9@53@10.0.2.30"),
    ("server", "add", "2001:db8::9@443@2001:db8::10"),  # port 81 has no servers
]
_BASE = []


def build(cli, *, through_cli=False):
    """Three clusters: port 80 with servers on two of them, 53 and 81 (no servers) on one, 443 on IPv6.
    Built through the console script once per session, then copied (each command costs a process)."""
    if through_cli or not _BASE:
        for command in COMMANDS:
            cli(*command, check=0)
        if not _BASE:
            _BASE.append(cli.config.read_bytes())
        return
    cli.config.write_bytes(_BASE[0])


def advisors_in(cli):
    return tomllib.loads(cli.config.read_text()).get("advisors", [])


def nothing_answers(cli):
    return str(cli.config.parent / "no-dispatcher.sock")


# ---------------------------------------------------------------------------------------- the grammar


def test_start_set_stop_land_in_the_file(cli):
    build(cli, through_cli=True)
    assert cli("advisor", "start", "connect", "80", check=0).stdout == "advisor connect 80 started\n"
    assert advisors_in(cli) == [{"name": "connect", "port": 80}]  # defaults are not written
    cli("advisor", "start", "HTTP", "80", "interval", "2", "timeout", "0.5", "rise", "1", "fall", "5",
        "path", "/health?full=1", "status", "200-299", "host", "www.example.org", check=0)
    cli("advisor", "start", "udp", "53", "send", "hex:1234010000010000000000000000020001",
        "expect", "hex:1234", check=0)
    assert advisors_in(cli)[1:] == [
        {"name": "http", "port": 80, "interval": 2.0, "timeout": 0.5, "rise": 1, "fall": 5,
         "options": {"host": "www.example.org", "path": "/health?full=1", "status": "200-299"}},
        {"name": "udp", "port": 53,
         "options": {"send": "hex:1234010000010000000000000000020001", "expect": "hex:1234"}},
    ]
    assert cli("advisor", "set", "http", "80", "path", "none", "interval", "10", "fall", "2",
               check=0).stdout == "advisor http 80 updated\n"
    http = advisors_in(cli)[1]
    assert http["interval"] == 10.0 and http["fall"] == 2
    assert http["options"] == {"host": "www.example.org", "status": "200-299"}
    assert cli("advisor", "stop", "connect", "80", check=0).stdout == "advisor connect 80 stopped\n"
    assert [(a["name"], a["port"]) for a in advisors_in(cli)] == [("http", 80), ("udp", 53)]

    config = cfg.load(cli.config)
    assert config.advisor("http", 80) == Advisor(
        name="http", port=80, interval=10, timeout=0.5, rise=1, fall=2,
        options={"host": "www.example.org", "status": "200-299"})
    assert config.advisor("HTTP", "80") is config.advisor("http", 80)
    assert config.advisor("connect", 80) is None
    assert cfg.advisor_servers(config, config.advisor("http", 80)) == [
        "10.0.9.9@80@10.0.2.10", "10.0.9.9@80@10.0.2.11", "10.0.9.10@80@10.0.2.20"]  # every cluster's


def test_the_same_through_the_python_api():
    registry = get_plugin_manager()
    config = cfg.server_add(cfg.port_add(cfg.cluster_add(Config(), ["10.0.9.9"]), "10.0.9.9@80", []),
                            "10.0.9.9@80@10.0.2.10", [])
    config = cfg.advisor_start(config, "http", 80, ["path", "/x", "interval", "0.5", "timeout", "0.25"], registry)
    advisor = config.advisor("http", 80)
    assert (advisor.interval, advisor.timeout, advisor.rise, advisor.fall, advisor.via) == (0.5, 0.25, 2, 3, "address")
    assert advisor.options == (("path", "/x"),)
    assert cfg.loads(cfg.dumps(config)) == config
    assert cfg.to_dict(config)["advisors"] == [
        {"name": "http", "port": 80, "interval": 0.5, "timeout": 0.25, "options": {"path": "/x"}}]
    assert "advisors" not in cfg.to_dict(cfg.advisor_stop(config, "http", 80, registry))
    config = cfg.advisor_set(config, "http", "80", ["status", "200"], registry)
    assert config.advisor("http", 80).options == (("path", "/x"), ("status", "200"))


def test_defaults():
    advisor = Advisor(name="connect", port=80)
    assert (advisor.interval, advisor.timeout, advisor.rise, advisor.fall, advisor.via, advisor.options) == (
        5.0, 3.0, 2, 3, "address", ())


def test_the_hold_time_is_stored(cli):
    build(cli)
    assert Advisor(name="connect", port=80).hold == 2.0
    cli("advisor", "start", "connect", "80", "hold", "10", check=0)
    assert advisors_in(cli) == [{"name": "connect", "port": 80, "hold": 10.0}]
    cli("advisor", "set", "connect", "80", "hold", "0", check=0)  # 0: no damping
    assert advisors_in(cli) == [{"name": "connect", "port": 80, "hold": 0.0}]
    assert cfg.load(cli.config).advisor("connect", 80).hold == 0.0


def test_via_forwarding_is_stored_for_ipv4_ports_with_an_nfa(cli):
    build(cli)
    cli("executor", "set", "nfa", "10.0.2.1", check=0)
    cli("advisor", "start", "connect", "80", "via", "forwarding", check=0)
    assert advisors_in(cli) == [{"name": "connect", "port": 80, "via": "forwarding"}]
    cli("advisor", "set", "connect", "80", "via", "address", check=0)
    assert advisors_in(cli) == [{"name": "connect", "port": 80, "via": "address"}]  # changed in place


def test_comments_are_kept_and_stopping_restores_the_file(cli):
    text = ("# Example\n[executor]  # the dispatcher\nnfa = \"10.0.2.1\"\n\n# web\n[[clusters]]\n"
            "address = \"10.0.9.9\"\n[[clusters.ports]]  # http\nnumber = 80\n"
            "[[clusters.ports.servers]]\naddress = \"10.0.2.10\"  # first\n# tail\n")
    cli.config.write_text(text)
    cli("advisor", "start", "http", "80", "path", "/x", check=0)
    cli("advisor", "start", "connect", "80", check=0)
    edited = cli.config.read_text()
    assert edited.startswith(text)
    # hand-written comments in the advisors' tables stay through edits
    cli.config.write_text(edited.replace('[[advisors]]\nname = "http"', '# the web check\n[[advisors]]\nname = "http"')
                          .replace('options = {path = "/x"}', 'options = {path = "/x"}  # the page'))
    cli("advisor", "set", "http", "80", "interval", "7", check=0)
    edited = cli.config.read_text()
    assert "# the web check\n[[advisors]]" in edited and "interval = 7.0" in edited
    assert 'options = {path = "/x"}  # the page' in edited
    cli("advisor", "set", "connect", "80", "fall", "4", check=0)
    assert "# the web check" in cli.config.read_text()
    cli("advisor", "stop", "http", "80", check=0)
    assert "# the web check" not in cli.config.read_text()  # the comment went with its advisor
    cli("advisor", "stop", "connect", "80", check=0)
    assert cli.config.read_text() == text  # back to the very bytes it started from


def test_a_hand_written_options_table_is_merged_key_by_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
                    '[[clusters.ports.servers]]\naddress = "10.0.2.10"\n\n'
                    '[[advisors]]\nname = "http"  # web\nport = 80\n'
                    '[advisors.options]\npath = "/x"   # the page\nstatus = "200"\n')
    with cfg.edit(path) as session:
        session.config = cfg.advisor_set(session.config, "http", 80, ["status", "none", "host", "a.example"],
                                         get_plugin_manager())
    text = path.read_text()
    assert 'name = "http"  # web' in text and 'path = "/x"   # the page' in text and "status" not in text
    assert cfg.load(path).advisor("http", 80).options == (("host", "a.example"), ("path", "/x"))


# --------------------------------------------------------------------------------------------- errors

ERRORS = [
    (("start", "ping", "80"), "unknown advisor 'ping'"),
    (("start", "connect", "8080"), "no cluster has port 8080 with servers"),
    (("start", "connect", "81"), "no cluster has port 81 with servers"),  # the port exists, no servers
    (("start", "connect", "0"), "advisor port must be between 1 and 65535"),
    (("start", "connect", "http"), "advisor port must be a whole number"),
    (("start", "Bad/Name", "80"), "invalid advisor name"),
    (("start", "connect", "80", "interval", "0"), "interval must be between 0.001 and 86400 seconds, got 0"),
    (("start", "connect", "80", "interval", "1e3"), "interval must be a number of seconds"),
    (("start", "connect", "80", "interval", ".5"), "interval must be a number of seconds"),
    (("start", "connect", "80", "timeout", "-1"), "timeout must be a number of seconds"),
    (("start", "connect", "80", "interval", "2", "timeout", "3"), "timeout 3 s is longer than the interval 2 s"),
    (("start", "connect", "80", "interval", "1"), "timeout 3 s is longer than the interval 1 s"),
    (("start", "connect", "80", "rise", "0"), "rise must be between 1 and 1000"),
    (("start", "connect", "80", "fall", "0"), "fall must be between 1 and 1000"),
    (("start", "connect", "80", "fall", "2.5"), "fall must be a whole number"),
    (("start", "connect", "80", "via", "tunnel"), "via must be one of address, forwarding"),
    (("start", "connect", "80", "via", "forwarding"), "via forwarding needs the executor's nfa"),
    (("start", "connect", "443", "via", "forwarding"), "via forwarding is only valid for IPv4"),
    (("start", "udp", "53", "send", "x", "via", "forwarding"), "only the connect advisor does"),
    (("start", "connect", "80", "interval"), "needs a value"),
    (("start", "connect", "80", "rise", "2", "rise", "3"), "given twice"),
    (("start", "http", "53", "path", "/a b"), "spaces"),
    (("start", "http", "53", "path", "/a\x01b"), "control"),
    (("start", "http", "53", "path", "/a\nb"), "control"),
    (("start", "http", "53", "path", "health"), "path must start with '/'"),
    (("start", "http", "53", "status", "2xx"), "invalid status"),
    (("start", "http", "53", "status", "299-200"), "invalid status"),
    (("start", "http", "53", "colour", "blue"), "unknown advisor http keyword 'colour'"),
    (("start", "connect", "80", "path", "/"), "unknown advisor connect keyword 'path'"),
    (("start", "udp", "53"), "the key send is required"),
    (("start", "udp", "53", "send", "hex:zz"), "pairs of hex digits"),
    (("start", "http", "80"), "advisor http 80 is already started"),
    (("set", "connect", "80", "rise", "2"), "advisor connect 80 is not started"),
    (("stop", "connect", "80"), "advisor connect 80 is not started"),
    (("set", "http", "80", "interval", "0.5"), "timeout 3 s is longer than the interval 0.5 s"),
    (("set", "http", "80", "path", "/a b"), "spaces"),
    (("set", "http", "80", "send", "x"), "unknown advisor http keyword 'send'"),
    # the Host header's port must be a port (the hostile-input probe)
    (("start", "http", "53", "host", "www.example.org:99999"), "the port must be from 1 to 65535"),
    (("start", "http", "53", "host", "www.example.org:0"), "the port must be from 1 to 65535"),
    (("set", "http", "80", "host", "[fd00::1]:65536"), "the port must be from 1 to 65535"),
    (("start", "connect", "80", "hold", "-1"), "hold must be a number of seconds"),
    (("start", "connect", "80", "hold", "1e3"), "hold must be a number of seconds"),
    (("start", "connect", "80", "hold", "86401"), "hold must be between 0 and 86400 seconds"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[" ".join(a[:2]) + ":" + m[:24] for a, m in ERRORS])
def test_errors_are_one_line_and_leave_the_file_untouched(cli, args, message):
    build(cli)
    cli("advisor", "start", "http", "80", check=0)
    before = cli.config.read_bytes()
    stat = os.stat(cli.config)
    proc = cli("advisor", *args)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("encapfwd: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "\x01" not in proc.stderr
    assert cli.config.read_bytes() == before and os.stat(cli.config).st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in cli.config.parent.iterdir()) == ["encapfwd.toml"]  # no temp or lock files


@pytest.mark.parametrize("args", [
    ("server", "remove", "10.0.9.9@53@10.0.2.30"),
    ("port", "remove", "10.0.9.9@53"),
    ("cluster", "remove", "10.0.9.9"),
])
def test_removing_the_last_servers_of_a_probed_port_is_refused(cli, args):
    build(cli)
    cli("advisor", "start", "udp", "53", "send", "ping", check=0)
    before = cli.config.read_bytes()
    proc = cli(*args)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "advisor udp 53: no cluster has port 53 with servers" in proc.stderr
    assert "encapfwd advisor stop udp 53" in proc.stderr
    assert cli.config.read_bytes() == before
    cli("advisor", "stop", "udp", "53", check=0)
    cli(*args, check=0)


def test_servers_of_a_probed_port_on_another_cluster_keep_it_valid(cli):
    build(cli)
    cli("advisor", "start", "connect", "80", check=0)
    cli("cluster", "remove", "10.0.9.10", check=0)  # 10.0.9.9@80 still has servers
    cli("server", "remove", "10.0.9.9@80@10.0.2.10", check=0)


@pytest.mark.parametrize("text,message", [
    ('[[advisors]]\nname = "connect"\nport = 80\ncolour = "blue"\n', "unknown keyword 'colour'"),
    ('[[advisors]]\nname = "connect"\n', "name and port are required"),
    ('[[advisors]]\nname = "connect"\nport = 80\ninterval = true\n', "interval must be a number of seconds"),
    ('[[advisors]]\nname = "connect"\nport = 80\ninterval = 1\n', "longer than the interval 1 s"),
    ('[[advisors]]\nname = "connect"\nport = 80\noptions = "x"\n', "options must be a table"),
    ('[[advisors]]\nname = "http"\nport = 80\noptions = {status = 200}\n', "must be a string"),
    ('[[advisors]]\nname = "connect"\nport = 80\n[[advisors]]\nname = "connect"\nport = 80\n',
     "advisor connect 80 is defined twice"),
    ('[[advisors]]\nname = "connect"\nport = 8080\n', "no cluster has port 8080 with servers"),
    ('advisors = "connect"\n', "expected [[advisors]] tables"),
])
def test_bad_advisors_in_the_file_are_one_line_errors(cli, text, message):
    clusters = ('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
                '[[clusters.ports.servers]]\naddress = "10.0.2.10"\n\n')
    cli.config.write_text(text + clusters if text.startswith("advisors =") else clusters + text)
    proc = cli("advisor", "report")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_loading_without_plugins_then_checking_with_them():
    text = ('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
            '[[clusters.ports.servers]]\naddress = "10.0.2.10"\n\n'
            '[[advisors]]\nname = "pingish"\nport = 80\noptions = {colour = "blue"}\n')
    config = cfg.loads(text)  # loading checks what needs no plugin
    registry = get_plugin_manager()
    with pytest.raises(ConfigError, match="advisor pingish 80: unknown advisor 'pingish'"):
        cfg.check(config, registry)
    config = cfg.loads(text.replace("pingish", "http"))
    with pytest.raises(ConfigError, match="advisor http 80: unknown advisor http keyword 'colour'"):
        cfg.check(config, registry)


# --------------------------------------------------------------------------------------------- report


def test_report_without_a_dispatcher_shows_the_configuration(cli):
    build(cli)
    assert cli("advisor", "report", check=0).stdout == "No advisors configured.\n"
    cli("advisor", "start", "http", "80", "interval", "2", "timeout", "0.5", "path", "/health", check=0)
    cli("advisor", "start", "udp", "53", "send", "hello world", check=0)
    out = cli("advisor", "report", "--control", nothing_answers(cli), check=0).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["ADVISOR", "PORT", "INTERVAL", "TIMEOUT", "RISE", "FALL", "VIA", "OPTIONS"]
    assert lines[1].split() == ["http", "80", "2", "0.5", "2", "3", "address", "path", "/health"]
    assert lines[2].split()[:7] == ["udp", "53", "5", "3", "2", "3", "address"]
    assert "send 'hello world'" in lines[2]
    assert "10.0.9.10@80@10.0.2.20" in out and "10.0.9.9@53@10.0.2.30" in out
    assert "no running dispatcher answered" in out

    data = json.loads(cli("advisor", "report", "--json", "--control", nothing_answers(cli), check=0).stdout)
    assert data["live"] is False and data["health"] is None
    http = data["advisors"][0]
    assert {k: http[k] for k in ("name", "port", "interval", "timeout", "rise", "fall", "via", "options")} == {
        "name": "http", "port": 80, "interval": 2.0, "timeout": 0.5, "rise": 2, "fall": 3, "via": "address",
        "options": {"path": "/health"}}
    assert [s["server"] for s in http["servers"]] == [
        "10.0.9.9@80@10.0.2.10", "10.0.9.9@80@10.0.2.11", "10.0.9.10@80@10.0.2.20"]
    assert all(s["state"] == "-" and s["last"] is None for s in http["servers"])


@pytest.fixture
def fake_dispatcher(tmp_path):
    """A control socket that answers every request with a report holding ``health`` (set ``.answer``)."""
    path = str(tmp_path / "control.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    state = {"answer": {}}

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(json.dumps(state["answer"]).encode())

    threading.Thread(target=serve, daemon=True).start()
    yield path, state
    server.close()


def test_report_shows_the_health_a_dispatcher_reports(cli, fake_dispatcher):
    path, state = fake_dispatcher
    build(cli)
    cli("advisor", "start", "connect", "80", check=0)
    cli("advisor", "start", "http", "80", check=0)
    state["answer"] = {"servers": {}, "health": {
        # the shape of the contract: one advisor's figures at the top level …
        "10.0.9.9@80@10.0.2.10": {"advisor": "connect", "state": "up", "changes": 0, "since": 1.0,
                                  "last": {"ok": True, "detail": "connected", "latency": 0.0012}},
        # … and the manager's, with each advisor's own figures under "advisors"
        "10.0.9.9@80@10.0.2.11": {"advisor": "connect", "state": "down", "changes": 1, "since": 2.0,
                                  "last": {"ok": False, "detail": "connection refused", "latency": 0.0005},
                                  "advisors": {
                                      "connect 80": {"state": "down", "changes": 1, "since": 2.0,
                                                     "last": {"ok": False, "detail": "connection refused",
                                                              "latency": 0.0005}},
                                      "http 80": {"state": "up", "changes": 0, "since": 2.0,
                                                  "last": {"ok": True, "detail": "HTTP 200\nX", "latency": 0.01}}}},
    }}
    data = json.loads(cli("advisor", "report", "--json", "--control", path, check=0).stdout)
    assert data["live"] is True and "10.0.9.9@80@10.0.2.11" in data["health"]
    connect, http = data["advisors"]
    states = {s["server"]: (s["state"], s["last"] and s["last"]["detail"]) for s in connect["servers"]}
    assert states == {"10.0.9.9@80@10.0.2.10": ("up", "connected"),
                      "10.0.9.9@80@10.0.2.11": ("down", "connection refused"),
                      "10.0.9.10@80@10.0.2.20": ("unknown", None)}
    states = {s["server"]: (s["state"], s["last"] and s["last"]["detail"]) for s in http["servers"]}
    assert states["10.0.9.9@80@10.0.2.11"] == ("up", "HTTP 200")  # one line, whatever was sent
    assert states["10.0.9.9@80@10.0.2.10"] == ("unknown", None)  # the top-level figures are connect's

    out = cli("advisor", "report", "--control", path, check=0).stdout
    row = [line.split() for line in out.splitlines() if "10.0.9.9@80@10.0.2.11" in line and line.startswith("connect")]
    assert row == [["connect", "80", "10.0.9.9@80@10.0.2.11", "down", "failed:", "connection", "refused",
                    "0.5", "ms", "1"]]
    assert "no running dispatcher answered" not in out


# ---------------------------------------------------------------------------------------------- plugins


async def _always(address, port, options, timeout):
    return ProbeResult(ok=True, detail="fine", latency=0.0)


def test_builtin_advisors_are_registered_like_plugins():
    registry = get_plugin_manager(load_entrypoints=False)
    advisors = registry.advisors()
    assert list(advisors) == ["connect", "http", "udp"]
    assert set(registry.advisor_owners.values()) == {"encapfwd"}
    assert set(advisors["http"].keys) == {"path", "status", "host"}
    assert set(advisors["udp"].keys) == {"send", "expect"}
    assert advisors["connect"].keys == {} and advisors["connect"].check is None


def test_a_plugin_advisor_with_its_own_keys_and_check():
    def check(options):
        if options.get("mode") not in (None, "fast", "slow"):
            raise ConfigError(f"mode must be fast or slow, got {options['mode']!r}")

    class Plugin:
        @hookimpl
        def encapfwd_register_advisors(self, register):
            register(AdvisorType(name="smtp", keys={"mode": "fast or slow"}, description="SMTP banner",
                                 probe=_always, check=check))

    registry = get_plugin_manager(plugins=[Plugin()])
    assert registry.advisor_owners["smtp"] == "Plugin"
    config = cfg.server_add(cfg.port_add(cfg.cluster_add(Config(), ["10.0.9.9"]), "10.0.9.9@25", []),
                            "10.0.9.9@25@10.0.2.10", [])
    config = cfg.advisor_start(config, "smtp", 25, ["mode", "fast"], registry)
    with pytest.raises(ConfigError, match="advisor smtp 25: mode must be fast or slow, got 'turbo'"):
        cfg.advisor_set(config, "smtp", 25, ["mode", "turbo"], registry)
    with pytest.raises(ConfigError, match="unknown advisor smtp keyword 'path'"):
        cfg.advisor_set(config, "smtp", 25, ["path", "/"], registry)
    with pytest.raises(ConfigError, match="unknown advisor 'smtp'"):
        cfg.check(config, get_plugin_manager())


def test_a_name_registered_twice_names_both():
    class Plugin:
        @hookimpl
        def encapfwd_register_advisors(self, register):
            register(AdvisorType(name="http", probe=_always))

    with pytest.raises(PluginError, match="advisor 'http' is registered by both") as info:
        get_plugin_manager(load_entrypoints=False, plugins=[Plugin()])
    assert "encapfwd" in str(info.value) and "Plugin" in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "Bad Name", "probe": _always}, "invalid advisor name"),
    ({"name": "x", "keys": {"interval": "clash"}, "probe": _always}, "one every advisor has"),
    ({"name": "x", "keys": {"Bad Key": "?"}, "probe": _always}, "invalid key"),
    ({"name": "x", "probe": lambda address, port, options, timeout: None}, "async function"),
])
def test_advisor_type_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdvisorType(**kwargs)


def test_an_installed_plugin_advisor_through_the_cli(cli, fake_dist):
    env = fake_dist("encapfwd-smtp", "encapfwd_smtp", """
        from encapfwd import hookimpl
        from encapfwd.hookspecs import AdvisorType, ProbeResult
        async def probe(address, port, options, timeout):
            return ProbeResult(ok=True, detail="220", latency=0.0)
        @hookimpl
        def encapfwd_register_advisors(register):
            register(AdvisorType(name="smtp", keys={"helo": "the HELO name"}, description="SMTP banner",
                                 probe=probe))
    """)
    build(cli)
    cli("advisor", "start", "smtp", "80", "helo", "lb.example", env=env, check=0)
    assert advisors_in(cli) == [{"name": "smtp", "port": 80, "options": {"helo": "lb.example"}}]
    listing = cli("forwarders", env=env, check=0).stdout
    assert [line.split()[:2] for line in listing.splitlines() if line.startswith("smtp ")] == [
        ["smtp", "encapfwd-smtp"]]
    proc = cli("advisor", "set", "smtp", "80", "helo", "x", env={"ENCAPFWD_PLUGINS": "encapfwd-mac"})
    assert proc.returncode == 1 and "unknown advisor 'smtp'" in proc.stderr


def test_a_plugin_that_fails_to_register_advisors_is_recorded(cli, fake_dist):
    env = fake_dist("encapfwd-broken", "encapfwd_broken", """
        from encapfwd import hookimpl
        @hookimpl
        def encapfwd_register_advisors(register):
            raise RuntimeError("no luck")
    """)
    proc = cli("forwarders", "--json", env=env, check=0)
    assert "failed to register its advisors: RuntimeError: no luck" in proc.stderr
    row = [r for r in json.loads(proc.stdout) if r["distribution"] == "encapfwd-broken"][0]
    assert row["status"] == "failed: RuntimeError: no luck"
    build(cli)
    cli("advisor", "start", "connect", "80", env=env, check=0)  # the core's advisors still work
