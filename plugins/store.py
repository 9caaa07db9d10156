"""`store` sink: the local history behind the dashboard (a HistoryStore).

The agent adds it implicitly unless `[dashboard] store = false`; it has no policies,
because it is a local file: a failure is a disk problem, and the journal keeps the
backlog until it is solved (RetryableError). An event the store cannot convert (a ts
whose minute bucket overflows SQLite's INTEGER, data that is not JSON) is the one
exception: the batch fails with PermanentError naming it, so the core bisects the batch
and only that event goes to the DLQ. The agent refuses such events at the edge
(agent.event.check()); this guards against older journal and DLQ entries. Once open, the
store is published on `ctx.history` (the agent's history board), where the HTTP API
finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
from typing import Annotated

import msgspec

from agent.plugin import (
    STORE_FILE,
    BaseSink,
    Event,
    HistoryStore,
    PermanentError,
    PluginContext,
    RegisterComponent,
    RetryableError,
    hookimpl,
)

# The store buckets ts by minute and hour into SQLite INTEGERs (signed 64-bit).
_MAX_ABS_TS = float(2**62)


def unstorable(e: Event) -> str | None:
    """Why the history store cannot convert this event, or None when it can."""
    if not (math.isfinite(e.ts) and abs(e.ts) < _MAX_ABS_TS):
        return f"ts {e.ts!r} is out of range"
    if e.value is not None and not isinstance(e.value, (int, float)):
        return f"value is a {type(e.value).__name__}"
    try:
        json.dumps(e.tags, sort_keys=True)
        if e.data is not None:
            json.dumps(e.data)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        return f"tags or data are not JSON: {exc}"
    return None


class StoreOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str | None = None  # default: data_dir/store.db
    retention_h: float = 24.0
    minute_retention_h: float = 24.0 * 7
    hour_retention_h: float = 24.0 * 90
    compact_interval_s: float = 60.0
    # Size cap of store.db: past it the oldest raw events go first, then the oldest roll-ups.
    max_mb: Annotated[float, msgspec.Meta(gt=0)] = 1024.0


class StoreSink(BaseSink):
    """Writes each batch to the HistoryStore; compacts it on a timer."""

    def __init__(self, name: str, options: StoreOptions, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.options = options
        self.store = HistoryStore(
            options.path or (ctx.data_dir / STORE_FILE),  # type: ignore[arg-type]
            raw_retention_s=options.retention_h * 3600,
            minute_retention_s=options.minute_retention_h * 3600,
            hour_retention_s=options.hour_retention_h * 3600,
            max_bytes=int(options.max_mb * 1024 * 1024),
            log=ctx.log,
        )
        self._compactor: asyncio.Task[None] | None = None
        ctx.stats["store"] = lambda: dict(self.store.stats)
        ctx.history.expect()  # the API waits for this store while it opens

    async def start(self) -> None:
        await self.store.open()
        self._compactor = asyncio.get_running_loop().create_task(self._compact_loop(), name="store-compact")
        self.ctx.history.serve(self.store)

    async def send(self, events: list[Event]) -> None:
        try:
            await self.store.write(events)
        except sqlite3.Error as exc:
            raise RetryableError(f"history store: {exc}") from exc
        except (OverflowError, TypeError, ValueError, RecursionError) as exc:
            # A conversion error, or (ValueError) a closed connection: tell them apart by
            # the events themselves.
            for e in events:
                why = unstorable(e)
                if why is not None:
                    raise PermanentError(f"history store: event {e.id} cannot be stored: {why}") from exc
            raise RetryableError(f"history store: {type(exc).__name__}: {exc}") from exc

    async def _compact_loop(self) -> None:
        while True:
            try:
                await self.store.compact()
            except sqlite3.Error as exc:  # retried next round; never kills the loop
                self.ctx.log.error("history store compaction failed: %s", exc)
            await asyncio.sleep(self.options.compact_interval_s)

    async def close(self) -> None:
        self.ctx.history.withdraw(self.store)
        if self._compactor is not None:
            self._compactor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compactor
        await self.store.close()


@hookimpl
def register_sinks(register: RegisterComponent) -> None:
    register("store", StoreSink, options=StoreOptions)
