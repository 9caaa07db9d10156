"""Pre-bound metric handles (agent.counter_handle / gauge_handle / histogram_handle): what
they record, and that they follow the process-wide agent through start, stop and fork."""

from __future__ import annotations

import json
import os
import threading

from tests.helpers import read_jsonl, wait_until
from tests.test_embed import _run_script


def _events(cfg):
    return read_jsonl(cfg["sinks"]["out"]["path"])


def test_handles_record_what_record_would(embedded, jsonl_config):
    tags = {"region": "eu"}
    orders = embedded.counter_handle("orders.placed", tags=tags)
    depth = embedded.gauge_handle("queue.depth")
    latency = embedded.histogram_handle("http.latency_s", tags={"route": "/a"})
    tags["region"] = "us"  # the handle copied its tags: later changes do not leak in
    a = embedded.start(jsonl_config)
    orders.inc()
    orders.inc(3)
    depth.set(17)
    latency.observe(0.25)
    embedded.record("orders.placed", 1, kind="counter", tags={"region": "eu"})  # the same, by hand
    assert embedded.flush(10)
    got = _events(jsonl_config)
    pid = str(os.getpid())
    by_name: dict[str, list] = {}
    for e in got:
        by_name.setdefault(e["name"], []).append(e)
    # the handle's two incs arrive summed, as one delta; record()'s call is its own event
    assert sorted((e["kind"], e["value"], e["tags"]) for e in by_name["orders.placed"]) == [
        ("counter", 1.0, {"region": "eu", "pid": pid}),
        ("counter", 4.0, {"region": "eu", "pid": pid}),
    ]
    (d,) = by_name["queue.depth"]
    assert d["value"] == 17 and d["tags"] == {"pid": pid} and d.get("kind", "gauge") == "gauge"
    (h,) = by_name["http.latency_s"]
    assert h["kind"] == "histogram" and h["value"] == 0.25 and h["tags"] == {"route": "/a", "pid": pid}
    assert all(e["source"] == "app" and e["id"] for e in got)
    assert len({e["id"] for e in got}) == len(got)
    assert a.ledger.total() == 0


def test_a_handle_made_before_start_counts_until_then_and_follows_a_restart(embedded, jsonl_config, tmp_path):
    hits = embedded.counter_handle("hits")
    hits.inc()
    hits.inc()
    a = embedded.start(jsonl_config)
    assert a.ledger.by_reason().get("not_started") == 2  # as agent.record() before start()
    hits.inc()
    assert embedded.flush(10)
    embedded.stop()
    hits.inc()  # stopped: counted, not queued anywhere
    second = dict(jsonl_config, sinks={"out": {**jsonl_config["sinks"]["out"], "path": str(tmp_path / "b.jsonl")}})
    b = embedded.start(second)
    assert b.ledger.by_reason().get("not_started") == 2 + 1  # the data dir's ledger, plus the call while stopped
    hits.inc(5)  # bound again, to the new agent
    assert embedded.flush(10)
    assert [e["value"] for e in _events(jsonl_config)] == [1.0]
    assert [e["value"] for e in _events(second)] == [5.0]


def test_a_full_intake_is_counted_for_a_histogram_handle(embedded, jsonl_config):
    jsonl_config["agent"]["intake_capacity"] = 2
    a = embedded.start(jsonl_config)
    burst = embedded.histogram_handle("burst")
    n = 5000
    for _ in range(n):
        burst.observe(1.0)
    assert embedded.flush(10)
    lost = a.ledger.by_reason().get("intake_full", 0)
    assert lost > 0 and len(_events(jsonl_config)) + lost == n


def test_a_full_intake_loses_no_counter_increment(embedded, jsonl_config):
    """A counter handle's sum waits in its cells while the intake is full: nothing lost."""
    jsonl_config["agent"]["intake_capacity"] = 2
    a = embedded.start(jsonl_config)
    burst = embedded.counter_handle("burst")
    flood = embedded.histogram_handle("flood")
    for _ in range(5000):
        burst.inc()
        flood.observe(1.0)  # keeps the intake full
    assert embedded.flush(10)
    assert sum(e["value"] for e in _events(jsonl_config) if e["name"] == "burst") == 5000
    assert a.ledger.by_reason().get("intake_full", 0) > 0  # the histogram's, counted


def test_invalid_handle_is_counted_not_raised(embedded, jsonl_config):
    a = embedded.start(jsonl_config)
    nameless = embedded.counter_handle("")
    nameless.inc()
    nameless.inc()  # found bad at binding: each call is counted, as record()'s would be
    embedded.gauge_handle("ok").set("not a number")  # type: ignore[arg-type]
    embedded.counter_handle("fine").inc("x")  # type: ignore[arg-type]
    embedded.counter_handle("fine").inc()
    assert embedded.flush(10)
    assert [e["name"] for e in _events(jsonl_config)] == ["fine"]
    assert a.ledger.by_reason().get("invalid") == 4


def test_a_handle_bound_before_fork_records_through_the_childs_forwarder(tmp_path):
    r = _run_script(
        tmp_path,
        """
        import os, sys
        import agent

        cfg = {"agent": {"data_dir": "data"}, "server": {"enabled": False},
               "sinks": {"out": {"type": "jsonl", "path": "out.jsonl", "policies": []}}}
        hits = agent.counter_handle("hits", tags={"side": "any"})
        parent = agent.start(cfg)
        hits.inc(1)  # bound to the parent's agent, maybe not emitted yet at fork time
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                assert type(agent.current()).__name__ == "Forwarder"
                hits.inc(2)  # the same handle: bound again, to the child's forwarder
                assert agent.flush(10)
                agent.stop()
            except BaseException as exc:
                print("child failed:", repr(exc), file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        hits.inc(3)
        assert agent.flush(10)
        assert parent.ledger.total() == 0, parent.ledger.snapshot()
        agent.stop()
        print(pid)
        sys.exit(os.waitstatus_to_exitcode(status))
    """,
    )
    assert r.returncode == 0, r.stderr
    child = r.stdout.split()[-1]
    sums: dict[str, float] = {}
    for e in read_jsonl(tmp_path / "out.jsonl"):
        sums[e["tags"]["pid"]] = sums.get(e["tags"]["pid"], 0) + e["value"]
    # the child counts only its own inc: the parent's 1 (in its cells at fork) is the parent's
    assert sums.pop(child) == 2.0
    assert list(sums.values()) == [4.0]


def test_concurrent_increments_sum_exactly(embedded, jsonl_config):
    """Many threads incrementing one handle at once, while the agent drains and some
    threads end: the delivered deltas add up to the number of incs, as far fewer events."""
    a = embedded.start(jsonl_config)
    hits = embedded.counter_handle("hits", tags={"route": "/a"})
    threads, per_thread = 8, 20_000
    go = threading.Barrier(threads)

    def work():
        go.wait()
        for _ in range(per_thread):
            hits.inc()

    for _ in range(2):  # the second wave finds the first wave's cells dead and folded
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    hits.inc(0.5)
    assert embedded.flush(10)
    got = _events(jsonl_config)
    assert sum(e["value"] for e in got) == 2 * threads * per_thread + 0.5
    assert {e["kind"] for e in got} == {"counter"} and len(got) < 1000
    assert a.ledger.total() == 0


def test_flush_returns_after_the_delta_is_journaled(embedded, jsonl_config):
    embedded.start(jsonl_config)
    hits = embedded.counter_handle("hits")
    for _ in range(1000):
        hits.inc()
    assert embedded.flush(10)  # no waiting for the next interval: flush drains the handles first
    assert journal_values(jsonl_config, "hits") and sum(journal_values(jsonl_config, "hits")) == 1000
    assert sum(e["value"] for e in _events(jsonl_config)) == 1000


def test_deltas_arrive_every_interval_without_a_flush(embedded, jsonl_config):
    embedded.start(jsonl_config)
    hits = embedded.counter_handle("hits")
    depth = embedded.gauge_handle("depth")
    hits.inc(2)
    depth.set(3)
    depth.set(7)  # only the last value of an interval is sent
    wait_until(lambda: len(journal_values(jsonl_config, "depth")) == 1, what="the gauge's reading, unflushed")
    wait_until(lambda: journal_values(jsonl_config, "hits") == [2.0], what="the counter's delta, unflushed")
    hits.inc(5)
    wait_until(lambda: journal_values(jsonl_config, "hits") == [2.0, 5.0], what="the next interval's delta")
    assert embedded.flush(10)
    assert journal_values(jsonl_config, "depth") == [7.0]  # unchanged since: not sent again


def journal_values(cfg, name):
    """The values of `name`'s events as the jsonl sink received them, in journal order. Not
    read from the journal itself: housekeeping compacts what every sink has confirmed, so
    rows a test waits for can be gone by the time it looks (a CI run caught that)."""
    return [e["value"] for e in _events(cfg) if e["name"] == name]


def test_a_forwarders_handle_sums_across_threads_exactly(embedded, jsonl_config, tmp_path):
    """Another process on the same data dir forwards: its drain thread sends the deltas,
    and its flush() hands over what its threads counted, exactly."""
    a = embedded.start(jsonl_config)
    cfg = {k: jsonl_config[k] for k in ("agent", "server", "sinks")}
    r = _run_script(
        tmp_path,
        f"""
        import json, os, threading
        import agent

        fw = agent.start(json.loads({json.dumps(json.dumps(cfg))}))
        assert type(fw).__name__ == "Forwarder", fw
        hits = agent.counter_handle("fw.hits")
        depth = agent.gauge_handle("fw.depth")

        def work():
            for i in range(5000):
                hits.inc()
                depth.set(i)

        pool = [threading.Thread(target=work) for _ in range(4)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        depth.set(-1.0)
        assert agent.flush(30)
        agent.stop()
        print(os.getpid())
        """,
    )
    assert r.returncode == 0, r.stderr
    child = r.stdout.split()[-1]
    assert embedded.flush(10)
    got = [e for e in _events(jsonl_config) if e["name"].startswith("fw.")]
    assert {e["tags"]["pid"] for e in got} == {child}
    assert sum(e["value"] for e in got if e["name"] == "fw.hits") == 20_000
    assert [e["value"] for e in got if e["name"] == "fw.depth"][-1] == -1.0
    assert a.ledger.total() == 0


def test_a_gauge_sends_its_last_value(embedded, jsonl_config):
    embedded.start(jsonl_config)
    depth = embedded.gauge_handle("depth")

    def work(k):
        for i in range(2000):
            depth.set(k * 10_000 + i)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    depth.set(0.5)
    assert embedded.flush(10)
    values = journal_values(jsonl_config, "depth")
    assert values[-1] == 0.5 and len(values) < 1000  # one reading per interval, not per set()


def test_a_call_after_the_stops_last_drain_is_counted_stopped(embedded, jsonl_config):
    """Between the intake's close and the end of a stop (sinks may take seconds), a
    handle's call is counted as `stopped`, as record()'s, not left in its cell."""
    a = embedded.start(jsonl_config)
    hits = embedded.counter_handle("hits")
    hits.inc(3)
    a.committer.close("stopped")  # what Agent.stop() does first; its drain comes next
    assert embedded.flush(10)  # the same drain: the 3 counted before the close go in
    hits.inc()
    hits.inc()
    assert a.ledger.by_reason().get("stopped") == 2
    embedded.stop()
    assert [e["value"] for e in _events(jsonl_config)] == [3.0]
