"""`statsd` source: StatsD and DogStatsD lines over UDP.

A reader thread receives and parses (see _Reader). By default (`aggregate = true`) the
samples of each `flush_interval_s` are aggregated per name and tag set, as StatsD servers
do (plugins/statsd_aggregate.py); lines with their own `T` timestamp, and every line with
`aggregate = false`, become one event per sample:

`name:value|type[|@rate][|#k:v,...][|T<epoch>]`, several lines per datagram:

- `c` counter: one `counter` event per line, value divided by the sample rate;
- `g` gauge: a `gauge` event; `+N`/`-N` is a delta from the last value of that
  name and tag set (from 0 when there is none), as StatsD does;
- `ms`, `h`, `d` timer/histogram/distribution: a `histogram` event per value, as sent
  (timers stay in milliseconds); a sample rate below 1 is kept in `data.sample_rate`;
- `s` set: members are collected per name and tag set, and every `flush_interval_s`
  one `gauge` event carries the number of distinct members seen in that interval.

Lines that cannot be parsed are counted in the loss ledger (`malformed_statsd`, or
`unsupported_statsd` for DogStatsD events and service checks), and so are datagrams
the kernel dropped because the socket's receive buffer was full
(`statsd_socket_overflow`, Linux only).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any

import msgspec

from agent.plugin import (
    Emit,
    Event,
    PluginContext,
    RegisterComponent,
    ThrottledLog,
    bind_with_retry,
    hookimpl,
)

from .statsd_aggregate import Aggregate
from .statsd_parse import MALFORMED, UNSUPPORTED, BadLine, Parser

__all__ = ["MALFORMED", "SOCKET_OVERFLOW", "UNSUPPORTED", "Parser", "StatsdOptions", "StatsdSource"]

# Loss ledger reasons this plugin counts under (see docs/operations.md), besides the
# parser's MALFORMED and UNSUPPORTED.
SOCKET_OVERFLOW = "statsd_socket_overflow"
SHUTDOWN_LOST = "shutdown_timeout"  # a batch arriving after the source stopped (not expected)

# A taken or refused address is retried (0.5 s doubling to 10 s), one WARNING line per try.
# The reader thread hands events to the loop when this many wait, or the oldest has
# waited BATCH_S; with nothing arriving it wakes every IDLE_WAKE_S to do so (and to stop).
BATCH_LINES = 2000
BATCH_S = 0.005
IDLE_WAKE_S = 0.05
MAX_DATAGRAM = 65536


class StatsdOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"  # StatsD has no authentication: anyone who can reach it can send
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8125  # 0: any free port (see status)
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # aggregates, sets, the kernel drop count
    aggregate: bool = True  # one event per series and interval, as StatsD servers do; false: one per sample
    # SO_RCVBUF asked for; the kernel caps it at net.core.rmem_max (granted size in status)
    receive_buffer_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 * 1024 * 1024
    tags: dict[str, str] = {}  # added to every event; a line's own tags win


def socket_drops(sock: Any) -> int | None:
    """Datagrams the kernel dropped on this socket (receive buffer full); None off Linux."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 12 and f[9] == inode:
                return int(f[12])
    return None


def granted_rcvbuf(sock: socket.socket, wanted: int) -> tuple[int, int | None]:
    """Ask for a `wanted`-byte receive buffer: (what the kernel granted, net.core.rmem_max).

    Linux caps the request at rmem_max and reports twice what it keeps (bookkeeping)."""
    with contextlib.suppress(OSError):  # refused: keep the default
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    try:
        rmem_max: int | None = int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        rmem_max = None
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), rmem_max


def _next_boundary(now: float, interval: float) -> float:
    """The first multiple of `interval` after `now`."""
    return (math.floor(now / interval) + 1) * interval


class _Reader:
    """The receive path, on its own thread: `recv_into` a preallocated buffer in a tight
    loop, parse there, and hand events to the loop in batches (every BATCH_LINES events or
    BATCH_S seconds), never one loop callback per datagram. With aggregation on, the
    aggregate of each flush interval is the batch."""

    def __init__(self, source: StatsdSource, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.sock = sock
        self.loop = loop
        self.stopping = threading.Event()
        self.error: BaseException | None = None  # what ended the thread, if not a stop
        self.thread = threading.Thread(target=self._run, name=f"statsd-{source.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        src, sock = self.source, self.sock
        parser, stats, interval = src.parser, src.stats, src.options.flush_interval_s
        agg = Aggregate(interval) if src.options.aggregate else None
        buf = bytearray(MAX_DATAGRAM)
        view = memoryview(buf)
        pending: list[Event] = []
        bad: list[BadLine] = []
        first_at = 0.0  # when the oldest pending event arrived
        # Flushes fall on interval boundaries, so each closes exactly one aggregation bucket.
        next_flush = _next_boundary(time.time(), interval)
        sock.settimeout(IDLE_WAKE_S)
        try:
            while not self.stopping.is_set():
                try:
                    n = sock.recv_into(buf)
                except TimeoutError:
                    n = -1
                now = time.time()
                if n >= 0:
                    stats["packets"] += 1
                    if agg is not None:
                        events, wrong = parser.feed_into(bytes(view[:n]), now, agg)
                    else:
                        events, wrong = parser.feed(bytes(view[:n]), now)
                    if events:
                        if not pending:
                            first_at = now
                        pending.extend(events)
                    if wrong:
                        bad.extend(wrong)
                if now >= next_flush:
                    pending.extend(agg.flush(now) if agg is not None else parser.flush_sets(now))
                    next_flush = _next_boundary(now, interval)
                    self._hand(pending, bad, drops=True)
                    pending, bad = [], []
                elif bad or (pending and (len(pending) >= BATCH_LINES or now - first_at >= BATCH_S)):
                    self._hand(pending, bad)
                    pending, bad = [], []
        except Exception as exc:  # run() raises it, so the supervisor logs it and restarts the source
            self.error = exc
        finally:
            # Stopping (or the socket failed): the partial interval goes too, no loss.
            now = time.time()
            pending.extend(agg.flush() if agg is not None else parser.flush_sets(now))
            self._hand(pending, bad, drops=True)

    def _hand(self, events: list[Event], bad: list[BadLine], drops: bool = False) -> None:
        self.source.inbox.append((events, bad, drops))
        # RuntimeError: the loop is closed; run()'s finally drains the inbox itself.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.source.deliver)


class StatsdSource:
    """Listens on UDP with a reader thread (see _Reader); hands its batches to intake."""

    def __init__(self, name: str, options: StatsdOptions, ctx: PluginContext) -> None:
        self.name = name
        self.options = options
        self.ctx = ctx
        self.parser = Parser(options.tags)
        self.warn = ThrottledLog(ctx.log)
        self.warn_overflow = ThrottledLog(ctx.log)  # not muted by a flood of bad lines
        self.stats = ctx.stats
        self.stats.update(
            address=None,
            error=None,
            rcvbuf=None,
            packets=0,
            events=0,
            malformed=0,
            unsupported=0,
            socket_overflow=0,
        )
        # (events, bad lines, check kernel drops) from the reader thread; deque appends and
        # pops are atomic, so the thread and the loop share it without a lock.
        self.inbox: deque[tuple[list[Event], list[BadLine], bool]] = deque()
        self._emit: Emit | None = None
        self._sock: socket.socket | None = None
        self._drops_seen = 0

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        sock = await self._listen()
        host, port = sock.getsockname()[:2]
        granted, rmem_max = granted_rcvbuf(sock, self.options.receive_buffer_bytes)
        self.stats.update(address=f"{host}:{port}", rcvbuf=granted)
        self.ctx.log.info(
            "statsd listening on udp %s:%d, receive buffer %d bytes (asked %d; net.core.rmem_max %s)",
            host, port, granted, self.options.receive_buffer_bytes, rmem_max,
        )  # fmt: skip
        self._sock = sock
        self._drops_seen = 0  # the kernel counts per socket, and this one is new
        reader = _Reader(self, sock, asyncio.get_running_loop())
        reader.start()
        try:
            while reader.thread.is_alive():
                await asyncio.sleep(self.options.flush_interval_s)
            raise RuntimeError(f"the statsd reader thread failed: {reader.error!r}") from reader.error
        finally:
            # Cancelled at shutdown: the reader hands over its partial interval (intake is
            # still open while sources stop), then its batches and the drop count go in.
            reader.stopping.set()
            await asyncio.to_thread(reader.thread.join)
            self.deliver()
            sock.close()
            self._emit = None

    async def _listen(self) -> socket.socket:
        """Bind the UDP socket. A taken or refused address is a user's problem, not a bug:
        one WARNING line per try naming the address (no traceback), `error` in status, and
        a retry with backoff until it is free."""
        host, port = self.options.host, self.options.port

        async def bind() -> socket.socket:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            try:
                sock.bind(info[4])
            except OSError:
                sock.close()
                raise
            return sock

        return await bind_with_retry(bind, f"udp {host}:{port}", self.stats, self.ctx.log, "statsd")

    def deliver(self) -> None:
        """On the loop: hand the reader's batches to intake, count their bad lines, and
        (each flush interval) the datagrams the kernel dropped."""
        while self.inbox:
            events, bad, drops = self.inbox.popleft()
            for exc in bad:
                self.ctx.lost(exc.reason)
                self.stats["malformed" if exc.reason == MALFORMED else "unsupported"] += 1
                self.warn("statsd line dropped (%s): %s", exc.reason, exc)
            if events:
                if self._emit is None:  # cannot happen while run() is alive; counted if it does
                    self.ctx.lost(SHUTDOWN_LOST, len(events))
                else:
                    self.stats["events"] += len(events)
                    self._emit(events)  # never blocks: when intake is full it counts them as intake_full
            if drops and self._sock is not None:
                self._count_drops(self._sock)

    def _count_drops(self, sock: socket.socket) -> None:
        drops = socket_drops(sock)
        if drops is not None and drops > self._drops_seen:
            # Each datagram held at least one line: a lower bound on what was lost.
            self.ctx.lost(SOCKET_OVERFLOW, drops - self._drops_seen)
            self.stats["socket_overflow"] += drops - self._drops_seen
            self.warn_overflow(
                "statsd: the kernel dropped %d datagrams (receive buffer full)", drops - self._drops_seen
            )
            self._drops_seen = drops


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("statsd", StatsdSource, options=StatsdOptions)
