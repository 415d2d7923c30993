"""``encapfwd run --metrics HOST:PORT``: Prometheus metrics served with prometheus_client.

Unit part (anyone): ``--metrics`` parsing, the metric families built from a report (names, types, labels,
health, active flows, the probe latency histogram across scrapes), the HTTP server (scrape, a failing
report → 503 in one line, a port in use → one line, a forked child not holding the port).

Live part (root, iproute2, curl, pyroute2; MAC forwarding only, plain namespaces, no user-mode-linux): a lab
dispatcher with ``--metrics 127.0.0.1:PORT`` in its namespace; curls through it; a scrape from inside the
namespace equals ``encapfwd server report --json`` taken right after with no traffic in between; names and
label sets as documented; ``encapfwd_info`` names the engine; a server ``down`` in the configuration has
health 0; a bad ``--metrics`` value and a port in use are refused with one line, non-zero, nothing started.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="--metrics needs prometheus_client (pip install prometheus_client)"
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from encapfwd.runtime.metrics import (  # noqa: E402
    LATENCY_BUCKETS,
    LatencyHistograms,
    MetricsError,
    MetricsServer,
    ReportCollector,
    metric_families,
    parse_address,
)

SERVER_LABELS = {"cluster", "port", "server", "method"}
#: family name (as the parser gives it: a counter without ``_total``) -> (type, label names)
DOCUMENTED = {
    "encapfwd_server_packets": ("counter", SERVER_LABELS),
    "encapfwd_server_bytes": ("counter", SERVER_LABELS),
    "encapfwd_server_health": ("gauge", SERVER_LABELS),
    "encapfwd_server_active_flows": ("gauge", SERVER_LABELS),
    "encapfwd_drops": ("counter", {"reason"}),
    "encapfwd_engine_rx_frames": ("counter", set()),
    "encapfwd_engine_tx_frames": ("counter", set()),
    "encapfwd_engine_ring_drops": ("counter", set()),
    "encapfwd_engine_gso_dropped": ("counter", set()),
    "encapfwd_xdp_forwarded": ("counter", set()),
    "encapfwd_xdp_tx_lost": ("counter", set()),
    "encapfwd_xdp_passed": ("counter", set()),
    "encapfwd_xdp_dropped": ("counter", set()),
    "encapfwd_xdp_flows_placed": ("counter", {"why"}),
    "encapfwd_reloads": ("counter", set()),
    "encapfwd_reload_failures": ("counter", set()),
    "encapfwd_info": ("gauge", {"engine", "interface", "plan_digest", "selection_digest"}),
    "encapfwd_probe_latency_seconds": ("histogram", {"cluster", "port", "server", "advisor"}),
    "encapfwd_bgp_session_up": ("gauge", {"peer"}),
    "encapfwd_bgp_announced_routes": ("gauge", {"prefix"}),
    "encapfwd_bgp_speaker_restarts": ("counter", set()),
}
#: only with advisors (the health manager's ``health`` in the report), BGP (``bgp``) or a kernel engine
OPTIONAL = {"encapfwd_probe_latency_seconds", "encapfwd_bgp_session_up", "encapfwd_bgp_announced_routes",
            "encapfwd_bgp_speaker_restarts", "encapfwd_xdp_flows_placed"}


def families_of(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict, family: str, sample: str = None) -> dict:
    """``{frozenset(labels.items()): value}`` of one family's samples named *sample* (default: the counter's
    ``_total`` or the gauge itself)."""
    fam = families[family]
    wanted = sample or (family + "_total" if fam.type == "counter" else family)
    return {frozenset(s.labels.items()): s.value for s in fam.samples if s.name == wanted}


def check_names_and_labels(families: dict) -> None:
    missing = set(DOCUMENTED) - OPTIONAL - set(families)
    assert not missing, missing
    extra = set(families) - set(DOCUMENTED)
    assert not extra, extra
    for name, family in families.items():
        kind, labels = DOCUMENTED[name]
        assert family.type == kind, (name, family.type)
        for s in family.samples:
            got = set(s.labels) - ({"le"} if s.name.endswith("_bucket") else set())
            assert got == labels, (s.name, s.labels)


def expose(families) -> str:
    class Fixed:
        def collect(self):
            return families

    registry = prometheus_client.CollectorRegistry()
    registry.register(Fixed())
    return prometheus_client.generate_latest(registry).decode()


# ------------------------------------------------------------------------------------------ unit


@pytest.mark.parametrize(
    "text, expected",
    [
        (":9464", ("127.0.0.1", 9464)),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:1", ("::", 1)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("9464", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("::1:9464", "brackets"),
        ("[::1]9464", "expected HOST:PORT"),
        ("[nope]:80", "not an IPv6 address"),
        ("1.2.3:80", "not an IPv4 address or a host name"),
        ("300.1.1.1:80", "not an IPv4 address or a host name"),
        ("bad host:80", "not an IPv4 address or a host name"),
        (":0", "from 1 to 65535"),
        (":65536", "from 1 to 65535"),
        ("127.0.0.1:http", "from 1 to 65535"),
    ],
)
def test_parse_address_refuses(text, words):
    with pytest.raises(MetricsError) as info:
        parse_address(text)
    message = str(info.value)
    assert words in message and "\n" not in message and message.startswith("--metrics ")


def _report(health=None, connections=True):
    report = {
        "servers": {
            "10.0.9.1@80@10.0.2.10": {"cluster": "10.0.9.1", "port": 80, "server": "10.0.2.10",
                                      "method": "mac", "packets": 7, "bytes": 700},
            "10.0.9.1@80@10.0.2.11": {"cluster": "10.0.9.1", "port": 80, "server": "10.0.2.11",
                                      "method": "ipip", "packets": 3, "bytes": 360},
            "fd00:9::1@80@fd00:2::a": {"cluster": "fd00:9::1", "port": 80, "server": "fd00:2::a",
                                       "method": "mac", "packets": 0, "bytes": 0},
        },
        "drops": {"not-cluster": 2, "ttl-exceeded": 1},
        "flows": {"flows": 2},
        "engine": {"rx": 20, "tx": 10, "kernel_drops": 1, "tx_ring_full": 2, "engine": "xdp",
                   "interface": "eth0", "plan_digest": "ab" * 32, "selection_digest": "cd" * 32,
                   "reloads": 3, "reload_errors": 1,
                   "xdp_forwarded": 5, "xdp_passed": 4, "xdp_dropped": 6, "xdp_tx_lost": 8},
    }
    if connections:
        report["flows"]["connections"] = {"10.0.9.1@80@10.0.2.10": 2}
    if health is not None:
        report["health"] = health
    return report


def test_families_from_a_report():
    fams = families_of(expose(metric_families(_report(), {"10.0.9.1@80@10.0.2.11": False})))
    check_names_and_labels(fams)
    assert "encapfwd_probe_latency_seconds" not in fams  # no health, no histogram
    mac = frozenset({"cluster": "10.0.9.1", "port": "80", "server": "10.0.2.10", "method": "mac"}.items())
    ipip = frozenset({"cluster": "10.0.9.1", "port": "80", "server": "10.0.2.11", "method": "ipip"}.items())
    assert samples(fams, "encapfwd_server_packets")[mac] == 7
    assert samples(fams, "encapfwd_server_bytes")[ipip] == 360
    assert samples(fams, "encapfwd_server_health")[mac] == 1
    assert samples(fams, "encapfwd_server_health")[ipip] == 0  # down in the configuration
    flows = samples(fams, "encapfwd_server_active_flows")
    assert flows[mac] == 2 and flows[ipip] == 0 and len(flows) == 3
    assert samples(fams, "encapfwd_drops") == {frozenset({("reason", "not-cluster")}): 2,
                                                frozenset({("reason", "ttl-exceeded")}): 1}
    one = frozenset()
    assert samples(fams, "encapfwd_engine_rx_frames")[one] == 20
    assert samples(fams, "encapfwd_engine_tx_frames")[one] == 10
    assert samples(fams, "encapfwd_engine_ring_drops")[one] == 3
    assert samples(fams, "encapfwd_xdp_forwarded")[one] == 5
    assert samples(fams, "encapfwd_xdp_tx_lost")[one] == 8
    assert samples(fams, "encapfwd_xdp_passed")[one] == 4
    assert samples(fams, "encapfwd_xdp_dropped")[one] == 6
    assert samples(fams, "encapfwd_reloads")[one] == 3
    assert samples(fams, "encapfwd_reload_failures")[one] == 1
    assert samples(fams, "encapfwd_info") == {
        frozenset({"engine": "xdp", "interface": "eth0", "plan_digest": "ab" * 32,
                   "selection_digest": "cd" * 32}.items()): 1}
    assert "encapfwd_bgp_session_up" not in fams  # no BGP, no BGP families


def test_bgp_from_the_report():
    report = _report()
    report["bgp"] = {"peer": "10.0.2.254", "session": "up", "announced": ["10.0.9.1/32", "fd00:9::1/128"],
                     "restarts": 2}
    fams = families_of(expose(metric_families(report)))
    check_names_and_labels(fams)
    assert samples(fams, "encapfwd_bgp_session_up") == {frozenset({("peer", "10.0.2.254")}): 1}
    assert samples(fams, "encapfwd_bgp_announced_routes") == {
        frozenset({("prefix", "10.0.9.1/32")}): 1, frozenset({("prefix", "fd00:9::1/128")}): 1}
    assert samples(fams, "encapfwd_bgp_speaker_restarts")[frozenset()] == 2
    report["bgp"]["session"] = "down"
    fams = families_of(expose(metric_families(report)))
    assert samples(fams, "encapfwd_bgp_session_up") == {frozenset({("peer", "10.0.2.254")}): 0}


def test_no_connections_no_active_flows():
    fams = families_of(expose(metric_families(_report(connections=False))))
    assert "encapfwd_server_active_flows" not in fams


def test_health_from_the_report():
    health = {
        "10.0.9.1@80@10.0.2.10": {"state": "down",
                                  "advisors": {"http 80": {"state": "down", "latencies": []}}},
        "10.0.9.1@80@10.0.2.11": {"state": "unknown", "advisors": {}},
        "fd00:9::1@80@fd00:2::a": {"state": "up", "latencies": [0.003], "advisor": "tcp"},
    }
    fams = families_of(expose(metric_families(_report(health))))
    check_names_and_labels(fams)
    health_values = {dict(k)["server"]: v for k, v in samples(fams, "encapfwd_server_health").items()}
    assert health_values == {"10.0.2.10": 0, "10.0.2.11": 1, "fd00:2::a": 1}  # unknown counts as up
    counts = {(dict(k)["server"], dict(k)["advisor"]): v for k, v in
              samples(fams, "encapfwd_probe_latency_seconds", "encapfwd_probe_latency_seconds_count").items()}
    assert counts == {("10.0.2.10", "http 80"): 0, ("fd00:2::a", "tcp"): 1}
    labels = {k for k in samples(fams, "encapfwd_probe_latency_seconds",
                                 "encapfwd_probe_latency_seconds_count")}
    tcp = {"cluster": "fd00:9::1", "port": "80", "server": "fd00:2::a", "advisor": "tcp"}
    assert frozenset(tcp.items()) in labels


def _bucket(histograms, key, window, probes=None):
    buckets, total = histograms.update(key, window, probes)
    return dict(buckets), total


def test_latency_window_becomes_a_cumulative_histogram():
    h = LatencyHistograms()
    b, total = _bucket(h, "k", [0.002, 0.02])
    assert b["+Inf"] == 2 and b["0.0025"] == 1 and b["0.025"] == 2 and total == pytest.approx(0.022)
    b, total = _bucket(h, "k", [0.002, 0.02])  # nothing new
    assert b["+Inf"] == 2
    b, total = _bucket(h, "k", [0.002, 0.02, 0.3])  # one more
    assert b["+Inf"] == 3 and b["0.25"] == 2 and b["0.5"] == 3
    # a full window of 3 sliding by two values: only the two new ones count
    h2 = LatencyHistograms()
    _bucket(h2, "k", [0.1, 0.2, 0.3])
    b, total = _bucket(h2, "k", [0.3, 0.4, 12.0])
    assert b["+Inf"] == 5 and b["10.0"] == 4 and total == pytest.approx(13.0)
    # with a cumulative probe count the new values are known exactly, even when values repeat
    h3 = LatencyHistograms()
    _bucket(h3, "k", [5.0, 5.0], probes=2)
    b, _ = _bucket(h3, "k", [5.0, 5.0], probes=4)
    assert b["+Inf"] == 4
    b, _ = _bucket(h3, "k", [5.0, 5.0], probes=4)
    assert b["+Inf"] == 4
    counts = [b[k] for k in [*(f"{x}" if x != int(x) else f"{x:.1f}" for x in LATENCY_BUCKETS), "+Inf"]]
    assert counts == sorted(counts)  # cumulative


def test_latency_buckets_given_by_the_report():
    given = {"buckets": [["0.01", 3], ["0.1", 5], ["+Inf", 6]], "sum": 1.5, "count": 6}
    health = {"10.0.9.1@80@10.0.2.10": {"state": "up", "advisors": {"http 80": {"latencies": given}}}}
    fams = families_of(expose(metric_families(_report(health))))
    buckets = {dict(k)["le"]: v for k, v in samples(fams, "encapfwd_probe_latency_seconds",
                                                      "encapfwd_probe_latency_seconds_bucket").items()}
    assert buckets == {"0.01": 3, "0.1": 5, "+Inf": 6}
    total = samples(fams, "encapfwd_probe_latency_seconds", "encapfwd_probe_latency_seconds_sum")
    assert list(total.values()) == [1.5]


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_server_scrape_failure_and_port_in_use():
    state = {"report": _report(), "fail": False}

    def fetch():
        if state["fail"]:
            raise OSError("no answer on /run/encapfwd/x.sock within 5.0 s")
        return state["report"]

    server = MetricsServer("127.0.0.1", 0, ReportCollector(fetch))
    try:
        status, text = _get(server.url)
        assert status == 200
        check_names_and_labels(families_of(text))
        state["fail"] = True
        status, text = _get(server.url)
        assert status == 503 and text.count("\n") == 1 and "scrape failed: OSError" in text
        state["fail"] = False
        assert _get(server.url)[0] == 200
        with pytest.raises(MetricsError) as info:
            MetricsServer("127.0.0.1", server.port, ReportCollector(fetch))
        assert "cannot listen" in str(info.value) and "in use" in str(info.value)
        # a forked child (a worker) does not keep the listening socket
        pid = os.fork()
        if pid == 0:
            os._exit(0 if server.httpd.socket.fileno() == -1 else 1)
        assert os.waitpid(pid, 0)[1] == 0
        assert server.httpd.socket.fileno() != -1
    finally:
        server.stop()
    with socket.socket() as probe:  # nobody listens on the port any more (TIME_WAIT aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))
        probe.listen(1)


# ------------------------------------------------------------------------------------------ live

METRICS_PORT = 9464


def _live_reason():
    if os.geteuid() != 0:
        return "the live metrics tests need root (network namespaces, AF_PACKET)"
    try:
        from encapfwd.lab import topology
    except ImportError as exc:
        return f"the lab is not importable: {exc}"
    reason = topology.unavailable_reason(("mac",))
    return f"the live metrics tests need: {reason}" if reason else None


@pytest.fixture(scope="module", params=["auto", "afpacket"])
def lab(request):
    """The MAC-only lab with ``encapfwd run --metrics 127.0.0.1:PORT``: ``--engine auto`` (the TC program where
    BPF works, as on every veth) and ``--engine afpacket``."""
    reason = _live_reason()
    if reason:
        pytest.skip(reason)
    from encapfwd.lab import topology

    with topology.Topology(("mac",), engine=request.param) as built:
        built.start_dispatcher(extra=["--metrics", f"127.0.0.1:{METRICS_PORT}"])
        yield built
        code = built.stop_dispatcher()
        assert code == 0, built.dispatcher_log()
        assert "stopped:" in built.dispatcher_log()


def _scrape(lab) -> str:
    proc = lab.ns["dispatcher"].run(
        ["curl", "-s", "-S", "-f", "-m", "10", f"http://127.0.0.1:{METRICS_PORT}/metrics"], check=False
    )
    assert proc.returncode == 0, (proc.stderr, lab.dispatcher_log())
    return proc.stdout


def _server_report(lab) -> dict:
    proc = lab.cli("server", "report", "--json", "--control", lab.control_path)
    live = json.loads(proc.stdout)["live"]
    assert live, proc.stdout
    return live


def _server_counts(report: dict) -> dict:
    """``{labels: (packets, bytes)}``; cluster, port and server from the name ``cluster@port@server`` (the
    report's ``port`` field is summed over the controller's units: 160 with the XDP program and a worker)."""
    out = {}
    for name, s in report["servers"].items():
        cluster, port, server = name.split("@")
        out[frozenset({"cluster": cluster, "port": port, "server": server,
                       "method": str(s["method"])}.items())] = (s["packets"], s["bytes"])
    return out


def _quiet_scrape(lab):
    """A scrape between two reports that agree (no packet in between): ``(before, text, after)``."""
    for _ in range(10):
        before = _server_report(lab)
        text = _scrape(lab)
        after = _server_report(lab)
        if _server_counts(before) == _server_counts(after) and before["drops"] == after["drops"]:
            return before, text, after
        time.sleep(0.5)  # a late ACK or FIN of the last connection: once more
    pytest.fail("traffic kept arriving between the reports")


@pytest.mark.slow
def test_scrape_equals_server_report(lab):
    answers = lab.curl("mac", 5)
    assert all(a.startswith("server=mac ") for a in answers), (answers, lab.dispatcher_log())
    time.sleep(0.3)
    before, text, after = _quiet_scrape(lab)
    fams = families_of(text)
    check_names_and_labels(fams)
    packets = samples(fams, "encapfwd_server_packets")
    nbytes = samples(fams, "encapfwd_server_bytes")
    expected = _server_counts(after)
    assert {k: (packets[k], nbytes[k]) for k in packets} == expected
    assert max(p for p, _ in expected.values()) >= 5 * 3  # 5 connections, several packets each
    assert {dict(k)["port"] for k in packets} == {"80"}  # the configured port, whatever the units
    drops = {dict(k)["reason"]: v for k, v in samples(fams, "encapfwd_drops").items()}
    assert drops == after["drops"]
    engine = after["engine"]
    one = frozenset()
    assert samples(fams, "encapfwd_reloads")[one] == engine["reloads"]
    assert samples(fams, "encapfwd_reload_failures")[one] == engine["reload_errors"]
    for family, key in (("encapfwd_engine_rx_frames", "rx"), ("encapfwd_engine_tx_frames", "tx"),
                        ("encapfwd_xdp_forwarded", "xdp_forwarded"), ("encapfwd_xdp_passed", "xdp_passed"),
                        ("encapfwd_xdp_dropped", "xdp_dropped"), ("encapfwd_xdp_tx_lost", "xdp_tx_lost")):
        value = samples(fams, family)[one]
        assert before["engine"].get(key, 0) <= value <= engine.get(key, 0), (family, value)
    ring = samples(fams, "encapfwd_engine_ring_drops")[one]
    assert ring <= engine["kernel_drops"] + engine["tx_ring_full"]
    health = samples(fams, "encapfwd_server_health")
    assert set(health) == set(expected) and set(health.values()) == {1}
    flows = samples(fams, "encapfwd_server_active_flows")
    assert set(flows) == set(expected)
    # the metrics server answers while the dispatcher forwards
    assert lab.curl("mac", 1)[0].startswith("server=mac ")


@pytest.mark.slow
def test_info_names_the_engine(lab):
    report = _server_report(lab)
    fams = families_of(_scrape(lab))
    (labels, value), = samples(fams, "encapfwd_info").items()
    labels = dict(labels)
    assert value == 1
    assert labels == {"engine": report["engine"]["engine"], "interface": "eth0",
                      "plan_digest": report["engine"]["plan_digest"],
                      "selection_digest": report["engine"]["selection_digest"]}
    assert labels["engine"] in ("xdp", "tc", "afpacket")
    if lab.engine == "afpacket":
        assert labels["engine"] == "afpacket"


@pytest.mark.slow
def test_server_down_in_the_configuration_has_health_0(lab):
    from encapfwd.control import query_control
    from encapfwd.lab.topology import SERVERS

    vip, address, _ = SERVERS["mac"]
    target = f"{vip}@80@{address}"
    key = frozenset({"cluster": vip, "port": "80", "server": address, "method": "mac"}.items())
    before = samples(families_of(_scrape(lab)), "encapfwd_reloads")[frozenset()]
    lab.cli("server", "down", target)
    try:
        assert query_control(lab.control_path, "reload", timeout=15)["reloaded"] is True
        fams = families_of(_scrape(lab))
        assert samples(fams, "encapfwd_server_health")[key] == 0
        assert samples(fams, "encapfwd_reloads")[frozenset()] == before + 1
    finally:
        lab.cli("server", "up", target)
        query_control(lab.control_path, "reload", timeout=15)
    assert samples(families_of(_scrape(lab)), "encapfwd_server_health")[key] == 1


def _second_run(lab, metrics: str, tmp_path):
    """``encapfwd run --metrics METRICS`` in the dispatcher namespace beside the running one (its own
    control socket); ``(completed process, control path)``."""
    from encapfwd.lab.topology import encapfwd_argv

    control = str(tmp_path / "second.sock")
    argv = encapfwd_argv() + ["--config", str(lab.config_path), "run", "--interface", "eth0",
                              "--control", control, "--metrics", metrics]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
    proc = lab.ns["dispatcher"].run(argv, check=False, timeout=60, env=env)
    return proc, control


def _one_line_error(proc, words, only=True):
    """Non-zero, and one error line naming --metrics (*only*: nothing else at all; else the usual start-up
    log lines, ``encapfwd: engine …``, may come before it)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("encapfwd: error:")]
    assert proc.returncode != 0, (proc.returncode, proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("encapfwd: error: --metrics "), proc.stderr
    assert words in errors[0], errors[0]
    assert not only or lines == errors, proc.stderr
    assert all(line.startswith("encapfwd: ") for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("value, words", [("9464", "expected HOST:PORT"), ("[::1:9464", "expected HOST:PORT"),
                                          ("127.0.0.1:99999", "from 1 to 65535")])
def test_bad_metrics_value_refused(lab, tmp_path, value, words):
    proc, control = _second_run(lab, value, tmp_path)
    _one_line_error(proc, words)
    assert not os.path.exists(control)  # nothing started


@pytest.mark.slow
def test_port_in_use_refused(lab, tmp_path):
    proc, control = _second_run(lab, f"127.0.0.1:{METRICS_PORT}", tmp_path)
    _one_line_error(proc, "Address already in use", only=False)
    assert not os.path.exists(control)  # its control socket was removed again; no worker, no XDP program
    # the running dispatcher goes on: forwarding and metrics
    assert lab.dispatcher.poll() is None, lab.dispatcher_log()
    assert lab.curl("mac", 1)[0].startswith("server=mac ")
    assert "encapfwd_info" in families_of(_scrape(lab))
