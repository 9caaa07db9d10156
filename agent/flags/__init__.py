"""Feature flags: typed definitions, four layers, runtime overrides, audit and rollout.

Each flag's value comes from the highest layer that sets it:

    default < config [flags] < environment SIDECAR_AGENT_FLAG_<NAME> < runtime override

Runtime overrides (`set`/`clear`, the HTTP API, the CLI) persist in
`data_dir/flags.json`; every change is appended to `data_dir/flags-audit.jsonl` and
emitted as a `sidecar_agent.flag_changed` event. `get()` is a dict lookup of the
resolved value, cheap enough for hot paths. See docs/flags.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

from agent.errors import FlagError
from agent.flags.definition import ENV_PREFIX, TYPES, Flag, FlagConfigError, UnknownFlagError, env_var
from agent.flags.service import CHANGED_EVENT, LAYERS, FlagService, flatten

__all__ = [
    "CHANGED_EVENT",
    "ENV_PREFIX",
    "LAYERS",
    "TYPES",
    "Flag",
    "FlagConfigError",
    "FlagError",
    "FlagService",
    "UnknownFlagError",
    "core_flags",
    "data_source_check",
    "env_var",
    "flatten",
    "in_rollout",
    "rollout_bucket",
]


# -- rollout -----------------------------------------------------------------------

_blake2b = hashlib.blake2b


def rollout_bucket(event_id: str) -> int:
    """The event's stable bucket in 0..9999: blake2b(id, digest_size=8) mod 10000."""
    return int.from_bytes(_blake2b(event_id.encode(), digest_size=8).digest(), "big") % 10000


def in_rollout(event_id: str, percent: float) -> bool:
    """True when the event falls in the first `percent` % of buckets (0.01 % steps).

    Stable across processes, restarts and machines (never Python's hash()). Ids are
    hashed as given; the agent lower-cases ids at intake, so one event always maps to
    one bucket.
    """
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return int.from_bytes(_blake2b(event_id.encode(), digest_size=8).digest(), "big") % 10000 < percent * 100


# -- core flags ----------------------------------------------------------------------

DATA_SOURCES = ("websocket", "supabase", "dual")


def core_flags(sink_names: Iterable[str]) -> list[Flag]:
    """The flags the core defines: a kill switch and a rollout share per sink, and the
    dashboard's data source."""
    flags: list[Flag] = []
    for sink in sink_names:
        flags.append(
            Flag.bool(
                f"sinks.{sink}.enabled",
                True,
                "kill switch: while off the sink's cursor waits and nothing is lost",
            )
        )
        flags.append(
            Flag.float(
                f"sinks.{sink}.rollout_percent",
                100.0,
                "share of events, chosen by a stable hash of the event id, that go to this sink",
                min=0,
                max=100,
            )
        )
    flags.append(
        Flag.enum(
            "dashboard.data_source",
            "websocket",
            DATA_SOURCES,
            "where the dashboard's live data comes from: the agent's WebSocket, Supabase Realtime, or both (dual)",
        )
    )
    return flags


def data_source_check(service: FlagService, sink_types: Mapping[str, str]) -> Callable[[], list[str]]:
    """A health check: dashboard.data_source needs a sink of type supabase unless it is websocket.

    `sink_types` maps configured sink names to their types.
    """

    def check() -> list[str]:
        source = service.get("dashboard.data_source")
        if source != "websocket" and "supabase" not in sink_types.values():
            return [f"dashboard.data_source={source} but no supabase sink is configured"]
        return []

    return check
