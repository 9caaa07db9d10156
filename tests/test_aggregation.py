"""agent.aggregation: counters summed, gauges last, histograms merged, per series and interval."""

from __future__ import annotations

import random

import msgspec
import pytest

from agent.aggregation import Aggregator, parse_interval, stable_id
from agent.event import Event, check
from agent.history.sketch import Sketch


def ev(name: str, kind: str, value: float | None, ts: float, **tags: str) -> Event:
    return Event(name=name, kind=kind, value=value, ts=ts, tags=tags, source="s", agent_id="a")


def by_key(events: list[Event]) -> dict[tuple[str, float, tuple[tuple[str, str], ...]], Event]:
    return {(e.name, e.ts, tuple(sorted(e.tags.items()))): e for e in events}


def test_counters_are_summed_per_series_and_bucket() -> None:
    agg = Aggregator(10)
    agg.add_many(
        [
            ev("req", "counter", 1, 100.0, route="/a"),
            ev("req", "counter", 2, 109.9, route="/a"),
            ev("req", "counter", 4, 110.0, route="/a"),
            ev("req", "counter", 8, 101.0, route="/b"),
        ]
    )
    out = by_key(agg.flush())
    assert out[("req", 100.0, (("route", "/a"),))].value == 3
    assert out[("req", 110.0, (("route", "/a"),))].value == 4
    assert out[("req", 100.0, (("route", "/b"),))].value == 8
    assert out[("req", 100.0, (("route", "/a"),))].data == {"interval_s": 10, "count": 2}
    assert len(out) == 3 and len(agg) == 0


def test_tag_order_does_not_split_a_series() -> None:
    agg = Aggregator(10)
    a = Event(name="x", kind="counter", value=1, ts=1, tags={"a": "1", "b": "2"})
    b = Event(name="x", kind="counter", value=1, ts=2, tags={"b": "2", "a": "1"})
    agg.add_many([a, b])
    [out] = agg.flush()
    assert out.value == 2 and out.tags == {"a": "1", "b": "2"}


def test_kinds_sources_and_agents_are_separate_series() -> None:
    agg = Aggregator(10)
    agg.add_many(
        [
            ev("x", "counter", 1, 1),
            ev("x", "gauge", 5, 1),
            Event(name="x", kind="counter", value=1, ts=1, agent_id="other", source="s"),
        ]
    )
    assert len(agg.flush()) == 3


def test_gauge_keeps_the_value_with_the_latest_ts_whatever_the_arrival_order() -> None:
    agg = Aggregator(10)
    agg.add_many([ev("t", "gauge", 7, 105.0), ev("t", "gauge", 3, 101.0), ev("t", "gauge", 9, 103.0)])
    [out] = agg.flush()
    assert out.value == 7
    assert out.data == {"interval_s": 10, "count": 3, "sum": 19.0, "min": 3.0, "max": 9.0, "last_ts": 105.0}


def test_histograms_merge_count_sum_min_max_and_sketch() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 1) for _ in range(2000)]
    agg = Aggregator(60)
    agg.add_many([ev("lat", "histogram", v, 120 + (k % 60)) for k, v in enumerate(values)])
    [out] = agg.flush()
    assert out.ts == 120 and out.value == pytest.approx(sum(values))
    d = out.data or {}
    assert d["count"] == 2000 and d["min"] == min(values) and d["max"] == max(values)
    sk = Sketch()
    sk.zero = d["sketch"]["zero"]
    sk.pos = {int(k): c for k, c in d["sketch"]["pos"].items()}
    sk.n = 2000
    true_p99 = sorted(values)[int(0.99 * 1999)]
    assert sk.quantile(0.99) == pytest.approx(true_p99, rel=0.02)


def test_partial_aggregates_merge_back_to_the_whole() -> None:
    """A bucket split over two rows (two flushes) merges to what one pass gives."""
    rng = random.Random(1)
    raw = [ev("lat", "histogram", rng.uniform(-5, 50), 10 + rng.random() * 9) for _ in range(500)]
    whole = Aggregator(10)
    whole.add_many(raw)
    [one] = whole.flush()
    parts = []
    for chunk in (raw[:200], raw[200:]):
        p = Aggregator(10)
        p.add_many(chunk)
        parts += p.flush()
    again = Aggregator(10)
    assert again.add_many(parts) == []  # summaries are merged, not passed through
    [merged] = again.flush()
    assert merged.value == pytest.approx(one.value)
    for k in ("count", "min", "max", "sketch"):
        assert (merged.data or {})[k] == (one.data or {})[k], k


def test_events_and_valueless_metrics_pass_through_unchanged() -> None:
    agg = Aggregator(10)
    plain = ev("deploy", "event", None, 5)
    empty = ev("g", "gauge", None, 5)
    assert agg.add_many([plain, ev("c", "counter", 1, 5), empty]) == [plain, empty]
    assert len(agg.flush()) == 1


def test_flush_before_hands_out_closed_buckets_only() -> None:
    agg = Aggregator(10)
    agg.add_many([ev("c", "counter", 1, 5), ev("c", "counter", 1, 15), ev("c", "counter", 1, 25)])
    assert [e.ts for e in agg.flush(before=19.9)] == [0]
    assert [e.ts for e in agg.flush(before=20)] == [10]
    assert len(agg) == 1
    assert [e.ts for e in agg.flush()] == [20]


def test_ids_come_from_the_callback_and_are_stable() -> None:
    def ids(series: object, bucket: float) -> str:
        return stable_id("sink", 0, 10, series, bucket)

    first, second = Aggregator(10), Aggregator(10)
    batch = [ev("c", "counter", 1, 5, h="1"), ev("c", "counter", 1, 15, h="1"), ev("g", "gauge", 2, 5)]
    first.add_many(batch)
    second.add_many(list(reversed(batch)))
    a = sorted((e.id, e.value) for e in first.flush(ids=ids))
    b = sorted((e.id, e.value) for e in second.flush(ids=ids))
    assert a == b and len({i for i, _ in a}) == 3
    assert stable_id("sink", 0, 10) != stable_id("sink", 0, 11)


def test_default_ids_are_fresh_and_every_aggregate_is_a_valid_event() -> None:
    agg = Aggregator(10)
    agg.add_many(
        [ev("h", "histogram", 0.0, 5), ev("h", "histogram", -3.0, 5), ev("g", "gauge", 1, 5), ev("c", "counter", 2, 5)]
    )
    out = agg.flush()
    assert len({e.id for e in out}) == 3
    for e in out:
        check(e)
        assert msgspec.json.decode(msgspec.json.encode(e), type=Event) == e


def test_a_summary_without_min_and_max_gives_none_of_them() -> None:
    agg = Aggregator(10)
    agg.add(Event(name="h", kind="histogram", value=None, ts=1, data={"count": 3, "sum": 6.0}))
    [out] = agg.flush()
    assert out.value == 6.0 and "min" not in (out.data or {}) and (out.data or {})["count"] == 3


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("500ms", 0.5), ("1m", 60), ("2h", 7200), (15, 15)])
def test_parse_interval(text: str | int, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("bad", ["", "ten", "-1s", "0s", "inf", True])
def test_parse_interval_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_interval(bad)  # type: ignore[arg-type]


def test_a_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        Aggregator(0)
