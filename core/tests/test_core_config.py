"""Core alone: the model, the TOML round trip and the grammar, with no forwarder plugin involved."""

import ipaddress

import pytest
from hypothesis import given, strategies as st

from encapfwd import config as cfg
from encapfwd.errors import ConfigError
from encapfwd.model import Executor, Server, forwarding_method
from encapfwd.plugins import get_plugin_manager


def sample():
    c = cfg.executor_set(cfg.Config(), "nfa 10.0.2.1 networks 10.0.2.0/24,10.0.4.0/24".split())
    c = cfg.cluster_add(c, ["10.0.9.9", "2001:db8::9"])
    c = cfg.port_add(c, "10.0.9.9@80", "porttype tcp stickytime 30".split())
    c = cfg.port_add(c, "10.0.9.9@0", [])
    c = cfg.server_add(c, "10.0.9.9@80@10.0.2.10+10.0.4.10", "mac 02:00:00:00:00:10".split())
    c = cfg.server_add(c, "10.0.9.9@0@10.0.3.10", "encapforward yes encaptype gre grekey 7 encapcond auto".split())
    return c


def test_toml_round_trip_is_exact():
    c = sample()
    assert cfg.loads(cfg.dumps(c)) == c
    assert cfg.dumps(cfg.loads(cfg.dumps(c))) == cfg.dumps(c)


def test_forwarding_method_definition():
    ex = Executor(networks="10.0.2.0/24")
    assert forwarding_method(ex, Server(address="10.0.2.5")) == "mac"
    assert forwarding_method(ex, Server(address="10.0.2.5", encapforward=True, encapcond="auto")) == "mac"
    assert forwarding_method(ex, Server(address="10.0.3.5", encapforward=True, encapcond="auto")) == "ipip"
    assert forwarding_method(ex, Server(address="10.0.2.5", encapforward=True, encaptype="gre")) == "gre"


def test_ipv6_server_with_encapsulation_is_refused():
    # the rule lives in config.check (one place), which every command and every load runs
    c = cfg.port_add(cfg.cluster_add(cfg.Config(), ["10.0.9.9"]), "10.0.9.9@80", [])
    with pytest.raises(ConfigError, match="server 10.0.9.9@80@2001:db8::1: encapsulation forwarding is only"):
        cfg.server_add(c, "10.0.9.9@80@2001:db8::1", "encapforward yes".split())
    c = cfg.port_add(cfg.cluster_add(cfg.Config(), ["2001:db8::9"]), "2001:db8::9@80", [])
    with pytest.raises(ConfigError, match="only valid for IPv4"):
        cfg.server_add(c, "2001:db8::9@80@10.0.2.10", "encapforward yes".split())


def test_missing_forwarder_names_distribution():
    registry = get_plugin_manager(load_entrypoints=False)
    c = sample()
    with pytest.raises(ConfigError, match="install the encapfwd-gre distribution"):
        cfg.check(c, registry)


@given(st.lists(st.text(max_size=12), max_size=6))
def test_grammar_never_raises_anything_but_config_error(words):
    c = sample()
    for op in (lambda: cfg.server_set(c, "10.0.9.9@80@10.0.2.10", words),
               lambda: cfg.port_set(c, "10.0.9.9@80", words),
               lambda: cfg.executor_set(c, words),
               lambda: cfg.server_add(c, (words or ["x"])[0], words[1:]),
               lambda: cfg.cluster_add(c, words or ["x"])):
        try:
            op()
        except ConfigError:
            pass


def test_loads_rejects_bad_values_in_one_line():
    for text, message in [
        ('[executor]\nnfa = "10.0.2.x"\n', "invalid IP address"),
        ('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
         '[[clusters.ports.servers]]\naddress = "10.0.2.1"\nweight = 500\n', "weight must be between"),
        ('[[clusters]]\naddress = "10.0.9.9"\n[[clusters]]\naddress = "10.0.9.9"\n', "defined twice"),
        ('[surprise]\n', "unknown top-level table"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            cfg.loads(text)
        assert "\n" not in str(info.value)


def test_attached_ignores_other_family():
    ex = Executor(networks=["10.0.0.0/8", "2001:db8::/32"])
    assert ex.attached("10.1.2.3") and ex.attached("2001:db8::1") and not ex.attached("192.0.2.1")
    assert ex.networks[1] == ipaddress.ip_network("2001:db8::/32")
