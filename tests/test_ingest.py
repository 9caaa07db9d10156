"""HTTP ingest against a real server on an ephemeral port: formats, 202 only after the
journal commit, all-or-nothing validation, size limit, token, client ids, RFC 3339 ts."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import aiohttp
import msgspec
import pytest

from tests.helpers import journal_events, journal_ids, make_agent, post_raw


@pytest.fixture
async def agent(tmp_path):
    # A hanging sink keeps every row in the journal (nothing is compacted), so the
    # tests can read exactly what was committed.
    a = make_agent(tmp_path, {"stuck": {"type": "hang"}}, agent={"shutdown_timeout_s": 0.2},
                   server={"max_body_bytes": 64 * 1024})
    async with a:
        yield a


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


def ev(i: int, **kw):
    return {"name": f"m{i}", "value": float(i), **kw}


@pytest.mark.parametrize("fmt", ["object", "array", "ndjson", "msgpack", "msgpack-one"])
async def test_formats_202_only_after_commit(agent, http, fmt):
    items = [ev(i, tags={"k": str(i)}) for i in range(5)]
    if fmt == "object":
        items = items[:1]
        body, ctype = json.dumps(items[0]).encode(), "application/json"
    elif fmt == "array":
        body, ctype = json.dumps(items).encode(), "application/json"
    elif fmt == "ndjson":
        body, ctype = b"\n".join(json.dumps(i).encode() for i in items) + b"\n", "application/x-ndjson"
    elif fmt == "msgpack":
        body, ctype = msgspec.msgpack.encode(items), "application/msgpack"
    else:
        items = items[:1]
        body, ctype = msgspec.msgpack.encode(items[0]), "application/msgpack"
    status, out, _ = await post_raw(agent, body, content_type=ctype, session=http)
    assert status == 202, out
    assert out["accepted"] == len(items) and len(out["ids"]) == len(items)
    # The 202 means committed: a separate connection sees the rows right now.
    assert journal_ids(agent.db.path) == out["ids"]
    decoded = journal_events(agent.db.path)
    assert [d.name for d in decoded] == [i["name"] for i in items]
    assert all(d.source == "http" and d.agent_id == agent.id for d in decoded)


async def test_bad_items_are_named_and_nothing_is_accepted(agent, http):
    before = agent.journal.last_seq
    items = [ev(0), {"value": 1}, ev(2), {"name": "x", "kind": "bogus"}, {"name": "y", "extra": 1},
             {"name": "z", "id": "not-a-uuid"}, {"name": "t", "ts": "yesterday"}]
    status, out, _ = await post_raw(agent, json.dumps(items).encode(), content_type="application/json", session=http)
    assert status == 400
    assert out["accepted"] == 0
    assert [e["index"] for e in out["errors"]] == [1, 3, 4, 5, 6]
    assert "name" in out["errors"][0]["error"]
    assert "extra" in out["errors"][2]["error"]
    assert agent.journal.last_seq == before and journal_ids(agent.db.path) == []
    # NDJSON and msgpack name bad items the same way.
    nd = b"\n".join(json.dumps(i).encode() for i in items[:2])
    status, out, _ = await post_raw(agent, nd, content_type="application/x-ndjson", session=http)
    assert status == 400 and [e["index"] for e in out["errors"]] == [1]
    status, out, _ = await post_raw(agent, msgspec.msgpack.encode(items[:4]), content_type="application/msgpack", session=http)
    assert status == 400 and [e["index"] for e in out["errors"]] == [1, 3]
    # A body that does not parse, and an empty array, are 400 too.
    for body in (b"{not json", b"[]"):
        status, out, _ = await post_raw(agent, body, content_type="application/json", session=http)
        assert status == 400 and out["errors"]
    # Too many tags and a non-finite ts are rejected after decoding, still all-or-nothing.
    tags = {f"t{i}": "v" for i in range(65)}
    status, out, _ = await post_raw(agent, json.dumps([ev(0), ev(1, tags=tags)]).encode(), content_type="application/json", session=http)
    assert status == 400 and [e["index"] for e in out["errors"]] == [1]
    assert agent.journal.last_seq == before and journal_ids(agent.db.path) == []


async def test_body_over_the_limit_is_413(agent, http):
    big = json.dumps([ev(i, data={"pad": "x" * 1000}) for i in range(100)]).encode()
    assert len(big) > 64 * 1024
    status, out, _ = await post_raw(agent, big, content_type="application/json", session=http)
    assert status == 413 and "limit" in out["error"]
    assert journal_ids(agent.db.path) == []


async def test_token_required_when_set(tmp_path, http):
    a = make_agent(tmp_path, {"stuck": {"type": "hang"}}, agent={"shutdown_timeout_s": 0.2},
                   server={"token": "s3cret"})
    async with a:
        body = json.dumps([ev(1)]).encode()
        status, out, hdrs = await post_raw(a, body, content_type="application/json", session=http)
        assert status == 401 and hdrs["WWW-Authenticate"] == "Bearer"
        status, _, _ = await post_raw(a, body, content_type="application/json", headers={"Authorization": "Bearer wrong"}, session=http)
        assert status == 401
        assert journal_ids(a.db.path) == []
        status, out, _ = await post_raw(a, body, content_type="application/json", headers={"Authorization": "Bearer s3cret"}, session=http)
        assert status == 202 and journal_ids(a.db.path) == out["ids"]
        status, _, _ = await post_raw(a, body, content_type="application/json", headers={"X-Sidecar-Token": "s3cret"}, session=http)
        assert status == 202


async def test_client_ids_kept_and_lowercased(agent, http):
    given = [str(uuid.uuid4()).upper(), str(uuid.uuid4())]
    items = [ev(0, id=given[0]), ev(1, id=given[1]), ev(2)]
    status, out, _ = await post_raw(agent, json.dumps(items).encode(), content_type="application/json", session=http)
    assert status == 202
    assert out["ids"][:2] == [given[0].lower(), given[1]]
    assert uuid.UUID(out["ids"][2]).version == 7  # generated ids are UUIDv7
    # A retry of the same request keeps the same ids (the sinks' idempotency key).
    status, again, _ = await post_raw(agent, json.dumps(items[:2]).encode(), content_type="application/json", session=http)
    assert again["ids"] == out["ids"][:2]
    assert journal_ids(agent.db.path) == out["ids"] + again["ids"]


async def test_rfc3339_ts_accepted(agent, http):
    items = [ev(0, ts="2024-05-01T12:00:00Z"), ev(1, ts="2024-05-01T14:00:00.250+02:00"),
             ev(2, ts=1714564800.5), ev(3)]
    status, out, _ = await post_raw(agent, json.dumps(items).encode(), content_type="application/json", session=http)
    assert status == 202, out
    stored = journal_events(agent.db.path)
    want = dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc).timestamp()
    assert stored[0].ts == want
    assert stored[1].ts == want + 0.25
    assert stored[2].ts == want + 0.5
    assert stored[3].ts > want  # filled with the arrival time
