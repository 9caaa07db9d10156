"""Helpers shared by the core tests: child processes with this tree on PYTHONPATH, jsonl reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(extra_path: list[str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child python: this tree (then extra_path) first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(extra_path or [])])
    env.update(extra)
    return env


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None, timeout: float = 60,
            extra_path: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `sidecar-agent ARGS` (as `python -m agent.cli`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=cwd, env=subprocess_env(extra_path),
                          capture_output=True, text=True, timeout=timeout)


def spawn_agent(config: str | os.PathLike[str], cwd: str | os.PathLike[str],
                extra_path: list[str] | None = None) -> subprocess.Popen[str]:
    """Start `sidecar-agent run --config FILE` as a child process (stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=cwd,
                            env=subprocess_env(extra_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_http(url: str, proc: subprocess.Popen[str] | None = None, timeout: float = 30) -> Any:
    """Poll a URL until it answers 200; return the decoded JSON body."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read())
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s: {last}")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every line of a jsonl sink's file, decoded."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def wait_for(predicate: Any, timeout: float = 20, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def plan_error(tmp_path: Path, toml: str) -> str:
    """The ConfigError message that loading and planning `toml` (as agent.toml) gives."""
    import pytest

    from agent.plan import plan
    from agent.config import load
    from agent.errors import ConfigError
    from agent.plugin.host import PluginHost

    p = tmp_path / "agent.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as err:
        cfg = load(p)
        plan(cfg, PluginHost(cfg.plugins).load())
    return str(err.value)
