"""docs/hooks.md documents every hook with its full signature, each argument, and a runnable example."""

import inspect
import re
from pathlib import Path

import pytest

from encapfwd import hookspecs
from encapfwd.hookspecs import Egress, SetupTarget
from encapfwd.model import Port, Server, parse_ip
from encapfwd.plugins import get_plugin_manager

DOC = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
HOOKS = sorted(
    name for name, obj in vars(hookspecs).items()
    if name.startswith("encapfwd_") and inspect.isfunction(obj)
)


def sections():
    text = DOC.read_text()
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {part.split("(", 1)[0]: part for part in parts}


def test_there_are_hooks():
    assert len(HOOKS) >= 5


@pytest.mark.parametrize("name", HOOKS)
def test_hook_documented_with_signature_and_arguments(name):
    section = sections().get(name)
    assert section is not None, f"docs/hooks.md has no '## {name}(...)' heading"
    params = list(inspect.signature(getattr(hookspecs, name)).parameters)
    heading = section.splitlines()[0]
    assert heading == f"{name}({', '.join(params)})", heading
    for param in params:
        assert f"- `{param}`" in section, f"{name}: argument {param!r} is not explained"
    assert "```python" in section, f"{name}: no example"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_example_runs(name):
    server = Server(address="10.0.2.10", mac="02:00:00:00:00:10")
    namespace = {
        "make_registry": lambda *plugins: get_plugin_manager(load_entrypoints=False, plugins=plugins),
        "server": server,
        "port": Port(number=80, servers=(server,)),
        "egress": Egress(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:10",
                         outer_src=parse_ip("10.0.2.1"), outer_dst=server.address, ttl=64,
                         cluster=parse_ip("10.0.9.9"), mtu=1500),
        "target": SetupTarget(server=server, cluster=parse_ip("10.0.9.9"), port=80,
                              dispatcher=None),
    }
    for block in re.findall(r"```python\n(.*?)```", sections()[name], flags=re.S):
        exec(compile(block, f"docs/hooks.md:{name}", "exec"), dict(namespace))
