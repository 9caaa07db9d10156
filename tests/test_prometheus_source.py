"""The `prometheus` source: sample mapping, then a real agent scraping real aiohttp pages."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from agent.builtin_plugins.prometheus import SCRAPE_ERRORS, Deltas, kind_of, parse, series_key
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics_format

from agent.config import load
from agent.plan import plan
from agent.plugin.host import PluginHost
from agent.runtime import Agent
from tests.helpers import await_until, free_port, jsonl_sink, plan_error, read_jsonl, start_agent


def registry() -> tuple[CollectorRegistry, Counter]:
    reg = CollectorRegistry()
    requests = Counter("http_requests", "Requests.", ["route", "instance"], registry=reg)
    requests.labels("/a", "app-1").inc(3)
    Gauge("temperature_celsius", "Heat.", registry=reg).set(-1.5)
    h = Histogram("latency_seconds", "Latency.", buckets=[0.1, 1.0], registry=reg)
    h.observe(0.05)
    h.observe(0.5)
    Summary("payload_bytes", "Sizes.", registry=reg).observe(512)
    Info("build", "Build.", registry=reg).info({"version": "1.2"})
    return reg, requests


def by_name(events) -> dict[str, list[tuple[str, float, dict[str, str]]]]:
    out: dict[str, list[Any]] = {}
    for e in events:
        out.setdefault(e.name, []).append((e.kind, e.value, e.tags))
    return out


# -- mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize("ftype, family, sample, kind", [
    ("counter", "reqs", "reqs_total", "counter"),
    ("counter", "reqs", "reqs", "counter"),
    ("counter", "reqs", "reqs_created", "gauge"),
    ("gauge", "temp", "temp", "gauge"),
    ("histogram", "lat", "lat_bucket", "counter"),
    ("histogram", "lat", "lat_count", "counter"),
    ("histogram", "lat", "lat_sum", "counter"),
    ("histogram", "lat", "lat_created", "gauge"),
    ("summary", "sz", "sz", "gauge"),  # a quantile
    ("summary", "sz", "sz_count", "counter"),
    ("summary", "sz", "sz_sum", "counter"),
    ("gaugehistogram", "q", "q_bucket", "gauge"),
    ("info", "build", "build_info", "gauge"),
    ("stateset", "st", "st", "gauge"),
    ("unknown", "x", "x", "gauge"),
])
def test_kinds(ftype, family, sample, kind):
    assert kind_of(ftype, family, sample) == kind


def test_a_registrys_text_exposition_maps_to_events():
    reg, _ = registry()
    events = parse(text_format.generate_latest(reg).decode(), openmetrics=False, now=123.0)
    got = by_name(events)
    assert got["http_requests_total"] == [("counter", 3.0, {"route": "/a", "instance": "app-1"})]
    assert got["temperature_celsius"] == [("gauge", -1.5, {})]
    assert got["latency_seconds_bucket"] == [("counter", 1.0, {"le": "0.1"}), ("counter", 2.0, {"le": "1.0"}),
                                             ("counter", 2.0, {"le": "+Inf"})]
    assert got["latency_seconds_count"] == [("counter", 2.0, {})]
    assert got["latency_seconds_sum"] == [("counter", 0.55, {})]
    assert got["payload_bytes_count"] == [("counter", 1.0, {})]
    assert got["payload_bytes_sum"] == [("counter", 512.0, {})]
    assert got["build_info"] == [("gauge", 1.0, {"version": "1.2"})]
    assert all(e.ts == 123.0 for e in events)
    # the text format exposes each _created timestamp as a gauge family of its own: kept as is
    assert [k for k, _, _ in got["http_requests_created"]] == ["gauge"]


def test_openmetrics_maps_the_same_way():
    reg, _ = registry()
    text = parse(text_format.generate_latest(reg).decode(), openmetrics=False, now=1.0)
    om = parse(openmetrics_format.generate_latest(reg).decode(), openmetrics=True, now=1.0)
    key = sorted((e.name, e.kind, e.value, sorted(e.tags.items())) for e in text if "created" not in e.name)
    assert key == sorted((e.name, e.kind, e.value, sorted(e.tags.items())) for e in om if "created" not in e.name)


def test_prefix_tags_timestamps_and_conflicting_labels():
    text = '# TYPE up gauge\nup{instance="inner",job="j"} 1 1700000000500\nother NaN\n'
    events = parse(text, openmetrics=False, now=5.0, prefix="app.", tags={"instance": "h:1", "env": "t"})
    up, other = events
    assert (up.name, up.value, up.ts) == ("app.up", 1.0, 1_700_000_000.5)
    assert up.tags == {"exported_instance": "inner", "job": "j", "instance": "h:1", "env": "t"}
    # NaN has no finite value: the sample is kept, value None, the NaN named in data.
    assert other.name == "app.other" and other.value is None and other.ts == 5.0
    assert other.data == {"value_nonfinite": "NaN"}


def scrape(deltas: Deltas, text: str, *, openmetrics: bool = False) -> dict[str, list[tuple[str, Any, dict]]]:
    """One scrape of `text` through `deltas`, as the source does it."""
    starts: dict = {}
    return by_name(deltas.convert(parse(text, openmetrics=openmetrics, now=1.0, starts=starts), starts))


def counter_page(total: float, created: float | None = None, *, nan: bool = False) -> str:
    page = f'# TYPE reqs_total counter\nreqs_total{{route="/a"}} {"NaN" if nan else total}\n'
    if created is not None:
        page += f'# TYPE reqs_created gauge\nreqs_created{{route="/a"}} {created}\n'
    return page + "# TYPE temp gauge\ntemp 21.5\n"


def test_counters_become_increments_since_the_last_scrape_after_a_baseline():
    d = Deltas()
    first = scrape(d, counter_page(10))
    assert "reqs_total" not in first  # the first total is only the baseline: no increment is known
    assert first["temp"] == [("gauge", 21.5, {})]  # gauges are as scraped, from the first scrape on
    assert scrape(d, counter_page(14))["reqs_total"] == [("counter", 4.0, {"route": "/a"})]
    assert scrape(d, counter_page(14))["reqs_total"] == [("counter", 0.0, {"route": "/a"})]  # alive, nothing new
    # lower than the last total: the target restarted, and counted 3 since
    assert scrape(d, counter_page(3))["reqs_total"] == [("counter", 3.0, {"route": "/a"})]
    assert scrape(d, counter_page(5))["reqs_total"] == [("counter", 2.0, {"route": "/a"})]


def test_a_changed_created_time_is_a_reset_even_when_the_total_grew():
    d = Deltas()
    scrape(d, counter_page(10, created=100.0))
    assert scrape(d, counter_page(12, created=100.0))["reqs_total"][0][1] == 2.0
    # restarted and counted past the old total before this scrape: only _created shows it
    assert scrape(d, counter_page(20, created=500.0))["reqs_total"][0][1] == 20.0
    assert scrape(d, counter_page(21, created=500.0))["reqs_total"][0][1] == 1.0


def test_a_series_that_left_the_page_starts_from_a_new_baseline_and_nan_passes_through():
    d = Deltas()
    scrape(d, counter_page(10))
    assert "reqs_total" not in scrape(d, "# TYPE temp gauge\ntemp 1\n")
    assert "reqs_total" not in scrape(d, counter_page(50))  # gone meanwhile: 50 is a baseline, not 40
    nan = scrape(d, counter_page(0, nan=True))["reqs_total"]
    assert nan == [("counter", None, {"route": "/a"})]  # no finite total: kept as parse keeps it
    assert "reqs_total" not in scrape(d, counter_page(52))  # and the series starts over


@pytest.mark.parametrize("fmt, openmetrics", [(text_format, False), (openmetrics_format, True)])
def test_a_registrys_histograms_and_counters_as_deltas_with_their_created_times(fmt, openmetrics):
    reg = CollectorRegistry()
    requests = Counter("http_requests", "Requests.", ["route", "instance"], registry=reg)
    requests.labels("/a", "app-1").inc(3)
    h = Histogram("latency_seconds", "Latency.", buckets=[0.1, 1.0], registry=reg)
    h.observe(0.05)
    Summary("payload_bytes", "Sizes.", registry=reg).observe(512)
    d = Deltas()
    starts: dict = {}
    events = parse(fmt.generate_latest(reg).decode(), openmetrics=openmetrics, now=1.0, starts=starts)
    # every cumulative series knows its start time (the histogram's per bucket, without `le`)
    cumulative = [e for e in events if e.kind == "counter"]
    assert len(cumulative) == 8 and all(series_key(e) in starts for e in cumulative)
    d.convert(events, starts)
    requests.labels("/a", "app-1").inc(2)
    h.observe(0.5)
    got = scrape(d, fmt.generate_latest(reg).decode(), openmetrics=openmetrics)
    assert got["http_requests_total"] == [("counter", 2.0, {"route": "/a", "instance": "app-1"})]
    buckets = {t["le"]: v for _, v, t in got["latency_seconds_bucket"]}
    assert buckets == {"0.1": 0.0, "1.0": 1.0, "+Inf": 1.0}
    assert got["latency_seconds_count"] == [("counter", 1.0, {})]
    assert got["latency_seconds_sum"] == [("counter", 0.5, {})]
    assert got["payload_bytes_count"] == [("counter", 0.0, {})]


@pytest.mark.parametrize("body", ["this is { garbage", "<html><body>hi</body></html>", "a{b=\"c\" 1\n"])
def test_an_unparsable_exposition_raises(body):
    with pytest.raises(ValueError):
        parse(body, openmetrics=False, now=1.0)


@pytest.mark.parametrize("toml, path, problem", [
    ('[sources.p]\ntype = "prometheus"\n', "sources.p", "set url or urls"),
    ('[sources.p]\ntype = "prometheus"\nurl = "ftp://x/metrics"\n', "sources.p", "not an http(s) URL"),
    ('[sources.p]\ntype = "prometheus"\nurl = "http://u:s3cret@h:99999/m?token=t0ken"\n', "sources.p",
     "bad port in URL: 'http://h:99999/m'"),
    ('[sources.p]\ntype = "prometheus"\nurls = [3]\n', "sources.p.urls[0]", "expected str"),
    ('[sources.p]\ntype = "prometheus"\nurl = "http://a/m"\ninterval_s = 0\n', "sources.p.interval_s", "> 0"),
    ('[sources.p]\ntype = "prometheus"\nurl = "http://a/m"\nintervl_s = 1\n', "sources.p.intervl_s", "unknown key"),
])
def test_option_errors_name_the_key_path(tmp_path, toml, path, problem):
    msg = plan_error(tmp_path, toml)
    assert msg.startswith(f"{tmp_path / 'agent.toml'}: {path}: ") and problem in msg
    assert "s3cret" not in msg and "t0ken" not in msg


def test_url_and_urls_are_scraped_once_each(tmp_path):
    p = tmp_path / "agent.toml"
    p.write_text('[sources.p]\ntype = "prometheus"\nurl = "http://a/m"\nurls = ["http://b/m", "http://a/m"]\n')
    cfg = load(p)
    (spec,) = [s for s in plan(cfg, PluginHost(cfg.plugins).load()) if s.kind == "sources"]
    assert spec.options.targets() == ["http://a/m", "http://b/m"]


# -- a real agent scraping real pages ---------------------------------------------------


class Target:
    """An aiohttp app serving /metrics; `mode` switches what it answers."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self.reg = reg
        self.mode = "ok"
        self.hits = 0
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.auth: str | None = None  # a required Authorization header

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.auth is not None and request.headers.get("Authorization") != self.auth:
            return web.Response(status=401, text="who are you")
        if self.mode == "500":
            return web.Response(status=500, text="boom")
        if self.mode == "garbage":
            return web.Response(text="<html>not metrics</html>", content_type="text/plain")
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "openmetrics":
            return web.Response(body=openmetrics_format.generate_latest(self.reg),
                                headers={"Content-Type": openmetrics_format.CONTENT_TYPE_LATEST})
        return web.Response(body=text_format.generate_latest(self.reg),
                            headers={"Content-Type": text_format.CONTENT_TYPE_LATEST})

    async def start(self, port: int = 0) -> Target:
        app = web.Application()
        app.router.add_get("/metrics", self.handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/metrics"
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


def prom_config(tmp_path: Path, **prom) -> dict:
    """start_agent() arguments: the source `prom` with `prom` options, one jsonl sink `out`."""
    return {"sources": {"prom": {"type": "prometheus", "interval_s": 0.05, **prom}},
            "sinks": {"out": jsonl_sink(tmp_path / "out.jsonl")}, "dashboard": {"store": False},
            "agent": {"id": "test-agent"}}


def _stats(agent: Agent) -> dict:
    return next(c for c in agent.status()["components"] if c["name"] == "prom")["stats"]


def _landed(tmp_path, *names: str) -> bool:
    """Whether events of every name have reached the jsonl sink. The source counts its
    samples before it hands them to the agent, so a count alone cannot say a flush covers them."""
    return set(names) <= {e["name"] for e in read_jsonl(tmp_path / "out.jsonl")}


async def test_scraped_samples_land_in_the_sink_with_kinds_values_and_tags(tmp_path):
    reg, requests = registry()
    target = await Target(reg).start()
    agent = await start_agent(tmp_path / "data", **prom_config(tmp_path, url=target.url, prefix="app.",
                                                            tags={"env": "test"}))
    try:
        await await_until(lambda: target.hits >= 1)
        requests.labels("/a", "app-1").inc(2)  # later scrapes see the new total
        hits = target.hits
        await await_until(lambda: target.hits >= hits + 2)
        assert await agent.flush(10)
    finally:
        await agent.stop()
        await target.stop()
    events = read_jsonl(tmp_path / "out.jsonl")
    host = target.url.split("/")[2]
    reqs = [e for e in events if e["name"] == "app.http_requests_total"]
    assert {(e["kind"], e["source"]) for e in reqs} == {("counter", "prom")}
    # increments since the first scrape (its total of 3 is the baseline): they add up to what was counted since
    assert sum(e["value"] for e in reqs) == 2.0 and all(e["value"] >= 0 for e in reqs)
    assert reqs[0]["tags"] == {"route": "/a", "exported_instance": "app-1", "instance": host, "env": "test"}
    buckets = {e["tags"]["le"] for e in events if e["name"] == "app.latency_seconds_bucket"}
    assert buckets == {"0.1", "1.0", "+Inf"}
    assert all(e["value"] == 0.0 for e in events if e["name"] == "app.latency_seconds_bucket")  # no observations
    temp = next(e for e in events if e["name"] == "app.temperature_celsius")
    assert (temp["kind"], temp["value"], temp["tags"]) == ("gauge", -1.5, {"instance": host, "env": "test"})
    assert not [e for e in events if e["name"] == SCRAPE_ERRORS]
    assert agent.ledger.total() == 0


async def test_a_dead_url_is_counted_and_does_not_stop_the_others_or_later_scrapes(tmp_path):
    reg, _ = registry()
    live = await Target(reg).start()
    dead_port = free_port()
    dead_url = f"http://127.0.0.1:{dead_port}/metrics"
    agent = await start_agent(tmp_path / "data", **prom_config(tmp_path, urls=[dead_url, live.url]))
    revived = None
    try:
        # The live target keeps being scraped meanwhile (each scrape of the dead URL fails at
        # once, so its third error can come before the live target's third answer).
        await await_until(lambda: _stats(agent)["scrape_errors"] >= 3 and live.hits >= 3,
                          what="three failed scrapes of the dead URL and three of the live one")
        stats = _stats(agent)
        assert stats["last_error"].startswith(f"{dead_url}: ClientConnectorError")
        # the same figures at /metrics, for whoever scrapes the agent itself
        from prometheus_client.parser import text_string_to_metric_families

        from agent.api.metrics import render
        fam = {f.name: f for f in text_string_to_metric_families(render(agent))}["sidecar_agent_source_stat"]
        by_stat = {smp.labels["stat"]: smp.value for smp in fam.samples if smp.labels["source"] == "prom"}
        assert by_stat["scrape_errors"] >= 3 and by_stat["scrapes"] >= 6 and "last_error" not in by_stat
        assert next(c for c in agent.status()["components"] if c["name"] == "prom")["state"] == "running"
        revived = await Target(reg).start(dead_port)  # the dead target comes up
        await await_until(lambda: revived.hits >= 2)
        assert await agent.flush(10)
    finally:
        await agent.stop()
        await live.stop()
        if revived is not None:
            await revived.stop()
    events = read_jsonl(tmp_path / "out.jsonl")
    errors = [e for e in events if e["name"] == SCRAPE_ERRORS]
    assert errors and {(e["kind"], e["value"], e["source"]) for e in errors} == {("counter", 1.0, "agent.prom")}
    assert {e["tags"]["url"] for e in errors} == {dead_url}
    assert "ClientConnectorError" in errors[0]["data"]["error"]
    from_revived = [e for e in events if e["tags"].get("instance") == f"127.0.0.1:{dead_port}"]
    assert any(e["name"] == "temperature_celsius" for e in from_revived)
    assert agent.ledger.total() == 0  # a failed scrape loses no event: there was none


# Only the hanging target needs a short scrape timeout (the timeout is at most interval_s);
# the others get a generous one, so a busy machine cannot turn their answer into a timeout.
# (A 0.5 s timeout still turned a slow 500 into a TimeoutError on a loaded machine: 2 s.)
@pytest.mark.parametrize("mode, error, interval_s", [("500", "ScrapeError: HTTP 500", 2.0),
                                                     ("garbage", "ValueError", 2.0), ("hang", "TimeoutError", 0.05)])
async def test_bad_answers_are_scrape_errors_and_scraping_resumes(tmp_path, mode, error, interval_s):
    reg, _ = registry()
    target = await Target(reg).start()
    target.mode = mode
    agent = await start_agent(tmp_path / "data", **prom_config(tmp_path, url=target.url, interval_s=interval_s,
                                                                timeout_s=interval_s))
    try:
        await await_until(lambda: _stats(agent)["scrape_errors"] >= 2)
        assert _stats(agent)["last_error"].startswith(f"{target.url}: {error}")
        target.mode = "ok"
        target.release.set()
        await await_until(lambda: _landed(tmp_path, "temperature_celsius"), what="scraped samples in the sink")
        assert await agent.flush(10)
    finally:
        await agent.stop()
        await target.stop()
    names = {e["name"] for e in read_jsonl(tmp_path / "out.jsonl")}
    assert {SCRAPE_ERRORS, "temperature_celsius"} <= names


async def test_an_openmetrics_answer_is_parsed_as_openmetrics(tmp_path):
    reg, _ = registry()
    target = await Target(reg).start()
    # OpenMetrics names a counter family without `_total`: read as 0.0.4, its samples would be untyped gauges
    target.mode = "openmetrics"
    agent = await start_agent(tmp_path / "data", **prom_config(tmp_path, url=target.url))
    try:
        await await_until(lambda: _landed(tmp_path, "http_requests_total"), what="scraped samples in the sink")
        assert await agent.flush(10)
        assert _stats(agent)["scrape_errors"] == 0
    finally:
        await agent.stop()
        await target.stop()
    got = {e["name"]: (e["kind"], e["value"]) for e in read_jsonl(tmp_path / "out.jsonl")}
    # an increment of 0 since the first scrape's baseline, so a counter it read as a gauge would show its total
    assert got["http_requests_total"] == ("counter", 0.0) and got["temperature_celsius"] == ("gauge", -1.5)


async def test_credentials_in_the_url_are_used_but_never_shown(tmp_path, caplog):
    import base64

    reg, _ = registry()
    target = await Target(reg).start()
    target.auth = "Basic " + base64.b64encode(b"scraper:s3cret").decode()
    host = target.url.split("/")[2]
    good = target.url.replace("http://", "http://scraper:s3cret@") + "?token=t0ken"
    bad = target.url.replace("http://", "http://scraper:wr0ng@") + "?token=t0ken"
    agent = await start_agent(tmp_path / "data", **prom_config(tmp_path, urls=[good, bad]))
    try:
        await await_until(lambda: _stats(agent)["scrape_errors"] >= 2 and _landed(tmp_path, "temperature_celsius"))
        stats = _stats(agent)
        assert await agent.flush(10)
    finally:
        await agent.stop()
        await target.stop()
    out = (tmp_path / "out.jsonl").read_text()
    shown = out + repr(stats) + caplog.text + repr(agent.status())
    for secret in ("s3cret", "wr0ng", "t0ken", "scraper"):
        assert secret not in shown, secret
    events = read_jsonl(tmp_path / "out.jsonl")
    assert {e["tags"]["instance"] for e in events if e["name"] == "temperature_celsius"} == {host}  # scraped with auth
    errors = [e for e in events if e["name"] == SCRAPE_ERRORS]
    assert {e["tags"]["url"] for e in errors} == {f"http://{host}/metrics"} and "HTTP 401" in errors[0]["data"]["error"]
