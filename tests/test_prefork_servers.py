"""Real pre-fork servers: gunicorn -w 4 with examples/gunicorn_app, with and without --preload.

The app calls agent.start() at import: without --preload each worker does (the first
owns the data dir, the others forward); with --preload the master does and every
worker gets a forwarder at fork. A bounded number of requests, then SIGTERM to the
master; every request's event must arrive exactly once (by id) with nothing lost. A
worker that could not hand over at shutdown spills its events to the data dir, so an
agent started on it afterwards takes them in before the file is checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import ROOT, read_jsonl, subprocess_env
from tests.test_forwarding import assert_exactly_once

pytest.importorskip("gunicorn")

REQUESTS = 200
WORKERS = 4


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def _wait_up(url: str, proc: subprocess.Popen) -> None:
    for _ in range(600):  # bounded: 600 * 0.05 s plus connect time
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {proc.returncode}")
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("gunicorn never answered")


@pytest.mark.parametrize("preload", [False, True], ids=["per-worker-start", "preload"])
def test_gunicorn_workers_deliver_every_request_once(tmp_path, free_port, preload):
    env = subprocess_env(
        SIDECAR_APP_DATA_DIR=str(tmp_path / "data"),
        SIDECAR_APP_JSONL=str(tmp_path / "out.jsonl"),
    )
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{free_port}",
           "--pythonpath", str(ROOT / "examples" / "gunicorn_app"), "--graceful-timeout", "30"]
    if preload:
        cmd.append("--preload")
    cmd.append("app:app")
    log = open(tmp_path / "gunicorn.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{free_port}/"
        _wait_up(base + "healthz", proc)
        # 16 clients at once: sync workers serve one request each at a time, so the
        # requests spread over the workers (owner and forwarders alike).
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: _get(f"{base}?i={i}"), range(REQUESTS)))
        assert all(status == 200 for status, _ in answers)
        pids = {body.strip() for _, body in answers}
        assert len(pids) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "gunicorn.log").read_text()
    assert "Traceback" not in text and "DataDirInUse" not in text, text
    # Whatever a worker spilled at shutdown is taken in by the next owner of the data dir.
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, agent
        a = agent.start({{"agent": {{"data_dir": {str(tmp_path / "data")!r}, "id": "gunicorn-app"}},
                          "server": {{"enabled": False}}, "dashboard": {{"store": False}},
                          "sinks": {{"out": {{"type": "jsonl", "path": {str(tmp_path / "out.jsonl")!r},
                                              "policies": []}}}}}})
        assert type(a).__name__ == "Agent"
        assert agent.flush(30)
        print(json.dumps(a.status()["losses"]))
        agent.stop()
    """)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}, "the ledger must be empty"
    rows = [e for e in read_jsonl(tmp_path / "out.jsonl") if e["name"] == "http.request"]
    for e in rows:
        e["data"] = {"w": 0, "k": e["data"]["i"]}
    assert_exactly_once(rows, {(0, k) for k in range(REQUESTS)})
    # Who sent what: the requests' events name the workers that served them.
    assert {e["tags"]["pid"] for e in rows} == pids
