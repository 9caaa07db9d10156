"""A msgpack body nesting too deeply for the decoder is a 400 naming the item (issue 18,
item 4), as JSON's is: the item is found by walking the body without recursion, past
every kind of msgpack value, and the limit is exactly check()'s."""

from __future__ import annotations

import msgspec
import pytest

from agent.event import MAX_DATA_DEPTH, InvalidEvent, decode_input

MSGPACK = "application/msgpack"
# An item with one of each msgpack kind in its data: bin, ext, str, float, ints, bool, nil, arrays, maps.
BUSY = {"name": "busy", "value": 1.5, "tags": {"t": "x" * 40}, "data": {
    "s": "é" * 300, "i": [-1, 200, -200, 70000, -70000, 2**40, -(2**40), 2**63], "f": 0.1, "b": True, "n": None,
    "bin": b"\x00" * 300, "ext": msgspec.msgpack.Ext(5, b"\x01" * 20), "ext1": msgspec.msgpack.Ext(1, b"\x02"),
    "l": list(range(20)), "m": {str(k): k for k in range(20)}}}


def nested(levels: int) -> object:
    d: object = 1
    for _ in range(levels):
        d = {"a": d}
    return d


def deep(levels: int) -> bytes:
    """An item whose data nests `levels` arrays deep, past what the decoder can recurse into."""
    return b"\x82\xa4name\xa1x\xa4data\x81\xa1a" + b"\x91" * levels + b"\x01"


@pytest.mark.parametrize("before", [0, 1, 3, 20])
def test_the_deep_item_is_named_after_items_of_every_kind(before: int) -> None:
    items = b"".join(msgspec.msgpack.encode(BUSY) for _ in range(before))
    n = before + 2
    body = (bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")) + items + deep(5000) + \
        msgspec.msgpack.encode(BUSY)
    with pytest.raises(InvalidEvent) as err:
        decode_input(body, MSGPACK)
    assert err.value.index == before and "item nests too deeply" in err.value.message


def test_a_single_deep_object_is_item_0() -> None:
    with pytest.raises(InvalidEvent) as err:
        decode_input(deep(5000), MSGPACK)
    assert err.value.index == 0


@pytest.mark.parametrize("levels, ok", [(MAX_DATA_DEPTH, True), (MAX_DATA_DEPTH + 1, False)])
def test_the_limit_is_the_validators(levels: int, ok: bool) -> None:
    from agent.event import _deep_msgpack_item

    body = msgspec.msgpack.encode([BUSY, {"name": "x", "data": nested(levels)}])
    assert _deep_msgpack_item(body) == (-1 if ok else 1)
