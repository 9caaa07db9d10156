"""`store` sink: the local history behind the dashboard (agent.history_store).

The agent adds it implicitly (agent.build.plan) unless `[dashboard] store = false`;
it has no policies, because it is a local file: a failure is a disk problem, and the
journal keeps the backlog until it is solved.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import msgspec

from agent.plugin import BaseSink, Event, HistoryStore, PluginContext, RetryableError, STORE_FILE, hookimpl


class StoreOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str | None = None  # default: data_dir/store.db
    retention_h: float = 24.0
    minute_retention_h: float = 24.0 * 7
    hour_retention_h: float = 24.0 * 90
    compact_interval_s: float = 60.0


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
        )
        self._compactor: asyncio.Task[None] | None = None
        ctx.stats["store"] = lambda: dict(self.store.stats)

    async def start(self) -> None:
        await self.store.open()
        self._compactor = asyncio.get_running_loop().create_task(self._compact_loop(), name="store-compact")

    async def send(self, events: list[Event]) -> None:
        try:
            await self.store.write(events)
        except sqlite3.Error as exc:
            raise RetryableError(f"history store: {exc}") from exc

    async def _compact_loop(self) -> None:
        while True:
            try:
                await self.store.compact()
            except sqlite3.Error as exc:  # retried next round; never kills the loop
                self.ctx.log.error("history store compaction failed: %s", exc)
            await asyncio.sleep(self.options.compact_interval_s)

    async def close(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compactor
        await self.store.close()


def find_store(agent: Any) -> HistoryStore | None:
    """The agent's history store (the first running sink of type store), if any."""
    for worker in agent.workers.values():
        if isinstance(worker.sink, StoreSink) and worker.started:
            return worker.sink.store
    return None


@hookimpl
def register_sinks(register):
    register("store", StoreSink, options=StoreOptions)
