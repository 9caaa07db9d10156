"""`nats` source: a durable JetStream pull consumer, for collector agents.

Several collectors with the same `durable` share one consumer, so JetStream splits the
stream's messages among them. A fetched batch goes into the agent through the durable
path HTTP ingest uses (`ctx.submit`, which returns after the journal commit), and only
then is each message acked. A collector killed before that leaves its messages unacked:
JetStream redelivers them after `ack_wait_s` to whichever collector fetches next, and
the idempotent sinks (Postgres, Supabase: event id primary key) drop the repeats. At most
`max_ack_pending` messages are out unacked across all collectors.

Events keep their original id, agent_id, ts, tags and source. A message that is not an
event in our codec is terminated (never redelivered) and counted in the loss ledger as
`nats_undecodable`; one the agent's checks refuse, as `nats_invalid`. When the intake or
the journal is full the batch is nak'ed with a delay: JetStream keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from agent.plugin import (
    Emit,
    Event,
    IntakeFullError,
    JournalFullError,
    PluginContext,
    PluginError,
    RegisterComponent,
    ThrottledLog,
    hookimpl,
)

from .nats import CONTENT_TYPE, NatsConnection, connect, load_nats

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

# Loss ledger reasons this plugin counts under (see docs/operations.md).
UNDECODABLE = "nats_undecodable"
INVALID = "nats_invalid"

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 10.0

_decoder = msgspec.msgpack.Decoder(Event)


class NatsSourceOptions(NatsConnection, kw_only=True, forbid_unknown_fields=True):
    """`[sources.NAME]` with `type = "nats"`."""

    durable: str = "sidecar-collector"  # the shared consumer's name: collectors with one name split the work
    batch: Annotated[int, msgspec.Meta(gt=0)] = 500  # messages per fetch
    max_ack_pending: Annotated[int, msgspec.Meta(gt=0)] = 10_000  # unacked messages, across all collectors
    ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0  # redelivery after this long without an ack
    fetch_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    fetchers: Annotated[int, msgspec.Meta(gt=0, le=64)] = 4  # concurrent fetch -> commit -> ack loops
    full_retry_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0  # nak delay when the intake or journal is full


class NatsSource:
    """Fetches from the durable consumer, submits durably, then acks."""

    def __init__(self, name: str, options: NatsSourceOptions, ctx: PluginContext) -> None:
        if ctx.submit is None:
            raise PluginError("the nats source needs the agent's durable submit (ctx.submit)")
        load_nats()
        self.name, self.options, self.ctx = name, options, ctx
        self.warn = ThrottledLog(ctx.log)
        ctx.stats.update(connected=False, fetched=0, committed=0, acked=0, redelivered=0, undecodable=0, invalid=0)
        ctx.stats.setdefault("reconnects", 0)

    async def run(self, emit: Emit) -> None:
        nc = await self._connect()
        try:
            # Several fetch loops on one connection, each with its own pull subscription on
            # the shared durable: while one waits for its journal commit, others fetch.
            async with asyncio.TaskGroup() as tg:
                for _ in range(self.options.fetchers):
                    tg.create_task(self._fetch_loop(nc))
        finally:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(nc.close(), timeout=self.options.connect_timeout_s)

    async def _fetch_loop(self, nc: Client) -> None:
        psub = await self._subscribe(nc)
        while True:
            try:
                msgs = await psub.fetch(self.options.batch, timeout=self.options.fetch_timeout_s)
            except Exception as exc:
                if _is_timeout(exc):
                    continue  # nothing to do within fetch_timeout_s
                self.warn("nats source %s: fetch failed: %s", self.name, exc)
                await asyncio.sleep(RETRY_INITIAL_S)  # disconnected: the client reconnects meanwhile
                continue
            await self.handle(msgs)

    async def _connect(self) -> Client:
        """Connect, retrying with backoff (a WARNING per try) while NATS is unreachable."""
        delay = RETRY_INITIAL_S
        while True:
            try:
                return await connect(self.options, self.name, self.ctx)
            except Exception as exc:
                self.ctx.stats["last_error"] = f"{type(exc).__name__}: {exc}"[:300]
                self.ctx.log.warning("nats source %s: cannot connect (%s); retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _subscribe(self, nc: Client) -> Any:
        """Bind to (or create) the durable pull consumer; retried while the stream is missing."""
        from nats.js import api

        o = self.options
        js = nc.jetstream(timeout=o.request_timeout_s)
        config = api.ConsumerConfig(
            durable_name=o.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=o.ack_wait_s,
            max_ack_pending=o.max_ack_pending,
            filter_subject=o.subject,
        )
        delay = RETRY_INITIAL_S
        while True:
            try:
                return await js.pull_subscribe(o.subject, durable=o.durable, stream=o.stream, config=config)
            except Exception as exc:
                self.ctx.stats["last_error"] = f"{type(exc).__name__}: {exc}"[:300]
                self.ctx.log.warning("nats source %s: no consumer yet (%s); retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def handle(self, msgs: list[Msg]) -> None:
        """Decode, submit (returns after the journal commit), then ack each message."""
        stats = self.ctx.stats
        stats["fetched"] += len(msgs)
        events: list[Event] = []
        kept: list[Msg] = []
        for m in msgs:
            if m.metadata.num_delivered and m.metadata.num_delivered > 1:
                stats["redelivered"] += 1
            ctype = (m.headers or {}).get("Content-Type", CONTENT_TYPE)
            try:
                if ctype != CONTENT_TYPE:
                    raise ValueError(f"content type {ctype!r}")
                events.append(_decoder.decode(m.data))
                kept.append(m)
            except (ValueError, msgspec.DecodeError) as exc:
                stats["undecodable"] += 1
                self.ctx.lost(UNDECODABLE)
                self.warn("nats source %s: message %s is not an event: %s", self.name, m.metadata.sequence, exc)
                with contextlib.suppress(Exception):  # not terminated: redelivered, counted again
                    await m.term()
        if not events:
            return
        submit = self.ctx.submit
        assert submit is not None
        try:
            errors = await submit(events)
        except (IntakeFullError, JournalFullError) as exc:
            self.warn("nats source %s: agent full (%s); messages left to JetStream", self.name, exc)
            await self._settle(kept, "nak")
            return
        if errors:
            # Refused by the agent's checks: redelivering would only refuse them again.
            stats["invalid"] += len(errors)
            self.ctx.lost(INVALID, len(errors))
            self.warn("nats source %s: %d event(s) refused: %s", self.name, len(errors), errors[0])
        stats["committed"] += len(events) - len(errors)
        await self._settle(kept, "ack")  # a lost ack means one redelivery; the sinks drop the repeat by id

    async def _settle(self, msgs: list[Msg], how: str) -> None:
        """Ack (or nak) each message. One that fails (the connection dropped) is left to
        JetStream's redelivery after ack_wait_s: never a reason to stop the source."""
        done = 0
        try:
            for m in msgs:
                await (m.ack() if how == "ack" else m.nak(delay=self.options.full_retry_s))
                done += 1
        except Exception as exc:
            self.warn("nats source %s: %s failed (%s); JetStream redelivers the rest", self.name, how, exc)
        if how == "ack":
            self.ctx.stats["acked"] += done


def _is_timeout(exc: Exception) -> bool:
    import nats.errors

    return isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError, TimeoutError))


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("nats", NatsSource, options=NatsSourceOptions)
