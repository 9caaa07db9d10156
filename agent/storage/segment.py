"""The journal segment codec: one row's events, framed so that one damaged event costs only itself.

A segment row holds events first_seq..seq. Its `body` is always the msgpack array of
those events, so anything that reads bodies as `list[Event]` keeps working. The format
is told by the row's `frames` column:

- format 0 (release 0.1.0, and rows written before migration 3): `frames` is NULL; the
  body is all there is, and one damaged byte loses the whole segment;
- format 1: `frames` indexes the body, all little-endian:
  version u8 (= 1) | crc32 of the body u32 | n u32 | n + 1 offsets u32 (event i is
  body[off[i]:off[i + 1]]) | n crc32s u32, one per event | crc32 of all the above u32.

Reading checks the body's crc32 and decodes the array in one call (as fast as format 0
plus one checksum pass). A body that fails that is *recovered*: each event whose own
crc32 still matches is decoded alone; only the others are lost. Rows are never
rewritten to change format; old rows simply stay format 0 until compacted.
"""

from __future__ import annotations

import struct
import zlib
from itertools import accumulate

import msgspec

from agent.event import Event, msgpack_encoder, stored_batch_decoder

FORMAT = 1
_HEAD = struct.Struct("<BII")  # version, body crc32, n
_TAIL = struct.Struct("<I")  # crc32 of the frames before it
_one = msgspec.msgpack.Decoder(Event)

Run = tuple[int, list[Event]]  # (seq of its first event, consecutive intact events)


class CorruptSegment(ValueError):
    """A stored segment that does not decode into the events its row says it holds."""


def _array_header(n: int) -> bytes:
    """The msgpack array header msgspec writes for n items."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode(events: list[Event]) -> tuple[bytes, bytes]:
    """(body, frames) of a format-1 segment holding `events`."""
    parts = list(map(msgpack_encoder.encode, events))
    crcs = list(map(zlib.crc32, parts))
    parts.insert(0, _array_header(len(events)))
    body = b"".join(parts)
    offsets = list(accumulate(map(len, parts)))  # offsets[0]: the end of the header = event 0's start
    n = len(events)
    frames = struct.pack(f"<BII{n + 1}I{n}I", FORMAT, zlib.crc32(body), n, *offsets, *crcs)
    return body, frames + _TAIL.pack(zlib.crc32(frames))


def decode(first: int, last: int, count: int, body: bytes, frames: bytes | None) -> list[Event]:
    """The events of a stored segment; CorruptSegment if its bytes do not decode, fail their
    checksum, or do not match its seqs (first..last, `count` events)."""
    if frames is not None:
        if not isinstance(frames, bytes) or len(frames) < _HEAD.size or frames[0] != FORMAT:
            raise CorruptSegment("segment frames are not format 1")
        _, crc, _ = _HEAD.unpack_from(frames)
        if not isinstance(body, bytes) or zlib.crc32(body) != crc:
            raise CorruptSegment("segment body fails its checksum")
    try:
        events = stored_batch_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
        raise CorruptSegment(f"{type(exc).__name__}: {exc}") from exc
    if not (len(events) == count == last - first + 1):
        raise CorruptSegment(f"{len(events)} events decoded for seqs {first}..{last} (count {count})")
    return events


def lost_in(first: object, last: object, count: object) -> int:
    """How many events a damaged segment row stands for: its count column, unless that is
    not a plausible number (then its seq span)."""
    if isinstance(count, int) and count >= 0:
        return count
    if isinstance(first, int) and isinstance(last, int) and last >= first:
        return last - first + 1
    return 0


def _index(frames: object, body_size: int) -> tuple[list[int], list[int]] | None:
    """(offsets, crcs) of intact format-1 frames, or None."""
    if not isinstance(frames, bytes) or len(frames) < _HEAD.size + _TAIL.size or frames[0] != FORMAT:
        return None
    if zlib.crc32(frames[: -_TAIL.size]) != _TAIL.unpack_from(frames, len(frames) - _TAIL.size)[0]:
        return None
    _, _, n = _HEAD.unpack_from(frames)
    if len(frames) != _HEAD.size + 4 * (2 * n + 1) + _TAIL.size:
        return None
    values = struct.unpack_from(f"<{2 * n + 1}I", frames, _HEAD.size)
    offsets, crcs = list(values[: n + 1]), list(values[n + 1 :])
    if offsets != sorted(offsets) or offsets[-1] > body_size:
        return None
    return offsets, crcs


def recover(first: int, last: int, count: int, body: bytes, frames: bytes | None) -> tuple[list[Run], int]:
    """What still reads in a segment that `decode` refused: runs of consecutive intact
    events (each with the seq of its first), and how many events are lost.

    Format 1 decodes each event whose own crc32 matches. Without usable frames (format 0,
    or damaged frames) the body is decoded whole or the whole segment is lost. A row whose
    seqs are not plausible loses everything it claims to hold."""
    lost_all = lost_in(first, last, count)
    if not (isinstance(first, int) and isinstance(last, int) and last >= first and isinstance(body, bytes)):
        return [], lost_all
    index = _index(frames, len(body))
    if index is None:
        try:
            events = stored_batch_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
            return [], lost_all
        if len(events) == last - first + 1:
            return [(first, events)], 0
        return [], lost_all
    offsets, crcs = index
    if len(crcs) != last - first + 1:
        return [], lost_all
    runs: list[Run] = []
    view = memoryview(body)
    intact = 0
    for i, crc in enumerate(crcs):
        piece = view[offsets[i] : offsets[i + 1]]
        event = None
        if zlib.crc32(piece) == crc:
            try:
                event = _one.decode(piece)
            except (msgspec.DecodeError, msgspec.ValidationError):
                event = None
        if event is None:
            continue
        intact += 1
        seq = first + i
        if runs and runs[-1][0] + len(runs[-1][1]) == seq:
            runs[-1][1].append(event)
        else:
            runs.append((seq, [event]))
    return runs, len(crcs) - intact
