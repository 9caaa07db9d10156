"""The `otlp` source: the real OpenTelemetry Python SDK exporters (OTLP/HTTP protobuf)
send metrics and logs to a running agent; what lands in a jsonl sink is checked by value,
exactly once. Hand-made bodies cover JSON, gzip, and what is refused (truncated,
oversized, wrong type, wrong content type, a full intake)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from tests.helpers import await_until, jsonl_sink, losses_in_db, read_jsonl, start_agent

PROTOBUF = "application/x-protobuf"
RESOURCE = {"service.name": "checkout", "deployment.environment": "test", "process.pid": 4242}


async def otlp_agent(tmp_path: Path, agent: dict[str, Any] | None = None, **otlp: Any) -> tuple[Any, str]:
    """A started agent with an otlp source on a free port and a jsonl sink; (agent, base URL)."""
    a = await start_agent(
        tmp_path / "data",
        sinks={"out": jsonl_sink(tmp_path / "out.jsonl")},
        sources={"otlp": {"port": 0, **otlp}},
        agent=agent or {},
    )
    address = await await_until(lambda: a._source_stats["otlp"].get("address"), what="the otlp listener")
    return a, f"http://{address}"


def sink_events(tmp_path: Path) -> list[dict[str, Any]]:
    return read_jsonl(tmp_path / "out.jsonl")


def meter_provider(url: str, resource: dict[str, Any] | None = None) -> tuple[MeterProvider, Any]:
    """An SDK MeterProvider exporting (cumulative, the default) only when force_flush() is called."""
    exporter = OTLPMetricExporter(endpoint=f"{url}/v1/metrics", timeout=60)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create(resource or RESOURCE))
    return provider, provider.get_meter("shop")


async def export(provider: Any) -> None:
    """force_flush(): the SDK exporter posts synchronously, so off the agent's loop; it must succeed."""
    assert await asyncio.to_thread(provider.force_flush, 60_000)


async def test_sdk_metrics_map_to_events_exactly_once(tmp_path):
    agent, url = await otlp_agent(tmp_path)
    try:
        provider, meter = meter_provider(url)
        orders = meter.create_counter("orders", unit="1")
        latency = meter.create_histogram("latency_ms")
        queue = meter.create_up_down_counter("queue.depth")
        temp = meter.create_gauge("temperature")

        orders.add(5, {"region": "eu"})
        orders.add(1, {"region": "us"})
        latency.record(3, {"route": "/a"})
        latency.record(40, {"route": "/a"})
        queue.add(7)
        temp.set(21.5)
        await export(provider)
        orders.add(3, {"region": "eu"})
        latency.record(8, {"route": "/a"})
        queue.add(-2)
        await export(provider)
        # shutdown() exports once more (off the loop, as the exporter blocks): nothing new, so
        # eu and us give zero deltas and the histogram a zero count.
        await asyncio.to_thread(provider.shutdown)

        # The same service restarted: a new provider, so a new start time, and its counter from 0.
        provider2, meter2 = meter_provider(url)
        meter2.create_counter("orders").add(2, {"region": "eu"})
        await asyncio.to_thread(provider2.shutdown)

        assert await agent.flush(60)
        events = sink_events(tmp_path)
        assert len({e["id"] for e in events}) == len(events)  # nothing twice

        eu = [e for e in events if e["name"] == "orders" and e["tags"].get("region") == "eu"]
        assert [e["kind"] for e in eu] == ["counter"] * 4
        assert [e["value"] for e in eu] == [5, 3, 0, 2]  # the reset gives its whole new count
        us = [e["value"] for e in events if e["name"] == "orders" and e["tags"].get("region") == "us"]
        assert us == [1, 0, 0]
        assert sum(e["value"] for e in eu) == 10

        tags = eu[0]["tags"]
        assert tags["service.name"] == "checkout" and tags["deployment.environment"] == "test"
        assert "process.pid" not in tags and "telemetry.sdk.language" not in tags  # not in resource_tags
        assert eu[0]["source"] == "otlp"

        hist = [e for e in events if e["name"] == "latency_ms"]
        assert [e["kind"] for e in hist] == ["histogram"] * 3
        first, second, third = (h["data"] for h in hist)
        assert (first["count"], first["sum"]) == (2, 43)
        assert hist[0]["value"] == 21.5  # the interval's mean
        assert first["bounds"][:4] == [0.0, 5.0, 10.0, 25.0]  # the SDK's default boundaries
        assert sum(first["bucket_counts"]) == 2 and first["bucket_counts"][1] == 1  # 3 in (0, 5]
        assert (second["count"], second["sum"]) == (1, 8) and second["bucket_counts"][2] == 1  # 8 in (5, 10]
        assert (third["count"], third["sum"]) == (0, 0)

        assert [e["value"] for e in events if e["name"] == "queue.depth"] == [7, 5, 5]
        assert {e["kind"] for e in events if e["name"] == "queue.depth"} == {"gauge"}
        assert next(e["value"] for e in events if e["name"] == "temperature") == 21.5
        assert agent.ledger.total() == 0
    finally:
        await agent.stop()


@pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")
async def test_sdk_logs_become_events_with_body_severity_and_trace_ids(tmp_path):
    agent, url = await otlp_agent(tmp_path)
    try:
        provider = LoggerProvider(resource=Resource.create(RESOURCE))
        provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{url}/v1/logs")))
        tracer = TracerProvider().get_tracer("shop")
        log = logging.getLogger("test_otlp.shop")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(LoggingHandler(logger_provider=provider))
        seen: dict[str, str] = {}

        def send() -> None:  # the SDK exports synchronously: off the agent's loop
            with tracer.start_as_current_span("checkout") as span:
                ctx = span.get_span_context()
                seen.update(trace=f"{ctx.trace_id:032x}", span=f"{ctx.span_id:016x}")
                log.warning("payment failed for %s", "order-7", extra={"order": "order-7", "attempt": 2})
            log.info("plain line")
            provider.shutdown()

        await asyncio.to_thread(send)
        assert await agent.flush(60)
        events = [e for e in sink_events(tmp_path) if e["name"] == "log"]
        assert len(events) == 2 and len({e["id"] for e in events}) == 2
        warn, info = events
        assert warn["kind"] == "event" and warn["value"] is None
        assert warn["tags"]["service.name"] == "checkout" and warn["tags"]["severity"] == "warn"
        assert warn["data"]["body"] == "payment failed for order-7"
        assert warn["data"]["severity_number"] == 13 and warn["data"]["severity_text"] == "WARN"
        assert info["tags"]["severity"] == "info"
        assert (warn["data"]["trace_id"], warn["data"]["span_id"]) == (seen["trace"], seen["span"])
        assert warn["data"]["attributes"]["order"] == "order-7" and warn["data"]["attributes"]["attempt"] == 2
        assert warn["data"]["scope"] == "test_otlp.shop"
        assert info["data"]["body"] == "plain line" and "trace_id" not in info["data"]
        assert abs(warn["ts"] - info["ts"]) < 3600  # record times, in epoch seconds
    finally:
        await agent.stop()


async def post(url: str, body: bytes, content_type: str = PROTOBUF, **headers: str) -> tuple[int, bytes, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=body, headers={"Content-Type": content_type, **headers}) as r,
    ):
        return r.status, await r.read(), r.headers


def json_metrics(*points: dict[str, Any], name: str = "jobs") -> dict[str, Any]:
    """An OTLP JSON metrics body: one gauge `name` with these points."""
    return {
        "resourceMetrics": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "batch"}}]},
                "scopeMetrics": [
                    {"scope": {"name": "s"}, "metrics": [{"name": name, "gauge": {"dataPoints": list(points)}}]}
                ],
            }
        ]
    }


async def test_json_and_gzip_with_partial_success(tmp_path):
    agent, url = await otlp_agent(tmp_path)
    try:
        body = json_metrics(
            {
                "asInt": "42",
                "timeUnixNano": "1700000000000000000",  # int64 as strings, as OTLP JSON writes them
                "attributes": [
                    {"key": "queue", "value": {"stringValue": "a"}},
                    {"key": "shard", "value": {"intValue": "3"}},
                    {"key": "hot", "value": {"boolValue": True}},
                ],
            },
            {"asDouble": "NaN", "timeUnixNano": "1700000000000000000"},  # refused: not finite
        )
        status, raw, _ = await post(f"{url}/v1/metrics", json.dumps(body).encode(), "application/json")
        assert status == 200
        answer = json.loads(raw)
        assert answer["partialSuccess"]["rejectedDataPoints"] == "1"
        assert "not finite" in answer["partialSuccess"]["errorMessage"]

        logs = {
            "resourceLogs": [
                {
                    "resource": {},
                    "scopeLogs": [
                        {
                            "logRecords": [
                                {
                                    "timeUnixNano": "1700000001000000000",
                                    "severityNumber": 17,
                                    "body": {"stringValue": "disk full"},
                                    "traceId": "5b8efff798038103d269b633813fc60c",
                                    "spanId": "eee19b7ec3c1b174",
                                }
                            ]
                        }
                    ],
                }
            ]
        }
        status, raw, _ = await post(
            f"{url}/v1/logs",
            gzip.compress(json.dumps(logs).encode()),
            "application/json",
            **{"Content-Encoding": "gzip"},
        )
        assert status == 200 and json.loads(raw) == {}  # nothing refused: no partial_success

        # protobuf in, protobuf out: an empty response is a full success
        status, raw, headers = await post(f"{url}/v1/metrics", ExportMetricsServiceRequest().SerializeToString())
        assert status == 200 and headers["Content-Type"] == PROTOBUF
        assert not ExportMetricsServiceResponse.FromString(raw).HasField("partial_success")

        assert await agent.flush(60)
        events = sink_events(tmp_path)
        jobs = [e for e in events if e["name"] == "jobs"]
        assert len(jobs) == 1 and jobs[0]["value"] == 42 and jobs[0]["ts"] == 1700000000.0
        assert jobs[0]["tags"] == {"service.name": "batch", "queue": "a", "shard": "3", "hot": "true"}
        (log,) = [e for e in events if e["name"] == "log"]
        assert log["data"]["trace_id"] == "5b8efff798038103d269b633813fc60c"
        assert log["data"]["span_id"] == "eee19b7ec3c1b174"
        assert log["tags"] == {"severity": "error"} and log["data"]["body"] == "disk full"
        assert agent.ledger.total() == 0  # refused points are the sender's to know, not losses
    finally:
        await agent.stop()


async def test_undecodable_oversized_and_wrong_type_bodies_are_refused(tmp_path):
    agent, url = await otlp_agent(tmp_path, max_body_bytes=4096)
    try:
        good = ExportMetricsServiceRequest()
        metric = good.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
        for i in range(20):
            metric.gauge.data_points.add(as_double=float(i), time_unix_nano=1_700_000_000_000_000_000)
        wire = good.SerializeToString()
        cases = [
            (f"{url}/v1/metrics", wire[: len(wire) // 2 + 1], PROTOBUF, {}, 400),  # truncated
            (f"{url}/v1/metrics", b"\xff" * 64, PROTOBUF, {}, 400),  # not protobuf
            (f"{url}/v1/metrics", b"[1, 2]", "application/json", {}, 400),  # JSON, not an object
            (f"{url}/v1/metrics", b'{"resourceMetrics": "x"}', "application/json", {}, 400),  # wrong field type
            (
                f"{url}/v1/logs",
                b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "zz"}]}]}]}',
                "application/json",
                {},
                400,
            ),  # a trace id that is not hex
            (f"{url}/v1/metrics", b"{not json", "application/json", {}, 400),
            (f"{url}/v1/metrics", wire, "text/plain", {}, 415),
            (f"{url}/v1/metrics", b"\0" * 5000, PROTOBUF, {}, 413),  # over max_body_bytes as sent
            (f"{url}/v1/metrics", gzip.compress(b"\0" * 100_000), PROTOBUF, {"Content-Encoding": "gzip"}, 413),
            (f"{url}/v1/metrics", gzip.compress(wire)[:-12], PROTOBUF, {"Content-Encoding": "gzip"}, 400),
            (f"{url}/v1/metrics", b"abc", PROTOBUF, {"Content-Encoding": "gzip"}, 400),
        ]
        for target, body, ctype, headers, expected in cases:
            status, raw, _ = await post(target, body, ctype, **headers)
            assert status == expected, (body[:40], ctype, status, raw[:200])
        status, raw, _ = await post(f"{url}/v1/metrics", b"[1]", "application/json")
        assert json.loads(raw) == {"code": 3, "message": "the JSON body is not an object"}
        assert (await post(f"{url}/v1/metrics", wire))[0] == 200  # the same points, whole: taken
        assert await agent.flush(60)
        assert [e["value"] for e in sink_events(tmp_path)] == [float(i) for i in range(20)]
        assert agent._source_stats["otlp"]["bad_requests"] == len(cases) + 1
    finally:
        await agent.stop()


async def test_full_intake_answers_429_with_retry_after_and_takes_nothing(tmp_path):
    # A long commit window and a small intake: the first export waits in the intake for its
    # commit, and a second one while it waits would overfill it.
    agent, url = await otlp_agent(
        tmp_path, agent={"intake_capacity": 30, "commit_interval_ms": 3000, "commit_batch": 1000}
    )
    try:

        def request(name: str) -> bytes:
            req = ExportMetricsServiceRequest()
            m = req.resource_metrics.add().scope_metrics.add().metrics.add(name=name)
            for i in range(20):
                m.gauge.data_points.add(as_double=float(i), time_unix_nano=1_700_000_000_000_000_000)
            return req.SerializeToString()

        first = asyncio.ensure_future(post(f"{url}/v1/metrics", request("first")))
        await await_until(lambda: agent.committer.pending_events == 20, what="the first export queued")
        assert not first.done()  # not answered before its commit
        status, _, headers = await post(f"{url}/v1/metrics", request("second"))
        assert status == 429 and headers["Retry-After"] == "1"
        # The SDK's exporter meets the same 429 and retries with backoff until it is taken.
        provider, meter = meter_provider(url)
        c = meter.create_counter("sdk")
        for k in range(11):
            c.add(k + 1, {"k": str(k)})
        sdk = asyncio.ensure_future(export(provider))
        await await_until(lambda: agent._source_stats["otlp"]["refused"] >= 2, what="the SDK's export refused")
        assert (await first)[0] == 200
        await sdk
        assert (await post(f"{url}/v1/metrics", request("second")))[0] == 200  # the retry is taken
        assert await agent.flush(60)
        events = sink_events(tmp_path)
        assert Counter(e["name"] for e in events) == {"first": 20, "second": 20, "sdk": 11}
        assert sorted(e["value"] for e in events if e["name"] == "sdk") == [k + 1 for k in range(11)]
        await asyncio.to_thread(provider.shutdown)
        assert agent.ledger.total() == 0
    finally:
        await agent.stop()


async def test_stopping_agent_answers_503(tmp_path):
    agent, url = await otlp_agent(tmp_path)
    try:
        agent.committer.close("stopped")  # what stop() does first: the intake refuses from now on
        status, _, headers = await post(f"{url}/v1/metrics", ExportMetricsServiceRequest().SerializeToString())
        assert status == 200  # nothing to journal: nothing to refuse
        req = ExportMetricsServiceRequest()
        req.resource_metrics.add().scope_metrics.add().metrics.add(name="m").gauge.data_points.add(as_double=1)
        status, _, headers = await post(f"{url}/v1/metrics", req.SerializeToString())
        assert status == 503 and headers["Retry-After"] == "1"
    finally:
        await agent.stop()


async def test_cumulative_state_is_capped_and_evictions_counted(tmp_path):
    agent, url = await otlp_agent(tmp_path, max_series=2)
    try:
        provider, meter = meter_provider(url)
        c = meter.create_counter("hits")
        for k in range(5):
            c.add(1, {"k": str(k)})
        await export(provider)
        assert agent._source_stats["otlp"]["series"] == 2
        assert agent.ledger.by_reason().get("otlp_series_evicted") == 3
        # shutdown() exports all five again: the two kept give zero deltas, the three forgotten
        # come back as baselines (never counted whole twice) and push the two out again.
        await asyncio.to_thread(provider.shutdown)
        assert await agent.flush(60)
        hits = [e["value"] for e in sink_events(tmp_path) if e["name"] == "hits"]
        assert sorted(hits) == [0, 0, 1, 1, 1, 1, 1]
        db = agent.db.path
    finally:
        await agent.stop()
    assert losses_in_db(db)[("otlp_series_evicted", "")] == 6  # the ledger outlives the agent


@pytest.mark.parametrize("bad", [{"port": 70000}, {"max_series": 0}, {"colour": "red"}])
def test_options_are_checked(tmp_path, bad):
    from tests.helpers import plan_error

    toml = '[sources.o]\ntype = "otlp"\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in bad.items())
    assert f"sources.o.{next(iter(bad))}" in plan_error(tmp_path, toml)


async def test_delta_temporality_and_exponential_histograms(tmp_path):
    from opentelemetry.sdk.metrics import Counter as SdkCounter
    from opentelemetry.sdk.metrics import Histogram as SdkHistogram
    from opentelemetry.sdk.metrics.export import AggregationTemporality
    from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

    agent, url = await otlp_agent(tmp_path)
    try:
        delta = {SdkCounter: AggregationTemporality.DELTA, SdkHistogram: AggregationTemporality.DELTA}
        exporter = OTLPMetricExporter(endpoint=f"{url}/v1/metrics", timeout=60, preferred_temporality=delta)
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
        view = View(instrument_name="size", aggregation=ExponentialBucketHistogramAggregation())
        provider = MeterProvider(metric_readers=[reader], resource=Resource.create(RESOURCE), views=[view])
        meter = provider.get_meter("shop")
        sent, size = meter.create_counter("bytes.sent"), meter.create_histogram("size")
        sent.add(100)
        for v in (1, 2, 4, 1000):
            size.record(v)
        await export(provider)
        sent.add(50)
        size.record(3)
        await export(provider)
        assert await agent.flush(60)
        events = sink_events(tmp_path)
        assert [e["value"] for e in events if e["name"] == "bytes.sent"] == [100, 50]  # deltas as they are
        first, second = (e["data"] for e in events if e["name"] == "size")
        assert (first["count"], first["sum"], first["min"], first["max"]) == (4, 1007, 1, 1000)
        assert (second["count"], second["sum"], second["min"], second["max"]) == (1, 3, 3, 3)
        for data, values in ((first, (1, 2, 4, 1000)), (second, (3,))):
            bounds, counts = data["bounds"], data["bucket_counts"]
            assert len(counts) == len(bounds) + 1 and sum(counts) == len(values)
            assert bounds == sorted(bounds)
            for v in values:  # each value lies in a bucket that counts it: (bounds[i-1], bounds[i]]
                i = next((i for i, b in enumerate(bounds) if v <= b * (1 + 1e-9)), len(bounds))
                assert counts[i] >= 1, (v, bounds, counts)
        await asyncio.to_thread(provider.shutdown)
    finally:
        await agent.stop()


async def test_resource_tags_option_and_point_attributes_win(tmp_path):
    agent, url = await otlp_agent(tmp_path, resource_tags=["*"])
    try:
        body = json_metrics({"asDouble": 1.5, "attributes": [{"key": "host.name", "value": {"stringValue": "pod-2"}}]})
        resource = body["resourceMetrics"][0]["resource"]["attributes"]
        resource += [
            {"key": "process.pid", "value": {"intValue": "7"}},
            {"key": "host.name", "value": {"stringValue": "node-1"}},
        ]
        assert (await post(f"{url}/v1/metrics", json.dumps(body).encode(), "application/json"))[0] == 200
        assert await agent.flush(60)
        (event,) = sink_events(tmp_path)
        assert event["tags"] == {"service.name": "batch", "process.pid": "7", "host.name": "pod-2"}
    finally:
        await agent.stop()


def cumulative(service: str, value: int, start_ns: int, t_ns: int) -> bytes:
    """A protobuf export: one monotonic cumulative sum `hits` of `service` at `value`."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key="service.name").value.string_value = service
    m = rm.scope_metrics.add().metrics.add(name="hits")
    m.sum.aggregation_temporality, m.sum.is_monotonic = 2, True
    m.sum.data_points.add(as_int=value, start_time_unix_nano=start_ns, time_unix_nano=t_ns)
    return req.SerializeToString()


async def test_concurrent_cumulative_exports(tmp_path):
    """Exports of one resource are taken one at a time (each delta from the one before it);
    other resources and gauges do not wait for them."""
    import time

    agent, url = await otlp_agent(tmp_path, agent={"commit_interval_ms": 1500, "commit_batch": 1000})
    try:
        start = time.time_ns()  # after the source started: a new series counts whole
        a1 = asyncio.ensure_future(post(f"{url}/v1/metrics", cumulative("a", 5, start, start + 1)))
        await await_until(lambda: agent.committer.pending_events == 1, what="a's first export queued")
        a2 = asyncio.ensure_future(post(f"{url}/v1/metrics", cumulative("a", 8, start, start + 2)))
        b = asyncio.ensure_future(post(f"{url}/v1/metrics", cumulative("b", 4, start, start + 1)))
        gauge = json_metrics({"asDouble": 1.0})
        g = asyncio.ensure_future(post(f"{url}/v1/metrics", json.dumps(gauge).encode(), "application/json"))
        # b and the gauge join a's first export in the same commit window; a's second waits for it.
        await await_until(lambda: agent.committer.pending_events == 3, what="b and the gauge queued beside a")
        assert not a2.done()
        assert [(await f)[0] for f in (a1, a2, b, g)] == [200] * 4
        assert await agent.flush(60)
        values = [(e["tags"]["service.name"], e["value"]) for e in sink_events(tmp_path) if e["name"] == "hits"]
        assert sorted(values) == [("a", 3), ("a", 5), ("b", 4)]
    finally:
        await agent.stop()


APP = """
import logging
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

# No endpoint in code: OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME, as an app is configured.
resource = Resource.create()
reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=3_600_000)
meters = MeterProvider(metric_readers=[reader], resource=resource)
meters.get_meter("app").create_counter("jobs.done").add(3, {"queue": "mail"})
logs = LoggerProvider(resource=resource)
logs.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
log = logging.getLogger("app")
log.addHandler(LoggingHandler(logger_provider=logs))
log.error("job %d failed", 7)
meters.shutdown()
logs.shutdown()
"""


def test_an_app_configured_by_the_standard_environment_reaches_a_sidecar(tmp_path):
    """`sidecar-agent run` as its own process; an app sends with the SDK's stock exporters,
    pointed at it by OTEL_EXPORTER_OTLP_ENDPOINT alone (the exporters add /v1/metrics, /v1/logs)."""
    import subprocess
    import sys

    from tests.helpers import free_port, spawn_agent, subprocess_env, wait_http, wait_until, write_toml

    port, otlp_port = free_port(), free_port()
    cfg = write_toml(
        tmp_path / "agent.toml",
        {
            "agent": {"data_dir": str(tmp_path / "data"), "commit_interval_ms": 2},
            "server": {"port": port},
            "sources": {"otlp": {"port": otlp_port}},
            "sinks": {"out": jsonl_sink(tmp_path / "out.jsonl")},
        },
    )
    proc = spawn_agent(cfg, cwd=tmp_path)
    try:
        wait_until(
            lambda: any(
                c["name"] == "otlp" and c["stats"].get("address")
                for c in wait_http(f"http://127.0.0.1:{port}/api/v1/status", proc)["components"]
                if c["kind"] == "source"
            ),
            timeout=60,
            what="the otlp listener",
        )
        env = subprocess_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
            OTEL_SERVICE_NAME="billing",
            PYTHONWARNINGS="ignore",
        )
        app = subprocess.run([sys.executable, "-c", APP], env=env, capture_output=True, text=True, timeout=120)
        assert app.returncode == 0, app.stderr
        out = tmp_path / "out.jsonl"
        wait_until(
            lambda: out.exists() and len([e for e in read_jsonl(out) if e["name"] in ("jobs.done", "log")]) >= 2,
            timeout=60,
            what="the app's events in the sink",
        )
        events = [e for e in read_jsonl(out) if e["name"] in ("jobs.done", "log")]
        (job,) = [e for e in events if e["name"] == "jobs.done"]
        (line,) = [e for e in events if e["name"] == "log"]
        # not the service.instance.id the SDK adds (a new UUID per process start)
        assert job["value"] == 3 and job["tags"] == {"service.name": "billing", "queue": "mail"}
        assert line["data"]["body"] == "job 7 failed" and line["tags"]["severity"] == "error"
        assert line["tags"]["service.name"] == "billing"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_repeated_and_late_points_give_nothing(tmp_path):
    """An exporter's retry of an export already taken, and a late one from before a reset,
    change no sums."""
    import time

    agent, url = await otlp_agent(tmp_path)
    try:
        start = time.time_ns()
        restart = start + 10_000
        sends = [
            cumulative("a", 5, start, start + 1),  # new: 5
            cumulative("a", 5, start, start + 1),  # the same export again: nothing
            cumulative("a", 9, start, start + 2),  # +4
            cumulative("a", 2, restart, restart + 1),  # reset: 2
            cumulative("a", 9, start, start + 2),  # a late retry from before the reset: nothing
            cumulative("a", 7, restart, restart + 2),  # +5
        ]
        for body in sends:
            assert (await post(f"{url}/v1/metrics", body))[0] == 200
        assert await agent.flush(60)
        assert [e["value"] for e in sink_events(tmp_path) if e["name"] == "hits"] == [5, 4, 2, 5]
    finally:
        await agent.stop()
