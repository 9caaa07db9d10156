"""Failover (issue 12, item 2): when the owner of a data dir dies (kill -9) or stops
while forwarders keep recording, one forwarder takes the data-dir lock and becomes the
owner (journal, sinks, HTTP server on the same port), the others reconnect to it, and
every event arrives exactly once: in the jsonl sink (at-least-once, so a repeat must be
the same event under the same id) and in Postgres (one row per id).

Each process is a real python process (tests/test_forwarding.py says why); they share
`cfg.json`, record events with a unique (worker, k) in `data`, and wait for a file
`stop-<pid>` before they stop, so the test decides the order they leave in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import losses_in_db, read_jsonl, subprocess_env, wait_http, wait_until
from tests.test_forwarding import assert_exactly_once

OWNER = """
import json, sys
from pathlib import Path
import agent

a = agent.start(json.loads(Path("cfg.json").read_text()))
assert type(a).__name__ == "Agent", a
print("ready", flush=True)
if sys.stdin.readline().strip() == "stop":  # else it is killed
    agent.stop()
    print("stopped", flush=True)
"""

# argv: worker, events to flush first (what a flush confirmed must survive the owner),
# then at least as many more. It goes on recording, with pauses, until the test has made
# the owner go (the file `gone`) and it is connected to the next owner (or is it), then
# for N1 events more, so the owner goes mid-traffic;
# then it flushes again and prints its view, with `n`, the events it recorded in all.
FORWARDER = """
import json, os, sys, time
from pathlib import Path
import agent
from tests.test_forwarding import _wait_file

W, N1 = (int(x) for x in sys.argv[1:3])

def produce(lo, hi, pause=0.0):
    for k in range(lo, hi):
        agent.record("fw.event", k, tags={"worker": str(W)}, data={"w": W, "k": k})
        if pause and k % 50 == 0:
            time.sleep(pause)

fw = agent.start(json.loads(Path("cfg.json").read_text()))
assert type(fw).__name__ == "Forwarder", fw
produce(0, N1)
assert agent.flush(60)
print("flushed", flush=True)
n, end = N1, time.monotonic() + 120  # bounded, should the owner never change
while not (Path("gone").exists() and (fw.owner.owner_changes or fw.owner.took_over)) and time.monotonic() < end:
    produce(n, n + 50, pause=0.01)
    n += 50
produce(n, n + N1, pause=0.01)
n += N1
ok = agent.flush(120)
a = agent.current()
out = {"pid": os.getpid(), "ok": ok, "role": type(a).__name__, "fw": fw.status(), "n": n}
if out["role"] == "Agent":
    out["owner"] = a.status()["owner"]
print(json.dumps(out), flush=True)
_wait_file(Path(f"stop-{os.getpid()}"))
agent.stop()
"""

N1 = 500


def _config(tmp_path: Path, port: int, pg: dict | None) -> None:
    sinks: dict = {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": []}}
    if pg is not None:
        sinks["pg"] = {"type": "postgres", "policies": [], **pg}
    cfg = {
        "agent": {"data_dir": "data", "id": "failover", "shutdown_timeout_s": 10},
        "server": {"enabled": True, "host": "127.0.0.1", "port": port},
        "dashboard": {"store": False},
        "sinks": sinks,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))


def _spawn(tmp_path: Path, code: str, *args: object) -> subprocess.Popen[str]:
    path = tmp_path / f"p{abs(hash(code))}.py"
    if not path.exists():  # never rewritten: a python still starting may be reading it
        tmp = path.with_suffix(".tmp")
        tmp.write_text(textwrap.dedent(code))
        tmp.rename(path)
    return subprocess.Popen([sys.executable, str(path), *map(str, args)], cwd=tmp_path, env=subprocess_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if not line:  # every writer closed stdout: say what the process (and its children) said
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(60)
        err = p.stderr.read() if p.stderr and p.poll() is not None else "(still running)"
        raise AssertionError(f"pid {p.pid} ended ({p.returncode}): {err}")
    return line


def _status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=10) as r:
        return json.loads(r.read())


def _run_failover(tmp_path: Path, port: int, how: str) -> tuple[list[dict], int]:
    """Owner plus 3 forwarders; the owner goes (`how`) once each forwarder flushed its
    first part; returns the forwarders' final views and the old owner's pid."""
    owner = _spawn(tmp_path, OWNER)
    procs: list[subprocess.Popen[str]] = [owner]
    try:
        assert _line(owner) == "ready"
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        fws = [_spawn(tmp_path, FORWARDER, w, N1) for w in (1, 2, 3)]
        procs += fws
        for p in fws:
            assert _line(p) == "flushed"
        if how == "kill":
            os.kill(owner.pid, signal.SIGKILL)
        else:
            assert owner.stdin is not None
            owner.stdin.write("stop\n")
            owner.stdin.flush()
        (tmp_path / "gone").touch()
        views = [json.loads(_line(p)) for p in fws]
        assert owner.wait(60) == (-signal.SIGKILL if how == "kill" else 0)
        # The HTTP server moved with the journal: same port, the new owner answers.
        new = [v for v in views if v["role"] == "Agent"]
        assert len(new) == 1, views
        status = _status(port)
        assert status["owner"]["pid"] == new[0]["pid"] and status["owner"]["took_over"] is not None
        # The others leave first (they hand over to the new owner), then the new owner.
        for v, p in zip(views, fws, strict=True):
            if v["role"] != "Agent":
                (tmp_path / f"stop-{v['pid']}").touch()
                assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
        for v, p in zip(views, fws, strict=True):
            if v["role"] == "Agent":
                (tmp_path / f"stop-{v['pid']}").touch()
                assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
        for p in fws:
            err = p.stderr.read() if p.stderr else ""
            assert "Traceback" not in err, err
        return views, owner.pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _check_views(views: list[dict], old_pid: int) -> None:
    assert all(v["ok"] for v in views), views
    (new,) = [v for v in views if v["role"] == "Agent"]
    assert new["fw"]["took_over"] is True
    took = new["owner"]["took_over"]
    assert took["from_pid"] == old_pid and took["gap_s"] is not None and took["gap_s"] >= 0
    gaps = sorted(v["fw"]["last_failover_gap_s"] for v in views if v["fw"]["last_failover_gap_s"] is not None)
    print(f"\nfailover: the new owner took over after {took['gap_s']}s; forwarders reconnected after {gaps}s")
    for v in views:
        fw = v["fw"]
        assert fw["losses"] == {} and fw["spilled"] == 0
        assert fw["owner_pid"] == new["pid"] and fw["owner_changes"] == 1, fw
        assert fw["last_failover_gap_s"] is not None


@pytest.mark.parametrize("how", ["kill", "stop"], ids=["kill-9", "clean-stop"])
async def test_owner_goes_mid_traffic_and_a_forwarder_takes_over(tmp_path, free_port, pg_table, how):
    """3 forwarders recording; the owner is killed with kill -9 (or stops cleanly) mid-
    traffic. One forwarder becomes the owner, its HTTP server answers on the old port,
    the other two reconnect to it; every event arrives once (Postgres: one row per id),
    and the ledger stays empty."""
    _config(tmp_path, free_port, {"dsn": pg_table.dsn, "schema": pg_table.schema, "table": pg_table.table})
    views, old_pid = _run_failover(tmp_path, free_port, how)
    _check_views(views, old_pid)
    expected = {(w, k) for w, v in zip((1, 2, 3), views, strict=True) for k in range(v["n"])}
    assert_exactly_once(read_jsonl(tmp_path / "out.jsonl"), expected)
    rows = await pg_table.fetch("SELECT id::text AS id, data FROM {t}")
    assert len(rows) == len({r["id"] for r in rows}) == len(expected)
    assert {(d["w"], d["k"]) for d in (json.loads(r["data"]) for r in rows)} == expected
    assert losses_in_db(tmp_path / "data" / "agent.db") == {}
    assert not list((tmp_path / "data" / "forward" / "spill").glob("*"))


FORKING_OWNER = """
import json, os, sys, time, traceback
from pathlib import Path
import agent
from tests.test_forwarding import _wait_file

a = agent.start(json.loads(Path("cfg.json").read_text()))
assert type(a).__name__ == "Agent", a
for w in (1, 2):
    if os.fork() == 0:  # a child forked after start(): a forwarder from the at-fork hook
        code = 0
        try:
            fw = agent.current()
            assert type(fw).__name__ == "Forwarder", fw
            n, end = 0, time.monotonic() + 120
            while n < %(n1)d or not (Path("gone").exists() and (fw.owner.owner_changes or fw.owner.took_over)):
                assert time.monotonic() < end, "the owner never changed"
                for k in range(n, n + 50):
                    agent.record("fw.event", k, data={"w": w, "k": k})
                n += 50
                if n == %(n1)d:
                    assert agent.flush(60)
                    os.write(1, b"flushed\\n")  # one write: the two children share the pipe
                time.sleep(0.01)
            ok = agent.flush(120)
            cur = agent.current()
            view = {"pid": os.getpid(), "w": w, "n": n, "ok": ok, "role": type(cur).__name__, "fw": fw.status()}
            os.write(1, (json.dumps(view) + "\\n").encode())
            _wait_file(Path(f"stop-{os.getpid()}"))
            agent.stop()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
sys.stdin.readline()  # it is killed before that
"""


def test_children_forked_after_start_take_over_from_their_killed_parent(tmp_path, free_port):
    """The owner forked two children after start() (gunicorn --preload, multiprocessing):
    their forwarders come from the at-fork hook. The parent is killed with kill -9 while
    they record: one child becomes the owner, the other forwards to it, nothing is lost."""
    import psutil

    _config(tmp_path, free_port, None)
    owner = _spawn(tmp_path, FORKING_OWNER % {"n1": N1})
    kids: list[int] = []
    try:
        assert [_line(owner), _line(owner)] == ["flushed", "flushed"]
        kids = [c.pid for c in psutil.Process(owner.pid).children()]
        os.kill(owner.pid, signal.SIGKILL)
        (tmp_path / "gone").touch()
        views = sorted((json.loads(_line(owner)) for _ in kids), key=lambda v: v["w"])
        assert owner.wait(60) == -signal.SIGKILL
        assert all(v["ok"] for v in views), views
        roles = sorted(v["role"] for v in views)
        assert roles == ["Agent", "Forwarder"], views
        new = next(v for v in views if v["role"] == "Agent")
        assert _status(free_port)["owner"]["pid"] == new["pid"]
        for v in sorted(views, key=lambda v: v["role"] == "Agent"):  # the owner leaves last
            (tmp_path / f"stop-{v['pid']}").touch()
            wait_until(lambda v=v: not psutil.pid_exists(v["pid"]) or psutil.Process(v["pid"]).status() == "zombie",
                       timeout=60, what=f"pid {v['pid']} to exit")
    finally:
        for pid in [owner.pid, *kids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        owner.wait(10)
    assert_exactly_once(read_jsonl(tmp_path / "out.jsonl"), {(v["w"], k) for v in views for k in range(v["n"])})
    assert losses_in_db(tmp_path / "data" / "agent.db") == {}
