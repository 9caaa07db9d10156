"""Where a sink publishes the agent's history store for the HTTP API.

The store sink is a plugin; the API must not look for it among the sinks. Instead the
sink says, when it is built, that it will serve the history (`expect`), publishes its
open HistoryStore (`serve`) and withdraws it when it closes. The API waits on the
board (bounded) for a store that is still opening, and answers 503 when none is
expected at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.history.store import HistoryStore


class HistoryBoard:
    """The agent's history store, as published by the sink that owns it."""

    def __init__(self) -> None:
        self.expected = False  # a sink said it will serve the history
        self._stores: list[HistoryStore] = []
        self._served = asyncio.Event()  # set while a store is served

    def expect(self) -> None:
        """A sink will serve the history once it has started (call when it is built)."""
        self.expected = True

    def serve(self, store: HistoryStore) -> None:
        """Publish an open store; the first one served is the one the API reads."""
        self.expected = True
        if store not in self._stores:
            self._stores.append(store)
        self._served.set()

    def withdraw(self, store: HistoryStore) -> None:
        """Take a store back (before closing it)."""
        if store in self._stores:
            self._stores.remove(store)
        if not self._stores:
            self._served.clear()

    @property
    def store(self) -> HistoryStore | None:
        """The store served now, or None."""
        return self._stores[0] if self._stores else None

    async def wait(self, timeout: float) -> HistoryStore | None:
        """The served store; if one is expected but not open yet, wait up to `timeout` s."""
        if not self._stores and self.expected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._served.wait(), timeout)
        return self.store
