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
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import msgspec

from agent.plugin import (
    MAX_TAGS,
    Emit,
    Event,
    PluginContext,
    RegisterComponent,
    ThrottledLog,
    bind_with_retry,
    hookimpl,
)

from .statsd_aggregate import Aggregate

# Loss ledger reasons this plugin counts under (see docs/operations.md).
MALFORMED = "malformed_statsd"
UNSUPPORTED = "unsupported_statsd"
SOCKET_OVERFLOW = "statsd_socket_overflow"
SHUTDOWN_LOST = "shutdown_timeout"  # a batch arriving after the source stopped (not expected)

# Gauge values kept for +N/-N deltas. Past this many distinct name+tag sets the least
# recently updated is forgotten (its next delta starts from 0): a sender inventing names
# must not grow the agent without bound.
MAX_GAUGES = 100_000
# Parsed `#tags` fields remembered by their text (cleared when full).
MAX_TAG_CACHE = 10_000
# A taken or refused address is retried (0.5 s doubling to 10 s), one WARNING line per try.
# The reader thread hands events to the loop when this many wait, or the oldest has
# waited BATCH_S; with nothing arriving it wakes every IDLE_WAKE_S to do so (and to stop).
BATCH_LINES = 2000
BATCH_S = 0.005
IDLE_WAKE_S = 0.05
MAX_DATAGRAM = 65536

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class StatsdOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"  # StatsD has no authentication: anyone who can reach it can send
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8125  # 0: any free port (see status)
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # aggregates, sets, the kernel drop count
    aggregate: bool = True  # one event per series and interval, as StatsD servers do; false: one per sample
    # SO_RCVBUF asked for; the kernel caps it at net.core.rmem_max (granted size in status)
    receive_buffer_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 * 1024 * 1024
    tags: dict[str, str] = {}  # added to every event; a line's own tags win


class BadLine(ValueError):
    """A line that yields no event; `reason` is its loss ledger reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _number(text: str) -> float:
    # float() alone would also take "nan", "inf", "1_000" and surrounding spaces.
    if not _NUMBER.fullmatch(text):
        raise BadLine(MALFORMED, f"not a number: {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise BadLine(MALFORMED, f"number out of range: {text!r}")
    return value


def _lines(datagram: bytes, bad: list[BadLine]) -> Iterator[str]:
    """The non-blank lines of a datagram, decoded; a line that is not UTF-8 goes to `bad`."""
    for raw in datagram.split(b"\n"):
        raw = raw.strip()
        if not raw:
            continue
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(BadLine(MALFORMED, f"not UTF-8: {raw[:80]!r}"))


class Parser:
    """Turns datagrams into events.

    Holds the state StatsD semantics need across lines: the last value of each gauge
    (for deltas) and the members of each set until `flush_sets`.
    """

    def __init__(self, tags: dict[str, str] | None = None, max_gauges: int = MAX_GAUGES) -> None:
        self.tags = dict(tags or {})
        self.max_gauges = max_gauges
        self.gauges: dict[tuple[str, Any], float] = {}
        self.sets: dict[tuple[str, Any], tuple[dict[str, str], set[str]]] = {}
        self._base = (self.tags, tuple(sorted(self.tags.items())))
        self._tag_cache: dict[str, tuple[dict[str, str], Any]] = {}

    def feed(self, datagram: bytes, now: float) -> tuple[list[Event], list[BadLine]]:
        """Parse every line of a datagram: the events, and one BadLine per line that failed."""
        events: list[Event] = []
        bad: list[BadLine] = []
        for line in _lines(datagram, bad):
            try:
                events.extend(self.parse_line(line, now))
            except BadLine as exc:
                bad.append(exc)
        return events, bad

    def feed_into(self, datagram: bytes, now: float, agg: Aggregate) -> tuple[list[Event], list[BadLine]]:
        """Parse a datagram into `agg`: the events of lines with their own `T` timestamp
        (not aggregated: they keep their time), and one BadLine per line that failed."""
        events: list[Event] = []
        bad: list[BadLine] = []
        for line in _lines(datagram, bad):
            try:
                name, mtype, values, rate, tags, tkey, ts = self._split(line, None)
                if ts is not None:
                    events.extend(self._events(name, mtype, values, rate, tags, tkey, ts, line))
                    continue
                key = (name, tkey)
                if mtype == "s":
                    agg.member(key, tags, self._member(values, line), now)
                    continue
                nums = [_number(v) for v in values.split(":")]  # all or nothing
                if mtype == "c":
                    agg.counter(key, nums, rate, now)
                elif mtype == "g":
                    agg.gauge(key, self._gauge(key, values.split(":"), nums), now)
                elif mtype in ("ms", "h", "d"):
                    agg.observe(key, nums, now)
                else:
                    raise BadLine(MALFORMED, f"unknown metric type {mtype[:10]!r}: {line[:80]!r}")
            except BadLine as exc:
                bad.append(exc)
        return events, bad

    def parse_line(self, line: str, now: float) -> list[Event]:
        """One line's events (none for a set member); raises BadLine."""
        name, mtype, values, rate, tags, tkey, ts = self._split(line, now)
        return self._events(name, mtype, values, rate, tags, tkey, ts if ts is not None else now, line)

    def _split(self, line: str, now: float | None) -> tuple[str, str, str, float, dict[str, str], Any, float | None]:
        """(name, type, value text, rate, tags, tag key, ts): ts is the line's `T`, else `now`."""
        if line.startswith(("_e{", "_sc|")):
            raise BadLine(UNSUPPORTED, f"DogStatsD events and service checks are not supported: {line[:80]!r}")
        name, sep, rest = line.partition(":")
        fields = rest.split("|")
        if not sep or not name or len(fields) < 2:
            raise BadLine(MALFORMED, f"expected name:value|type: {line[:80]!r}")
        if len(name) > 255:
            raise BadLine(MALFORMED, f"name longer than 255 characters: {name[:80]!r}...")
        rate, (tags, tkey), ts = 1.0, self._base, now
        for f in fields[2:]:
            if f.startswith("@"):
                rate = _number(f[1:])
                if not 0 < rate <= 1:
                    raise BadLine(MALFORMED, f"sample rate must be in (0, 1]: {line[:80]!r}")
            elif f.startswith("#"):
                tags, tkey = self._tagset(f[1:])
            elif f.startswith("T"):
                ts = _number(f[1:])
                if ts <= 0:
                    raise BadLine(MALFORMED, f"timestamp must be positive epoch seconds: {line[:80]!r}")
            elif not f.startswith(("c:", "e:")):  # DogStatsD container id / external data: not kept
                raise BadLine(MALFORMED, f"unknown field |{f[:20]}: {line[:80]!r}")
        return name, fields[1], fields[0], rate, tags, tkey, ts

    @staticmethod
    def _member(values: str, line: str) -> str:
        if not values:
            raise BadLine(MALFORMED, f"empty set member: {line[:80]!r}")
        return values

    def _events(
        self, name: str, mtype: str, values: str, rate: float, tags: dict[str, str], tkey: Any, ts: float, line: str
    ) -> list[Event]:
        """The events of one parsed line, one per sample (sets are collected instead)."""
        key = (name, tkey)
        if mtype == "s":
            self.sets.setdefault(key, (tags, set()))[1].add(self._member(values, line))
            return []
        raw = values.split(":")  # DogStatsD 1.1: several values in one line
        nums = [_number(v) for v in raw]  # all or nothing: no half-applied gauge deltas
        if mtype == "c":
            return [Event(name=name, kind="counter", value=v / rate, ts=ts, tags=tags) for v in nums]
        if mtype == "g":
            return [Event(name=name, kind="gauge", value=v, ts=ts, tags=tags) for v in self._gauge(key, raw, nums)]
        if mtype in ("ms", "h", "d"):
            data = {"sample_rate": rate} if rate != 1.0 else None
            return [Event(name=name, kind="histogram", value=v, ts=ts, tags=tags, data=data) for v in nums]
        raise BadLine(MALFORMED, f"unknown metric type {mtype[:10]!r}: {line[:80]!r}")

    def _tagset(self, text: str) -> tuple[dict[str, str], Any]:
        """The tags of a `#...` field and their sorted items (the series key), cached by
        the field's text: senders repeat the same few tag sets."""
        hit = self._tag_cache.get(text)
        if hit is not None:
            return hit
        tags = self._tags(text)
        hit = (tags, tuple(sorted(tags.items())))
        if len(self._tag_cache) >= MAX_TAG_CACHE:
            self._tag_cache.clear()  # a sender inventing tag sets: start over, stay bounded
        self._tag_cache[text] = hit
        return hit

    def _tags(self, text: str) -> dict[str, str]:
        tags = dict(self.tags)
        for item in text.split(","):
            if not item:
                continue
            k, _, v = item.partition(":")  # a tag without a value (DogStatsD allows it) gets ""
            if not k:
                raise BadLine(MALFORMED, f"tag without a key: {item[:40]!r}")
            tags[k] = v
        if len(tags) > MAX_TAGS:
            raise BadLine(MALFORMED, f"too many tags ({len(tags)} > {MAX_TAGS})")
        return tags

    def _gauge(self, key: tuple[str, Any], raw: list[str], nums: list[float]) -> list[float]:
        value = self.gauges.pop(key, 0.0)  # re-inserted below: the dict's order is recency
        out = []
        for text, v in zip(raw, nums, strict=True):
            value = value + v if text[0] in "+-" else v
            out.append(value)
        self.gauges[key] = value
        if len(self.gauges) > self.max_gauges:
            del self.gauges[next(iter(self.gauges))]
        return out

    def flush_sets(self, now: float) -> list[Event]:
        """One gauge per set seen since the last flush: its number of distinct members."""
        sets, self.sets = self.sets, {}
        return [
            Event(name=name, kind="gauge", value=float(len(members)), ts=now, tags=tags)
            for (name, _), (tags, members) in sets.items()
        ]


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
