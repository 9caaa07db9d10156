"""`prometheus` source: scrapes Prometheus text exposition from URLs every `interval_s`.

Every sample becomes one event named after the sample (`prefix` + e.g.
`http_requests_total`, `latency_seconds_bucket`), its labels as tags. Counters and the
cumulative series of histograms and summaries (`_bucket`, `_count`, `_sum`) are
`counter` events carrying the scraped total (not an increment, like the `system`
source's byte counters); everything else, summary quantiles included, is a `gauge`.

A failed scrape (refused, timed out, not 200, not parsable) yields no samples for that
URL, a `sidecar_agent.scrape_errors` counter event and a count in the source's status;
the next interval scrapes again.
"""

from __future__ import annotations

import asyncio
import math
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


def parse(
    text: str, *, openmetrics: bool, now: float, prefix: str = "", tags: dict[str, str] | None = None
) -> list[Event]:
    """Every sample of an exposition as an event; raises ValueError if any line is bad.

    `tags` win over scraped labels; a scraped label they replace is kept as
    `exported_<label>` (what Prometheus does with conflicting target labels).
    """
    # Imported here, not at module import: the embedded agent loads every built-in
    # plugin, and only an agent that scrapes should pay for prometheus_client.
    if openmetrics:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    tags = tags or {}
    events = []
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
            events.append(
                Event(
                    name=prefix + s.name,
                    kind=kind_of(family.type, family.name, s.name),
                    value=value,
                    ts=float(s.timestamp) if s.timestamp is not None else now,
                    tags={**labels, **tags},
                    data=data,
                )
            )
    return events


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
        return parse(body.decode("utf-8"), openmetrics=openmetrics, now=now, prefix=self.prefix, tags=tags)

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
