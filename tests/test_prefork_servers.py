"""Real pre-fork servers with the example apps, which call agent.start() at import.

- gunicorn -w 4 (examples/gunicorn_app), with and without --preload: without it each
  worker calls start() (the first owns the data dir, the others forward); with it the
  master does and every worker gets a forwarder at fork.
- gunicorn --max-requests 50: workers are recycled (with and without --preload; without
  it the owner itself is recycled and the next worker to start takes the data dir).
- gunicorn SIGHUP mid-traffic: new workers are started and the old ones stopped;
  without --preload the owner is an old worker, and a new one takes the data dir over
  (failover), so the events reach the sink while the server still runs.
- uvicorn --workers 4 (examples/uvicorn_app): spawned workers, each calling start().

A bounded number of requests, then SIGTERM to the master; every request's event must
arrive exactly once (by id) with nothing lost. A worker that could not hand over at
shutdown spills its events to the data dir, so an agent started on it afterwards takes
them in before the file is checked.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, read_jsonl, subprocess_env, wait_until
from tests.test_forwarding import assert_exactly_once

REQUESTS = 200
WORKERS = 4


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


def _wait_up(url: str, proc: subprocess.Popen) -> None:
    for _ in range(1200):  # bounded: 1200 * 0.05 s plus connect time
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the server never answered")


def _serve(tmp_path: Path, cmd: list[str], traffic: Callable[[str, subprocess.Popen], set[str]]) -> set[str]:
    """Run the server, drive `traffic` (returns the pids that answered), SIGTERM it and
    wait for a clean exit; returns the pids."""
    env = subprocess_env(
        SIDECAR_APP_DATA_DIR=str(tmp_path / "data"),
        SIDECAR_APP_JSONL=str(tmp_path / "out.jsonl"),
    )
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_up(cmd_base(cmd) + "healthz", proc)
            pids = traffic(cmd_base(cmd), proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in text and "DataDirInUse" not in text, text
    return pids


def cmd_base(cmd: list[str]) -> str:
    for flag in ("-b", "--port"):
        if flag in cmd:
            value = cmd[cmd.index(flag) + 1]
            port = value.rsplit(":", 1)[-1]
            return f"http://127.0.0.1:{port}/"
    raise AssertionError(cmd)


def _requests(base: str, indices: range) -> set[str]:
    # 16 clients at once: sync workers serve one request each at a time, so the
    # requests spread over the workers (owner and forwarders alike).
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _get(f"{base}?i={i}"), indices))
    assert all(status == 200 for status, _ in answers)
    return {body.strip() for _, body in answers}


def _check(tmp_path: Path, n: int, pids: set[str]) -> None:
    """Take in what was spilled (an agent started on the data dir afterwards), check the
    ledger is empty and every request's event arrived once, tagged with its worker."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, agent
        a = agent.start({{"agent": {{"data_dir": {str(tmp_path / "data")!r}, "id": "prefork-app"}},
                          "server": {{"enabled": False}}, "dashboard": {{"store": False}},
                          "sinks": {{"out": {{"type": "jsonl", "path": {str(tmp_path / "out.jsonl")!r},
                                              "policies": []}}}}}})
        assert type(a).__name__ == "Agent"
        assert agent.flush(30)
        print(json.dumps(a.status()["losses"]))
        agent.stop()
    """)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}, "the ledger must be empty"
    rows = [e for e in read_jsonl(tmp_path / "out.jsonl") if e["name"] == "http.request"]
    for e in rows:
        e["data"] = {"w": 0, "k": e["data"]["i"]}
    assert_exactly_once(rows, {(0, k) for k in range(n)})
    # Who sent what: the requests' events name the workers that served them.
    assert {e["tags"]["pid"] for e in rows} == pids


def _gunicorn(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}",
            "--pythonpath", str(ROOT / "examples" / "gunicorn_app"), "--graceful-timeout", "30",
            *extra, "app:app"]


@pytest.mark.parametrize("preload", [False, True], ids=["per-worker-start", "preload"])
def test_gunicorn_workers_deliver_every_request_once(tmp_path, free_port, preload):
    pytest.importorskip("gunicorn")

    def traffic(base: str, proc: subprocess.Popen) -> set[str]:
        pids = _requests(base, range(REQUESTS))
        assert len(pids) >= 2
        return pids

    pids = _serve(tmp_path, _gunicorn(free_port, *(["--preload"] if preload else [])), traffic)
    _check(tmp_path, REQUESTS, pids)


@pytest.mark.parametrize("preload", [False, True], ids=["per-worker-start", "preload"])
def test_gunicorn_max_requests_recycling_loses_nothing(tmp_path, free_port, preload):
    """--max-requests 50 with 400 requests over 4 workers: every worker is replaced at
    least once. A recycled forwarder hands over at exit; without --preload the owner is
    a worker too, and its replacement (or a later one) owns the data dir next."""
    pytest.importorskip("gunicorn")
    n = 400

    def traffic(base: str, proc: subprocess.Popen) -> set[str]:
        pids = _requests(base, range(n))
        assert len(pids) > WORKERS, "no worker was recycled"
        return pids

    cmd = _gunicorn(free_port, "--max-requests", "50", *(["--preload"] if preload else []))
    pids = _serve(tmp_path, cmd, traffic)
    _check(tmp_path, n, pids)


@pytest.mark.parametrize("preload", [False, True], ids=["per-worker-start", "preload"])
def test_gunicorn_sighup_reload_mid_traffic_loses_nothing(tmp_path, free_port, preload):
    """SIGHUP while 8 clients keep sending: gunicorn starts new workers and stops the
    old ones gracefully; the old ones hand over (or spill) and the new ones forward.
    Traffic goes on until the new workers have served 100 requests, and 100 more once
    every old worker is gone (bounded).

    A worker_exit hook holds each exiting worker for 3 s, so without --preload the new
    workers all start while the old owner still holds the data dir (they forward), and
    it leaves after them: no process owns the data dir until a new worker takes it over.
    Without the hook a new worker that boots after the old owner left just owns it."""
    pytest.importorskip("gunicorn")
    issued = [0]
    conf = tmp_path / "gunicorn_conf.py"
    conf.write_text("import time\n\ndef worker_exit(server, worker):\n    time.sleep(3)\n")

    def traffic(base: str, proc: subprocess.Popen) -> set[str]:
        lock = threading.Lock()
        stop = threading.Event()
        answers: list[tuple[int, str]] = []
        errors: list[BaseException] = []

        def client() -> None:
            while not stop.is_set():
                with lock:
                    if issued[0] >= 50000:  # the bound, should the new workers never answer
                        return
                    i = issued[0]
                    issued[0] += 1
                try:
                    answer = _get(f"{base}?i={i}")
                except BaseException as exc:  # reported below: every request must succeed
                    errors.append(exc)
                    return
                with lock:
                    answers.append(answer)

        def answered(pred: Callable[[], bool]) -> bool:
            for _ in range(2400):  # bounded: 120 s
                with lock:
                    if pred() or errors or issued[0] >= 50000:
                        return pred()
                time.sleep(0.05)
            return False

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            assert answered(lambda: len(answers) >= 100)
            old: set[str] = set()
            for _ in range(1200):  # bounded: the workers now (all booted)
                old = {f"{c.pid}\n" for c in psutil.Process(proc.pid).children()}
                if len(old) == WORKERS:
                    break
                time.sleep(0.05)
            assert len(old) == WORKERS, old
            proc.send_signal(signal.SIGHUP)  # mid-traffic: requests are in flight now
            assert answered(lambda: sum(1 for _, body in answers if body not in old) >= 100), "no new worker answered"
            # And on after every old worker (the owner among them, without --preload) is
            # gone: those requests need an owner that is a new worker (failover).
            wait_until(lambda: not any(psutil.pid_exists(int(p)) for p in old), timeout=120, what="old workers gone")
            with lock:
                after = len(answers)
            assert answered(lambda: len(answers) >= after + 100), "no requests answered after the reload"
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors
        assert len(answers) == issued[0] and all(status == 200 for status, _ in answers)
        pids = {body.strip() for _, body in answers}
        assert pids - {p.strip() for p in old}, "no new worker answered"

        # Some process owns the data dir after the reload, while the server still runs:
        # with --preload the master; without it the old owner was a worker that exited,
        # and a new worker (a forwarder) took the data dir over. Every request's event
        # reaches the sink now, not only when an agent is started after shutdown.
        def delivered() -> bool:
            got = {e["data"]["i"] for e in read_jsonl(tmp_path / "out.jsonl") if e["name"] == "http.request"}
            return got >= set(range(issued[0]))

        wait_until(delivered, timeout=120, what="every request's event in the sink before the server stops")
        return pids

    pids = _serve(tmp_path, _gunicorn(free_port, "-c", str(conf), *(["--preload"] if preload else [])), traffic)
    _check(tmp_path, issued[0], pids)


def test_uvicorn_workers_deliver_every_request_once(tmp_path, free_port):
    """uvicorn --workers 4 spawns its workers; each imports the app and calls start().
    An async worker can take every connection, so requests go on in rounds of 50 until
    at least two workers (so at least one forwarder) have answered (bounded)."""
    pytest.importorskip("uvicorn")
    issued = [0]

    def traffic(base: str, proc: subprocess.Popen) -> set[str]:
        pids: set[str] = set()
        while issued[0] < 5000 and (issued[0] < REQUESTS or len(pids) < 2):
            pids |= _requests(base, range(issued[0], issued[0] + 50))
            issued[0] += 50
        assert len(pids) >= 2, "one worker answered everything"
        return pids

    cmd = [sys.executable, "-m", "uvicorn", "--workers", str(WORKERS), "--host", "127.0.0.1",
           "--port", str(free_port), "--app-dir", str(ROOT / "examples" / "uvicorn_app"),
           "--timeout-graceful-shutdown", "30", "--no-access-log", "app:app"]
    pids = _serve(tmp_path, cmd, traffic)
    _check(tmp_path, issued[0], pids)
