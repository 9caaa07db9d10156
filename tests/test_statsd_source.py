"""The `statsd` source: the line parser's edge cases, then a real agent fed real UDP datagrams."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import aiohttp
import pytest
from agent.aggregation import Aggregator
from agent.builtin_plugins.statsd import MALFORMED, SOCKET_OVERFLOW, UNSUPPORTED, Parser
from agent.builtin_plugins.statsd_aggregate import Aggregate

from agent.event import Event
from agent.plugin.base import ThrottledLog
from agent.runtime import Agent
from tests.helpers import await_until, jsonl_sink, plan_error, read_jsonl, start_agent

NOW = 1_700_000_000.0


def parse(*lines: str, parser: Parser | None = None):
    parser = parser or Parser()
    return parser.feed("\n".join(lines).encode(), NOW)


def one(line: str, parser: Parser | None = None):
    events, bad = parse(line, parser=parser)
    assert not bad, bad
    return [(e.name, e.kind, e.value, e.tags) for e in events]


# -- the parser ------------------------------------------------------------------------


def test_counter_is_scaled_by_its_sample_rate():
    assert one("hits:1|c") == [("hits", "counter", 1.0, {})]
    assert one("hits:1|c|@0.1") == [("hits", "counter", 10.0, {})]
    assert one("hits:-2.5|c|@0.5") == [("hits", "counter", -5.0, {})]
    assert one("hits:3|c|@1") == [("hits", "counter", 3.0, {})]


def test_gauge_deltas_apply_to_the_last_value_of_the_same_name_and_tags():
    p = Parser()
    assert one("q:+4|g", p) == [("q", "gauge", 4.0, {})]  # no last value: from 0
    assert one("q:10|g", p) == [("q", "gauge", 10.0, {})]
    assert one("q:+2.5|g", p) == [("q", "gauge", 12.5, {})]
    assert one("q:-20|g", p) == [("q", "gauge", -7.5, {})]
    assert one("q:3|g", p) == [("q", "gauge", 3.0, {})]  # unsigned: set
    # another tag set is another gauge
    assert one("q:+1|g|#host:b", p) == [("q", "gauge", 1.0, {"host": "b"})]
    assert one("q:+1|g", p) == [("q", "gauge", 4.0, {})]
    # the sample rate does not scale a gauge
    assert one("q:7|g|@0.5", p) == [("q", "gauge", 7.0, {})]


def test_gauge_state_is_bounded_least_recently_updated_first():
    p = Parser(max_gauges=2)
    one("a:10|g", p), one("b:20|g", p), one("a:+1|g", p), one("c:30|g", p)  # b is the oldest now
    assert set(p.gauges) == {("a", ()), ("c", ())}
    assert one("b:+1|g", p) == [("b", "gauge", 1.0, {})]


def test_timers_histograms_and_distributions_are_histograms_with_their_rate_in_data():
    events, bad = parse("rt:12.5|ms", "sz:3|h|@0.25", "d:0.5|d")
    assert not bad
    assert [(e.name, e.kind, e.value, e.data) for e in events] == [
        ("rt", "histogram", 12.5, None), ("sz", "histogram", 3.0, {"sample_rate": 0.25}),
        ("d", "histogram", 0.5, None)]


def test_dogstatsd_tags_and_extra_tags():
    p = Parser({"env": "prod", "dc": "x"})
    assert one("a:1|c|#route:/v1/a:b,flag,dc:y", p) == [
        ("a", "counter", 1.0, {"env": "prod", "dc": "y", "route": "/v1/a:b", "flag": ""})]
    assert one("a:1|c|@0.5|#k:v", p) == [("a", "counter", 2.0, {"env": "prod", "dc": "x", "k": "v"})]
    assert one("a:1|c|#k:v|@0.5", p) == [("a", "counter", 2.0, {"env": "prod", "dc": "x", "k": "v"})]
    assert one("a:1|c|#", p) == [("a", "counter", 1.0, {"env": "prod", "dc": "x"})]


def test_multi_value_lines_timestamps_and_ignored_dogstatsd_fields():
    assert [v for _, _, v, _ in one("rt:1:2:3|ms")] == [1.0, 2.0, 3.0]
    assert [v for _, _, v, _ in one("n:1:+1:+1|g")] == [1.0, 2.0, 3.0]
    events, _ = parse("a:1|c|T1600000000|c:container-1|e:ext")
    assert events[0].ts == 1_600_000_000.0 and events[0].tags == {}
    assert parse("a:1|c")[0][0].ts == NOW


def test_several_lines_per_datagram_with_blank_lines_and_crlf():
    events, bad = Parser().feed(b"a:1|c\r\n\n  b:2|g \nc:3|ms\n", NOW)
    assert not bad
    assert [(e.name, e.value) for e in events] == [("a", 1.0), ("b", 2.0), ("c", 3.0)]


def test_sets_count_distinct_members_per_flush():
    p = Parser({"env": "t"})
    events, bad = parse("u:alice|s", "u:bob|s", "u:alice|s", "u:carol|s|#app:x", "u:a:b|s", parser=p)
    assert events == [] and bad == []
    flushed = sorted((e.name, e.kind, e.value, tuple(sorted(e.tags.items()))) for e in p.flush_sets(NOW))
    assert flushed == [("u", "gauge", 1.0, (("app", "x"), ("env", "t"))), ("u", "gauge", 3.0, (("env", "t"),))]
    assert p.flush_sets(NOW) == []  # a new interval starts empty


@pytest.mark.parametrize("line", [
    "nocolon", "a:1", "a:|c", ":1|c", "a:1|", "a:1|x", "a:1|cc", "a:one|c", "a:nan|g", "a:inf|c",
    "a:1e999|c", "a:1_000|c", "a: 1|c", "a:1::2|ms", "a:1|c|@0", "a:1|c|@1.5", "a:1|c|@x", "a:1|c|zz",
    "a:1|c|#:v", "a:1|c|T-5", "a:1|c|Tsoon", "a:|s", "x" * 256 + ":1|c",
    "a:1|c|#" + ",".join(f"k{i}:v" for i in range(65)),
])
def test_garbage_lines_are_reported_malformed_not_dropped_silently(line):
    events, bad = parse(line)
    assert events == []
    assert [b.reason for b in bad] == [MALFORMED]
    assert str(bad[0])


def test_dogstatsd_events_and_service_checks_are_unsupported():
    events, bad = parse("_e{5,4}:title|text", "_sc|db|0", "ok:1|c")
    assert [e.name for e in events] == ["ok"]
    assert [b.reason for b in bad] == [UNSUPPORTED, UNSUPPORTED]


def test_one_bad_line_does_not_spoil_the_datagram_and_invalid_utf8_is_malformed():
    events, bad = Parser().feed(b"a:1|c\n\xff\xfe:1|c\nb:x|g\nc:2|c", NOW)
    assert [e.name for e in events] == ["a", "c"]
    assert [b.reason for b in bad] == [MALFORMED, MALFORMED]


def test_a_bad_multi_value_line_changes_no_gauge():
    p = Parser()
    one("g:5|g", p)
    assert parse("g:+1:oops|g", parser=p)[0] == []
    assert one("g:+1|g", p) == [("g", "gauge", 6.0, {})]


def test_throttled_log_says_how_many_it_held_back(caplog):
    t = [0.0]
    log = ThrottledLog(logging.getLogger("test.throttle"), every_s=10, clock=lambda: t[0])
    with caplog.at_level(logging.WARNING, "test.throttle"):
        for i in range(5):
            log("bad %d", i)
        t[0] = 10.0
        log("bad %d", 5)
    assert [r.getMessage() for r in caplog.records] == ["bad 0", "bad 5 (and 4 more like it since the last message)"]


@pytest.mark.parametrize("toml, path, problem", [
    ('[sources.s]\ntype = "statsd"\nport = "x"\n', "sources.s.port", "expected int"),
    ('[sources.s]\ntype = "statsd"\nport = 70000\n', "sources.s.port", "<= 65535"),
    ('[sources.s]\ntype = "statsd"\nflush_interval_s = 0\n', "sources.s.flush_interval_s", "> 0"),
    ('[sources.s]\ntype = "statsd"\nmax_packet = 1\n', "sources.s.max_packet", "unknown key"),
])
def test_option_errors_name_the_key_path(tmp_path, toml, path, problem):
    msg = plan_error(tmp_path, toml)
    assert msg.startswith(f"{tmp_path / 'agent.toml'}: {path}: ") and problem in msg


# -- aggregation per flush interval ------------------------------------------------------


def aggregate(*datagrams: str, parser: Parser | None = None, now: float = NOW):
    """Feed datagrams into one interval; (its events by (name, kind, tags), pass-through events, bad lines)."""
    parser, agg, passed, bad = parser or Parser(), Aggregate(10.0), [], []
    for d in datagrams:
        ev, wrong = parser.feed_into(d.encode(), now, agg)
        passed += ev
        bad += wrong
    out = {(e.name, e.kind, tuple(sorted(e.tags.items()))): e for e in agg.flush(now + 10)}
    assert len(agg) == 0 and agg.flush() == []  # the flush emptied it
    return out, passed, bad


def test_aggregated_counters_are_summed_with_their_sample_rates():
    out, passed, bad = aggregate("hits:1|c|@0.1\nhits:2|c\nhits:1|c|@0.5|#k:v", "hits:3|c|#k:v\nhits:1:1|c")
    assert not passed and not bad
    hits = out["hits", "counter", ()]
    assert (hits.value, hits.data) == (14.0, {"interval_s": 10.0, "count": 4})
    assert out["hits", "counter", (("k", "v"),)].value == 5.0
    assert out["hits", "counter", ()].ts == NOW // 10 * 10  # the start of its 10 s interval


def test_aggregated_gauges_keep_the_last_value_with_relative_deltas_across_intervals():
    p = Parser()
    out, _, _ = aggregate("q:10|g\nq:+5|g", "q:-3|g\nq:7|g|#h:a", parser=p)
    assert out["q", "gauge", ()].value == 12.0 and out["q", "gauge", ()].data["count"] == 3
    assert out["q", "gauge", (("h", "a"),)].value == 7.0
    # the next interval's delta starts from the last value
    out, _, _ = aggregate("q:+1|g", parser=p)
    assert out["q", "gauge", ()].value == 13.0


def test_aggregated_timers_are_one_histogram_with_count_sum_min_max_and_a_sketch():
    out, _, _ = aggregate("rt:12.5|ms\nrt:3|ms|@0.5\nrt:40:0.5|ms", "rt:-1|h\nrt:0|d")
    h = out["rt", "histogram", ()]
    assert h.value == 55.0
    d = h.data
    assert (d["count"], d["sum"], d["min"], d["max"]) == (6, 55.0, -1.0, 40.0)
    sk = d["sketch"]
    assert sk["zero"] == 1 and sum(sk["pos"].values()) == 4 and sum(sk["neg"].values()) == 1
    # the same bucket keys as the history sketch, so the aggregates merge with the agent's own
    from agent.history.sketch import Sketch
    ref = Sketch()
    for v in (12.5, 3, 40, 0.5, -1, 0):
        ref.add(v)
    assert sk == {"zero": ref.zero, "pos": {str(k): c for k, c in ref.pos.items()},
                  "neg": {str(k): c for k, c in ref.neg.items()}}


def test_aggregated_sets_count_distinct_members_and_timestamped_lines_pass_through():
    out, passed, bad = aggregate("u:alice|s\nu:bob|s\nu:alice|s\nu:x|s|#a:b\nold:1|c|T1600000000\nbad|c")
    assert out["u", "gauge", ()].value == 2.0 and out["u", "gauge", (("a", "b"),)].value == 1.0
    assert [(e.name, e.value, e.ts) for e in passed] == [("old", 1.0, 1_600_000_000.0)]
    assert [b.reason for b in bad] == [MALFORMED]


def test_tag_order_does_not_split_a_series():
    out, _, _ = aggregate("a:1|c|#x:1,y:2\na:1|c|#y:2,x:1")
    assert [e.value for e in out.values()] == [2.0]


def test_statsd_aggregates_are_the_sink_aggregators_own():
    """The source feeds agent.aggregation's Aggregator (the one a sink's `aggregate` uses):
    the same samples give the same bucket, value and data either way."""
    out, _, _ = aggregate("rt:12.5|ms\nrt:3|ms\nq:4|g\nq:9|g\nhits:2|c", now=NOW + 3)
    sink = Aggregator(10.0)
    for name, kind, value in [("rt", "histogram", 12.5), ("rt", "histogram", 3.0), ("q", "gauge", 4.0),
                              ("q", "gauge", 9.0), ("hits", "counter", 2.0)]:
        assert sink.add(Event(name=name, kind=kind, value=value, ts=NOW + 3)) is None
    want = {(e.name, e.kind): e for e in sink.flush()}
    assert {(n, k) for n, k, _ in out} == set(want)
    for (name, kind, _), e in out.items():
        assert (e.ts, e.value, e.data) == (want[name, kind].ts, want[name, kind].value, want[name, kind].data)
    assert out["q", "gauge", ()].data == {"interval_s": 10.0, "count": 2, "sum": 13.0, "min": 4.0, "max": 9.0,
                                          "last_ts": NOW + 3}


def test_a_flush_closes_only_the_intervals_that_ended():
    p, agg = Parser(), Aggregate(10.0)
    p.feed_into(b"hits:1|c\nu:a|s", NOW + 1, agg)
    p.feed_into(b"hits:5|c", NOW + 12, agg)  # the next interval
    first = agg.flush(NOW + 10)
    assert sorted((e.name, e.value, e.ts) for e in first) == [("hits", 1.0, NOW), ("u", 1.0, NOW)]
    assert [(e.name, e.value, e.ts) for e in agg.flush(NOW + 19)] == []  # not ended yet
    assert [(e.name, e.value, e.ts) for e in agg.flush()] == [("hits", 5.0, NOW + 10)]  # a stop takes all


# -- a real agent, real datagrams -------------------------------------------------------


def statsd_config(tmp_path: Path, **statsd) -> dict:
    """start_agent() arguments: the source `statsd` with `statsd` options, one jsonl sink `out`."""
    return {"sources": {"statsd": {"port": 0, **statsd}},
            "sinks": {"out": jsonl_sink(tmp_path / "out.jsonl")}, "dashboard": {"store": False},
            "agent": {"id": "test-agent"}}


def _stats(agent: Agent, name: str = "statsd") -> dict:
    comp = next(c for c in agent.status()["components"] if c["name"] == name and c["kind"] == "source")
    return comp.get("stats", {})


async def _address(agent: Agent) -> tuple[str, int]:
    addr = await await_until(lambda: _stats(agent).get("address"), what="the statsd source to listen")
    host, port = addr.rsplit(":", 1)
    return host, int(port)


async def test_datagrams_become_journaled_events_with_names_kinds_values_and_tags(tmp_path):
    agent = await start_agent(tmp_path / "data", **statsd_config(tmp_path, tags={"env": "test"}, aggregate=False))
    try:
        addr = await _address(agent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"orders:1|c|@0.5|#region:eu\nqueue:10|g\nqueue:-3|g\nlatency:12.5|ms", addr)
            udp.sendto(b"users:alice|s\nusers:bob|s\nusers:alice|s", addr)
        await await_until(lambda: _stats(agent)["events"] == 4)
        assert await agent.flush(10)
        events = read_jsonl(tmp_path / "out.jsonl")
        got = [(e["name"], e["kind"], e["value"], e["tags"], e["source"]) for e in events]
        assert got == [
            ("orders", "counter", 2.0, {"env": "test", "region": "eu"}, "statsd"),
            ("queue", "gauge", 10.0, {"env": "test"}, "statsd"),
            ("queue", "gauge", 7.0, {"env": "test"}, "statsd"),
            ("latency", "histogram", 12.5, {"env": "test"}, "statsd"),
        ]
        assert all(e["id"] and e["agent_id"] == "test-agent" and e["ts"] > 0 for e in events)
        assert _stats(agent)["packets"] == 2
    finally:
        await agent.stop()
    # the set members seen before the stop were handed over as a gauge at shutdown
    sets = [e for e in read_jsonl(tmp_path / "out.jsonl") if e["name"] == "users"]
    assert [(e["kind"], e["value"], e["tags"]) for e in sets] == [("gauge", 2.0, {"env": "test"})]


async def test_sets_are_flushed_every_interval(tmp_path):
    agent = await start_agent(tmp_path / "data", **statsd_config(tmp_path, flush_interval_s=0.05))
    try:
        addr = await _address(agent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"u:a|s\nu:b|s\nu:c|s", addr)
        await await_until(lambda: _stats(agent)["events"] >= 1)
        assert await agent.flush(10)
        assert [(e["name"], e["value"]) for e in read_jsonl(tmp_path / "out.jsonl")] == [("u", 3.0)]
    finally:
        await agent.stop()


async def test_malformed_lines_are_counted_in_the_loss_ledger_by_reason(tmp_path, caplog):
    agent = await start_agent(tmp_path / "data", **statsd_config(tmp_path, aggregate=False))
    try:
        addr = await _address(agent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"good:1|c\ngarbage\nbad:x|c\n_sc|db|0", addr)
            udp.sendto(b"a:1|zz", addr)
        await await_until(lambda: (s := _stats(agent))["malformed"] + s["unsupported"] == 4)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{agent.server_url}/api/v1/losses") as resp:
                losses = await resp.json()
            async with http.get(f"{agent.server_url}/metrics") as resp:
                metrics = await resp.text()
        assert losses["by_reason"] == {MALFORMED: 3, UNSUPPORTED: 1}
        assert {"reason": MALFORMED, "sink": None, "count": 3} in losses["entries"]
        assert f'sidecar_agent_events_lost_total{{reason="{MALFORMED}",sink=""}} 3' in metrics
        stats = _stats(agent)
        assert (stats["malformed"], stats["unsupported"], stats["events"]) == (3, 1, 1)
        assert await agent.flush(10)
        assert [e["name"] for e in read_jsonl(tmp_path / "out.jsonl")] == ["good"]
    finally:
        await agent.stop()
    # logged, but throttled: one message for the first packet's problems
    dropped = [r for r in caplog.records if "statsd line dropped" in r.getMessage()]
    assert len(dropped) == 1 and "more like it" not in dropped[0].getMessage()


async def test_a_full_intake_drops_the_datagram_and_counts_it(tmp_path):
    cfg = statsd_config(tmp_path, aggregate=False)
    cfg["agent"]["intake_capacity"] = 5
    agent = await start_agent(tmp_path / "data", **cfg)
    try:
        addr = await _address(agent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto("\n".join(f"n{i}:1|c" for i in range(10)).encode(), addr)
            await await_until(lambda: _stats(agent)["events"] == 10)  # handed over (and refused) first
            udp.sendto(b"after:1|c", addr)
        await await_until(lambda: _stats(agent)["events"] == 11)
        assert await agent.flush(10)
        assert agent.ledger.by_reason() == {"intake_full": 10}
        assert [e["name"] for e in read_jsonl(tmp_path / "out.jsonl")] == ["after"]
    finally:
        await agent.stop()


@pytest.mark.skipif(not Path("/proc/net/udp").exists(), reason="the kernel's drop count is read from /proc/net/udp")
async def test_datagrams_the_kernel_drops_are_counted(tmp_path):
    # the smallest receive buffer the kernel grants (a few KiB): it overflows at once
    cfg = statsd_config(tmp_path, flush_interval_s=0.05, receive_buffer_bytes=1024)
    agent = await start_agent(tmp_path / "data", **cfg)
    try:
        addr = await _address(agent)
        sent = 3000
        payload = b"x:1|c\n" + b"#" * 1400  # one good line, one malformed: the buffer fills fast
        # Sent as fast as one thread can: the reader thread parses slower than that.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for _ in range(sent):
                udp.sendto(payload, addr)
        stats = await await_until(lambda: (s := _stats(agent))["packets"] + s["socket_overflow"] == sent and s)
        assert stats["socket_overflow"] > 0
        assert agent.ledger.by_reason()[SOCKET_OVERFLOW] == stats["socket_overflow"]
        assert agent.ledger.by_reason()[MALFORMED] == stats["packets"]
    finally:
        await agent.stop()


async def test_a_port_in_use_is_named_and_retried_without_a_traceback(tmp_path, caplog):
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    cfg = statsd_config(tmp_path, port=port)
    cfg["sources"]["other"] = {"type": "statsd", "port": 0}
    agent = await start_agent(tmp_path / "data", **cfg)
    try:
        problem = f"cannot listen on udp 127.0.0.1:{port}: Address already in use"
        await await_until(lambda: _stats(agent).get("error") == problem, what="the taken port in status")
        assert _stats(agent)["address"] is None and agent.state == "running"
        # the other source is not held up by it
        host, other = (await await_until(lambda: _stats(agent, "other").get("address"))).rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"still:1|c", (host, int(other)))
        await await_until(lambda: _stats(agent, "other")["events"] == 1)
        # the log names the address once per try, at WARNING, with no traceback
        tries = [r for r in caplog.records if problem in r.getMessage()]
        assert tries and all(r.levelname == "WARNING" and r.exc_info is None for r in tries)
        assert not [r for r in caplog.records if r.exc_info and "statsd" in r.getMessage()]
        # once the port is free the source listens on it
        taken.close()
        await await_until(lambda: _stats(agent)["address"] == f"127.0.0.1:{port}", timeout=60,
                          what="the statsd source to take the freed port")
        assert _stats(agent)["error"] is None
    finally:
        taken.close()
        await agent.stop()


def test_two_parsers_share_no_state():
    a, b = Parser(), Parser()
    one("g:5|g", a)
    assert one("g:+1|g", b) == [("g", "gauge", 1.0, {})]


async def test_aggregation_is_the_default_and_stop_flushes_the_partial_interval(tmp_path):
    agent = await start_agent(tmp_path / "data", **statsd_config(tmp_path, flush_interval_s=3600, tags={"env": "t"}))
    try:
        addr = await _address(agent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"orders:1|c|@0.5\norders:3|c\nq:10|g\nq:-4|g\nrt:10|ms\nrt:30|ms", addr)
            udp.sendto(b"u:a|s\nu:b|s\nu:a|s", addr)
        await await_until(lambda: _stats(agent)["packets"] == 2)
        assert await agent.flush(10)
        assert read_jsonl(tmp_path / "out.jsonl") == []  # the hour-long interval has not ended
        rcvbuf = _stats(agent)["rcvbuf"]
    finally:
        await agent.stop()
    got = {(e["name"], e["kind"]): e for e in read_jsonl(tmp_path / "out.jsonl")}
    assert {k: v["value"] for k, v in got.items()} == {
        ("orders", "counter"): 5.0, ("q", "gauge"): 6.0, ("rt", "histogram"): 40.0, ("u", "gauge"): 2.0}
    rt = got["rt", "histogram"]["data"]
    if Path("/proc/sys/net/core/rmem_max").exists():  # Linux grants min(asked, rmem_max), doubled
        rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
        assert rcvbuf == 2 * min(8 * 1024 * 1024, rmem_max)
    assert (rt["count"], rt["sum"], rt["min"], rt["max"], rt["interval_s"]) == (2, 40.0, 10.0, 30.0, 3600.0)
    assert all(e["tags"] == {"env": "t"} and e["source"] == "statsd" for e in got.values())


async def test_a_burst_is_accounted_for_line_by_line(tmp_path):
    """50k one-line packets as fast as a thread sends them: every line is delivered or
    counted as statsd_socket_overflow, none vanishes."""
    agent = await start_agent(tmp_path / "data", **statsd_config(tmp_path, flush_interval_s=0.2))
    sent = 50_000
    try:
        addr = await _address(agent)

        def burst() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                for _ in range(sent):
                    udp.sendto(b"burst:1|c|#k:v", addr)

        await asyncio.to_thread(burst)
        stats = await await_until(lambda: (s := _stats(agent))["packets"] + s["socket_overflow"] == sent and s,
                                  timeout=120, what="every datagram received or counted as dropped")
    finally:
        await agent.stop()
    delivered = sum(e["value"] for e in read_jsonl(tmp_path / "out.jsonl") if e["name"] == "burst")
    assert delivered == stats["packets"]
    assert delivered + agent.ledger.by_reason().get(SOCKET_OVERFLOW, 0) == sent
    assert agent.ledger.by_reason().keys() <= {SOCKET_OVERFLOW}
