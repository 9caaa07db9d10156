"""The `sidecar-agent` command line as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import agent
from tests.helpers import (agent_config, jsonl_sink, read_jsonl, run_cli, spawn_agent, subprocess_env, wait_http,
                           write_toml)


def cli_config(tmp_path, port):
    """agent.toml: id "cli-test", the server on `port`, one jsonl sink `out`."""
    cfg = agent_config(tmp_path / "data", {"out": jsonl_sink(tmp_path / "out.jsonl")}, agent={"id": "cli-test"},
                       server={"port": port})
    return write_toml(tmp_path / "agent.toml", cfg)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_and_stops_on_signal(tmp_path, free_port, sig):
    import json
    import urllib.request

    proc = spawn_agent(cli_config(tmp_path, free_port), cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{free_port}"
        assert wait_http(base + "/healthz", proc) == {"status": "ok"}
        status = wait_http(base + "/api/v1/status", proc)
        assert status["agent_id"] == "cli-test" and status["state"] == "running"
        req = urllib.request.Request(base + "/api/v1/events", data=json.dumps({"name": "via.http", "value": 1}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 202
        proc.send_signal(sig)
        rc = proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    # what was accepted before the signal reached the sink during the graceful stop
    assert [e["name"] for e in read_jsonl(tmp_path / "out.jsonl")] == ["via.http"]


def test_run_with_bad_config_exits_nonzero(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[server]\nport = \"x\"\n")
    r = run_cli("run", "--config", str(p), cwd=tmp_path)
    assert r.returncode == 2
    assert "server.port" in r.stderr


def test_plugins_lists_builtins_with_package(tmp_path):
    r = run_cli("plugins", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.strip()}
    for name, provides in [("system", "source:system"), ("process", "source:process"), ("jsonl", "sink:jsonl"),
                           ("postgres", "sink:postgres"), ("supabase", "sink:supabase")]:
        assert name in rows, r.stdout
        assert rows[name][1] == "sidecar-agent" and rows[name][2] == agent.__version__
        assert rows[name][3] == "loaded"
        assert provides in " ".join(rows[name])


def test_plugins_json(tmp_path):
    import json

    r = run_cli("plugins", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plugins = {p["name"]: p for p in json.loads(r.stdout)}
    assert plugins["jsonl"]["package"] == "sidecar-agent"
    assert plugins["jsonl"]["provides"] == ["sink:jsonl"]


def test_version(tmp_path):
    r = run_cli("version", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.strip() == f"sidecar-agent {agent.__version__}"


@pytest.mark.parametrize("args", [("plugins", "--json"), ("plugins",), ("version",)])
def test_output_to_a_closed_pipe_exits_quietly(tmp_path, args):
    # `sidecar-agent plugins --json | head -1`: the reader is gone before the command writes
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=tmp_path, env=subprocess_env(),
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize("data_dir, problem", [
    ("/proc/sidecar-nope/data", "cannot use /proc/sidecar-nope: No such file or directory"),
    ("{file}/data", "cannot use {file}/data: Not a directory"),
])
def test_run_with_an_unusable_data_dir_names_it(tmp_path, free_port, data_dir, problem):
    file = tmp_path / "a-file"
    file.write_text("")
    data_dir, problem = data_dir.format(file=file), problem.format(file=file)
    cfg = write_toml(tmp_path / "agent.toml", {"agent": {"data_dir": data_dir}, "server": {"port": free_port}})
    r = run_cli("run", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"error: data dir {data_dir}: {problem}"], r.stderr


def test_run_with_a_port_out_of_range_is_a_config_error(tmp_path):
    cfg = write_toml(tmp_path / "agent.toml", {"server": {"port": 70000}})
    r = run_cli("run", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: {cfg}: server.port: expected int <= 65535"]


def test_init_writes_the_starter_config_and_never_overwrites(tmp_path):
    from tests.helpers import ROOT

    r = run_cli("init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = (tmp_path / "agent.toml").read_text()
    assert written == (ROOT / "examples" / "agent.toml").read_text()  # the README starts from the same file
    r = run_cli("check-config", "agent.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "agent.toml").write_text("# mine\n")
    r = run_cli("init", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["error: agent.toml exists; pass --force to overwrite it"]
    assert (tmp_path / "agent.toml").read_text() == "# mine\n"
    assert run_cli("init", "--force", "agent.toml", cwd=tmp_path).returncode == 0
    assert (tmp_path / "agent.toml").read_text() == written
