"""`prometheus` source: scrapes Prometheus text exposition from URLs every `interval_s`.

Every sample becomes one event named after the sample (`prefix` + e.g.
`http_requests_total`, `latency_seconds_bucket`), its labels as tags. Counters and the
cumulative series of histograms and summaries (`_bucket`, `_count`, `_sum`) are
`counter` events carrying the increment since the previous scrape (`Deltas`), as OTLP
cumulative sums are: the first scrape of a series only establishes its baseline and
emits nothing; a total lower than the last one, or a changed `_created` time, is a reset
and emits the new total. Everything else, summary quantiles included, is a `gauge`.

A failed scrape (refused, timed out, not 200, not parsable) yields no samples for that
URL, a `sidecar_agent.scrape_errors` counter event and a count in the source's status;
the next interval scrapes again (from the baselines of the last good scrape).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Annotated
from urllib.parse import urlsplit

import aiohttp
import msgspec

from agent.plugin import Emit, Event, PluginContext, PollingSource, RegisterComponent, ThrottledLog, hookimpl

NONFINITE_KEY = "value_nonfinite"  # as agent.table.rows names it

ACCEPT = "text/plain;version=0.0.4;q=1.0, application/openmetrics-text;q=0.5, */*;q=0.1"
SCRAPE_ERRORS = "sidecar_agent.scrape_errors"

# Sample-name suffixes that are cumulative totals, per family type.
_CUMULATIVE = {"counter": ("", "_total"), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


class PrometheusOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str | None = None
    urls: list[str] = []
    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # per scrape; at most interval_s
    prefix: str = ""  # prepended to every sample name
    tags: dict[str, str] = {}  # added to every event (they win over scraped labels)

    def __post_init__(self) -> None:
        if not self.targets():
            raise ValueError("set url or urls")
        for u in self.targets():
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {public_url(u)!r}")
            try:
                parts.port  # noqa: B018 - raises for a port that is not a number in range
            except ValueError:
                raise ValueError(f"bad port in URL: {public_url(u)!r}") from None

    def targets(self) -> list[str]:
        """`url` and `urls` together, each once."""
        return list(dict.fromkeys(([self.url] if self.url else []) + self.urls))


class ScrapeError(Exception):
    """A target answered, but not with something we can use."""


def kind_of(family_type: str, family_name: str, sample_name: str) -> str:
    """`counter` for the cumulative series of counters, histograms and summaries, else `gauge`."""
    suffix = sample_name[len(family_name) :] if sample_name.startswith(family_name) else None
    return "counter" if suffix in _CUMULATIVE.get(family_type, ()) else "gauge"


SeriesKey = tuple[str, frozenset[tuple[str, str]]]  # (event name, tags)
_NOT_IDENTITY = ("le", "quantile")  # labels of one sample of a series, not of the series' start time


def series_key(e: Event) -> SeriesKey:
    """What identifies a scraped series between scrapes: its event name and tags."""
    return e.name, frozenset(e.tags.items())


def parse(
    text: str,
    *,
    openmetrics: bool,
    now: float,
    prefix: str = "",
    tags: dict[str, str] | None = None,
    starts: dict[SeriesKey, float] | None = None,
) -> list[Event]:
    """Every sample of an exposition as an event; raises ValueError if any line is bad.

    `tags` win over scraped labels; a scraped label they replace is kept as
    `exported_<label>` (what Prometheus does with conflicting target labels). `starts`,
    when given, is filled with the `_created` time of each cumulative series that has one.
    """
    # Imported here, not at module import: the embedded agent loads every built-in
    # plugin, and only an agent that scrapes should pay for prometheus_client.
    if openmetrics:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    tags = tags or {}
    events = []
    created: dict[SeriesKey, float] = {}  # (prefix + family name, tags without le/quantile) -> _created
    cumulative: list[tuple[Event, SeriesKey]] = []  # counter events and their family's key in `created`
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            for k in tags.keys() & labels.keys():
                labels[f"exported_{k}"] = labels.pop(k)
            sample = float(s.value)
            value: float | None = sample
            data = None
            if not math.isfinite(sample):  # NaN (no observations, staleness) or +/-Inf: the
                # agent takes finite values only, so the sample keeps its place without one
                data = {NONFINITE_KEY: "NaN" if sample != sample else ("Infinity" if sample > 0 else "-Infinity")}
                value = None
            e = Event(
                name=prefix + s.name,
                kind=kind_of(family.type, family.name, s.name),
                value=value,
                ts=float(s.timestamp) if s.timestamp is not None else now,
                tags={**labels, **tags},
                data=data,
            )
            events.append(e)
            if starts is None:
                continue
            if s.name.endswith("_created"):  # in its counter's family (OpenMetrics) or one of its own (0.0.4)
                created[(prefix + s.name[: -len("_created")], frozenset(e.tags.items()))] = sample
            elif e.kind == "counter":
                ident = frozenset((k, v) for k, v in e.tags.items() if k not in _NOT_IDENTITY)
                cumulative.append((e, (prefix + family.name, ident)))
    if starts is not None:
        for e, family_key in cumulative:
            if (start := created.get(family_key)) is not None:
                starts[series_key(e)] = start
    return events


class Deltas:
    """Turns one target's cumulative `counter` samples into increments since its last scrape.

    Per series (name and tags) it keeps the last total and `_created` time; the state is
    replaced by each good scrape's, so it holds no more series than the target exposes.
    """

    def __init__(self) -> None:
        self.last: dict[SeriesKey, tuple[float, float | None]] = {}
        # convert() runs in a worker thread; a scrape cancelled mid-parse (a source restart)
        # may leave one running beside the next scrape's.
        self._lock = threading.Lock()

    def convert(self, events: list[Event], starts: dict[SeriesKey, float]) -> list[Event]:
        """`events` with each counter's value made a delta; a series' first sample is dropped
        (its baseline: an increment needs two totals), and so is nothing else."""
        with self._lock:
            return self._convert(events, starts)

    def _convert(self, events: list[Event], starts: dict[SeriesKey, float]) -> list[Event]:
        out: list[Event] = []
        seen: dict[SeriesKey, tuple[float, float | None]] = {}
        last = self.last
        for e in events:
            if e.kind != "counter" or e.value is None:  # a gauge, or NaN/Inf: as it is
                out.append(e)
                continue
            key = series_key(e)
            total, start = float(e.value), starts.get(key)
            seen[key] = (total, start)
            prev = last.get(key)
            if prev is None:
                continue  # the baseline
            prev_total, prev_start = prev
            if total < prev_total or (start is not None and prev_start is not None and start != prev_start):
                e.value = total  # a reset (the target restarted): all of it is new since
            else:
                e.value = total - prev_total
            out.append(e)
        self.last = seen
        return out


class PrometheusSource(PollingSource):
    """Scrapes every URL concurrently each interval; one URL failing never stops the others."""

    def __init__(self, name: str, options: PrometheusOptions, ctx: PluginContext) -> None:
        self.name = name
        self.interval_s = options.interval_s
        self.timeout_s = min(options.timeout_s, options.interval_s)  # a scrape must not overlap the next
        self.urls = options.targets()
        self.prefix = options.prefix
        self.tags = options.tags
        self.warn = {u: ThrottledLog(ctx.log) for u in self.urls}  # one dead URL must not mute another
        self.stats = ctx.stats
        self.stats.update(scrapes=0, scrape_errors=0, last_error=None, samples=0)
        self._session: aiohttp.ClientSession | None = None
        self.deltas = {u: Deltas() for u in self.urls}  # one per target: their series never mix

    async def run(self, emit: Emit) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers={"Accept": ACCEPT}) as session:
            self._session = session
            try:
                await super().run(emit)
            finally:
                self._session = None

    async def collect(self) -> list[Event]:
        results = await asyncio.gather(*(self.scrape(u) for u in self.urls))
        return [e for events in results for e in events]

    async def scrape(self, url: str) -> list[Event]:
        """One URL's samples, or a single scrape-error event."""
        assert self._session is not None
        now = time.time()
        self.stats["scrapes"] += 1
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                body = await resp.read()
                openmetrics = resp.content_type == "application/openmetrics-text"
            # Off the loop: a large exposition takes the pure-Python parser long enough to
            # delay HTTP ingest and group commits running on this loop.
            events = await asyncio.to_thread(self._parse, body, openmetrics, now, url)
        except Exception as exc:  # whatever a target does, count it and scrape again next interval
            return [self._failed(url, exc, now)]
        self.stats["samples"] += len(events)
        return events

    def _parse(self, body: bytes, openmetrics: bool, now: float, url: str) -> list[Event]:
        tags = {"instance": instance(url), **self.tags}
        starts: dict[SeriesKey, float] = {}
        events = parse(
            body.decode("utf-8"), openmetrics=openmetrics, now=now, prefix=self.prefix, tags=tags, starts=starts
        )
        return self.deltas[url].convert(events, starts)  # only after a good parse: a bad page keeps the baselines

    def _failed(self, url: str, exc: BaseException, now: float) -> Event:
        shown = public_url(url)  # the URL may carry credentials: they go nowhere but the request
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        error = error.replace(url, shown)
        self.stats["scrape_errors"] += 1
        self.stats["last_error"] = f"{shown}: {error}"
        self.warn[url]("scrape of %s failed: %s", shown, error)
        return Event(
            name=SCRAPE_ERRORS,
            kind="counter",
            value=1.0,
            ts=now,
            tags={"url": shown},
            source=f"agent.{self.name}",
            data={"error": error},
        )


def instance(url: str) -> str:
    """The `instance` tag: host[:port] as written, never the user:password a URL may carry."""
    return urlsplit(url).netloc.rpartition("@")[2]


def public_url(url: str) -> str:
    """The URL without its user:password and query (a `?token=` is as secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{instance(url)}{parts.path}"


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("prometheus", PrometheusSource, options=PrometheusOptions)
