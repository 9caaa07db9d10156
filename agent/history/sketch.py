"""A small mergeable quantile sketch (DDSketch-style log buckets) for history roll-ups.

Each value v != 0 falls in bucket ceil(log_gamma(|v|)), gamma = (1 + a) / (1 - a), so a
quantile estimate is within a relative error `a` (1 %) of a true sample value. Sketches
merge exactly (add bucket counts), so per-minute sketches merge into per-hour ones and
into any query step without re-reading raw events. The bucket count is capped
(MAX_BINS): beyond it the buckets nearest zero are collapsed, which only coarsens the
smallest magnitudes. A sketch serializes to a few hundred bytes of msgpack:
(zeros, {key: count} positive, {key: count} negative), encoded and decoded in C by
msgspec; blobs of the first format (flat [key, count, ...] lists) still decode.
"""

from __future__ import annotations

import math

import msgspec

ACCURACY = 0.01
GAMMA = (1 + ACCURACY) / (1 - ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
MIN_MAGNITUDE = 1e-9  # |v| below this counts as zero
MAX_BINS = 1024

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(tuple[int, dict[int, int] | list[int], dict[int, int] | list[int]])


def _key(mag: float) -> int:
    return math.ceil(math.log(mag) / _LOG_GAMMA)


def _value(key: int) -> float:
    return 2 * GAMMA**key / (GAMMA + 1)


class Sketch:
    """Counts per log bucket for positive and negative values, plus zeros."""

    __slots__ = ("n", "neg", "pos", "zero")

    def __init__(self) -> None:
        self.pos: dict[int, int] = {}
        self.neg: dict[int, int] = {}
        self.zero = 0
        self.n = 0

    def add(self, v: float) -> None:
        """Add one finite value (NaN and infinities are ignored)."""
        if not math.isfinite(v):
            return
        self.n += 1
        if abs(v) < MIN_MAGNITUDE:
            self.zero += 1
            return
        bins = self.pos if v > 0 else self.neg
        k = _key(abs(v))
        bins[k] = bins.get(k, 0) + 1
        if len(bins) > MAX_BINS:
            _collapse(bins)

    def add_many(self, values: list[float]) -> None:
        """Add finite values (the caller leaves out NaN and infinities): the counts of
        add() one at a time, in one loop without a call per value."""
        pos, neg, log, ceil, lg = self.pos, self.neg, math.log, math.ceil, _LOG_GAMMA
        zero = 0
        for v in values:
            if v >= MIN_MAGNITUDE:
                k = ceil(log(v) / lg)
                pos[k] = pos.get(k, 0) + 1
            elif v <= -MIN_MAGNITUDE:
                k = ceil(log(-v) / lg)
                neg[k] = neg.get(k, 0) + 1
            else:
                zero += 1
        self.zero += zero
        self.n += len(values)
        for bins in (pos, neg):
            if len(bins) > MAX_BINS:
                _collapse(bins)

    def merge(self, other: Sketch) -> Sketch:
        """Add `other`'s counts into this sketch; returns self."""
        self.n += other.n
        self.zero += other.zero
        for mine, theirs in ((self.pos, other.pos), (self.neg, other.neg)):
            for k, c in theirs.items():
                mine[k] = mine.get(k, 0) + c
            if len(mine) > MAX_BINS:
                _collapse(mine)
        return self

    def quantile(self, q: float) -> float | None:
        """The estimated q-quantile (0 <= q <= 1), or None when empty."""
        if self.n == 0:
            return None
        rank = q * (self.n - 1)
        seen = 0
        for k in sorted(self.neg, reverse=True):  # most negative first
            seen += self.neg[k]
            if seen > rank:
                return -_value(k)
        seen += self.zero
        if seen > rank:
            return 0.0
        for k in sorted(self.pos):
            seen += self.pos[k]
            if seen > rank:
                return _value(k)
        return _value(max(self.pos)) if self.pos else 0.0

    def to_bytes(self) -> bytes:
        """The sketch as msgpack (see the module docstring)."""
        return _enc.encode((self.zero, self.pos, self.neg))

    @classmethod
    def from_bytes(cls, blob: bytes | None) -> Sketch:
        """A sketch from `to_bytes()` (either format); empty for no blob."""
        s = cls()
        if not blob:
            return s
        zero, pos, neg = _dec.decode(blob)
        s.zero = zero
        s.pos = pos if isinstance(pos, dict) else dict(zip(pos[::2], pos[1::2], strict=True))
        s.neg = neg if isinstance(neg, dict) else dict(zip(neg[::2], neg[1::2], strict=True))
        s.n = zero + sum(s.pos.values()) + sum(s.neg.values())
        return s


def merge_bytes(old: bytes | None, new: bytes | None) -> bytes | None:
    """Two serialized sketches merged, without building Sketch objects (the store merges
    a batch's sketch into each roll-up cell it touches, so this is on the write path)."""
    if not old:
        return new
    if not new:
        return old
    zero, pos, neg = _dec.decode(old)
    zero2, pos2, neg2 = _dec.decode(new)
    bins = []
    for mine, theirs in ((pos, pos2), (neg, neg2)):
        mine = mine if isinstance(mine, dict) else dict(zip(mine[::2], mine[1::2], strict=True))
        theirs = theirs if isinstance(theirs, dict) else dict(zip(theirs[::2], theirs[1::2], strict=True))
        for k, c in theirs.items():
            mine[k] = mine.get(k, 0) + c
        if len(mine) > MAX_BINS:
            _collapse(mine)
        bins.append(mine)
    return _enc.encode((zero + zero2, bins[0], bins[1]))


def _collapse(bins: dict[int, int]) -> None:
    """Fold the lowest-magnitude buckets into the next one until MAX_BINS remain."""
    keys = sorted(bins)
    extra = len(keys) - MAX_BINS
    if extra <= 0:
        return
    target = keys[extra]
    for k in keys[:extra]:
        bins[target] += bins.pop(k)
