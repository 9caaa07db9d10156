"""OTLP metrics and logs as the agent's events (the rules are in docs/otlp.md).

`Mapper.metrics()` and `Mapper.logs()` turn a decoded export request into events. The
state cumulative sums and histograms need (the last point of each series) is only
*staged* by a request: the source applies it with `Mapper.commit()` once the events are
in the journal, so an export the agent refused (429/503) and the exporter retries gives
the same deltas again, never zero.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agent.plugin import Event

__all__ = [
    "DEFAULT_RESOURCE_TAGS",
    "ExportLogsServiceRequest",
    "ExportLogsServiceResponse",
    "ExportMetricsServiceRequest",
    "ExportMetricsServiceResponse",
    "Mapper",
    "decode",
    "encode",
    "stateful_resources",
]

CUMULATIVE = 2  # AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
# Resource attributes kept as tags by default (service.name is kept whatever the list says).
# Not service.instance.id: the SDKs make a new UUID per process start, so every restart
# would start new series (the deltas still tell instances apart: see Mapper).
DEFAULT_RESOURCE_TAGS = (
    "service.name",
    "service.namespace",
    "service.version",
    "deployment.environment",
    "deployment.environment.name",
    "host.name",
)
_SEVERITY = {1: "trace", 5: "debug", 9: "info", 13: "warn", 17: "error", 21: "fatal"}


def decode(body: bytes, content_type: str, message: type[Message]) -> Any:
    """A request body as `message`; raises ValueError when it is not one."""
    msg = message()
    try:
        if content_type == "application/json":
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise ValueError("the JSON body is not an object")
            # OTLP JSON writes trace and span ids as hex; protobuf's JSON mapping wants base64.
            json_format.ParseDict(_ids_to_base64(doc), msg, ignore_unknown_fields=True)
        else:
            msg.ParseFromString(body)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"body does not decode as {message.__name__}: {exc}") from None
    return msg


def encode(msg: Message, content_type: str, status: int) -> web.Response:
    """A response message in the request's encoding."""
    if content_type == "application/json":
        body = json_format.MessageToJson(msg, indent=None).encode()
    else:
        body = msg.SerializeToString()
    return web.Response(status=status, body=body, content_type=content_type)


def _ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("traceId", "spanId", "trace_id", "span_id") and isinstance(v, str):
                try:
                    v = base64.b64encode(bytes.fromhex(v)).decode()
                except ValueError:
                    raise ValueError(f"{k} is not hex: {v[:40]!r}") from None
            out[k] = _ids_to_base64(v)
        return out
    if isinstance(node, list):
        return [_ids_to_base64(x) for x in node]
    return node


def stateful_resources(req: ExportMetricsServiceRequest) -> list[Any]:
    """The resources (their series-key part, sorted) with metrics whose deltas need the
    state: monotonic cumulative sums and cumulative histograms."""
    keys = set()
    for rm in req.resource_metrics:
        if any(_stateful(m) for sm in rm.scope_metrics for m in sm.metrics):
            keys.add(_frozen(attributes(rm.resource.attributes)))
    return sorted(keys)


def _stateful(m: Any) -> bool:
    kind = m.WhichOneof("data")
    if kind not in ("sum", "histogram", "exponential_histogram"):
        return False
    data = getattr(m, kind)
    return bool(data.aggregation_temporality == CUMULATIVE and (kind != "sum" or data.is_monotonic))


def any_value(v: AnyValue) -> Any:
    """An OTLP AnyValue as a JSON value (bytes as hex)."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def tag_value(v: Any) -> str:
    """A tag's string: strings as they are, booleans as true/false, the rest as JSON."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, separators=(",", ":"))


def _frozen(attrs: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, tag_value(v)) for k, v in attrs.items()))


@dataclass(slots=True)
class Last:
    """The last point of a cumulative series: its start, time and value(s)."""

    start: int
    time: int
    value: float
    count: int = 0
    bounds: tuple[float, ...] = ()
    buckets: tuple[int, ...] = ()


class Mapper:
    """Maps export requests to events; holds the cumulative series' last points (bounded)."""

    def __init__(self, resource_tags: Iterable[str], max_series: int, started_ns: int) -> None:
        keep = set(resource_tags)
        self.all_resource_tags = "*" in keep
        self.resource_tags = keep | {"service.name"}
        self.max_series = max_series
        # A series first seen that began after this has had no delta emitted yet: not by an
        # earlier run (it started after us), nor before an eviction (raised past each one).
        self.started_ns = started_ns
        self.last: dict[Any, Last] = {}
        self.evicted = 0

    # -- tags ----------------------------------------------------------------------

    def _resource(self, attrs: dict[str, Any]) -> dict[str, str]:
        return {k: tag_value(v) for k, v in attrs.items() if self.all_resource_tags or k in self.resource_tags}

    # -- metrics -------------------------------------------------------------------

    def metrics(self, req: ExportMetricsServiceRequest) -> tuple[list[Event], dict[Any, Last], list[str]]:
        """The events, the staged cumulative state, and one error per point that maps to nothing."""
        events: list[Event] = []
        staged: dict[Any, Last] = {}
        errors: list[str] = []
        for rm in req.resource_metrics:
            rattrs = attributes(rm.resource.attributes)
            rkey = _frozen(rattrs)
            rtags = self._resource(rattrs)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind is None:
                        errors.append(f"metric {m.name!r} has no data")
                        continue
                    data = getattr(m, kind)
                    for p in data.data_points:
                        pattrs = attributes(p.attributes)
                        tags = {**rtags, **{k: tag_value(v) for k, v in pattrs.items()}}
                        key = (rkey, sm.scope.name, m.name, _frozen(pattrs))
                        try:
                            events.extend(self._point(kind, data, m.name, p, tags, key, staged))
                        except ValueError as exc:
                            errors.append(f"metric {m.name!r}: {exc}")
        return events, staged, errors

    def _point(self, kind: str, data: Any, name: str, p: Any, tags: dict[str, str], key: Any, staged: dict) -> list:
        ts = p.time_unix_nano / 1e9
        if kind == "gauge":
            return [Event(name=name, kind="gauge", value=_number(p), ts=ts, tags=tags)]
        if kind == "sum":
            value = _number(p)
            if data.aggregation_temporality != CUMULATIVE:
                return [Event(name=name, kind="counter", value=value, ts=ts, tags=tags)]
            if not data.is_monotonic:  # an up-down counter's running total is its current level
                return [Event(name=name, kind="gauge", value=value, ts=ts, tags=tags)]
            point = Last(p.start_time_unix_nano, p.time_unix_nano, value)
            prev = self._delta_base(key, point, staged, lambda last: value < last.value)
            if prev is None:
                return []
            return [Event(name=name, kind="counter", value=value - prev.value, ts=ts, tags=tags)]
        if kind == "summary":
            return [
                Event(
                    name=name, kind="gauge", value=_finite(q.value), ts=ts, tags={**tags, "quantile": str(q.quantile)}
                )
                for q in p.quantile_values
            ]
        if kind == "histogram":
            bounds, buckets = tuple(p.explicit_bounds), tuple(p.bucket_counts)
        else:  # exponential_histogram
            bounds, buckets = _exponential(p)
        total = p.sum if p.HasField("sum") else None
        lo = p.min if p.HasField("min") else None
        hi = p.max if p.HasField("max") else None
        count = p.count
        if data.aggregation_temporality == CUMULATIVE:
            point = Last(p.start_time_unix_nano, p.time_unix_nano, total or 0.0, count, bounds, buckets)
            prev = self._delta_base(key, point, staged, lambda last: count < last.count)
            if prev is None:
                return []
            lo = hi = None  # lifetime extremes, not this interval's
            count -= prev.count
            if total is not None:
                total -= prev.value
            if prev.bounds == bounds:
                buckets = tuple(b - a for a, b in zip(prev.buckets, buckets, strict=True))
            else:  # the layout changed (an exponential histogram rescaled): one bucket
                bounds, buckets = (), (count,)
        mean = total / count if total is not None and count else None
        hdata = {
            "count": count,
            "sum": total,
            "min": lo,
            "max": hi,
            "bounds": list(bounds),
            "bucket_counts": list(buckets),
        }
        return [Event(name=name, kind="histogram", value=mean, ts=ts, tags=tags, data=hdata)]

    def _delta_base(self, key: Any, point: Last, staged: dict, went_down: Any) -> Last | None:
        """The point to subtract from `point`, or None when it gives no delta; stages `point`."""
        last = staged.get(key) or self.last.get(key)
        staged[key] = point
        if last is None:
            # A series this run has not seen: if it began after the source started, no
            # earlier run can have counted any of it, so all of it is new; otherwise it is
            # only the base the next point's delta is taken from.
            new = point.start != 0 and point.start > self.started_ns
            return Last(point.start, point.start, 0.0, 0, point.bounds, (0,) * len(point.buckets)) if new else None
        if (point.time <= last.time and point.start == last.start) or 0 < point.start < last.start:
            # A repeat, an older point, or one from before the last reset (a late retry
            # of an export taken earlier): nothing new, and the state stays as it was.
            staged[key] = last
            return None
        if point.start > last.start or went_down(last):
            # Reset (the process restarted): everything since its start is new.
            return Last(point.start, point.start, 0.0, 0, point.bounds, (0,) * len(point.buckets))
        return last

    def commit(self, staged: dict[Any, Last]) -> None:
        """Keep the staged last points (after their events were committed), within the cap."""
        for key, point in staged.items():
            self.last.pop(key, None)  # re-inserted: the dict's order is recency
            self.last[key] = point
        while len(self.last) > self.max_series:
            forgotten = self.last.pop(next(iter(self.last)))
            # If it comes back it must be a baseline, not counted whole a second time; any
            # series that began before its last point could be it.
            self.started_ns = max(self.started_ns, forgotten.time)
            self.evicted += 1

    # -- logs ----------------------------------------------------------------------

    def logs(self, req: ExportLogsServiceRequest) -> list[Event]:
        """One `event` per log record."""
        events = []
        for rl in req.resource_logs:
            rtags = self._resource(attributes(rl.resource.attributes))
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    severity = _severity(r.severity_number) or r.severity_text.lower()  # one vocabulary for filters
                    tags = {**rtags, "severity": severity} if severity else dict(rtags)
                    data: dict[str, Any] = {"body": any_value(r.body), "severity_number": r.severity_number}
                    if r.severity_text:
                        data["severity_text"] = r.severity_text
                    if r.trace_id:
                        data["trace_id"] = r.trace_id.hex()
                    if r.span_id:
                        data["span_id"] = r.span_id.hex()
                    if r.attributes:
                        data["attributes"] = attributes(r.attributes)
                    if sl.scope.name:
                        data["scope"] = sl.scope.name
                    ts = (r.time_unix_nano or r.observed_time_unix_nano) / 1e9
                    events.append(Event(name=r.event_name or "log", kind="event", ts=ts, tags=tags, data=data))
        return events


def _severity(number: int) -> str:
    """The severity's short name from its number (1-4 trace ... 21-24 fatal)."""
    if not 1 <= number <= 24:
        return ""
    return _SEVERITY[(number - 1) // 4 * 4 + 1]


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError(f"value is not finite: {v}")
    return float(v)


def _number(p: Any) -> float:
    which = p.WhichOneof("value")
    if which is None:
        raise ValueError("data point has no value")
    return _finite(getattr(p, which))


def _exponential(p: Any) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """An exponential histogram's buckets as explicit upper bounds and counts (ascending):
    negative buckets, the zero bucket, positive buckets; the last bucket has no bound."""
    base = 2.0 ** (2.0**-p.scale)
    pairs: list[tuple[float, int]] = []  # (upper bound, count)
    neg = p.negative
    for i in reversed(range(len(neg.bucket_counts))):  # index k covers [-base^(k+1), -base^k)
        pairs.append((-(base ** (neg.offset + i)), neg.bucket_counts[i]))
    if p.zero_count or pairs or len(p.positive.bucket_counts) == 0:
        pairs.append((p.zero_threshold, p.zero_count))
    pos = p.positive
    for i, c in enumerate(pos.bucket_counts):  # index k covers (base^k, base^(k+1)]
        pairs.append((base ** (pos.offset + i + 1), c))
    if not pairs:
        return (), (p.count,)
    bounds = tuple(b for b, _ in pairs[:-1])
    return bounds, tuple(c for _, c in pairs)
