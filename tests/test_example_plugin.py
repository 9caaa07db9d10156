"""The example third-party plugin, pip-installed into a temp dir (never into the shared
venv) and discovered through its entry point by a real `sidecar-agent` process."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_cli, spawn_agent, wait_http, wait_until

EXAMPLE = ROOT / "examples" / "custom_plugin"


def _can_build_offline() -> bool:
    # setuptools builds wheels by itself from 70.1 on; before that it needs `wheel`.
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("build") / "custom_plugin"  # pip builds in place: keep the tree clean
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(src)]
    if _can_build_offline():
        cmd.insert(5, "--no-build-isolation")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=src)
    assert r.returncode == 0, r.stderr
    assert (target / "sidecar_example_plugin" / "__init__.py").exists()
    return str(target)


def test_plugins_command_lists_it(installed, tmp_path):
    r = run_cli("plugins", cwd=tmp_path, extra_path=[installed])
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[0] == "example")
    assert "sidecar-example-plugin" in line and "0.1.0" in line and "loaded" in line
    assert "source:heartbeat" in line and "sink:textfile" in line


def test_not_found_without_it(tmp_path):
    """Without the temp install, the plugin is listed only if this environment has the
    distribution itself (e.g. .venv after the README's `pip install ./examples/custom_plugin`):
    found through installed entry points, never through the examples folder. Whatever else is
    installed in .venv, the answer must match it (issue 17: this failed once it was installed)."""
    from importlib.metadata import distributions

    installed_here = any(d.metadata["Name"] == "sidecar-example-plugin" for d in distributions())
    r = run_cli("plugins", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("example ") for ln in r.stdout.splitlines()) == installed_here, r.stdout


def test_source_events_reach_its_sink(installed, tmp_path, free_port):
    out = tmp_path / "beats.txt"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\ndata_dir = "{tmp_path / "data"}"\n[server]\nport = {free_port}\n'
        '[sources.heartbeat]\ninterval_s = 0.05\n'
        f'[sinks.beats]\ntype = "textfile"\npath = "{out}"\npolicies = []\n'
    )
    r = run_cli("check-config", str(cfg), cwd=tmp_path, extra_path=[installed])
    assert r.returncode == 0, r.stderr
    proc = spawn_agent(cfg, cwd=tmp_path, extra_path=[installed])
    try:
        wait_http(f"http://127.0.0.1:{free_port}/healthz", proc)
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3)
        status = wait_http(f"http://127.0.0.1:{free_port}/api/v1/status", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    plugin = next(p for p in status["plugins"] if p["name"] == "example")
    assert plugin["package"] == "sidecar-example-plugin" and plugin["state"] == "loaded"
    for line in out.read_text().splitlines():
        _, name, value = line.split()
        assert (name, value) == ("heartbeat", "1.0")
