"""The event model and its batch codecs.

An Event is what every source produces, the journal stores and every sink receives.
Codecs are module-level encoders/decoders built once and reused for whole batches.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import time
from typing import Annotated, Any, Literal

import msgspec

Kind = Literal["counter", "gauge", "histogram", "event"]
KINDS: tuple[str, ...] = ("counter", "gauge", "histogram", "event")

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
EventId = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]

MAX_TAGS = 64
MAX_NAME = 255
_ID = re.compile(UUID_PATTERN)


class Event(msgspec.Struct, kw_only=True):
    """One metric sample or event. `id` is the idempotency key end to end."""

    id: str = ""
    name: str
    kind: str = "gauge"
    value: float | None = None
    ts: float = 0.0
    tags: dict[str, str] = {}
    source: str = ""
    agent_id: str = ""
    session_id: str | None = None
    data: dict[str, Any] | None = None


class EventIn(Event, kw_only=True, forbid_unknown_fields=True):
    """An event as clients send it: validated strictly on decode, then normalized in place.

    A subclass of Event, so a normalized EventIn goes down the pipeline as it is,
    without a copy.
    """

    id: EventId | Literal[""] = ""
    name: Name
    kind: Kind | None = None  # type: ignore[assignment]
    ts: float | _dt.datetime | None = None  # type: ignore[assignment]


class InvalidEvent(ValueError):
    """One input item failed validation; `index` is its position in the batch."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"item {index}: {message}")
        self.index = index
        self.message = message


_VARIANT = str.maketrans("0123456789abcdef", "89ab89ab89ab89ab")


def new_ids(n: int, now: float | None = None) -> list[str]:
    """Return n fresh UUIDv7 strings (time-ordered, so database indexes stay compact).

    Randomness comes from os.urandom, which stays unique across os.fork().
    """
    ms = int((time.time() if now is None else now) * 1000) & 0xFFFFFFFFFFFF
    prefix = f"{ms:012x}"
    head = f"{prefix[:8]}-{prefix[8:12]}-7"
    raw = os.urandom(10 * n).hex()
    var = raw.translate(_VARIANT)  # the variant nibble (10xx), computed for the whole batch at once
    return [
        f"{head}{raw[i : i + 3]}-{var[i + 3]}{raw[i + 4 : i + 7]}-{raw[i + 8 : i + 20]}" for i in range(0, 20 * n, 20)
    ]


def default_kind(value: float | None) -> str:
    """An event without a kind is a gauge when it has a value, otherwise a plain event."""
    return "event" if value is None else "gauge"


def check(e: Event) -> Event:
    """The rules every event meets, whichever way it came in (record(), a source, HTTP).

    A name of 1..255 characters, a kind in KINDS, a numeric value or none, a finite ts,
    at most MAX_TAGS tags, a dict or no data, a UUID or no id. An int value or ts becomes
    a float and the id is lower-cased, in place. A non-finite value is kept: sinks store
    it (agent/table/rows.py) and the prometheus source documents keeping NaN.
    Raises ValueError naming the first rule broken; the same event gets the same answer
    on every path (record() and sources count it as `invalid`, HTTP answers 400).
    """
    name = e.name
    if name.__class__ is not str or not name or len(name) > MAX_NAME:
        raise ValueError(f"name must be a string of 1 to {MAX_NAME} characters, got {_short(name)}")
    if e.kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {_short(e.kind)}")
    v = e.value
    if v is not None and v.__class__ is not float:
        e.value = _number("value", v)
    ts = e.ts
    if ts.__class__ is not float:
        e.ts = ts = _number("ts", ts)
    if not math.isfinite(ts):
        raise ValueError("ts must be a finite number")
    if len(e.tags) > MAX_TAGS:
        raise ValueError(f"too many tags ({len(e.tags)} > {MAX_TAGS})")
    if e.data is not None and not isinstance(e.data, dict):
        raise ValueError(f"data must be an object, got {type(e.data).__name__}")
    if e.id:
        if e.id.__class__ is not str or not _ID.match(e.id):
            raise ValueError(f"id must be a UUID, got {_short(e.id)}")
        e.id = e.id.lower()
    return e


def _number(field: str, v: Any) -> float:
    if isinstance(v, (str, bytes, bool)):  # float("3") would pass; HTTP refuses strings too
        raise ValueError(f"{field} must be a number, got {type(v).__name__}")
    try:
        return float(v)  # an int, a numpy number, a Decimal
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number, got {type(v).__name__}") from None


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def normalize(item: EventIn, *, source: str, agent_id: str, now: float) -> Event:
    """Fill kind, ts, source and agent of a decoded input item, in place, then check() it.

    Raises ValueError when the item breaks a rule msgspec cannot express.
    """
    ts = item.ts
    if ts is None:
        item.ts = now
    elif isinstance(ts, _dt.datetime):
        item.ts = (ts if ts.tzinfo else ts.replace(tzinfo=_dt.UTC)).timestamp()
    if item.kind is None:
        item.kind = "event" if item.value is None else "gauge"
    if not item.source:
        item.source = source
    if not item.agent_id:
        item.agent_id = agent_id
    return check(item)


def assign_ids(events: list[Event]) -> None:
    """Give every event that has no id a fresh one, in place."""
    missing = [e for e in events if not e.id]
    if missing:
        for e, i in zip(missing, new_ids(len(missing)), strict=True):
            e.id = i


# Reused codecs: building an Encoder/Decoder is far costlier than using one.
json_encoder = msgspec.json.Encoder()
msgpack_encoder = msgspec.msgpack.Encoder()
_json_one = msgspec.json.Decoder(EventIn)
_json_many = msgspec.json.Decoder(list[EventIn])
_json_any = msgspec.json.Decoder()
_msgpack_any = msgspec.msgpack.Decoder()
_msgpack_many = msgspec.msgpack.Decoder(list[EventIn])
_msgpack_one = msgspec.msgpack.Decoder(EventIn)
stored_batch_decoder = msgspec.msgpack.Decoder(list[Event])


def encode_json_batch(events: list[Event]) -> bytes:
    """Encode a list of events as one JSON array."""
    return json_encoder.encode(events)


def encode_msgpack_batch(events: list[Event]) -> bytes:
    """Encode a list of events as one msgpack array."""
    return msgpack_encoder.encode(events)


def _validate_items(raw: list[Any]) -> tuple[list[EventIn], list[InvalidEvent]]:
    good: list[EventIn] = []
    bad: list[InvalidEvent] = []
    for i, obj in enumerate(raw):
        try:
            good.append(msgspec.convert(obj, EventIn))
        except msgspec.ValidationError as exc:
            bad.append(InvalidEvent(i, str(exc)))
    return good, bad


def decode_input(body: bytes, content_type: str) -> tuple[list[EventIn], list[InvalidEvent]]:
    """Decode a request body (JSON object/array, NDJSON or msgpack) into input items.

    Returns the valid items and a list naming each invalid one. A body that cannot be
    parsed at all raises InvalidEvent with index -1.
    """
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
        # The typed fast path first (as for JSON); per-item errors only when it fails.
        try:
            if body[:1] and (0x90 <= body[0] <= 0x9F or body[0] in (0xDC, 0xDD)):  # an array
                return _msgpack_many.decode(body), []
            return [_msgpack_one.decode(body)], []
        except msgspec.ValidationError:
            pass
        except msgspec.DecodeError as exc:
            raise InvalidEvent(-1, f"body is not valid msgpack: {exc}") from None
        raw = _msgpack_any.decode(body)
        return _validate_items(raw if isinstance(raw, list) else [raw])
    if ctype in ("application/x-ndjson", "application/ndjson", "application/jsonl"):
        raw = []
        for lineno, line in enumerate(body.splitlines()):
            if line.strip():
                try:
                    raw.append(_json_any.decode(line))
                except msgspec.DecodeError as exc:
                    raise InvalidEvent(lineno, f"line {lineno + 1} is not valid JSON: {exc}") from None
        return _validate_items(raw)
    # JSON: try the typed fast path first, fall back to per-item errors.
    stripped = body.lstrip()
    try:
        if stripped[:1] == b"[":
            return _json_many.decode(body), []
        return [_json_one.decode(body)], []
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise InvalidEvent(-1, f"body is not valid JSON: {exc}") from None
    raw = _json_any.decode(body)
    return _validate_items(raw if isinstance(raw, list) else [raw])
