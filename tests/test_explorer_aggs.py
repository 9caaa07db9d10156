"""The explorer's aggregations on a real store file: `rate` (deltas and reset-aware running
totals) and quantiles estimated from Prometheus-style `_bucket` series."""

from __future__ import annotations

import math
import uuid

import pytest

from agent.event import Event
from agent.history import query
from agent.history.store import HistoryStore

NOW = 1_700_002_800.0  # hour-aligned


def ev(name, value, ts, kind="counter", **tags):
    return Event(id=str(uuid.uuid4()), name=name, value=value, ts=ts, kind=kind, source="t", agent_id="a", tags=tags)


@pytest.fixture
async def store(tmp_path):
    s = HistoryStore(tmp_path / "store.db")
    await s.open()
    yield s
    await s.close()


async def test_rate_of_counter_deltas_is_their_sum_per_second(store):
    # two series of deltas, 10 s apart: 3 + 5 per 10 s -> 0.8/s; on the raw and minute levels
    events = [ev("req", 3.0, NOW - 600 + i * 10, host="a") for i in range(60)]
    events += [ev("req", 5.0, NOW - 600 + i * 10 + 1, host="b") for i in range(60)]
    await store.write(events, now=NOW)
    for step, level in ((10, "raw"), (60, "minute")):
        s = await store.series("req", NOW - 600, NOW, step, "rate", now=NOW)
        assert s["level"] == level
        assert all(v == pytest.approx(0.8) for v in s["v"]), s["v"]
    one = await store.series("req", NOW - 600, NOW, 60, "rate", {"host": "b"}, now=NOW)
    assert all(v == pytest.approx(0.5) for v in one["v"])
    # where nothing was recorded there is no rate (not a zero that looks like data)
    before = await store.series("req", NOW - 1200, NOW - 600, 60, "rate", now=NOW)
    assert set(before["v"]) == {None}


async def test_rate_of_a_running_total_counts_growth_across_a_reset(store):
    # a gauge total climbing 2/s, sampled every 10 s; it restarts at 7 at NOW - 300
    values = [1000.0 + 20 * i for i in range(30)] + [7.0 + 20 * i for i in range(30)]
    await store.write([ev("total", v, NOW - 600 + 10 * i, kind="gauge") for i, v in enumerate(values)], now=NOW)
    s = await store.series("total", NOW - 600, NOW, 60, "rate", now=NOW)
    assert s["level"] == "raw", "a running total's resets are only seen in raw values"
    # the first step: 5 differences of 20 after the baseline; then 6 per step; the reset's step
    # counts 5 differences of 20 plus the new value 7
    assert s["v"][0] == pytest.approx(100 / 60)
    assert s["v"][1:5] == pytest.approx([2.0] * 4)
    assert s["v"][5] == pytest.approx((5 * 20 + 7) / 60)
    assert s["v"][6:] == pytest.approx([2.0] * 4)
    avg = await store.series("total", NOW - 600, NOW, 60, "avg", now=NOW)
    assert avg["v"][0] > 1000, "avg still shows the raw totals"


def test_bucket_quantile_interpolates_like_histogram_quantile():
    counts = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, math.inf: 100.0}
    assert query.bucket_quantile(0.5, counts) == pytest.approx(0.1)
    assert query.bucket_quantile(0.25, counts) == pytest.approx(0.05)
    assert query.bucket_quantile(0.7, counts) == pytest.approx(0.1 + 0.4 * 20 / 40)
    assert query.bucket_quantile(0.95, counts) == pytest.approx(0.5 + 0.5 * 5 / 10)
    # beyond the highest finite bound: that bound
    assert query.bucket_quantile(0.99, {1.0: 10.0, math.inf: 20.0}) == 1.0
    assert query.bucket_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert query.bucket_quantile(0.5, {1.0: 5.0}) is None, "no +Inf bucket"
    # counts that disagree (scraped a moment apart) are made monotonic, not negative
    assert query.bucket_quantile(0.5, {1.0: 10.0, 2.0: 8.0, math.inf: 10.0}) == pytest.approx(0.5)


async def test_bucket_series_give_quantiles_not_an_average_across_le(store):
    # per 10 s scrape (deltas): 6 observations <= 0.1, 3 more <= 0.5, 1 more <= 1, none above
    bounds = {"0.1": 6.0, "0.5": 9.0, "1": 10.0, "+Inf": 10.0}
    events = [
        ev("http_duration_seconds_bucket", v, NOW - 300 + 10 * i, le=le, route="/a")
        for i in range(30)
        for le, v in bounds.items()
    ]
    events += [ev("http_duration_seconds_bucket", 1.0, NOW - 300 + 10 * i, le="+Inf", route="/b") for i in range(30)]
    await store.write(events, now=NOW)
    for step in (10, 60):
        s = await store.series(
            "http_duration_seconds_bucket", NOW - 300, NOW, step, "quantile", {"route": "/a"}, now=NOW, q=0.9
        )
        assert s["q"] == 0.9
        assert s["v"] == pytest.approx([0.5] * len(s["v"]))
        p50 = await store.series(
            "http_duration_seconds_bucket", NOW - 300, NOW, step, "quantile", {"route": "/a"}, now=NOW, q=0.5
        )
        assert p50["v"] == pytest.approx([0.1 * 5 / 6] * len(p50["v"]))
    # both routes: /b adds one observation above 1 per scrape: 11, rank 9.9 falls inside (0.5, 1]
    both = await store.series("http_duration_seconds_bucket", NOW - 300, NOW, 60, "quantile", now=NOW, q=0.9)
    assert both["v"] == pytest.approx([0.5 + 0.5 * (9.9 - 9) / 1] * len(both["v"]))


async def test_histogram_events_answer_p90_from_their_sketches(store):
    await store.write([ev("lat", float(v), NOW - 100 + v / 10, kind="histogram") for v in range(1, 1001)], now=NOW)
    s = await store.series("lat", NOW - 120, NOW, 60, "p90", now=NOW)
    # steps [NOW-120, NOW-60) hold 1..399, [NOW-60, NOW) 400..999
    assert s["v"] == pytest.approx([0.9 * 399, 400 + 0.9 * 600], rel=0.03)


async def test_buckets_posted_as_running_totals_give_the_same_quantiles(store):
    # cumulative per-le totals (gauges), growing by 6/9/10/10 per 10 s; the process restarts
    # halfway (totals fall back to one scrape's worth): the quantiles do not jump
    bounds = {"0.1": 6.0, "0.5": 9.0, "1": 10.0, "+Inf": 10.0}
    events = []
    for i in range(30):
        n = i + 1 if i < 15 else i - 14
        events += [ev("rpc_seconds_bucket", v * n, NOW - 300 + 10 * i, kind="gauge", le=le) for le, v in bounds.items()]
    await store.write(events, now=NOW)
    s = await store.series("rpc_seconds_bucket", NOW - 300, NOW, 60, "quantile", now=NOW, q=0.9)
    assert s["level"] == "raw"
    assert s["v"] == pytest.approx([0.5] * len(s["v"]))
