"""The event model: codecs round trip whole batches, validation, UUIDv7 ids (also across fork)."""

from __future__ import annotations

import os
import time
import uuid

import msgspec
import pytest

from agent.event import (
    Event,
    EventIn,
    InvalidEvent,
    assign_ids,
    decode_input,
    encode_json_batch,
    encode_msgpack_batch,
    normalize,
    new_ids,
    stored_batch_decoder,
)


def _batch(n: int = 50) -> list[Event]:
    ids = new_ids(n)
    return [
        Event(id=ids[i], name=f"m.{i % 5}", kind=("counter", "gauge", "histogram", "event")[i % 4],
              value=None if i % 4 == 3 else i * 1.5, ts=1_700_000_000.0 + i, tags={"k": str(i)} if i % 2 else {},
              source="test", agent_id="a1", session_id="s1" if i % 3 == 0 else None,
              data={"n": i, "nested": {"x": [1, 2]}} if i % 5 == 0 else None)
        for i in range(n)
    ]


def test_json_batch_round_trip():
    events = _batch()
    decoded = msgspec.json.decode(encode_json_batch(events), type=list[Event])
    assert decoded == events


def test_msgpack_batch_round_trip():
    events = _batch()
    assert stored_batch_decoder.decode(encode_msgpack_batch(events)) == events


@pytest.mark.parametrize("ctype, encode", [
    ("application/json", lambda items: msgspec.json.encode(items)),
    ("application/x-ndjson", lambda items: b"\n".join(msgspec.json.encode(i) for i in items) + b"\n"),
    ("application/msgpack", lambda items: msgspec.msgpack.encode(items)),
])
def test_input_codecs_accept_whole_batches(ctype, encode):
    events = _batch(20)
    items = msgspec.to_builtins(events)
    good, bad = decode_input(encode(items), ctype)
    assert bad == []
    back = [normalize(i, source="x", agent_id="y", now=0.0) for i in good]
    assert msgspec.to_builtins(back) == msgspec.to_builtins(events)


def test_input_single_object_and_defaults():
    (item,), bad = decode_input(b'{"name": "cpu", "value": 3}', "application/json")
    assert bad == []
    e = normalize(item, source="http", agent_id="a1", now=123.0)
    assert (e.id, e.name, e.kind, e.value, e.ts, e.source, e.agent_id) == ("", "cpu", "gauge", 3.0, 123.0, "http", "a1")
    (item,), _ = decode_input(b'{"name": "deploy"}', "application/json")
    assert normalize(item, source="http", agent_id="a1", now=1.0).kind == "event"


def test_rfc3339_ts_and_uppercase_id():
    uid = str(uuid.uuid4()).upper()
    (item,), _ = decode_input(msgspec.json.encode({"name": "x", "id": uid, "ts": "2024-01-02T03:04:05Z"}),
                              "application/json")
    e = normalize(item, source="s", agent_id="a", now=0.0)
    assert e.ts == 1704164645.0
    assert e.id == uid.lower()


@pytest.mark.parametrize("item, fragment", [
    ({"value": 1}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 256}, "name"),
    ({"name": "x", "kind": "summary"}, "kind"),
    ({"name": "x", "value": "high"}, "value"),
    ({"name": "x", "id": "not-a-uuid"}, "id"),
    ({"name": "x", "tags": {"a": 1}}, "tags"),
    ({"name": "x", "surprise": True}, "surprise"),
])
def test_validation_names_each_bad_item(item, fragment):
    body = msgspec.json.encode([{"name": "ok"}, item, {"name": "ok2"}])
    good, bad = decode_input(body, "application/json")
    assert [b.index for b in bad] == [1]
    assert fragment in bad[0].message
    assert len(good) == 2


def test_non_finite_ts_and_too_many_tags_rejected():
    item = EventIn(name="x", ts=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        normalize(item, source="s", agent_id="a", now=0.0)
    item = EventIn(name="x", tags={str(i): "v" for i in range(65)})
    with pytest.raises(ValueError, match="too many tags"):
        normalize(item, source="s", agent_id="a", now=0.0)


@pytest.mark.parametrize("body, ctype", [(b"{nope", "application/json"), (b"\xc1", "application/msgpack"),
                                         (b'{"name":"a"}\n{oops\n', "application/x-ndjson")])
def test_unparseable_body_raises(body, ctype):
    with pytest.raises(InvalidEvent):
        decode_input(body, ctype)


def test_ids_are_uuidv7_and_unique():
    ids = new_ids(10_000)
    assert len(set(ids)) == len(ids)
    for s in ids[:100]:
        u = uuid.UUID(s)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert str(u) == s


def test_ids_are_time_ordered():
    t0 = time.time()
    earlier = new_ids(5, now=t0)
    later = new_ids(5, now=t0 + 0.002)
    assert max(earlier) < min(later)
    # the timestamp is the first 48 bits, in milliseconds
    assert int(uuid.UUID(earlier[0]).hex[:12], 16) == int(t0 * 1000)
    stamps = []
    for _ in range(5):
        stamps.append(new_ids(1)[0][:13])
        time.sleep(0.002)
    assert stamps == sorted(stamps)


def test_assign_ids_fills_only_missing():
    keep = new_ids(1)[0]
    events = [Event(name="a", id=keep), Event(name="b"), Event(name="c")]
    assign_ids(events)
    assert events[0].id == keep
    assert len({e.id for e in events}) == 3 and all(e.id for e in events)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_ids_unique_across_fork():
    new_ids(10)  # warm any state the generator may keep
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: write its ids and leave without running pytest's teardown
        try:
            os.close(r)
            data = "\n".join(new_ids(5000)).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    parent = new_ids(5000)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode().split("\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(child) == 5000
    assert not set(child) & set(parent)
    assert len(set(child)) == 5000
