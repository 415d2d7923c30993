"""Each distribution as users install it: real wheels in clean virtual environments.

- core alone: a working ``encapfwd`` with no forwarders, and core's own tests pass;
- core + one plugin: exactly that forwarder, and the plugin's own tests pass with nothing else installed;
- core + the docs' third-party example (encapfwd-gue): listed, and used to forward a packet.
"""

import json
import os
import subprocess
import sys
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SOURCES = {
    "encapfwd": "core",
    "encapfwd-mac": "plugins/mac",
    "encapfwd-ipip": "plugins/ipip",
    "encapfwd-gre": "plugins/gre",
    "encapfwd-gue": "docs/examples/encapfwd-gue",
}
#: virtual environment -> the distributions installed in it besides the core
SETS = {"core": [], "mac": ["encapfwd-mac"], "ipip": ["encapfwd-ipip"], "gre": ["encapfwd-gre"],
        "gue": ["encapfwd-gue"]}


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ENCAPFWD_", "PYTHON", "VIRTUAL_ENV", "PIP_")) and k != "PATH"}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def build_wheels(wheels: Path):
    """Build every distribution's wheel once, one after the other (setuptools builds in the source tree)."""
    sources = [ROOT / source for source in SOURCES.values()]
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
           "-w", str(wheels), *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {path.name.split("-")[0].replace("_", "-"): path for path in wheels.glob("*.whl")}


def make_venv(path: Path, wheels):
    # without a pip of its own (ensurepip costs ~4 s a venv): this interpreter's pip installs into it
    venv.EnvBuilder(with_pip=False, clear=True).create(path)
    cmd = [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "-q",
           "--disable-pip-version-check", *map(str, wheels), "pytest", "hypothesis"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=900)
    if proc.returncode:
        return f"pip install failed in {path.name}: {proc.stderr[-1500:]}"
    return None


@pytest.fixture(scope="module")
def venvs(tmp_path_factory):
    if os.environ.get("ENCAPFWD_SKIP_DISTRIBUTIONS"):
        pytest.skip("ENCAPFWD_SKIP_DISTRIBUTIONS is set")
    base = tmp_path_factory.mktemp("venvs")
    wheel = build_wheels(base / "wheels")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(make_venv, base / name, [wheel["encapfwd"]] + [wheel[d] for d in dists])
                   for name, dists in SETS.items()}
        errors = {name: f.result() for name, f in futures.items()}
    failed = {n: e for n, e in errors.items() if e}
    assert not failed, failed
    return {name: base / name / "bin" for name in SETS}


def forwarders(bindir, *args):
    proc = subprocess.run([str(bindir / "encapfwd"), "forwarders", "--json", *args], capture_output=True,
                          text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc, sorted(row["name"] for row in json.loads(proc.stdout))


def test_core_alone_lists_no_forwarders_and_names_the_plugins(venvs):
    proc, names = forwarders(venvs["core"])
    assert names == []
    for dist in ("encapfwd-mac", "encapfwd-ipip", "encapfwd-gre"):
        assert dist in proc.stderr
    table = subprocess.run([str(venvs["core"] / "encapfwd"), "forwarders"], capture_output=True, text=True,
                           env=clean_env(), timeout=60)
    assert table.returncode == 0 and "No forwarders installed" in table.stdout


@pytest.mark.parametrize("name", ["mac", "ipip", "gre"])
def test_each_plugin_alone_gives_exactly_its_forwarder(venvs, name):
    _, names = forwarders(venvs[name])
    assert names == [name]


def run_tests(bindir, where):
    proc = subprocess.run([str(bindir / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(ROOT / where), str(ROOT / where)],
                          capture_output=True, text=True, env=clean_env(), cwd=str(ROOT / where), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_core_tests_pass_with_core_alone(venvs):
    run_tests(venvs["core"], "core/tests")


@pytest.mark.parametrize("name", ["mac", "ipip", "gre"])
def test_plugin_tests_pass_with_only_core_and_that_plugin(venvs, name):
    run_tests(venvs[name], f"plugins/{name}/tests")


def test_third_party_gue_plugin_is_listed_and_forwards(venvs, tmp_path):
    proc, names = forwarders(venvs["gue"])
    assert names == ["gue"]
    row = json.loads(proc.stdout)[0]
    assert row["distribution"] == "encapfwd-gue" and row["overhead"] == 32 and row["status"] == "ok"
    # Use it: configure a GUE server with the CLI, forward a client packet, dissect the result with scapy.
    config = tmp_path / "gue.toml"
    bindir = venvs["gue"]
    for args in (["executor", "set", "nfa", "10.0.2.1", "mac", "02:00:00:00:00:01", "networks", "10.0.2.0/24",
                  "gatewaymac", "02:00:00:00:00:fe"],
                 ["cluster", "add", "10.0.9.9"], ["port", "add", "10.0.9.9@80"],
                 ["server", "add", "10.0.9.9@80@10.0.7.10", "encapforward", "yes", "encaptype", "gue"]):
        done = subprocess.run([str(bindir / "encapfwd"), "--config", str(config), *args], capture_output=True,
                              text=True, env=clean_env(), timeout=60)
        assert done.returncode == 0, done.stderr
    script = """
import sys
from scapy.all import Ether, IP, TCP, UDP, raw, wrpcap, rdpcap
wrpcap(sys.argv[2], [Ether(src="02:00:00:00:00:aa", dst="02:00:00:00:00:01")/IP(src="192.0.2.7", dst="10.0.9.9", ttl=50)/TCP(sport=40000, dport=80, flags="S")])
"""
    pcap_in, pcap_out = tmp_path / "in.pcap", tmp_path / "out.pcap"
    subprocess.run([str(bindir / "python"), "-c", script, "x", str(pcap_in)], check=True, env=clean_env(), timeout=60)
    done = subprocess.run([str(bindir / "encapfwd"), "--config", str(config), "replay", str(pcap_in), str(pcap_out)],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    check = """
import sys
from scapy.all import Ether, IP, TCP, UDP, raw, rdpcap
def checksum_ok(ip):
    fresh = ip.copy()
    del fresh.chksum
    return IP(raw(fresh)).chksum == ip.chksum
(frame,) = rdpcap(sys.argv[1])
outer = frame[IP]
assert frame[Ether].dst == "02:00:00:00:00:fe", frame[Ether].dst
assert outer.src == "10.0.2.1" and outer.dst == "10.0.7.10" and outer.proto == 17
assert checksum_ok(outer)
udp = outer[UDP]
assert udp.dport == 6080 and udp.len == len(raw(udp))
payload = bytes(udp.payload)
assert payload[:4] == bytes([0, 4, 0, 0])
inner = IP(payload[4:])
assert inner.src == "192.0.2.7" and inner.dst == "10.0.9.9" and inner.ttl == 49
assert inner[TCP].dport == 80 and inner[TCP].flags == "S"
assert checksum_ok(inner)
print("ok")
"""
    done = subprocess.run([str(bindir / "python"), "-c", check, str(pcap_out)], capture_output=True, text=True,
                          env=clean_env(), timeout=60)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
