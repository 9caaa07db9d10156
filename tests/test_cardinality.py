"""Cardinality limits ([agent] max_series_per_name): the SeriesLimit rules with a fake clock,
then a real agent capping every way in (record(), HTTP, StatsD, Prometheus scrape, OTLP)."""

from __future__ import annotations

import socket
import time

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agent.api.metrics import render
from agent.cardinality import OTHER_NAMES, OVERFLOW_TAGS, SeriesLimit
from agent.event import Event
from tests.helpers import await_until, jsonl_sink, post_events, read_jsonl, start_agent


def ev(name: str, value: float = 1.0, **tags: str) -> Event:
    return Event(name=name, kind="counter", value=value, tags=tags)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def tags_of(events: list[Event]) -> list[dict[str, str]]:
    return [e.tags for e in events]


def test_past_the_cap_new_tag_sets_fold_into_one_overflow_series_keeping_value_and_kind():
    limit = SeriesLimit(3)
    events = [ev("hits", float(i), user=str(i)) for i in range(6)] + [ev("hits", 9.0, user="1")]
    events.append(Event(name="hits", kind="gauge", value=7.0, tags={"user": "new"}, data={"k": 1}))
    assert limit.apply(events) == 4
    assert tags_of(events) == [
        {"user": "0"},
        {"user": "1"},
        {"user": "2"},
        OVERFLOW_TAGS,
        OVERFLOW_TAGS,
        OVERFLOW_TAGS,
        {"user": "1"},
        OVERFLOW_TAGS,
    ]  # a known series still passes
    assert [e.value for e in events] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0, 7.0]
    assert (events[-1].kind, events[-1].data) == ("gauge", {"k": 1})
    assert limit.overflowed == {"hits": 4}
    events[3].tags["x"] = "y"  # each folded event has its own dict
    assert events[4].tags == OVERFLOW_TAGS
    # the cap is per name; tag order does not make another series; no tags is a series too
    other = [
        ev("other", a="1", b="2"),
        Event(name="other", kind="counter", value=1.0, tags={"b": "2", "a": "1"}),
        ev("other"),
    ]
    assert limit.apply(other) == 0 and tags_of(other) == [{"a": "1", "b": "2"}, {"b": "2", "a": "1"}, {}]
    assert limit.describe()["overflowed"] == {"hits": 4}


def test_a_series_counts_for_30_to_60_minutes_after_it_was_last_seen():
    clock = Clock()
    limit = SeriesLimit(2, clock=clock)
    limit.apply([ev("n", user="a"), ev("n", user="b")])
    clock.t += 1800  # a new half hour: a and b move to the previous window
    kept = [ev("n", user="a")]
    assert limit.apply(kept) == 0  # a is seen again: still one of the two
    assert limit.apply([ev("n", user="c")]) == 1  # b still counts
    clock.t += 1800  # b was last seen over 30 minutes ago: forgotten; a was seen in the last half hour
    assert limit.apply([ev("n", user="c")]) == 0
    assert limit.apply([ev("n", user="d")]) == 1
    clock.t += 3600  # a whole hour without an event: every series is forgotten
    assert limit.apply([ev("n", user="d"), ev("n", user="e"), ev("n", user="f")]) == 1
    assert limit.describe()["tracked_series"] == 2


def test_memory_is_bounded_by_tracked_series_and_names():
    clock = Clock()
    limit = SeriesLimit(1000, max_tracked=5, max_names=3, clock=clock)
    batch = [ev("a", user=str(i)) for i in range(4)] + [ev("b"), ev("c", x="1"), ev("d")]
    assert tags_of(batch)[-2:] == [{"x": "1"}, {}]
    limit.apply(batch)
    assert limit.tracked == 5 and set(limit.names) == {"a", "b"}
    assert limit.overflowed == {"c": 1, "d": 1}  # no room: folded, never dropped
    clock.t += 1800
    limit.apply([ev("a", user="0")])
    clock.t += 1800  # only a/0 was seen: the rest is forgotten
    limit.apply([ev("c", x="1")])
    assert limit.tracked == 2 and set(limit.names) == {"a", "c"}
    # the names counted as overflowed are bounded as well
    limit = SeriesLimit(1, max_names=2)
    limit.apply([ev(n, user=str(i)) for n in "xyz" for i in range(3)])
    assert limit.overflowed == {"x": 2, "y": 2, OTHER_NAMES: 3}


async def test_every_way_in_is_capped_counted_at_metrics_and_status_and_nothing_is_lost(tmp_path):
    page = "\n".join(f'scraped_gauge{{user="{i}"}} {i}' for i in range(6)) + "\n"

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="# TYPE scraped_gauge gauge\n" + page)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    target = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    agent = await start_agent(
        tmp_path / "data",
        sinks={"out": jsonl_sink(tmp_path / "out.jsonl")},
        agent={"max_series_per_name": 3},
        dashboard={"store": False},
        sources={
            "statsd": {"port": 0},
            "prom": {"type": "prometheus", "url": target, "interval_s": 3600},
            "otlp": {"port": 0},
        },
    )
    try:
        otlp = await await_until(lambda: agent._source_stats["otlp"].get("address"), what="the otlp listener")
        now_ns = str(time.time_ns())
        points = [
            {"asDouble": i, "timeUnixNano": now_ns, "attributes": [{"key": "user", "value": {"stringValue": str(i)}}]}
            for i in range(6)
        ]
        body = {
            "resourceMetrics": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "b"}}]},
                    "scopeMetrics": [{"metrics": [{"name": "otlp_gauge", "gauge": {"dataPoints": points}}]}],
                }
            ]
        }
        async with aiohttp.ClientSession() as s, s.post(f"http://{otlp}/v1/metrics", json=body) as r:
            assert r.status == 200, await r.text()  # answered after the journal commit
        for i in range(6):
            agent.record("recorded", 1, kind="counter", tags={"user": str(i)})
        await post_events(
            agent, [{"name": "posted", "value": 1, "kind": "counter", "tags": {"user": str(i)}} for i in range(6)]
        )
        comp = lambda: next(c for c in agent.status()["components"] if c["name"] == "statsd")  # noqa: E731
        host, port = (await await_until(lambda: comp().get("stats", {}).get("address"))).rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto("\n".join(f"udp:1|c|#user:{i}" for i in range(6)).encode(), (host, int(port)))

        def landed() -> dict[str, list[dict]]:
            out: dict[str, list[dict]] = {}
            for e in read_jsonl(tmp_path / "out.jsonl"):
                out.setdefault(e["name"], []).append(e)
            # StatsD may aggregate per interval: wait for all six increments, however they are split
            if sum(e["value"] for e in out.get("udp", [])) < 6 or len(out.get("scraped_gauge", [])) < 6:
                return {}
            return out if {"recorded", "posted", "otlp_gauge"} <= out.keys() else {}

        got = await await_until(landed, timeout=30, what="events of every way in in the sink")
        assert await agent.flush(10)
        status = agent.status()
        text = render(agent)
    finally:
        await agent.stop()
        await runner.cleanup()
    for name in ("recorded", "posted", "udp", "scraped_gauge", "otlp_gauge"):
        events = got[name]
        users = {e["tags"]["user"] for e in events if "user" in e["tags"]}
        overflow = [e for e in events if e["tags"] == OVERFLOW_TAGS]
        assert len(users) == 3 and overflow, (name, events)
        assert {e["kind"] for e in events} == {"gauge" if name.endswith("gauge") else "counter"}
    for name in ("scraped_gauge", "otlp_gauge"):
        assert sum(e["value"] for e in got[name]) == sum(range(6))  # values kept as they were
    assert len(got["otlp_gauge"]) == 6
    assert sum(e["value"] for e in got["udp"]) == 6
    assert [len(got[n]) for n in ("recorded", "posted")] == [6, 6]
    overflowed = status["series"]["overflowed"]
    assert {"recorded": 3, "posted": 3, "scraped_gauge": 3, "otlp_gauge": 3}.items() <= overflowed.items()
    assert overflowed["udp"] >= 1
    assert status["series"]["max_series_per_name"] == 3
    fam = {f.name: f for f in text_string_to_metric_families(text)}["sidecar_agent_series_overflow"]
    by_name = {s.labels["name"]: s.value for s in fam.samples}
    assert by_name == {k: float(v) for k, v in overflowed.items()}
    assert agent.ledger.total() == 0  # folded, not lost


def test_a_forwarders_events_are_capped_by_the_owner(tmp_path):
    """A child forked after start() forwards to its parent (agent.forwarding): the owner's
    committer caps what the forwarder sends, as it caps its own records."""
    import subprocess
    import sys
    import textwrap

    from tests.helpers import subprocess_env

    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        import agent

        owner = agent.start({"agent": {"data_dir": "data", "max_series_per_name": 2}, "server": {"enabled": False},
                             "dashboard": {"store": False},
                             "sinks": {"out": {"type": "jsonl", "path": "out.jsonl", "policies": []}}})
        pid = os.fork()
        if pid == 0:
            for i in range(4):
                agent.record("forwarded", 1, kind="counter", tags={"user": str(i)})
            ok = type(agent.current()).__name__ == "Forwarder" and agent.flush(30)
            agent.stop()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert agent.flush(30)
        print(owner.status()["series"]["overflowed"])
        agent.stop()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    )
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "{'forwarded': 2}"
    events = [e for e in read_jsonl(tmp_path / "out.jsonl") if e["name"] == "forwarded"]
    assert sorted(e["tags"].get("user", "overflow") for e in events) == ["0", "1", "overflow", "overflow"]
    assert sum(e["value"] for e in events) == 4
