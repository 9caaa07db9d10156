"""The runnable examples run and their events reach the sink (stdout); the example
configs check and do what their headers say."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys

from tests.helpers import ROOT, free_port, read_jsonl, run_cli, spawn_agent, subprocess_env, wait_http, wait_until


def _run(tmp_path, *args):
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def test_asyncio_app(tmp_path):
    events = _run(tmp_path, str(ROOT / "examples" / "asyncio_app.py"))
    names = [e["name"] for e in events]
    assert names.count("orders.placed") == 20 and names.count("request.seconds") == 20


def test_wsgi_app(tmp_path, free_port):
    events = _run(tmp_path, str(ROOT / "examples" / "wsgi_app.py"), str(free_port))
    routes = sorted(e["tags"]["route"] for e in events if e["name"] == "http.requests")
    assert routes == ["/", "/a", "/b"]
    assert sum(e["name"] == "http.request.seconds" for e in events) == 3


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_starter_config_runs_on_loopback_with_its_data_beside_it(tmp_path):
    """examples/agent.toml as a new user runs it, from another folder (only its two ports
    changed, so it cannot collide with anything else on this machine)."""
    http, udp = free_port(), _free_udp_port()
    text = (ROOT / "examples" / "agent.toml").read_text()
    text, n = re.subn(r"(?m)^port = 8765$", f"port = {http}", text)
    text, m = re.subn(r"(?m)^port = 8125$", f"port = {udp}", text)
    assert n == m == 1
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "agent.toml").write_text(text)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = spawn_agent(conf / "agent.toml", cwd=cwd)
    try:
        status = wait_http(f"http://127.0.0.1:{http}/api/v1/status", proc, timeout=60)
        sources = {c["name"]: c for c in status["components"] if c["kind"] == "source"}
        assert set(sources) == {"system", "process", "statsd"}

        def statsd_address():
            comps = wait_http(f"http://127.0.0.1:{http}/api/v1/status", proc)["components"]
            return next(c for c in comps if c["name"] == "statsd").get("stats", {}).get("address")

        address = wait_until(statsd_address, timeout=60, what="the statsd source to listen")
        assert address == f"127.0.0.1:{udp}"  # loopback only
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"starter.hits:1|c", ("127.0.0.1", udp))
        out = conf / ".sidecar-agent" / "events.jsonl"
        wait_until(lambda: any(e["name"] == "starter.hits" for e in read_jsonl(out)), timeout=60,
                   what="the statsd line in events.jsonl beside the config")
        assert (conf / ".sidecar-agent" / "agent.db").exists()
        assert list(cwd.iterdir()) == []  # nothing in the working directory
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as the header says
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_container_config_checks_and_its_header_promises_only_what_it_has(tmp_path):
    path = ROOT / "examples" / "sidecar.toml"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)], cwd=tmp_path,
                       env=subprocess_env(SIDECAR_AGENT_TOKEN="t"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "container" in header and "not for a host" in header
    assert "[sinks.supabase]" not in text.replace(header, "")  # a header that mentions Supabase says how to add it
    # without the token it refuses to listen on every interface
    r = run_cli("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2 and "server.token" in r.stderr
