"""The live stream: committed events fanned out to dashboard WebSocket clients.

Each client has its own bounded queue and filters (names, sources, kinds, session).
A slow client loses messages (counted per client and in total); it never slows the
agent or the other clients. Events are already durable when they are streamed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent.event import Event

CLIENT_QUEUE = 10_000


@dataclass(eq=False)
class Subscription:
    """One client's filters and queue."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    sources: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    session_id: str | None = None
    queue: asyncio.Queue[list[Event]] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    queued: int = 0
    dropped: int = 0

    def wants(self, e: Event) -> bool:
        if self.names and e.name not in self.names and not e.name.startswith(self.prefixes or ("\0",)):
            return False
        if self.sources and e.source not in self.sources:
            return False
        if self.kinds and e.kind not in self.kinds:
            return False
        return self.session_id is None or e.session_id == self.session_id


class StreamHub:
    """Publishes committed batches to every subscription without blocking."""

    def __init__(self) -> None:
        self.subscriptions: set[Subscription] = set()
        self.published = 0
        self.dropped = 0

    def subscribe(self, sub: Subscription) -> Subscription:
        self.subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    def publish(self, events: list[Event]) -> None:
        """Called after each journal commit, in the loop thread."""
        if not self.subscriptions:
            return
        self.published += len(events)
        for sub in self.subscriptions:
            chosen = [e for e in events if sub.wants(e)]
            if not chosen:
                continue
            try:
                sub.queue.put_nowait(chosen)
            except asyncio.QueueFull:
                sub.dropped += len(chosen)
                self.dropped += len(chosen)
