"""The live stream: committed events fanned out to dashboard WebSocket clients.

Each client has its own queue and filters (names, sources, kinds, session). The queue
is bounded in bytes (`[server] stream_client_max_bytes`, 4 MiB by default): a client
that reads slower than events arrive loses the OLDEST queued events first, so what it
does get is fresh. Every event dropped so is counted in the loss ledger under
`stream_dropped` (and per client, and in total); a slow client never slows the agent
or the other clients. Events are already durable when they are streamed, so only the
live view misses them.

Each event is JSON-encoded once per publish, however many clients want it; a client's
queue holds those encoded bytes, which is what its bound counts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from agent.event import Event, json_encoder
from agent.losses import STREAM_DROPPED, LossLedger

CLIENT_MAX_BYTES = 4 * 1024 * 1024  # the default of `[server] stream_client_max_bytes`


@dataclass(eq=False)
class Subscription:
    """One client's filters and its queue of encoded events, bounded in bytes."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    sources: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    session_id: str | None = None
    max_bytes: int = CLIENT_MAX_BYTES
    ledger: LossLedger | None = None  # where dropped events are counted (`stream_dropped`)
    queue: deque[bytes] = field(default_factory=deque)  # one JSON-encoded event per item, oldest first
    queued_bytes: int = 0
    dropped: int = 0  # events dropped for this client, ever
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set when the queue is not empty

    def wants(self, e: Event) -> bool:
        if self.names and e.name not in self.names and not e.name.startswith(self.prefixes or ("\0",)):
            return False
        if self.sources and e.source not in self.sources:
            return False
        if self.kinds and e.kind not in self.kinds:
            return False
        return self.session_id is None or e.session_id == self.session_id

    def unfiltered(self) -> bool:
        return not (self.names or self.prefixes or self.sources or self.kinds or self.session_id is not None)

    def put(self, encoded: list[bytes]) -> int:
        """Queue encoded events, dropping the oldest past `max_bytes`; returns how many were dropped."""
        q = self.queue
        for item in encoded:
            q.append(item)
            self.queued_bytes += len(item)
        dropped = 0
        # An event larger than the whole bound is dropped too: the queue never exceeds it.
        while self.queued_bytes > self.max_bytes:
            self.queued_bytes -= len(q.popleft())
            dropped += 1
        if dropped:
            self.dropped += dropped
            if self.ledger is not None:
                self.ledger.add(STREAM_DROPPED, dropped)
        if q:
            self.ready.set()
        return dropped

    def take(self, max_bytes: int) -> list[bytes]:
        """Take queued events from the oldest, about `max_bytes` of them (at least one)."""
        q = self.queue
        out: list[bytes] = []
        size = 0
        while q and (not out or size + len(q[0]) <= max_bytes):
            item = q.popleft()
            size += len(item)
            out.append(item)
        self.queued_bytes -= size
        if not q:
            self.ready.clear()
        return out


class StreamHub:
    """Publishes committed batches to every subscription without blocking."""

    def __init__(self) -> None:
        self.subscriptions: set[Subscription] = set()
        self.published = 0
        self.dropped = 0  # events dropped for slow clients, over every client

    def subscribe(self, sub: Subscription) -> Subscription:
        self.subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    def queued_bytes(self) -> int:
        """Encoded bytes waiting in every client's queue."""
        return sum(s.queued_bytes for s in self.subscriptions)

    def publish(self, events: list[Event]) -> None:
        """Called after each journal commit, in the loop thread."""
        if not self.subscriptions:
            return
        self.published += len(events)
        encoded: list[bytes | None] = [None] * len(events)  # each event's JSON, encoded once for all clients

        def enc(i: int) -> bytes:
            b = encoded[i]
            if b is None:
                b = encoded[i] = json_encoder.encode(events[i])
            return b

        for sub in self.subscriptions:
            if sub.unfiltered():  # the dashboard's usual subscription
                chosen = [enc(i) for i in range(len(events))]
            else:
                chosen = [enc(i) for i, e in enumerate(events) if sub.wants(e)]
            if chosen:
                self.dropped += sub.put(chosen)
