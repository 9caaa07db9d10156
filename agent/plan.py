"""Turn `[sources.*]` and `[sinks.*]` tables into validated component specs, and build
the flag service for them.

Each table may set `type` (default: its name). Sink tables also take `policies`
(default timeout, retry, circuit_breaker), `batch_size`, `max_in_flight`, `aggregate` (an interval such as
"10s": the sink receives per-interval aggregates; the store sink ignores it), and one sub-table per policy
named after it. Every other key belongs to the plugin's own options struct; errors
name the key path, e.g. `agent.toml: sinks.main.retry.max_attempts: expected int`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.aggregation import parse_interval
from agent.config import DEFAULT_POLICIES, Config, convert_section
from agent.errors import ConfigError, PluginError
from agent.event import Event
from agent.flags import FlagService, core_flags, data_source_check
from agent.plugin.host import PluginHost, Registration

STORE_BATCH = 5000  # the implicit store sink's batch_size
# An aggregating sink's default batch_size: events read per batch, aggregated into one row
# per series and bucket, so rows per batch stay few (bench/aggregation_savings.py).
AGGREGATE_BATCH = 20_000


@dataclass
class ComponentSpec:
    """A configured source or sink, ready to instantiate."""

    kind: str  # "sources" | "sinks"
    name: str
    registration: Registration
    options: Any
    policies: list[tuple[str, Registration, Any]] = field(default_factory=list)
    batch_size: int = 500
    max_in_flight: int | None = None  # None: the sink's own default (agent.pipeline.delivery)
    aggregate_s: float | None = None  # None: raw events (agent.pipeline.batch_ranges)


def plan(config: Config, host: PluginHost) -> list[ComponentSpec]:
    """Validate every component table against the loaded plugins."""
    specs: list[ComponentSpec] = []
    for kind in ("sources", "sinks"):
        tables = dict(getattr(config, kind))
        if kind == "sinks":
            tables.update(_implicit_store(config, host))
        for name, table in tables.items():
            specs.append(_spec(kind, name, dict(table), config, host))
    _check_together(specs, config.origin)
    return specs


def _check_together(specs: list[ComponentSpec], origin: str) -> None:
    """Give each plugin's options struct that defines ``check_together(uses)`` every
    configured use of its type at once, as (instance name, options) pairs (for a policy,
    the sink's name): it raises ConfigError for a combination that cannot work, e.g. two
    limits for one concurrency group. Checked here, before anything starts (and by
    check-config), not when the second component is built."""
    uses: dict[tuple[str, str], tuple[Registration, list[tuple[str, Any]]]] = {}
    for spec in specs:
        for reg, options in [(spec.registration, spec.options), *[(r, o) for _, r, o in spec.policies]]:
            uses.setdefault((reg.kind, reg.type_name), (reg, []))[1].append((spec.name, options))
    for reg, pairs in uses.values():
        check = getattr(reg.options, "check_together", None)
        if check is None:
            continue
        try:
            check(pairs)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None


def _implicit_store(config: Config, host: PluginHost) -> dict[str, dict[str, Any]]:
    """The dashboard's local history store is a sink like any other, added unless
    `[dashboard] store = false`, a store sink is configured, or the plugin is blocked."""
    if not config.dashboard.store or "store" in config.sinks or "store" not in host.registry["sinks"]:
        return {}
    if any(t.get("type", n) == "store" for n, t in config.sinks.items()):
        return {}
    dash = config.dashboard
    # Batches of 5000 when it is behind: a store batch's cost is mostly pages rewritten per
    # commit, so bigger batches catch up several times faster (bench/store_throughput.py).
    return {
        "store": {
            "type": "store",
            "policies": [],
            "retention_h": dash.store_retention_h,
            "max_mb": dash.max_store_mb,
            "batch_size": STORE_BATCH,
        }
    }


def _spec(kind: str, name: str, table: dict[str, Any], config: Config, host: PluginHost) -> ComponentSpec:
    origin = config.origin
    path = f"{kind}.{name}"
    type_name = table.pop("type", name)
    if not isinstance(type_name, str):
        raise ConfigError(f"{origin}: {path}.type: expected a string")
    try:
        reg = host.get(kind, type_name)
    except PluginError as exc:
        raise ConfigError(f"{origin}: {path}.type: {exc}") from None
    spec = ComponentSpec(kind, name, reg, None)
    if kind == "sinks":
        names = table.pop("policies", DEFAULT_POLICIES)
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ConfigError(f"{origin}: {path}.policies: expected a list of policy names")
        if len(set(names)) != len(names):
            raise ConfigError(f"{origin}: {path}.policies: a policy is listed twice: {names}")
        batch = table.pop("batch_size", None)
        if batch is None:
            batch = AGGREGATE_BATCH if table.get("aggregate") is not None and type_name != "store" else 500
        if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
            raise ConfigError(f"{origin}: {path}.batch_size: expected a positive integer")
        spec.batch_size = batch
        in_flight = table.pop("max_in_flight", None)
        if in_flight is not None and (not isinstance(in_flight, int) or isinstance(in_flight, bool) or in_flight <= 0):
            raise ConfigError(f"{origin}: {path}.max_in_flight: expected a positive integer")
        spec.max_in_flight = in_flight
        aggregate = table.pop("aggregate", None)
        if aggregate is not None:
            try:
                seconds = parse_interval(aggregate)
            except ValueError as exc:
                raise ConfigError(f"{origin}: {path}.aggregate: {exc}") from None
            # The local store keeps raw events for the dashboard's history, whatever is asked.
            spec.aggregate_s = None if type_name == "store" else seconds
        for pname in names:
            try:
                preg = host.get("policies", pname)
            except PluginError as exc:
                raise ConfigError(f"{origin}: {path}.policies: {exc}") from None
            raw = table.pop(pname, {})
            if not isinstance(raw, dict):
                raise ConfigError(f"{origin}: {path}.{pname}: expected a table")
            spec.policies.append((pname, preg, convert_section(raw, preg.options, origin, f"{path}.{pname}")))
        for key, value in list(table.items()):
            if isinstance(value, dict) and key in host.registry["policies"]:
                raise ConfigError(f"{origin}: {path}.{key}: policy {key!r} is configured but not in policies")
    spec.options = convert_section(table, reg.options, origin, path)
    return spec


def build_flags(
    config: Config, host: PluginHost, specs: list[ComponentSpec], emit: Callable[[list[Event]], None] | None = None
) -> FlagService:
    """The flag service: core flags for the configured sinks plus plugin flags."""

    sinks = {s.name: s.registration.type_name for s in specs if s.kind == "sinks"}
    defs: list[Any] = [("core", f) for f in core_flags(list(sinks))] + list(host.flags)
    service = FlagService(
        defs, config.flags, os.environ, Path(config.agent.data_dir), emit=emit, config_origin=config.origin
    )
    service.add_check(data_source_check(service, sinks))
    return service
