"""`statsd` source: StatsD and DogStatsD lines over UDP, one event per sample.

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
import math
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec

from agent.plugin import MAX_TAGS, Emit, Event, PluginContext, RegisterComponent, ThrottledLog, hookimpl

# Loss ledger reasons this plugin counts under (see docs/operations.md).
MALFORMED = "malformed_statsd"
UNSUPPORTED = "unsupported_statsd"
SOCKET_OVERFLOW = "statsd_socket_overflow"

# Gauge values kept for +N/-N deltas. Past this many distinct name+tag sets the least
# recently updated is forgotten (its next delta starts from 0): a sender inventing names
# must not grow the agent without bound.
MAX_GAUGES = 100_000
# A taken or refused address is retried (0.5 s doubling to 10 s), one WARNING line per try.
BIND_RETRY_INITIAL_S = 0.5
BIND_RETRY_MAX_S = 10.0

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class StatsdOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"  # StatsD has no authentication: anyone who can reach it can send
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8125  # 0: any free port (see status)
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # sets, and the kernel drop count
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

    def feed(self, datagram: bytes, now: float) -> tuple[list[Event], list[BadLine]]:
        """Parse every line of a datagram: the events, and one BadLine per line that failed."""
        events: list[Event] = []
        bad: list[BadLine] = []
        for raw in datagram.split(b"\n"):
            raw = raw.strip()
            if not raw:
                continue
            try:
                events.extend(self.parse_line(raw.decode("utf-8"), now))
            except UnicodeDecodeError:
                bad.append(BadLine(MALFORMED, f"not UTF-8: {raw[:80]!r}"))
            except BadLine as exc:
                bad.append(exc)
        return events, bad

    def parse_line(self, line: str, now: float) -> list[Event]:
        """One line's events (none for a set member); raises BadLine."""
        if line.startswith(("_e{", "_sc|")):
            raise BadLine(UNSUPPORTED, f"DogStatsD events and service checks are not supported: {line[:80]!r}")
        name, sep, rest = line.partition(":")
        fields = rest.split("|")
        if not sep or not name or len(fields) < 2:
            raise BadLine(MALFORMED, f"expected name:value|type: {line[:80]!r}")
        if len(name) > 255:
            raise BadLine(MALFORMED, f"name longer than 255 characters: {name[:80]!r}...")
        values, mtype = fields[0], fields[1]
        rate, tags, ts = 1.0, self.tags, now
        for f in fields[2:]:
            if f.startswith("@"):
                rate = _number(f[1:])
                if not 0 < rate <= 1:
                    raise BadLine(MALFORMED, f"sample rate must be in (0, 1]: {line[:80]!r}")
            elif f.startswith("#"):
                tags = self._tags(f[1:])
            elif f.startswith("T"):
                ts = _number(f[1:])
                if ts <= 0:
                    raise BadLine(MALFORMED, f"timestamp must be positive epoch seconds: {line[:80]!r}")
            elif not f.startswith(("c:", "e:")):  # DogStatsD container id / external data: not kept
                raise BadLine(MALFORMED, f"unknown field |{f[:20]}: {line[:80]!r}")
        if mtype == "s":
            if not values:
                raise BadLine(MALFORMED, f"empty set member: {line[:80]!r}")
            key = (name, tuple(sorted(tags.items())))
            self.sets.setdefault(key, (tags, set()))[1].add(values)
            return []
        raw = values.split(":")  # DogStatsD 1.1: several values in one line
        nums = [_number(v) for v in raw]  # all or nothing: no half-applied gauge deltas
        if mtype == "c":
            return [Event(name=name, kind="counter", value=v / rate, ts=ts, tags=tags) for v in nums]
        if mtype == "g":
            return [
                Event(name=name, kind="gauge", value=v, ts=ts, tags=tags) for v in self._gauge(name, tags, raw, nums)
            ]
        if mtype in ("ms", "h", "d"):
            data = {"sample_rate": rate} if rate != 1.0 else None
            return [Event(name=name, kind="histogram", value=v, ts=ts, tags=tags, data=data) for v in nums]
        raise BadLine(MALFORMED, f"unknown metric type {mtype[:10]!r}: {line[:80]!r}")

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

    def _gauge(self, name: str, tags: dict[str, str], raw: list[str], nums: list[float]) -> list[float]:
        key = (name, tuple(sorted(tags.items())))
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


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, source: StatsdSource) -> None:
        self.source = source

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.source.received(data)

    def error_received(self, exc: Exception) -> None:
        self.source.warn("statsd socket error: %s", exc)


class StatsdSource:
    """Listens on UDP; every datagram's events go to intake as one batch."""

    def __init__(self, name: str, options: StatsdOptions, ctx: PluginContext) -> None:
        self.options = options
        self.ctx = ctx
        self.parser = Parser(options.tags)
        self.warn = ThrottledLog(ctx.log)
        self.warn_overflow = ThrottledLog(ctx.log)  # not muted by a flood of bad lines
        self.stats = ctx.stats
        self.stats.update(address=None, error=None, packets=0, events=0, malformed=0, unsupported=0, socket_overflow=0)
        self._emit: Emit | None = None
        self._drops_seen = 0

    async def run(self, emit: Emit) -> None:
        self._emit = emit  # before the socket exists, so no datagram can find it unset
        transport = await self._listen()
        sock = transport.get_extra_info("socket")
        host, port = sock.getsockname()[:2]
        self.stats["address"] = f"{host}:{port}"
        self.ctx.log.info("statsd listening on udp %s:%d", host, port)
        self._drops_seen = 0  # the kernel counts per socket, and this one is new
        try:
            while True:
                await asyncio.sleep(self.options.flush_interval_s)
                self._flush(sock)
        finally:
            # Cancelled at shutdown: hand over the sets gathered so far (intake is still
            # open while sources stop) and the last drop count, then stop listening.
            self._flush(sock)
            transport.close()
            self._emit = None

    async def _listen(self) -> asyncio.DatagramTransport:
        """Bind the UDP socket. A taken or refused address is a user's problem, not a bug:
        one WARNING line per try naming the address (no traceback), `error` in status, and
        a retry with backoff until it is free."""
        loop = asyncio.get_running_loop()
        delay = BIND_RETRY_INITIAL_S
        while True:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Receiver(self), local_addr=(self.options.host, self.options.port)
                )
            except OSError as exc:
                where = f"udp {self.options.host}:{self.options.port}"
                self.stats["error"] = f"cannot listen on {where}: {exc.strerror or exc}"
                self.ctx.log.warning("statsd: %s; retrying in %.1fs", self.stats["error"], delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BIND_RETRY_MAX_S)
                continue
            self.stats["error"] = None
            return transport

    def received(self, data: bytes) -> None:
        """One datagram (called by the protocol on the loop)."""
        self.stats["packets"] += 1
        events, bad = self.parser.feed(data, time.time())
        for exc in bad:
            self.ctx.lost(exc.reason)
            self.stats["malformed" if exc.reason == MALFORMED else "unsupported"] += 1
            self.warn("statsd line dropped (%s): %s", exc.reason, exc)
        if events and self._emit is not None:
            self.stats["events"] += len(events)
            self._emit(events)  # never blocks: when intake is full it counts them as intake_full

    def _flush(self, sock: Any) -> None:
        events = self.parser.flush_sets(time.time())
        if events and self._emit is not None:
            self.stats["events"] += len(events)
            self._emit(events)
        drops = socket_drops(sock)
        if drops is not None and drops > self._drops_seen:
            # Each datagram held at least one event: a lower bound on what was lost.
            self.ctx.lost(SOCKET_OVERFLOW, drops - self._drops_seen)
            self.stats["socket_overflow"] += drops - self._drops_seen
            self.warn_overflow(
                "statsd: the kernel dropped %d datagrams (receive buffer full)", drops - self._drops_seen
            )
            self._drops_seen = drops


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("statsd", StatsdSource, options=StatsdOptions)
