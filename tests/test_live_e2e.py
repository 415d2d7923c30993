"""End to end: real TCP through ``encapfwd run`` in network namespaces, with real kernels as back-ends.

The topology (encapfwd.lab.topology): client ns → router ns → dispatcher ns (``encapfwd run`` as a
subprocess, configured with the documented CLI); a MAC-forwarded back-end namespace on the dispatcher's
segment; IPIP and GRE back-ends behind the router (user-mode-linux kernels when this kernel has no
ipip/ip_gre), each set up with the project's generated Linux script. curl in the client namespace is the
HTTP client. Only addresses inside these namespaces are used; everything is removed by PID / by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

topology = pytest.importorskip("encapfwd.lab.topology")

METHODS = ("mac", "ipip", "gre")
REQUESTS = 20


def _reason():
    reason = topology.unavailable_reason(("mac",))
    if reason:
        return reason
    return None


REASON = _reason()
if REASON:
    pytest.skip(f"live end-to-end tests need: {REASON}", allow_module_level=True)

TUNNEL_REASON = topology.unavailable_reason(METHODS)


def _xdp_reason():
    if os.geteuid() != 0:
        return "BPF needs root"
    from encapfwd.xdp.libbpf import available

    ok, why = available()
    return None if ok else why


@pytest.fixture(scope="module")
def topology_once():
    """One topology for the whole module: its guest kernels boot once (seconds each under QEMU), and every
    engine below runs on it in turn."""
    methods = METHODS if TUNNEL_REASON is None else ("mac",)
    with topology.Topology(methods, ipv6=True) as built:
        yield built


@pytest.fixture(scope="module", params=["xdp", "tc", "afpacket"])
def lab(request, topology_once):
    """The whole module runs once with each engine: the XDP program (the AF_PACKET workers as its slow
    path), the same program at tc ingress, and the AF_PACKET engine alone. Each test leaves the lab as it
    found it; between engines the dispatcher is stopped (which detaches its program) and started again."""
    engine = request.param
    if engine in ("xdp", "tc") and _xdp_reason():
        pytest.skip(f"XDP engine: {_xdp_reason()}")
    built = topology_once
    if built.dispatcher is not None:
        built.stop_dispatcher()
    built.engine = engine
    built.start_dispatcher()
    assert built.report()["engine"]["engine"] == engine
    yield built
    built.stop_dispatcher()


#: tests of what only the XDP engine does: the module's lab with that engine only
XDP_ONLY = pytest.mark.parametrize("lab", ["xdp"], indirect=True)
#: the same for the TC engine
TC_ONLY = pytest.mark.parametrize("lab", ["tc"], indirect=True)


def _need(lab, method):
    if method not in lab.methods:
        pytest.skip(f"{method} back-end unavailable: {TUNNEL_REASON}")


def _ensure_running(lab):
    if lab.dispatcher is None or lab.dispatcher.poll() is not None:
        lab.start_dispatcher()


@pytest.mark.parametrize("method", METHODS)
def test_every_request_succeeds(lab, method):
    _need(lab, method)
    _ensure_running(lab)
    before = lab.report()["servers"]
    answers = lab.curl(method, REQUESTS)
    assert answers == [a for a in answers if a.startswith(f"server={method} ")], answers
    # the server saw the real client address and answered from the VIP (direct server return)
    vip = topology.SERVERS[method][0]
    assert all(f"client={topology.CLIENT}:" in a and f"local={vip}" in a for a in answers)
    after = lab.report()["servers"]
    name = f"{vip}@80@{topology.SERVERS[method][1]}"
    assert after[name]["method"] == method
    # each HTTP exchange is several client→server packets (SYN, ACK, request, ACKs, FIN …)
    assert after[name]["packets"] - before.get(name, {}).get("packets", 0) >= 4 * REQUESTS


@pytest.mark.parametrize("lab", ["tc", "afpacket"], indirect=True)
@pytest.mark.parametrize("method", METHODS)
def test_an_upload_in_gso_buffers_arrives_whole(lab, method, tmp_path):
    """A 4 MiB upload whose segments reach the dispatcher merged into GSO socket buffers of up to 64 KiB (the
    client's TSO, forwarded whole over the veths: what a container's veth receives when its host's NIC
    does GRO). The TC program forwards each buffer whole: MAC as it is, IPIP and GRE through
    bpf_skb_adjust_room's tunnel flags, so that the kernel segments the tunnel on the way to the back-end's
    kernel. The AF_PACKET workers cut each buffer into its segments (runtime/afpacket/gso.py) and forward
    those; a segment too big for a tunnel is answered with ICMP "fragmentation needed", and the client's
    path MTU discovery does the rest, as with single frames. Either way the back-end's kernel must put the
    stream back together byte for byte (its SHA-256). Not native XDP: a veth with an XDP program makes its peer
    cut such buffers before they cross (the kernel turns the peer's GSO off), and the client's checksums, left
    to offload here, are what native XDP cannot finish (test_live_engines.py)."""
    import hashlib

    _need(lab, method)
    _ensure_running(lab)
    body = tmp_path / "upload.bin"
    body.write_bytes(os.urandom(4 << 20))
    digest = hashlib.sha256(body.read_bytes()).hexdigest()
    before = lab.report()["engine"]
    lab.segmentation_offload(True)
    try:
        answer = lab.upload(method, body)
    finally:
        lab.segmentation_offload(False)
    after = lab.report()["engine"]
    assert answer.startswith(f"server={method} ") and f"got={4 << 20} sha256={digest}" in answer, (
        answer, {k: v for k, v in after.items() if "gso" in k or "passed" in k})
    if lab.engine == "tc":
        forwarded = after["xdp_forwarded"] - before["xdp_forwarded"]
        passed = after["xdp_passed_by_reason"]
        too_big = passed.get("too-big", 0) - before["xdp_passed_by_reason"].get("too-big", 0)
        print(f"\n{method}: 4 MiB in {forwarded} buffers forwarded by the program; {too_big} too big for the "
              "tunnel (a single full-size segment: the slow path's ICMP 'fragmentation needed', path MTU discovery)")
        # far fewer buffers than the ~2,900 segments: the program saw GSO buffers, and forwarded them
        assert forwarded < 1500, forwarded
    elif lab.engine == "afpacket":
        cut = after["gso_buffers"] - before["gso_buffers"]
        segments = after["gso_segments"] - before["gso_segments"]
        print(f"\n{method}: the workers cut {cut} buffers into {segments} segments")
        assert cut > 0 and segments > cut, after
        assert after["gso_dropped"] == before["gso_dropped"], after


def test_ipv6_cluster_with_mac_forwarding(lab):
    """IPv6 clusters work with MAC forwarding (hop limit decremented; the socket filter matches IPv6)."""
    _ensure_running(lab)
    answers = lab.curl("mac6", REQUESTS)
    assert all(a.startswith("server=mac ") for a in answers), answers
    assert all(f"client={topology.CLIENT6}:" in a and f"local={topology.VIP6}" in a for a in answers), answers
    servers = lab.report()["servers"]
    (name,) = [n for n in servers if topology.VIP6 in n and topology.MAC_SERVER6 in n]
    assert servers[name]["packets"] >= 4 * REQUESTS


def test_replies_bypass_the_dispatcher(lab):
    _ensure_running(lab)
    sniffer = lab.sniff_dispatcher()
    try:
        for method in lab.methods:
            assert all(a.startswith("server=") for a in lab.curl(method, 5))
    finally:
        time.sleep(0.2)
        frames = sniffer.stop()
    vips = set(lab.vips.values())
    incoming = [f for f in frames if f[0] != 4 and f[3] == 6]  # TCP frames arriving on the dispatcher
    to_vip = [f for f in incoming if f[2] in vips]
    assert len(to_vip) >= 5 * 4 * len(lab.methods)
    assert all(f[1] == topology.CLIENT and f[5] == 80 for f in to_vip), "only client→VIP:80 packets arrive"
    assert [f for f in incoming if f[1] in vips] == [], "no reply (VIP as source) passes the dispatcher"


@pytest.mark.parametrize("method", METHODS)
def test_long_lived_connection_survives_sighup(lab, method):
    _need(lab, method)
    _ensure_running(lab)
    sock = lab.connect(method)
    try:
        first = lab.http_get(sock)
        assert first.startswith(f"server={method} ")
        reloads = lab.report()["engine"]["reloads"]
        # a real change: one more cluster (the socket filter changes too) and another weight
        vip, server, _ = topology.SERVERS[method]
        lab.cli("cluster", "add", "10.0.9.99")
        lab.cli("port", "add", "10.0.9.99@80")
        lab.cli("server", "set", f"{vip}@80@{server}", "weight", "7")
        try:
            lab.dispatcher.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while lab.report()["engine"]["reloads"] == reloads:
                assert time.monotonic() < deadline, lab.dispatcher_log()
                time.sleep(0.05)
            assert lab.report()["engine"]["reload_errors"] == 0, lab.dispatcher_log()
            assert "10.0.9.99" in lab.report()["engine"]["clusters"]
            for _ in range(3):
                again = lab.http_get(sock)  # the same TCP connection, after the reload
                assert again.split(" local=")[0] == first.split(" local=")[0]
            answers = lab.curl(method, 3)
            assert all(a.startswith(f"server={method} ") for a in answers), answers
        finally:
            lab.cli("cluster", "remove", "10.0.9.99")
            lab.cli("server", "set", f"{vip}@80@{server}", "weight", "1")
            lab.dispatcher.send_signal(signal.SIGHUP)
    finally:
        sock.close()
    assert lab.dispatcher.poll() is None


def test_bad_configuration_on_sighup_keeps_forwarding(lab):
    _ensure_running(lab)
    text = lab.config_path.read_text()
    errors = lab.report()["engine"]["reload_errors"]
    try:
        lab.config_path.write_text(text + "\n[[clusters]]\naddress = 'not-an-address'\n")
        lab.dispatcher.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while lab.report()["engine"]["reload_errors"] == errors:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "not-an-address" in lab.report()["engine"]["last_reload_error"]
        assert all(a.startswith("server=mac ") for a in lab.curl("mac", 3))
    finally:
        lab.config_path.write_text(text)
    assert lab.dispatcher.poll() is None


def test_stop_and_start_again(lab):
    _ensure_running(lab)
    assert lab.stop_dispatcher(signal.SIGTERM) == 0
    assert not os.path.exists(lab.control_path), "the control socket is removed on stop"
    assert "stopped:" in lab.dispatcher_log()
    # nothing forwards now: the dispatcher's kernel blackholes the VIP
    assert lab.curl("mac", 1, timeout=1) == ["FAIL"]
    lab.start_dispatcher()
    for method in lab.methods:
        answers = lab.curl(method, 5)
        assert all(a.startswith(f"server={method} ") for a in answers), answers
    # SIGINT stops cleanly as well
    assert lab.stop_dispatcher(signal.SIGINT) == 0
    lab.start_dispatcher()


def test_two_workers_share_the_traffic(lab):
    _ensure_running(lab)
    lab.stop_dispatcher()
    lab.start_dispatcher(workers=2)
    try:
        for method in lab.methods:
            answers = lab.curl(method, 10)
            assert all(a.startswith(f"server={method} ") for a in answers), answers
        # a long-lived connection stays on one worker (fanout by flow hash) and one server
        sock = lab.connect("mac")
        try:
            bodies = [lab.http_get(sock).split(" local=")[0] for _ in range(5)]
        finally:
            sock.close()
        assert len(set(bodies)) == 1 and bodies[0].startswith("server=mac ")
        report = lab.report()
        assert report["engine"]["workers"] == 2
        assert len(report["workers"]) == 2
        assert report["engine"]["rx"] == sum(w["rx"] for w in report["workers"])
        assert report["forwarded"] >= 4 * 10 * len(lab.methods)
    finally:
        lab.stop_dispatcher()
        lab.start_dispatcher()


def test_server_report_reads_live_counters(lab):
    _ensure_running(lab)
    assert all(a.startswith("server=mac ") for a in lab.curl("mac", 2))
    proc = lab.cli("server", "report", "--json", "--control", lab.control_path)
    data = json.loads(proc.stdout)
    assert data["live"] is not None
    rows = {row["server"]: row for row in data["servers"]}
    name = f"{topology.SERVERS['mac'][0]}@80@{topology.SERVERS['mac'][1]}"
    assert rows[name]["packets"] and rows[name]["packets"] > 0
    # the socket is root's only
    assert os.stat(lab.control_path).st_mode & 0o777 == 0o600


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_control_socket_refuses_other_users(lab):
    _ensure_running(lab)
    code = (
        "import sys\nfrom encapfwd.control import query_control\n"
        "try:\n    query_control(sys.argv[1]); print('answered')\n"
        "except OSError as e:\n    print('refused', e.errno)\n"
    )
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            lab.control_path,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "refused" in proc.stdout, (proc.stdout, proc.stderr)


# ----------------------------------------------------------------------------------------- errors


def _run_once(lab, config_text, *args, env=None, user=None):
    path = lab.workdir / "error.toml"
    path.write_text(config_text)
    argv = topology.encapfwd_argv() + [
        "--config",
        str(path),
        "run",
        "--control",
        str(lab.workdir / "error.sock"),
        *args,
    ]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
    full_env.update(env or {})
    proc = lab.ns["dispatcher"].run(argv, check=False, timeout=30, env=full_env)
    return proc


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_error_not_root(lab):
    proc = _run_once(lab, lab.config_path.read_text(), user="65534")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], "one line"
    assert "needs root" in proc.stderr


def test_error_no_such_interface(lab):
    proc = _run_once(lab, lab.config_path.read_text(), "--interface", "nosuch0")
    assert proc.returncode == 1
    assert "no such interface: nosuch0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_error_vip_is_a_local_address(lab):
    d = lab.ns["dispatcher"]
    vip = topology.SERVERS["mac"][0]
    d.ip("addr", "add", f"{vip}/32", "dev", "lo")
    try:
        proc = _run_once(lab, lab.config_path.read_text())
    finally:
        d.ip("addr", "del", f"{vip}/32", "dev", "lo")
    assert proc.returncode == 1
    assert f"cluster address {vip} is configured as a local address" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_error_encaptype_plugin_missing(lab):
    text = lab.config_path.read_text()
    if "encaptype" not in text:
        text += (
            '\n[[clusters]]\naddress = "10.0.9.2"\n[[clusters.ports]]\nnumber = 80\n'
            '[[clusters.ports.servers]]\naddress = "10.0.3.11"\nencapforward = true\nencaptype = "ipip"\n'
        )
    proc = _run_once(lab, text, env={"ENCAPFWD_PLUGINS": "encapfwd-mac"})
    assert proc.returncode == 1
    assert "encapfwd-ipip" in proc.stderr or "encapfwd-gre" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_upstream_by_arp_with_answer_arp(lab):
    """The other upstream option: the router ARPs for the VIP on the shared segment and the dispatcher
    answers (``encapfwd run --answer-arp``); the back-ends keep quiet (arp_ignore from their setup script)."""
    _ensure_running(lab)
    lab.stop_dispatcher()
    lab.upstream("arp")
    try:
        lab.start_dispatcher(extra=["--answer-arp"])
        for method in lab.methods:
            answers = lab.curl(method, 5)
            assert all(a.startswith(f"server={method} ") for a in answers), answers
        d_mac = lab.ns["dispatcher"].mac("eth0")
        entry = lab.router_neighbour(topology.SERVERS["mac"][0])
        assert d_mac in entry, entry
        assert lab.report()["engine"]["arp_replies"] >= 1
        # without --answer-arp nobody answers for the VIP: the requests fail
        lab.stop_dispatcher()
        lab.upstream("arp")
        lab.start_dispatcher()
        assert lab.curl("mac", 1, timeout=2) == ["FAIL"]
    finally:
        lab.stop_dispatcher()
        lab.upstream("route")
        lab.start_dispatcher()


def test_a_killed_worker_is_started_again(lab):
    _ensure_running(lab)
    before = lab.report()["engine"]
    victim = lab.report()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while lab.report()["engine"]["worker_restarts"] == before["worker_restarts"]:
        assert time.monotonic() < deadline, lab.dispatcher_log()
        time.sleep(0.05)
    assert lab.report()["workers"][0]["pid"] != victim
    for method in lab.methods:
        answers = lab.curl(method, 3)
        assert all(a.startswith(f"server={method} ") for a in answers), answers


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_link_down_and_up_again(lab):
    """A link that goes down does not make the workers spin, and forwarding resumes when it is back."""
    _ensure_running(lab)
    d = lab.ns["dispatcher"]
    pid = lab.report()["workers"][0]["pid"]
    d.ip("link", "set", "eth0", "down")
    try:
        time.sleep(0.3)
        before = _cpu_seconds(pid)
        time.sleep(1.0)
        assert _cpu_seconds(pid) - before < 0.3, "a worker spins while the link is down"
        assert lab.report()["engine"]["socket_errors"] >= 1
    finally:
        d.ip("link", "set", "eth0", "up")
    deadline = time.monotonic() + 10
    while True:
        answers = lab.curl("mac", 1, timeout=2)
        if answers[0].startswith("server=mac "):
            break
        assert time.monotonic() < deadline, lab.dispatcher_log()
    for method in lab.methods:
        answers = lab.curl(method, 3)
        assert all(a.startswith(f"server={method} ") for a in answers), answers
    assert "Network is down" in lab.dispatcher_log()


def test_a_changed_neighbour_is_followed(lab):
    """The MAC server is replaced by one with another MAC: once the kernel's neighbour table knows the new
    MAC (here set by hand, as a gratuitous ARP would), the dispatcher follows without a reload."""
    _ensure_running(lab)
    lab.stop_dispatcher()
    lab.start_dispatcher(env={"ENCAPFWD_NEIGH_REFRESH": "0.2"})
    m, d = lab.ns["mac"], lab.ns["dispatcher"]
    server = topology.SERVERS["mac"][1]
    old, new = m.mac("eth0"), "02:0e:0f:00:02:bb"
    try:
        assert all(a.startswith("server=mac ") for a in lab.curl("mac", 2))
        m.ip("link", "set", "eth0", "address", new)
        d.ip("neigh", "replace", server, "lladdr", new, "dev", "eth0", "nud", "reachable")
        deadline = time.monotonic() + 10
        while lab.report()["engine"]["neighbour_changes"] == 0:
            assert time.monotonic() < deadline, lab.dispatcher_log()
            time.sleep(0.05)
        answers = lab.curl("mac", 5)
        assert all(a.startswith("server=mac ") for a in answers), answers
        assert "neighbour changed" in lab.dispatcher_log()
    finally:
        m.ip("link", "set", "eth0", "address", old)
        d.ip("neigh", "replace", server, "lladdr", old, "dev", "eth0", "nud", "reachable")
        lab.stop_dispatcher()
        lab.start_dispatcher()


def _reload(lab):
    def count():
        engine = lab.report()["engine"]
        return engine["reloads"] + engine["reload_errors"]

    reloads = count()
    lab.dispatcher.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while count() == reloads:
        assert time.monotonic() < deadline, lab.dispatcher_log()
        time.sleep(0.05)
    assert lab.report()["engine"]["last_reload_error"] is None, lab.dispatcher_log()


def test_server_down_moves_new_flows(lab):
    """A second MAC server (another address of the MAC server's namespace): new flows spread over both;
    after 'server down' of the first, every new flow goes to the second and still succeeds."""
    _ensure_running(lab)
    vip, first, _ = topology.SERVERS["mac"]
    second = "10.0.2.11"
    names = {a: f"{vip}@80@{a}" for a in (first, second)}
    lab.ns["mac"].ip("addr", "add", f"{second}/24", "dev", "eth0")
    lab.cli("server", "add", names[second])
    try:
        _reload(lab)
        before = lab.report()["servers"]
        assert all(a.startswith("server=mac ") for a in lab.curl("mac", 24))
        spread = lab.report()["servers"]
        assert all(spread[n]["packets"] > before.get(n, {}).get("packets", 0) for n in names.values()), spread
        lab.cli("server", "down", names[first])
        _reload(lab)
        before = lab.report()["servers"]
        assert all(a.startswith("server=mac ") for a in lab.curl("mac", 12))
        after = lab.report()["servers"]
        assert after[names[first]]["packets"] == before[names[first]]["packets"], "a new flow went to a down server"
        assert after[names[second]]["packets"] >= before[names[second]]["packets"] + 4 * 12
    finally:
        lab.cli("server", "remove", names[second], check=False)
        lab.cli("server", "up", names[first], check=False)
        lab.ns["mac"].ip("addr", "del", f"{second}/24", "dev", "eth0", check=False)
        _reload(lab)


@XDP_ONLY
def test_xdp_stop_leaves_no_program_and_no_pin(lab):
    _ensure_running(lab)
    import re

    d = lab.ns["dispatcher"]
    attached = re.search(r"prog/xdp id (\d+)", d.ip("-d", "link", "show", "eth0").stdout)
    assert attached
    assert lab.stop_dispatcher(signal.SIGTERM) == 0
    assert "XDP:" in lab.dispatcher_log() and "forwarded in the kernel" in lab.dispatcher_log()
    shown = d.ip("-d", "link", "show", "eth0").stdout
    assert "prog/xdp" not in shown and "xdp" not in shown.split("\n")[0], shown
    # this dispatcher's program is unloaded (others on this machine may run their own encapfwd_xdp)
    gone = subprocess.run(["bpftool", "prog", "show", "id", attached.group(1)], capture_output=True, text=True)
    assert gone.returncode != 0, gone.stdout
    pinned = os.listdir("/sys/fs/bpf") if os.path.isdir("/sys/fs/bpf") else []
    assert not [p for p in pinned if "encapfwd" in p]
    lab.start_dispatcher()


@XDP_ONLY
def test_xdp_second_run_on_the_interface_refuses(lab):
    _ensure_running(lab)
    argv = topology.encapfwd_argv() + ["--config", str(lab.config_path), "run", "--interface", "eth0",
                                       "--engine", "xdp", "--control", lab.control_path + ".2"]
    proc = lab.ns["dispatcher"].run(argv, check=False, timeout=30)
    assert proc.returncode != 0
    errors = [line for line in (proc.stderr or "").splitlines() if "error" in line]
    assert len(errors) == 1 and "already has an XDP program" in errors[0], proc.stderr
    # nor beside it with the TC engine (both would forward)
    tc = lab.ns["dispatcher"].run(argv[:-4] + ["--engine", "tc", "--control", lab.control_path + ".3"],
                                  check=False, timeout=30)
    errors = [line for line in (tc.stderr or "").splitlines() if "error" in line]
    assert tc.returncode != 0 and len(errors) == 1 and "already has an XDP program" in errors[0], tc.stderr
    assert lab.dispatcher.poll() is None
    assert all(a.startswith("server=mac ") for a in lab.curl("mac", 3))


@XDP_ONLY
def test_xdp_a_killed_dispatcher_keeps_forwarding_and_a_restart_takes_over(lab):
    """SIGKILL leaves no chance to detach: the program stays and keeps forwarding from its maps (the kernel
    holds it); the next run sees that its owner is gone and replaces it atomically."""
    _ensure_running(lab)
    lab.stop_dispatcher(signal.SIGKILL)
    time.sleep(0.3)
    assert "prog/xdp" in lab.ns["dispatcher"].ip("-d", "link", "show", "eth0").stdout
    answers = lab.curl("mac", 3)
    assert all(a.startswith("server=mac ") for a in answers), answers
    if os.path.exists(lab.control_path):
        os.unlink(lab.control_path)
    lab.start_dispatcher()
    assert "taking over the XDP program left by encapfwd run" in lab.dispatcher_log()
    assert all(a.startswith("server=mac ") for a in lab.curl("mac", 3))
    assert lab.report()["engine"]["engine"] == "xdp"


def _tc_programs(lab):
    """The names of the programs at tc ingress of the dispatcher's eth0: tcx links and clsact filters."""
    script = ("import json, socket\n"
              "from encapfwd.xdp.libbpf import prog_by_id\n"
              "from encapfwd.xdp import tc\n"
              "i = socket.if_nametoindex('eth0')\n"
              "names = tc.clsact_programs(i)\n"
              "for prog, _ in (tc.tcx_query(i) if tc.tcx_available(i) else []):\n"
              "    name, maps = prog_by_id(prog)\n"
              "    [m.close() for m in maps]\n"
              "    names.append(name)\n"
              "print(json.dumps(names))\n")
    import json

    return json.loads(lab.ns["dispatcher"].run([sys.executable, "-c", script]).stdout)


@TC_ONLY
def test_tc_stop_detaches_and_a_second_run_refuses(lab):
    """The TC program runs at tc ingress while encapfwd runs (tcx on this kernel), a second ``encapfwd run``
    on the interface refuses in one line, and a clean stop detaches it."""
    import re

    _ensure_running(lab)
    assert _tc_programs(lab) == ["encapfwd_tc"]
    argv = topology.encapfwd_argv() + ["--config", str(lab.config_path), "run", "--interface", "eth0",
                                       "--engine", "tc", "--control", lab.control_path + ".2"]
    proc = lab.ns["dispatcher"].run(argv, check=False, timeout=30)
    assert proc.returncode != 0
    errors = [line for line in (proc.stderr or "").splitlines() if "error" in line]
    assert len(errors) == 1 and "already has encapfwd's TC program" in errors[0], proc.stderr
    # nor beside it with the XDP engine (both would forward)
    xdp = lab.ns["dispatcher"].run(argv[:-4] + ["--engine", "xdp", "--control", lab.control_path + ".3"],
                                   check=False, timeout=30)
    errors = [line for line in (xdp.stderr or "").splitlines() if "error" in line]
    assert xdp.returncode != 0 and len(errors) == 1 and "already has encapfwd's TC program" in errors[0], xdp.stderr
    assert lab.dispatcher.poll() is None and _tc_programs(lab) == ["encapfwd_tc"]
    assert all(a.startswith("server=mac ") for a in lab.curl("mac", 3))
    assert lab.stop_dispatcher(signal.SIGTERM) == 0
    assert re.search(r"TC: [1-9]\d* forwarded in the kernel", lab.dispatcher_log()), lab.dispatcher_log()
    assert _tc_programs(lab) == []
    lab.start_dispatcher()


@TC_ONLY
def test_tc_after_a_kill(lab):
    """SIGKILL: a tcx link belongs to the process, so the kernel detaches the program with it (nothing is
    left, a restart just attaches). A clsact filter (kernels before 6.6; forced here with
    ENCAPFWD_TC_ATTACH=clsact) stays and keeps forwarding; the next run sees its owner is gone and replaces it
    in one step."""
    from encapfwd.runtime.engine import ENV_TC_ATTACH

    _ensure_running(lab)
    lab.stop_dispatcher(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _tc_programs(lab):  # the workers (holding no link) follow their parent
        assert time.monotonic() < deadline, _tc_programs(lab)
        time.sleep(0.1)
    clsact = {ENV_TC_ATTACH: "clsact"}
    try:
        if os.path.exists(lab.control_path):
            os.unlink(lab.control_path)
        lab.start_dispatcher(env=clsact)
        assert lab.report()["engine"]["xdp_mode"] == "clsact"
        assert all(a.startswith("server=mac ") for a in lab.curl("mac", 3))
        lab.stop_dispatcher(signal.SIGKILL)
        time.sleep(0.3)
        assert _tc_programs(lab) == ["encapfwd_tc"]
        answers = lab.curl("mac", 3)
        assert all(a.startswith("server=mac ") for a in answers), answers
        if os.path.exists(lab.control_path):
            os.unlink(lab.control_path)
        lab.start_dispatcher(env=clsact)
        assert "took over from the TC program left by encapfwd run" in lab.dispatcher_log()
        assert _tc_programs(lab) == ["encapfwd_tc"]
        assert all(a.startswith("server=mac ") for a in lab.curl("mac", 3))
        assert lab.stop_dispatcher(signal.SIGTERM) == 0
        assert _tc_programs(lab) == []
    finally:
        if lab.dispatcher is not None:
            lab.stop_dispatcher(signal.SIGTERM)
        lab.start_dispatcher()
    assert lab.report()["engine"]["engine"] == "tc" and lab.report()["engine"]["xdp_mode"] == "tcx"
