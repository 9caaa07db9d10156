"""Event -> monitoring_events row mapping and SQLSTATE classification, shared by the
postgres and supabase sinks.

Columns: id, agent_id, event_type (the event name), kind, value, timestamp, source,
tags, data, metadata, session_id; created_at is left to the database default.
The agent refuses non-finite values at the edge (agent.event.check()); an event that
still has one (an older journal or DLQ entry) is stored with value NULL and the original
kept in data["value_nonfinite"] ("NaN", "Infinity" or "-Infinity"), counted in the
sink's `nonfinite_values`. An event that cannot be converted at all (a ts past year
9999, data the JSON encoder refuses) raises PermanentError naming it, so the core
bisects its batch and only that event goes to the DLQ.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import msgspec

from agent.errors import PermanentError
from agent.event import Event

COLUMNS: tuple[str, ...] = (
    "id",
    "agent_id",
    "event_type",
    "kind",
    "value",
    "timestamp",
    "source",
    "tags",
    "data",
    "metadata",
    "session_id",
)

NONFINITE_KEY = "value_nonfinite"
STAT_NONFINITE = "nonfinite_values"

_UTC = _dt.UTC
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def _nonfinite_name(v: float) -> str:
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _split_value(e: Event, stats: dict[str, Any] | None) -> tuple[float | None, dict[str, Any] | None]:
    v, data = e.value, e.data
    if v is not None and not math.isfinite(v):
        data = {**(data or {}), NONFINITE_KEY: _nonfinite_name(v)}
        v = None
        if stats is not None:
            stats[STAT_NONFINITE] = stats.get(STAT_NONFINITE, 0) + 1
    return v, data


def _json_safe(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Data as plain JSON values; non-finite floats nested in it become null (as msgspec encodes them)."""
    if not data:
        return data
    return _dec.decode(_enc.encode(data))


# What converting one event can raise: a ts out of datetime's range (ValueError,
# OverflowError, OSError), data the encoder refuses (TypeError, EncodeError, RecursionError).
CONVERSION_ERRORS = (ValueError, TypeError, OverflowError, OSError, RecursionError, msgspec.EncodeError)


def _unconvertible(e: Event, exc: BaseException) -> PermanentError:
    return PermanentError(f"event {e.id} cannot be converted to a row: {type(exc).__name__}: {exc}"[:500])


def to_rest_row(e: Event, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready row for PostgREST: timestamp as an ISO 8601 UTC string.

    Raises PermanentError when the event cannot be converted."""
    try:
        return _rest_row(e, stats)
    except CONVERSION_ERRORS as exc:
        raise _unconvertible(e, exc) from exc


def _rest_row(e: Event, stats: dict[str, Any] | None) -> dict[str, Any]:
    value, data = _split_value(e, stats)
    return {
        "id": e.id,
        "agent_id": e.agent_id or None,
        "event_type": e.name,
        "kind": e.kind,
        "value": value,
        "timestamp": _dt.datetime.fromtimestamp(e.ts, _UTC).isoformat(),
        "source": e.source or None,
        "tags": e.tags or None,
        "data": _json_safe(data),
        "metadata": None,
        "session_id": e.session_id,
    }


def to_record(e: Event, stats: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """A record for asyncpg (COPY or executemany) in COLUMNS order; jsonb as JSON text.

    Raises PermanentError when the event cannot be converted."""
    try:
        return _record(e, stats)
    except CONVERSION_ERRORS as exc:
        raise _unconvertible(e, exc) from exc


def _record(e: Event, stats: dict[str, Any] | None) -> tuple[Any, ...]:
    value, data = _split_value(e, stats)
    return (
        e.id,
        e.agent_id or None,
        e.name,
        e.kind,
        value,
        _dt.datetime.fromtimestamp(e.ts, _UTC),
        e.source or None,
        _enc.encode(e.tags).decode() if e.tags else None,
        _enc.encode(data).decode() if data else None,
        None,
        e.session_id,
    )


# SQLSTATE classes (first two characters). Retrying can help with connection loss,
# resource exhaustion, operator intervention (shutdown, cancel, timeouts),
# serialization failures and deadlocks, lock contention and system errors.
RETRYABLE_CLASSES = frozenset({"08", "40", "53", "55", "57", "58", "XX"})
# Retrying cannot help with bad data, constraint violations, syntax, undefined objects,
# missing permissions, bad credentials, unsupported features or raised exceptions.
PERMANENT_CLASSES = frozenset({"0A", "21", "22", "23", "25", "28", "2B", "3D", "3F", "42", "44", "54", "P0"})


def sqlstate_retryable(code: str | None) -> bool | None:
    """True if a SQLSTATE is transient, False if permanent, None if it is not a SQLSTATE we know."""
    if not code or len(code) != 5:
        return None
    cls = code[:2].upper()
    if cls in RETRYABLE_CLASSES:
        return True
    if cls in PERMANENT_CLASSES:
        return False
    return None
