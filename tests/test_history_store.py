"""The local history store: idempotent writes, roll-ups, level choice, queries, compaction."""

from __future__ import annotations

import random
import uuid

import pytest

from agent.event import Event
from agent.history.sketch import Sketch
from agent.history.store import HistoryStore

NOW = 1_700_002_800.0  # a fixed, hour-aligned clock


def ev(name="m", value=1.0, ts=NOW - 10, kind="gauge", **kw):
    return Event(id=str(uuid.uuid4()), name=name, value=value, ts=ts, kind=kind, source="t", agent_id="a", **kw)


@pytest.fixture
async def store(tmp_path):
    s = HistoryStore(tmp_path / "store.db")
    await s.open()
    yield s
    await s.close()


async def test_redelivery_does_not_double_count(store):
    batch = [ev(value=float(i), ts=NOW - 100 + i) for i in range(50)]
    assert await store.write(batch, now=NOW) == 50
    assert await store.write(batch, now=NOW) == 0
    assert await store.write([*batch[:10], batch[0]], now=NOW) == 0
    for agg, want in (("count", 50), ("sum", sum(range(50))), ("min", 0), ("max", 49)):
        for step in (1, 60, 3600):  # raw, minute and hour levels
            s = await store.series("m", NOW - 3600 * 3, NOW, step, agg, now=NOW)
            got = [v for v in s["v"] if v is not None]
            combined = sum(got) if agg in ("count", "sum") else (min(got) if agg == "min" else max(got))
            assert combined == want, (agg, step, s["level"])
    assert store.stats["duplicates"] == 61
    names = store.names()
    assert names[0]["count"] == 50 and names[0]["last_value"] == 49.0


async def test_hour_rollups_are_the_events_folded_directly(store, tmp_path):
    """Each hour cell is merged from the batch's minute cells: it must hold what folding
    the events straight into hours gives (counts, sum, min, max and the sketch), also for
    a batch across an hour boundary, several series and kinds, and a later batch merging in."""
    import sqlite3

    rng = random.Random(7)
    batches = [
        [ev(name=name, kind=kind, value=rng.choice([rng.uniform(-5, 500), 0.0, None]), ts=NOW - 7300 + i * 2.0)
         for i in range(3000)
         for name, kind in [rng.choice([("g", "gauge"), ("h", "histogram"), ("c", "counter")])]]
        for _ in range(2)
    ]
    for batch in batches:
        assert await store.write(batch, now=NOW) == len(batch)
    want: dict = {}
    for e in (e for batch in batches for e in batch):
        hour = int(e.ts // 3600) * 3600
        n, vn, values = want.get((e.name, hour), (0, 0, []))
        want[e.name, hour] = (n + 1, vn + (e.value is not None), values + ([e.value] if e.value is not None else []))
    with sqlite3.connect(tmp_path / "store.db") as conn:
        rows = conn.execute("SELECT s.name, r.bucket, r.n, r.vn, r.sum, r.mn, r.mx, r.sketch"
                            " FROM rollup_hour r JOIN series s ON s.id = r.sid").fetchall()
    assert len(rows) == len(want) == 9  # 3 series x 3 hours
    for name, bucket, n, vn, total, mn, mx, blob in rows:
        wn, wvn, values = want[name, bucket]
        assert (n, vn, mn, mx) == (wn, wvn, min(values), max(values))
        assert total == pytest.approx(sum(values), rel=1e-12)
        if name == "c":  # counters keep no sketch
            assert blob is None
            continue
        ref = Sketch()
        for v in values:
            ref.add(v)
        got = Sketch.from_bytes(blob)
        assert (got.n, got.zero, got.pos, got.neg) == (ref.n, ref.zero, ref.pos, ref.neg)


async def test_duplicate_inside_one_batch_counts_once(store):
    e = ev()
    assert await store.write([e, e], now=NOW) == 1
    s = await store.series("m", NOW - 60, NOW, 60, "count", now=NOW)
    assert sum(v for v in s["v"] if v) == 1


async def test_levels_follow_range_and_retention(store):
    assert store.choose_level(NOW - 300, NOW, 5, NOW)[0] == "raw"
    assert store.choose_level(NOW - 3600, NOW, 60, NOW)[0] == "minute"
    assert store.choose_level(NOW - 7 * 86400, NOW, 3600, NOW)[0] == "hour"
    # a fine step that reaches past the raw window falls back to roll-ups
    assert store.choose_level(NOW - 2 * 86400, NOW, 5, NOW)[0] == "minute"
    assert store.choose_level(NOW - 30 * 86400, NOW, 60, NOW)[0] == "hour"


async def test_percentiles_from_minute_rollups_are_within_one_percent(store):
    rnd = random.Random(7)
    values = [rnd.lognormvariate(0, 1) for _ in range(5000)]
    batch = [ev(name="lat", value=v, kind="histogram", ts=NOW - 3000 + i * 0.5) for i, v in enumerate(values)]
    for i in range(0, len(batch), 500):
        await store.write(batch[i : i + 500], now=NOW)
    values.sort()
    for agg, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        s = await store.series("lat", NOW - 3600, NOW, 3600, agg, now=NOW)
        assert s["level"] == "hour"
        (got,) = [v for v in s["v"] if v is not None]
        exact = values[int(q * (len(values) - 1))]
        assert abs(got - exact) / exact < 0.021, (agg, got, exact)


async def test_tag_filter_and_avg(store):
    await store.write(
        [ev(value=10, tags={"host": "a"}), ev(value=20, tags={"host": "b"}), ev(value=30, tags={"host": "a"})], now=NOW
    )
    for step in (1, 60):
        s = await store.series("m", NOW - 120, NOW, step, "avg", {"host": "a"}, now=NOW)
        assert [v for v in s["v"] if v is not None] == [20.0]
    names = store.names()
    assert names[0]["tag_keys"] == ["host"]


async def test_events_pagination_and_filters(store):
    batch = [ev(name=f"n{i % 2}", ts=NOW - 100 + i, session_id="s1" if i < 5 else None) for i in range(25)]
    await store.write(batch, now=NOW)
    seen, cursor = [], None
    while True:
        page, cursor = await store.events(limit=10, cursor=cursor)
        seen += page
        if cursor is None:
            break
    assert len(seen) == 25 and len({e["id"] for e in seen}) == 25
    assert [e["ts"] for e in seen] == sorted((e["ts"] for e in seen), reverse=True)
    page, _ = await store.events(session="s1", limit=100)
    assert len(page) == 5
    page, _ = await store.events(name="n1", start=NOW - 90, end=NOW - 80, limit=100)
    assert all(e["name"] == "n1" and NOW - 90 <= e["ts"] < NOW - 80 for e in page) and len(page) == 5


async def test_compaction_expires_each_level_and_old_events_are_skipped(tmp_path):
    s = HistoryStore(tmp_path / "s.db", raw_retention_s=3600, minute_retention_s=7200, hour_retention_s=86400)
    await s.open()
    try:
        await s.write([ev(ts=NOW - 3000), ev(ts=NOW - 10)], now=NOW)
        await s.write([ev(ts=NOW - 4000)], now=NOW)  # older than the raw window
        assert s.stats["skipped_old"] == 1
        deleted = await s.compact(now=NOW + 1000)  # raw cutoff NOW-2600: one raw row goes
        assert deleted == 1
        page, _ = await s.events(limit=10)
        assert len(page) == 1
        # roll-ups still answer for the compacted event
        r = await s.series("m", NOW - 3600, NOW, 60, "count", now=NOW + 1000)
        assert sum(v for v in r["v"] if v) == 2
        await s.compact(now=NOW + 100_000)
        r = await s.series("m", NOW - 3600, NOW, 3600, "count", now=NOW + 100_000)
        assert not any(r["v"])
    finally:
        await s.close()


def test_sketch_merge_equals_single_sketch():
    rnd = random.Random(1)
    vals = [rnd.uniform(-50, 500) for _ in range(3000)] + [0.0] * 10
    whole, a, b = Sketch(), Sketch(), Sketch()
    for i, v in enumerate(vals):
        whole.add(v)
        (a if i % 2 else b).add(v)
    merged = Sketch.from_bytes(a.merge(b).to_bytes())
    for q in (0.01, 0.5, 0.9, 0.99):
        assert merged.quantile(q) == whole.quantile(q)
    assert Sketch().quantile(0.5) is None


def test_sketches_of_the_first_format_still_decode_and_merge():
    """Version 1 stored (zeros, [key, count, ...], [...]); blobs now hold maps. Both read."""
    import msgspec

    from agent.history.sketch import merge_bytes

    rnd = random.Random(2)
    vals = [rnd.uniform(-5, 50) for _ in range(500)] + [0.0] * 3
    whole, old = Sketch(), Sketch()
    for v in vals:
        whole.add(v)
    for v in vals[:250]:
        old.add(v)
    flat = msgspec.msgpack.encode(
        (old.zero, [x for kv in old.pos.items() for x in kv], [x for kv in old.neg.items() for x in kv])
    )
    assert Sketch.from_bytes(flat).quantile(0.5) == old.quantile(0.5)
    rest = Sketch()
    for v in vals[250:]:
        rest.add(v)
    merged = Sketch.from_bytes(merge_bytes(flat, rest.to_bytes()))
    assert merged.n == whole.n
    for q in (0.01, 0.5, 0.99):
        assert merged.quantile(q) == whole.quantile(q)


def test_sketch_add_many_counts_as_add_one_at_a_time():
    rng = random.Random(3)
    values = [rng.choice([rng.lognormvariate(0, 6), -rng.lognormvariate(0, 3), 0.0, 1e-10, -1e-10, 1e-9, -1e-9])
              for _ in range(5000)]
    one, many = Sketch(), Sketch()
    for v in values:
        one.add(v)
    many.add_many(values[:1000])
    many.add_many(values[1000:])
    assert (many.n, many.zero, many.pos, many.neg) == (one.n, one.zero, one.pos, one.neg)
    assert one.zero > 0 and one.neg and one.pos
