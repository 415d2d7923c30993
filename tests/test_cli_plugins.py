"""Plugin loading as a user meets it: real entry points, real console script, hermetic fake dists."""

import json
import subprocess
import sys

from encapfwd.hookspecs import Forwarder
from encapfwd.plugins import get_plugin_manager
from encapfwd import hookimpl

from conftest import run_cli


def names(proc):
    return sorted(row["name"] for row in json.loads(proc.stdout) if row["name"])


def test_forwarders_lists_the_installed_plugins():
    proc = run_cli("forwarders", "--json", check=0)
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["ipip"]["distribution"] == "encapfwd-ipip" and rows["ipip"]["overhead"] == 20
    assert rows["gre"]["overhead"] == 24 and rows["gre"]["ipv4_only"] is True
    assert rows["mac"]["ipv4_only"] is False
    for row in rows.values():
        assert row["status"] == "ok" and row["version"]
        assert "linux" in row["operating_systems"]
    for name in ("mac", "ipip", "gre"):  # described as templates: the XDP program runs them too
        assert rows[name]["engines"] == ["xdp", "python"]
    table = run_cli("forwarders", check=0).stdout
    lines = table.splitlines()
    assert lines[0].split() == [
        "FORWARDER", "DISTRIBUTION", "VERSION", "OVERHEAD", "IPV4-ONLY", "OS", "ENGINES", "STATUS"]
    gre = [line.split() for line in lines if line.startswith("gre ")][0]
    assert gre[-2:] == ["xdp,python", "ok"]


def test_engines_column_for_template_and_python_only_plugins(fake_dist):
    env = fake_dist("encapfwd-both", "encapfwd_both", """
        from encapfwd import hookimpl
        from encapfwd.hookspecs import Forwarder, Template
        @hookimpl
        def encapfwd_register_forwarders(register):
            register(Forwarder(name="data", overhead=0, template=True))
            register(Forwarder(name="code", overhead=4))
            register(Forwarder(name="claims", overhead=0, template=True))
        @hookimpl
        def encapfwd_build_template(forwarder, server, egress):
            return Template() if forwarder == "data" else None
        @hookimpl
        def encapfwd_build_transform(forwarder, server, egress):
            return (lambda p: p) if forwarder == "code" else None
    """)
    env2 = fake_dist("encapfwd-codeonly", "encapfwd_codeonly", """
        from encapfwd import hookimpl
        from encapfwd.hookspecs import Forwarder
        @hookimpl
        def encapfwd_register_forwarders(register):
            register(Forwarder(name="legacy", overhead=4, template=True))  # declared, but no template hook
        @hookimpl
        def encapfwd_build_transform(forwarder, server, egress):
            return (lambda p: p) if forwarder == "legacy" else None
    """)
    assert env == env2
    rows = {r["name"]: r for r in json.loads(run_cli("forwarders", "--json", env=env, check=0).stdout)}
    assert rows["data"]["engines"] == ["xdp", "python"]
    assert rows["claims"]["engines"] == ["xdp", "python"]  # the declaration is per method: taken at its word
    assert rows["code"]["engines"] == ["python"]
    assert rows["legacy"]["engines"] == ["python"]  # template=True without encapfwd_build_template
    table = run_cli("forwarders", env=env, check=0).stdout.splitlines()
    code = [line.split() for line in table if line.startswith("code ")][0]
    assert code[-2:] == ["python", "ok"]


def test_allow_list_restricts_loading():
    assert names(run_cli("forwarders", "--json", env={"ENCAPFWD_PLUGINS": "encapfwd-gre"}, check=0)) == ["gre"]
    proc = run_cli("forwarders", env={"ENCAPFWD_PLUGINS": ""}, check=0)
    assert "No forwarders installed" in proc.stdout
    assert "encapfwd-mac (mac)" in proc.stdout and "encapfwd-gre (gre)" in proc.stdout
    proc = run_cli("forwarders", "--json", env={"ENCAPFWD_PLUGINS": ""}, check=0)
    assert json.loads(proc.stdout) == [] and "no forwarders installed" in proc.stderr


def test_broken_plugin_is_listed_as_failed_and_never_crashes(fake_dist):
    env = fake_dist("encapfwd-broken", "encapfwd_broken", "import no_such_module_anywhere\n")
    proc = run_cli("forwarders", "--json", env=env, check=0)
    rows = json.loads(proc.stdout)
    broken = [r for r in rows if r["distribution"] == "encapfwd-broken"]
    assert broken and broken[0]["status"].startswith("failed: ModuleNotFoundError")
    assert broken[0]["engines"] == []
    assert "warning: plugin encapfwd-broken could not be loaded" in proc.stderr
    assert {"mac", "ipip", "gre"} <= set(names(proc))
    assert "failed: ModuleNotFoundError" in run_cli("forwarders", env=env, check=0).stdout


def test_misspelt_hook_fails_loudly(fake_dist):
    env = fake_dist("encapfwd-typo", "encapfwd_typo", """
        from encapfwd import hookimpl
        @hookimpl
        def encapfwd_register_forwarder(register):  # missing "s"
            pass
    """)
    proc = run_cli("forwarders", "--json", env=env, check=0)
    row = [r for r in json.loads(proc.stdout) if r["distribution"] == "encapfwd-typo"][0]
    assert row["status"].startswith("failed:") and "encapfwd_register_forwarder" in row["status"]


def test_plugin_raising_in_register_is_failed(fake_dist):
    env = fake_dist("encapfwd-raises", "encapfwd_raises", """
        from encapfwd import hookimpl
        @hookimpl
        def encapfwd_register_forwarders(register):
            raise RuntimeError("boom")
    """)
    proc = run_cli("forwarders", "--json", env=env, check=0)
    row = [r for r in json.loads(proc.stdout) if r["distribution"] == "encapfwd-raises"][0]
    assert row["status"] == "failed: RuntimeError: boom"


def test_name_collision_names_both_distributions(fake_dist):
    env = fake_dist("encapfwd-otheripip", "encapfwd_otheripip", """
        from encapfwd import hookimpl
        from encapfwd.hookspecs import Forwarder
        @hookimpl
        def encapfwd_register_forwarders(register):
            register(Forwarder(name="ipip", overhead=20))
    """)
    proc = run_cli("forwarders", env=env)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "encapfwd-ipip" in proc.stderr and "encapfwd-otheripip" in proc.stderr


def test_startup_does_not_import_scapy():
    code = (
        "import sys\n"
        "from encapfwd.cli import main\n"
        "for args in (['--help'], ['forwarders'], ['forwarders', '--json'], ['server', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'scapy')\n"
        "print('SCAPY', loaded[:3])\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-500:]


def test_hermetic_registry_with_a_test_plugin():
    class Plugin:
        @hookimpl
        def encapfwd_register_forwarders(self, register):
            register(Forwarder(name="test", overhead=8))

    registry = get_plugin_manager(load_entrypoints=False, plugins=[Plugin()])
    assert list(registry.forwarders) == ["test"]
    assert registry.selection_algorithms()[:1] == ["maglev"]
    assert registry.engines("test") == ("python",)
