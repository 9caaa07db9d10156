"""Exactly-once pre-aggregation for a sink with `aggregate = "10s"`.

A sink that aggregates receives, per journal batch (after, upto], one event per series and
interval bucket, with an id that is a pure function of (sink, after, upto, the first
event's id, series, bucket). A re-send of the batch (a retry, a DLQ replay, a restart
after a crash between the send and the cursor's move) must therefore cover exactly the
same range, or the same events would be counted again under new ids. `BatchRanges` makes
that so: the range of each batch is persisted (the journal database's `meta` table, one
fsynced transaction) before its first send, and a worker reading from a seq where a
persisted range starts reads exactly that range again. Ranges at or below the sink's
persisted cursor can never be read again and are pruned at the next write.
See docs/resilience.md, "Pre-aggregation, exactly once".
"""

from __future__ import annotations

import json

from agent.aggregation import Aggregator, SeriesKey, stable_id
from agent.event import Event
from agent.storage.database import Database

_KEY = "aggregate_ranges:"


class BatchRanges:
    """The persisted journal ranges (after, upto] of one aggregating sink's batches."""

    def __init__(self, db: Database, sink: str) -> None:
        self.db = db
        self.sink = sink
        self._key = _KEY + sink
        self._ranges: dict[int, int] = {}  # after -> upto
        self._loaded = False

    async def load(self) -> None:
        """Read the ranges persisted by an earlier run (once)."""
        if self._loaded:
            return
        rows = await self.db.fetchall("SELECT value FROM meta WHERE key = ?", (self._key,))
        if rows:
            self._ranges = {int(a): int(b) for a, b in json.loads(rows[0][0])}
        self._loaded = True

    def get(self, after: int) -> int | None:
        """Where the batch starting after `after` must end, if one was ever sent from there."""
        return self._ranges.get(after)

    async def persist(self, after: int, upto: int) -> None:
        """Record a new batch's range durably; prune ranges the persisted cursor has passed."""
        async with self.db.tx() as conn:
            rows = list(await conn.execute_fetchall("SELECT seq FROM cursors WHERE sink = ?", (self.sink,)))
            persisted = int(rows[0][0]) if rows else -1
            self._ranges = {a: b for a, b in self._ranges.items() if b > persisted}
            self._ranges[after] = upto
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (self._key, json.dumps(sorted(self._ranges.items()))),
            )

    def __len__(self) -> int:
        return len(self._ranges)


def aggregate_batch(
    sink: str, interval_s: float, first_seq: int, upto: int, first_id: str, events: list[Event]
) -> list[Event]:
    """The events a batch of journal seqs first_seq..upto delivers to an aggregating sink:
    the aggregates, then the events passed through unchanged. `first_id` is the id of the
    event at first_seq: with it the ids differ from those of another journal (a wiped data
    dir) that reuses the same seqs."""

    def ids(series: SeriesKey, bucket: float) -> str:
        return stable_id(sink, first_seq, upto, first_id, series, bucket)

    agg = Aggregator(interval_s)
    passed = agg.add_many(events)
    return agg.flush(ids=ids) + passed
