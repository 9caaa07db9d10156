"""Embedding: agent.start() on a daemon thread, the sync recording API, fork and exit safety."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from agent.losses import LossLedger
from agent.pipeline.recording import RecordQueue
from tests.helpers import read_jsonl, subprocess_env


def _events(cfg):
    return read_jsonl(cfg["sinks"]["out"]["path"])


def test_start_record_flush_stop(embedded, jsonl_config):
    a = embedded.start(jsonl_config)
    assert embedded.current() is a and a.state == "running"
    embedded.record("orders.placed", 2, kind="counter", tags={"region": "eu"}, data={"order": 7})
    embedded.counter("hits")
    embedded.gauge("queue.depth", 12.5)
    embedded.histogram("latency", 0.25, tags={"route": "/a"})
    embedded.record("deploy", session_id="s-1")
    assert embedded.flush(10)
    embedded.stop()
    assert embedded.current() is None and a.state == "stopped"
    got = {e["name"]: e for e in _events(jsonl_config)}
    assert set(got) == {"orders.placed", "hits", "queue.depth", "latency", "deploy"}
    assert got["orders.placed"]["kind"] == "counter" and got["orders.placed"]["value"] == 2.0
    pid = str(os.getpid())  # agent.record() tags the producing process
    assert got["orders.placed"]["tags"] == {"region": "eu", "pid": pid} and got["orders.placed"]["data"] == {"order": 7}
    assert got["hits"]["tags"] == {"pid": pid}
    assert got["hits"]["kind"] == "counter" and got["hits"]["value"] == 1.0
    assert got["queue.depth"]["value"] == 12.5 and got["queue.depth"].get("kind", "gauge") == "gauge"
    assert got["latency"]["kind"] == "histogram"
    assert got["deploy"]["kind"] == "event" and got["deploy"]["session_id"] == "s-1"
    assert all(e["source"] == "app" and e["agent_id"] == "test-agent" and e["id"] for e in got.values())


def test_start_is_idempotent(embedded, jsonl_config):
    a = embedded.start(jsonl_config)
    assert embedded.start(jsonl_config) is a
    assert embedded.start() is a  # even with other arguments: one agent per process
    embedded.stop()
    embedded.stop()  # and stop is safe twice


def test_timer_context_manager_and_decorators(embedded, jsonl_config):
    embedded.start(jsonl_config)

    with embedded.timer("block", tags={"k": "v"}):
        pass

    @embedded.timer("sync.fn")
    def work(x):
        return x * 2

    @embedded.timer("async.fn")
    async def awork(x):
        await asyncio.sleep(0)
        return x + 1

    assert work(21) == 42
    assert asyncio.run(awork(1)) == 2
    assert asyncio.iscoroutinefunction(awork) and work.__name__ == "work"
    a = embedded.current()
    with a.timer("agent.block"):
        pass
    assert embedded.flush(10)
    got = {e["name"]: e for e in _events(jsonl_config)}
    assert set(got) == {"block", "sync.fn", "async.fn", "agent.block"}
    for e in got.values():
        assert e["kind"] == "histogram" and e["value"] >= 0
    assert got["block"]["tags"] == {"k": "v", "pid": str(os.getpid())}
    # Agent.record tags the producing process too (where the committer drains it)
    assert got["agent.block"]["tags"] == {"pid": str(os.getpid())}


def test_timer_made_before_start_records_after(embedded, jsonl_config):
    @embedded.timer("early.fn")
    def f():
        return 1

    embedded.start(jsonl_config)
    f()
    assert embedded.flush(10)
    assert [e["name"] for e in _events(jsonl_config)] == ["early.fn"]


def test_record_from_threads_delivered_exactly_once(embedded, jsonl_config):
    per_thread, threads = 2000, 8
    # every event's tags are its key here: above the cardinality cap they would be folded
    jsonl_config["agent"]["max_series_per_name"] = per_thread * threads
    embedded.start(jsonl_config)
    barrier = threading.Barrier(threads)

    def worker(t):
        barrier.wait()
        for i in range(per_thread):
            embedded.counter("thr", tags={"t": str(t), "i": str(i)})

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert embedded.flush(30)
    events = _events(jsonl_config)
    keys = [(e["tags"]["t"], e["tags"]["i"]) for e in events]
    assert len(keys) == per_thread * threads
    assert len(set(keys)) == len(keys)
    assert len({e["id"] for e in events}) == len(events)
    assert embedded.current().ledger.total() == 0


def test_intake_full_is_counted(embedded, jsonl_config):
    jsonl_config["agent"]["intake_capacity"] = 2
    a = embedded.start(jsonl_config)
    n = 5000
    for i in range(n):
        embedded.record("burst", i)
    assert embedded.flush(10)
    delivered = len(_events(jsonl_config))
    lost = a.ledger.by_reason().get("intake_full", 0)
    assert lost > 0
    assert delivered + lost == n


def test_record_before_start_counted_not_started(embedded, jsonl_config):
    embedded.record("too.early", 1)
    embedded.counter("too.early")
    a = embedded.start(jsonl_config)
    assert a.ledger.by_reason().get("not_started") == 2
    assert embedded.flush(10)
    assert _events(jsonl_config) == []


def test_counts_made_before_a_failed_start_reach_the_next_agent(embedded, jsonl_config):
    embedded.record("too.early", 1)
    bad = {**jsonl_config, "sinks": {"x": {"type": "no-such-sink"}}}
    with pytest.raises(Exception, match="no-such-sink"):
        embedded.start(bad)
    a = embedded.start(jsonl_config)
    assert a.ledger.by_reason().get("not_started") == 1


def test_invalid_record_is_counted_not_raised(embedded, jsonl_config):
    a = embedded.start(jsonl_config)
    embedded.record("", 1)
    embedded.record("ok", "not a number")
    embedded.record("ok", 1, kind="summary")
    embedded.record("fine", 1)
    assert embedded.flush(10)
    assert [e["name"] for e in _events(jsonl_config)] == ["fine"]
    assert a.ledger.by_reason().get("invalid") == 3


class _Signalled(RecordQueue):
    """A queue nobody drains, which notes when record() signals it."""

    def __init__(self, capacity: int, signal_at: int) -> None:
        super().__init__(LossLedger(), capacity=capacity, commit_batch=3, signal_at=signal_at)
        self.signals: list[int] = []

    def _wake_up(self, n: int) -> None:
        self.signals.append(n)


@pytest.mark.parametrize("signal_at", [1, 2])
def test_module_record_behaves_as_the_queues_record(signal_at):
    """agent.record() inlines RecordQueue.record for speed: the same calls must queue the
    same tuples, signal at the same lengths and count the same losses on both."""
    from agent import embed

    calls = [
        (("a",), {}),
        (("b", 2.5), {"kind": "gauge", "tags": {"k": "v"}, "ts": 1000.0, "data": {"d": 1}, "session_id": "s"}),
        (("c", None), {"ts": 0.0}),  # 0 means "now", as None does
        (("d", 1), {"kind": "counter"}),
        (("e", 1), {}),  # over capacity: intake_full
    ]
    results = []
    for use_module in (True, False):
        q = _Signalled(capacity=4, signal_at=signal_at)
        embed._intake = q  # what _use() sets for a started agent; reset below
        try:
            before = time.time()
            for args, kw in calls:
                (embed.record if use_module else q.record)(*args, **kw)
            q.refused = "stopped"
            (embed.record if use_module else q.record)("f", 1)
        finally:
            embed._intake = None
        queued = [list(t) for t in q.records]
        for t in queued:
            assert t[4] == 1000.0 or before <= t[4] <= time.time()
            t[4] = None if t[4] != 1000.0 else t[4]
        results.append((queued, q.signals, q.ledger.by_reason()))
    assert results[0] == results[1]
    queued, signals, lost = results[0]
    assert [t[0] for t in queued] == ["a", "b", "c", "d"]
    assert queued[1] == ["b", 2.5, "gauge", {"k": "v"}, 1000.0, {"d": 1}, "s"]
    assert lost == {"intake_full": 1, "stopped": 1}
    assert signals == ([1, 3] if signal_at == 1 else [2, 3])


def _run_script(tmp_path, body, timeout=60):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_fork_child_forwards_to_the_parent(tmp_path):
    """A child forked after start() gets a forwarder to the parent's data dir (not the
    parent's agent, and no agent of its own): start() there returns it, whatever config
    it is given, and its events land in the parent's sinks with the child's pid."""
    r = _run_script(tmp_path, """
        import os, sys, json
        import agent

        def cfg(name):
            return {"agent": {"data_dir": name + "-data"}, "server": {"enabled": False},
                    "sinks": {"out": {"type": "jsonl", "path": name + ".jsonl", "policies": []}}}

        parent = agent.start(cfg("parent"))
        agent.record("before.fork", 1)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                fw = agent.current()
                assert fw is not None and fw is not parent, "child inherited the parent's agent"
                assert type(fw).__name__ == "Forwarder"
                agent.record("child.event", 1)
                assert agent.start(cfg("child")) is fw  # one agent per process, as before
                assert agent.flush(10)
                agent.stop()
            except BaseException as exc:
                print("child failed:", repr(exc), file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        agent.record("parent.after", 1)
        _, status = os.waitpid(pid, 0)
        assert agent.flush(10)
        agent.stop()
        print(pid)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    assert r.returncode == 0, r.stderr
    parent = {e["name"]: e for e in read_jsonl(tmp_path / "parent.jsonl")}
    assert sorted(parent) == ["before.fork", "child.event", "parent.after"]
    assert parent["child.event"]["tags"] == {"pid": r.stdout.split()[-1]}
    assert parent["before.fork"]["tags"]["pid"] != parent["child.event"]["tags"]["pid"]
    assert not (tmp_path / "child.jsonl").exists()


def test_interpreter_exit_stops_cleanly(tmp_path):
    r = _run_script(tmp_path, """
        import agent
        agent.start({"agent": {"data_dir": "data"}, "server": {"enabled": False},
                     "sinks": {"out": {"type": "jsonl", "path": "out.jsonl", "policies": []}}})
        for i in range(500):
            agent.record("at.exit", i)
        # no flush, no stop: atexit must deliver them
    """)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    values = sorted(e["value"] for e in read_jsonl(tmp_path / "out.jsonl"))
    assert values == [float(i) for i in range(500)]
