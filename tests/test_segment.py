"""The journal segment codec (agent/storage/segment.py): format 1 frames each event with
its own checksum, so damage anywhere costs only the events it touches; format 0 (0.1.0's
rows, no frames) still reads."""

from __future__ import annotations

import random

import msgspec
import pytest

from agent.event import Event, msgpack_encoder
from agent.storage import segment
from tests.helpers import make_events


def damaged(data: bytes, at: int, n: int) -> bytes:
    """`data` with n bytes from `at` flipped (every bit: each byte surely changes)."""
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + n]) + data[at + n:]


def smashed(data: bytes, at: int, n: int = 36) -> bytes:
    """`data` with n bytes from `at` set to 0xc1, which msgpack never uses: without
    checksums (format 0) only damage msgpack itself notices can be told."""
    return data[:at] + b"\xc1" * n + data[at + n:]


@pytest.mark.parametrize("n", [1, 15, 16, 300, 70_000])
def test_the_body_is_the_plain_msgpack_array_and_decodes_back(n: int) -> None:
    events = make_events(n)
    body, frames = segment.encode(events)
    assert body == msgpack_encoder.encode(events)  # readers of format 0 read format 1 bodies too
    assert segment.decode(1, n, n, body, frames) == events
    assert segment.decode(1, n, n, body, None) == events  # as a format-0 row


def test_damage_costs_exactly_the_events_it_touches() -> None:
    events = make_events(200)
    body, frames = segment.encode(events)
    parts = [msgspec.msgpack.encode(e) for e in events]
    starts = [len(body) - sum(map(len, parts))]
    for p in parts:
        starts.append(starts[-1] + len(p))
    rng = random.Random(18)
    for _ in range(200):
        n = rng.choice([1, 4, 36, 400])
        at = rng.randrange(0, len(body) - n)
        bad = damaged(body, at, n)
        with pytest.raises(segment.CorruptSegment):
            segment.decode(101, 300, 200, bad, frames)
        runs, lost = segment.recover(101, 300, 200, bad, frames)
        hit = {i for i in range(200) if starts[i] < at + n and at < starts[i + 1]}
        got = {seq - 101: e for start, evs in runs for seq, e in enumerate(evs, start)}
        assert lost == len(hit) and set(got) == set(range(200)) - hit
        assert all(got[i] == events[i] for i in got)  # never a damaged event passed off as intact


def test_damage_in_the_array_header_loses_nothing() -> None:
    events = make_events(40)
    body, frames = segment.encode(events)
    runs, lost = segment.recover(1, 40, 40, damaged(body, 0, 1), frames)
    assert lost == 0 and runs == [(1, events)]


def test_damaged_frames_fall_back_to_the_whole_body() -> None:
    events = make_events(40)
    body, frames = segment.encode(events)
    bad_frames = damaged(frames, 20, 4)
    with pytest.raises(segment.CorruptSegment):  # the body's checksum can no longer be trusted either
        segment.decode(1, 40, 40, body, damaged(frames, 1, 4))
    assert segment.recover(1, 40, 40, body, bad_frames) == ([(1, events)], 0)  # the body still decodes whole
    assert segment.recover(1, 40, 40, smashed(body, 300), bad_frames) == ([], 40)  # both: all of it


def test_a_damaged_format_0_body_loses_its_whole_row() -> None:
    events = make_events(40)
    body = msgpack_encoder.encode(events)
    with pytest.raises(segment.CorruptSegment):
        segment.decode(1, 40, 40, smashed(body, 300), None)
    assert segment.recover(1, 40, 40, smashed(body, 300), None) == ([], 40)


def test_a_row_whose_seqs_do_not_match_its_events_is_refused() -> None:
    events = make_events(10)
    body, frames = segment.encode(events)
    with pytest.raises(segment.CorruptSegment, match=r"10 events decoded for seqs 1\.\.12"):
        segment.decode(1, 12, 12, body, frames)
    assert segment.recover(1, 12, 12, body, frames) == ([], 12)


def test_the_framing_costs_a_few_percent_of_the_bytes() -> None:
    events = [Event(id=e.id, name="http.request.duration", kind="histogram", value=0.25, ts=e.ts,
                    tags={"route": "/api/v1/items/7", "method": "GET", "status": "200"}, source="http",
                    agent_id="web-1") for e in make_events(1000)]
    body, frames = segment.encode(events)
    assert len(frames) <= 8 * len(events) + 32 and len(frames) / len(body) < 0.06
