"""The dead-letter queue: batches a sink could not deliver, kept for replay.

An entry holds the events, the sink, the cause (error class and message), the number
of attempts, first and last attempt times and a status: pending, replaying,
delivered, expired or purged. Terminal entries keep their metadata (for audit) but
drop their event bodies. Expiry (TTL) and the size cap (`max_events` pending events per
sink) are counted in the ledger.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import msgspec

from agent import losses
from agent.event import Event, encode_msgpack_batch, stored_batch_decoder
from agent.losses import LossLedger
from agent.storage.database import Database

log = logging.getLogger("sidecar_agent.dlq")

STATUSES = ("pending", "replaying", "delivered", "expired", "purged", "corrupt")
REPLAY_KEY = "dlq.replay_requested"  # meta row: sinks to replay at the next start (offline CLI)


class DlqEntry(msgspec.Struct):
    """One DLQ entry as the API and CLI show it (without the event bodies)."""

    id: int
    sink: str
    count: int
    error_class: str
    error: str
    attempts: int
    first_attempt: float
    last_attempt: float
    status: str
    created: float
    updated: float


_COLUMNS = "id, sink, count, error_class, error, attempts, first_attempt, last_attempt, status, created, updated"


class DeadLetterQueue:
    """Stores failed batches per sink, each sink capped at `max_events`; replayed by the delivery workers."""

    def __init__(self, db: Database, ledger: LossLedger, *, ttl_s: float, max_events: int) -> None:
        self.db = db
        self.ledger = ledger
        self.ttl_s = ttl_s
        self.max_events = max_events
        self._pending: dict[str, int] = {}  # sink -> pending events (entries still to replay)
        self.last_error: dict[str, str] = {}

    async def open(self) -> None:
        """Entries left `replaying` by a crash go back to `pending`; load depths."""
        async with self.db.tx() as conn:
            await conn.execute("UPDATE dlq SET status = 'pending' WHERE status = 'replaying'")
        await self._reload_depths()

    async def _reload_depths(self) -> None:
        rows = await self.db.fetchall(
            "SELECT sink, coalesce(sum(count), 0) FROM dlq WHERE status = 'pending' GROUP BY sink"
        )
        self._pending = {s: n for s, n in rows}

    def depth(self, sink: str | None = None) -> int:
        """Pending events, for one sink or all."""
        if sink is None:
            return sum(self._pending.values())
        return self._pending.get(sink, 0)

    def sinks(self) -> list[str]:
        """The sinks that have pending events."""
        return sorted(s for s, n in self._pending.items() if n)

    async def put(self, sink: str, events: list[Event], exc: BaseException, attempts: int, first_attempt: float) -> int:
        """Park a batch; returns the entry id. Over the sink's cap, its oldest pending entries go (counted)."""
        now = time.time()
        message = str(exc) or type(exc).__name__
        self.last_error[sink] = f"{type(exc).__name__}: {message}"
        async with self.db.tx() as conn:
            cur = await conn.execute(
                "INSERT INTO dlq (sink, events, count, error_class, error, attempts, first_attempt,"
                " last_attempt, status, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (
                    sink,
                    encode_msgpack_batch(events),
                    len(events),
                    type(exc).__name__,
                    message[:2000],
                    attempts,
                    first_attempt,
                    now,
                    now,
                    now,
                ),
            )
            entry_id = cur.lastrowid
        self._pending[sink] = self._pending.get(sink, 0) + len(events)
        if self.depth(sink) > self.max_events:
            await self._evict(sink, self.depth(sink) - self.max_events)
        return int(entry_id or 0)

    async def _evict(self, sink: str, n_events: int) -> None:
        """Expire `sink`'s oldest pending entries until `n_events` are freed (counted as `dlq_full`)."""
        rows = await self.db.fetchall(
            "SELECT id, sink, count FROM dlq WHERE sink = ? AND status = 'pending' ORDER BY id LIMIT 1000", (sink,)
        )
        victims, freed = [], 0
        for entry_id, sink, count in rows:
            if freed >= n_events:
                break
            victims.append((entry_id, sink, count))
            freed += count
        await self._finish(victims, "expired", losses.DLQ_FULL)

    async def _finish(self, victims: list[tuple[int, str, int]], status: str, reason: str | None) -> int:
        if not victims:
            return 0
        now = time.time()
        async with self.db.tx() as conn:
            await conn.executemany(
                "UPDATE dlq SET status = ?, events = x'', updated = ? WHERE id = ?",
                [(status, now, v[0]) for v in victims],
            )
        total = 0
        for _, sink, count in victims:
            if reason:  # the victims were pending: they leave the queue and are lost
                self._pending[sink] = max(0, self._pending.get(sink, 0) - count)
                self.ledger.add(reason, count, sink)
            total += count
        return total

    async def entries(
        self, *, sink: str | None = None, status: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[DlqEntry]:
        """Entries newest first; `before` is the id to page from."""
        where: list[str] = ["1=1"]
        params: list[Any] = []
        if sink:
            where.append("sink = ?")
            params.append(sink)
        if status:
            where.append("status = ?")
            params.append(status)
        if before:
            where.append("id < ?")
            params.append(before)
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM dlq WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            (*params, max(1, min(limit, 1000))),
        )
        return [DlqEntry(*r) for r in rows]

    async def events(self, entry_id: int) -> list[Event]:
        """The events of one entry (empty once it is delivered, expired or purged)."""
        rows = await self.db.fetchall("SELECT events FROM dlq WHERE id = ?", (entry_id,))
        if not rows or not rows[0][0]:
            return []
        return stored_batch_decoder.decode(rows[0][0])

    async def claim(self, sink: str) -> tuple[int, int, list[Event]] | None:
        """Take the oldest pending entry of `sink` for replay: (id, attempts, events)."""
        rows = await self.db.fetchall(
            # Least recently tried first: an entry that keeps failing does not hold back the others.
            "SELECT id, attempts, events, count FROM dlq WHERE sink = ? AND status = 'pending'"
            " ORDER BY last_attempt, id LIMIT 1",
            (sink,),
        )
        if not rows:
            self._pending[sink] = 0
            return None
        entry_id, attempts, blob, count = rows[0]
        try:
            events = stored_batch_decoder.decode(blob)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
            # Damaged bytes: set aside (status 'corrupt', bytes kept) and counted, never
            # retried for ever nor allowed to stop the sink's worker.
            async with self.db.tx() as conn:
                await conn.execute(
                    "UPDATE dlq SET status = 'corrupt', error = ?, updated = ? WHERE id = ?",
                    (f"does not decode: {exc}"[:2000], time.time(), entry_id),
                )
            self._pending[sink] = max(0, self._pending.get(sink, 0) - count)
            self.ledger.add(losses.JOURNAL_CORRUPT, count, sink)
            log.error(
                "DLQ entry %d of sink %s does not decode (%s): %d events counted as %s",
                entry_id,
                sink,
                exc,
                count,
                losses.JOURNAL_CORRUPT,
            )
            return await self.claim(sink)
        async with self.db.tx() as conn:
            await conn.execute("UPDATE dlq SET status = 'replaying', updated = ? WHERE id = ?", (time.time(), entry_id))
        return entry_id, attempts, events

    async def release(self, sink: str) -> None:
        """Put back `sink`'s entries left `replaying` by a worker that failed mid-replay
        (its supervisor restarted it) and recount its depth."""
        async with self.db.tx() as conn:
            await conn.execute("UPDATE dlq SET status = 'pending' WHERE sink = ? AND status = 'replaying'", (sink,))
        rows = await self.db.fetchall(
            "SELECT coalesce(sum(count), 0) FROM dlq WHERE sink = ? AND status = 'pending'", (sink,)
        )
        self._pending[sink] = int(rows[0][0]) if rows else 0

    async def settle(self, entry_id: int, sink: str, count: int, exc: BaseException | None) -> None:
        """After a replay attempt: delivered on success, back to pending on failure."""
        now = time.time()
        async with self.db.tx() as conn:
            if exc is None:
                await conn.execute(
                    "UPDATE dlq SET status = 'delivered', events = x'', attempts = attempts + 1,"
                    " last_attempt = ?, updated = ? WHERE id = ?",
                    (now, now, entry_id),
                )
            else:
                await conn.execute(
                    "UPDATE dlq SET status = 'pending', attempts = attempts + 1, last_attempt = ?,"
                    " updated = ?, error_class = ?, error = ? WHERE id = ?",
                    (now, now, type(exc).__name__, (str(exc) or type(exc).__name__)[:2000], entry_id),
                )
        if exc is None:
            self._pending[sink] = max(0, self._pending.get(sink, 0) - count)
        else:
            self.last_error[sink] = f"{type(exc).__name__}: {exc}"

    async def split(
        self, entry_id: int, sink: str, delivered: int, parts: list[tuple[list[Event], BaseException]]
    ) -> None:
        """After a bisected replay: `delivered` events went through and each of `parts`
        still fails. The entry keeps the first part and each other part becomes a new
        entry (same `created`, so the TTL still counts from the first failure), in one
        transaction, so a crash leaves either the whole entry or exactly the parts."""
        assert parts, "an entry delivered whole is settled, not split"
        now = time.time()
        async with self.db.tx() as conn:
            for i, (events, exc) in enumerate(parts):
                values = (
                    encode_msgpack_batch(events),
                    len(events),
                    type(exc).__name__,
                    (str(exc) or type(exc).__name__)[:2000],
                    now,
                    now,
                )
                if i == 0:
                    await conn.execute(
                        "UPDATE dlq SET events = ?, count = ?, error_class = ?, error = ?, last_attempt = ?,"
                        " updated = ?, attempts = attempts + 1, status = 'pending' WHERE id = ?",
                        (*values, entry_id),
                    )
                else:
                    await conn.execute(
                        "INSERT INTO dlq (sink, events, count, error_class, error, last_attempt, updated,"
                        " attempts, first_attempt, status, created)"
                        " SELECT sink, ?, ?, ?, ?, ?, ?, attempts, first_attempt, 'pending', created"
                        " FROM dlq WHERE id = ?",
                        (*values, entry_id),
                    )
        self._pending[sink] = max(0, self._pending.get(sink, 0) - delivered)
        exc = parts[0][1]
        self.last_error[sink] = f"{type(exc).__name__}: {exc}"

    async def request_replay(self, sinks: list[str]) -> None:
        """Remember that `sinks` are to replay their pending entries at the next start
        (the offline CLI asks while no agent runs)."""
        async with self.db.tx() as conn:
            rows = list(await conn.execute_fetchall("SELECT value FROM meta WHERE key = ?", (REPLAY_KEY,)))
            requested = sorted(set(json.loads(rows[0][0]) if rows else []) | set(sinks))
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (REPLAY_KEY, json.dumps(requested)),
            )

    async def take_replay_requests(self) -> list[str]:
        """The sinks asked to replay while no agent ran; the request is used up."""
        async with self.db.tx() as conn:
            rows = list(await conn.execute_fetchall("SELECT value FROM meta WHERE key = ?", (REPLAY_KEY,)))
            await conn.execute("DELETE FROM meta WHERE key = ?", (REPLAY_KEY,))
        return json.loads(rows[0][0]) if rows else []

    async def purge(self, *, sink: str | None = None, status: str | None = "pending") -> int:
        """Purge pending (or `status`) entries. Purged pending events count as `dlq_purged`;
        purging delivered or expired entries only clears them (they were counted already)."""
        status = status or "pending"
        victims = await self._select(sink, status)
        return await self._finish(victims, "purged", losses.DLQ_PURGED if status == "pending" else None)

    async def expire(self) -> int:
        """Expire pending entries older than the TTL (counted as `dlq_expired`)."""
        cutoff = time.time() - self.ttl_s
        rows = await self.db.fetchall(
            "SELECT id, sink, count FROM dlq WHERE status = 'pending' AND created < ?", (cutoff,)
        )
        return await self._finish([tuple(r) for r in rows], "expired", losses.DLQ_EXPIRED)

    async def _select(self, sink: str | None, status: str) -> list[Any]:
        sql, params = "SELECT id, sink, count FROM dlq WHERE status = ?", [status]
        if sink:
            sql += " AND sink = ?"
            params.append(sink)
        return [tuple(r) for r in await self.db.fetchall(sql, tuple(params))]
