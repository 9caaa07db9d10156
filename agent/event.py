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
MAX_FUTURE_S = 366 * 86400.0  # default of `[agent] max_future_s`: how far ahead of now a ts may be
MAX_DATA_DEPTH = 32  # `data` itself is level 1
MAX_DATA_ITEMS = 10_000  # values (scalars and containers) in one event's `data`
# What the journal's msgpack can carry; JSON sinks and SQLite take it too.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
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


def check(e: Event, ts_max: float | None = None) -> Event:
    """The rules every event meets, whichever way it came in (record(), a source, HTTP).

    A name of 1..255 characters; a kind in KINDS; a finite numeric value or none; a ts
    from 0 (1970-01-01) to `ts_max` (default: now + MAX_FUTURE_S; the committer and HTTP
    pass now + `[agent] max_future_s`); at most MAX_TAGS string tags; string source and
    agent; a JSON object or no data (JSON values only, finite numbers, integers the
    journal can carry, at most MAX_DATA_DEPTH levels and MAX_DATA_ITEMS values); a UUID
    or no id; text that is valid Unicode (no lone surrogates). An int value or ts becomes
    a float and the id is lower-cased, in place. Nothing else is altered.
    Raises ValueError naming the first rule broken; the same event gets the same answer
    on every path (record() and sources count it as `invalid`, HTTP answers 400).
    """
    name = e.name
    if name.__class__ is not str or not name or len(name) > MAX_NAME:
        raise ValueError(f"name must be a string of 1 to {MAX_NAME} characters, got {_short(name)}")
    _text("name", name)
    if e.kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {_short(e.kind)}")
    v = e.value
    if v is not None:
        if v.__class__ is not float:
            e.value = v = _number("value", v)
        if not math.isfinite(v):
            raise ValueError(f"value must be a finite number, got {v!r}")
    ts = e.ts
    if ts.__class__ is not float:
        e.ts = ts = _number("ts", ts)
    if ts_max is None:
        ts_max = time.time() + MAX_FUTURE_S
    if not 0.0 <= ts <= ts_max:
        if not math.isfinite(ts):
            raise ValueError("ts must be a finite number")
        raise ValueError(f"ts must be from 0 (1970-01-01) to {ts_max:.0f} (now + [agent] max_future_s), got {ts!r}")
    tags = e.tags
    if tags:
        if tags.__class__ is not dict:
            raise ValueError(f"tags must be an object, got {type(tags).__name__}")
        if len(tags) > MAX_TAGS:
            raise ValueError(f"too many tags ({len(tags)} > {MAX_TAGS})")
        for k, t in tags.items():
            if k.__class__ is not str or t.__class__ is not str:
                raise ValueError(f"tags must map strings to strings, got {_short(k)}: {_short(t)}")
            _text("tags", k)
            _text("tags", t)
    for field, text in (("source", e.source), ("agent_id", e.agent_id), ("session_id", e.session_id)):
        if text.__class__ is not str:
            if text is None and field == "session_id":
                continue
            raise ValueError(f"{field} must be a string, got {type(text).__name__}")
        _text(field, text)
    if e.data is not None:
        _check_data(e.data)
    if e.id:
        if e.id.__class__ is not str or not _ID.match(e.id):
            raise ValueError(f"id must be a UUID, got {_short(e.id)}")
        e.id = e.id.lower()
    return e


def _text(field: str, s: str) -> None:
    """Refuse a lone surrogate: the journal (UTF-8 msgpack) could not encode it. NUL is
    kept: only PostgreSQL refuses it, permanently, for that one event (its sinks bisect)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field} is not valid Unicode (a lone surrogate): {_short(s)}") from None


def _check_data(data: Any) -> None:
    """`data` holds JSON values only, finite and in range, within the depth and size bounds."""
    if not isinstance(data, dict):
        raise ValueError(f"data must be an object, got {type(data).__name__}")
    left = MAX_DATA_ITEMS
    stack: list[tuple[Any, str, int]] = [(data, "data", 1)]
    while stack:
        obj, path, depth = stack.pop()
        if depth > MAX_DATA_DEPTH:
            raise ValueError(f"data nests deeper than {MAX_DATA_DEPTH} levels (at {path})")
        is_dict = isinstance(obj, dict)
        left -= len(obj)
        if left < 0:
            raise ValueError(f"data holds more than {MAX_DATA_ITEMS} values")
        for k, v in obj.items() if is_dict else enumerate(obj):
            if is_dict:
                if k.__class__ is not str:
                    raise ValueError(f"{path} has a key that is not a string: {_short(k)}")
                _text(path, k)
            if v is None or v.__class__ is bool:
                continue
            if isinstance(v, str):
                _text(path, v)
            elif isinstance(v, float):
                if not math.isfinite(v):
                    raise ValueError(f"{_at(path, k, is_dict)} must be a finite number, got {v!r}")
            elif isinstance(v, int):
                if not INT_MIN <= v <= INT_MAX:
                    raise ValueError(f"{_at(path, k, is_dict)} is an integer out of range [-2**63, 2**64 - 1]")
            elif isinstance(v, (dict, list, tuple)):
                stack.append((v, _at(path, k, is_dict), depth + 1))
            else:
                raise ValueError(f"{_at(path, k, is_dict)} must be a JSON value, got {type(v).__name__}")


def _at(path: str, k: Any, is_dict: bool) -> str:
    if not is_dict:
        return f"{path}[{k}]"
    return f"{path}.{k if len(k) <= 40 else k[:37] + '...'}"


def _number(field: str, v: Any) -> float:
    if isinstance(v, (str, bytes, bool)):  # float("3") would pass; HTTP refuses strings too
        raise ValueError(f"{field} must be a number, got {type(v).__name__}")
    try:
        return float(v)  # an int, a numpy number, a Decimal
    except OverflowError:  # an int past the float range
        raise ValueError(f"{field} is a number out of range, got {_short(v)}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number, got {type(v).__name__}") from None


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def normalize(item: EventIn, *, source: str, agent_id: str, now: float, ts_max: float | None = None) -> Event:
    """Fill kind, ts, source and agent of a decoded input item, in place, then check() it
    (with `ts_max`; default: the clock now + MAX_FUTURE_S).

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
    return check(item, ts_max)


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
# The per-item fallback decodes 1e999 as inf (not "Number out of range" for the whole
# body), so the item's check() names it.
_json_any = msgspec.json.Decoder(float_hook=float)
_msgpack_any = msgspec.msgpack.Decoder()
_msgpack_many = msgspec.msgpack.Decoder(list[EventIn])
_msgpack_one = msgspec.msgpack.Decoder(EventIn)
stored_batch_decoder = msgspec.msgpack.Decoder(list[Event])

# msgspec raises RecursionError past ~1000 levels (the interpreter's recursion limit).
_TOO_DEEP = f"nests too deeply (data may nest at most {MAX_DATA_DEPTH} levels)"
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


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
        except RecursionError:
            bad.append(InvalidEvent(i, f"item {_TOO_DEEP}"))
    return good, bad


def _deep_json_item(body: bytes) -> int:
    """The index of the first top-level item nesting past the data limit (0 for an object body)."""
    limit = MAX_DATA_DEPTH + 2  # the array, the event, then data's own levels
    depth = index = 0
    array = False
    for m in _JSON_TOKEN.finditer(body):
        c = body[m.start()]
        if c == 0x22:  # a string
            continue
        if c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth == 1:
                array = c == 0x5B
            elif depth > limit - (0 if array else 1):
                return index
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1
        elif depth == 1 and array:  # a comma between items
            index += 1
    return -1


# msgpack scalars of a fixed size (head byte included), and those with a length after the head
_MSGPACK_FIXED = {
    0xC0: 1,
    0xC2: 1,
    0xC3: 1,
    0xCA: 5,
    0xCB: 9,
    0xCC: 2,
    0xCD: 3,
    0xCE: 5,
    0xCF: 9,
    0xD0: 2,
    0xD1: 3,
    0xD2: 5,
    0xD3: 9,
    0xD4: 3,
    0xD5: 4,
    0xD6: 6,
    0xD7: 10,
    0xD8: 18,
}
_MSGPACK_SIZED = {
    0xC4: (1, 0),
    0xC5: (2, 0),
    0xC6: (4, 0),
    0xC7: (1, 1),
    0xC8: (2, 1),
    0xC9: (4, 1),
    0xD9: (1, 0),
    0xDA: (2, 0),
    0xDB: (4, 0),
}  # bin, ext (+ its type byte), str
_MSGPACK_CONTAINER = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # arrays, maps (2 per entry)


def _msgpack_head(b: bytes, p: int) -> tuple[int, int]:
    """At a msgpack object at `p`: (children, position after its head), with children -1
    for a scalar (whose payload is skipped too). IndexError/KeyError when it is not msgpack."""
    c = b[p]
    if c <= 0x7F or c >= 0xE0:
        return -1, p + 1
    if c <= 0x8F:
        return 2 * (c & 0x0F), p + 1
    if c <= 0x9F:
        return c & 0x0F, p + 1
    if c <= 0xBF:
        return -1, p + 1 + (c & 0x1F)
    if c in _MSGPACK_FIXED:
        return -1, p + _MSGPACK_FIXED[c]
    if c in _MSGPACK_SIZED:
        width, extra = _MSGPACK_SIZED[c]
        if p + 1 + width > len(b):
            raise IndexError(p)
        return -1, p + 1 + width + extra + int.from_bytes(b[p + 1 : p + 1 + width], "big")
    width, per = _MSGPACK_CONTAINER[c]
    if p + 1 + width > len(b):
        raise IndexError(p)
    return per * int.from_bytes(b[p + 1 : p + 1 + width], "big"), p + 1 + width


def _deep_msgpack_item(body: bytes) -> int:
    """The index of the first item of a msgpack body that nests past the data limit (0 for
    a body that is one object), without recursion; -1 when it cannot be told."""
    limit = MAX_DATA_DEPTH + 1  # the event, then data's own levels
    try:
        items, p = _msgpack_head(body, 0)
        if not (0x90 <= body[0] <= 0x9F or body[0] in (0xDC, 0xDD)):  # one object, not an array
            items, p = 1, 0
        for index in range(items):
            open_: list[int] = []  # children still to come, per open container
            while True:
                children, p = _msgpack_head(body, p)
                if children >= 0 and len(open_) + 1 > limit:
                    return index
                if children > 0:
                    open_.append(children)
                    continue
                while open_:  # this object is complete: so may be the containers around it
                    open_[-1] -= 1
                    if open_[-1]:
                        break
                    open_.pop()
                if not open_:
                    break
    except (IndexError, KeyError):
        pass
    return -1


def decode_input(body: bytes, content_type: str) -> tuple[list[EventIn], list[InvalidEvent]]:
    """Decode a request body (JSON object/array, NDJSON or msgpack) into input items.

    Returns the valid items and a list naming each invalid one. A body that cannot be
    parsed at all raises InvalidEvent with index -1 (or the index of the item that
    nests too deeply to parse, when it can be told).
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
        except RecursionError:
            index = _deep_msgpack_item(body)
            raise InvalidEvent(index, f"{'body' if index < 0 else 'item'} {_TOO_DEEP}") from None
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
                except RecursionError:
                    raise InvalidEvent(lineno, f"line {lineno + 1} {_TOO_DEEP}") from None
        return _validate_items(raw)
    # JSON: try the typed fast path first, fall back to per-item errors.
    stripped = body.lstrip()
    try:
        try:
            if stripped[:1] == b"[":
                return _json_many.decode(body), []
            return [_json_one.decode(body)], []
        except msgspec.ValidationError:  # a bad item, or a number out of range: name them below
            pass
        raw = _json_any.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidEvent(-1, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        index = _deep_json_item(body)
        raise InvalidEvent(index, f"{'body' if index < 0 else 'item'} {_TOO_DEEP}") from None
    return _validate_items(raw if isinstance(raw, list) else [raw])
