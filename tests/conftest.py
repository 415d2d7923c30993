"""Shared fixtures for the cross-plugin tests."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_cli(*args, env=None, cwd=None, check=None):
    """Run the installed ``encapfwd`` console script as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
    full_env.update(env or {})
    proc = subprocess.run([str(BIN / "encapfwd"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def cli(tmp_path):
    """``cli(*args)`` runs encapfwd with a config file in a temporary folder."""
    config = tmp_path / "encapfwd.toml"

    def call(*args, check=None, env=None):
        return run_cli("--config", str(config), *args, check=check, env=env, cwd=tmp_path)

    call.config = config
    return call


@pytest.fixture
def fake_dist(tmp_path):
    """Create an importable distribution with an ``encapfwd`` entry point on a PYTHONPATH folder."""
    site = tmp_path / "site"
    site.mkdir()

    def make(dist: str, module: str, source: str, version: str = "9.9"):
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[encapfwd]\n{dist} = {module}\n")
        return {"PYTHONPATH": str(site)}

    return make
