"""The one throttle behind every recurring WARNING (agent.plugin.throttle)."""

from __future__ import annotations

from agent.plugin import Throttle
from agent.plugin.throttle import MAX_KEYS


def test_one_line_per_key_per_interval_with_what_was_held_back():
    now = [0.0]
    t = Throttle(60.0, clock=lambda: now[0])
    assert t.allow("a", 5) == (0, 0)
    assert t.allow("a", 7) is None and t.allow("a", 1) is None
    assert t.allow("b", 2) == (0, 0)  # another key is not muted by the first
    now[0] = 59.9
    assert t.allow("a") is None
    now[0] = 60.0
    assert t.allow("a", 3) == (3, 8)  # three held back, with 7 + 1 + 0 of their amount
    assert t.allow("a") is None
    assert t.allow("b", now=200.0) == (0, 0)  # an explicit `now` instead of the clock


def test_keys_are_bounded_oldest_first():
    t = Throttle(60.0, clock=lambda: 0.0)
    for i in range(MAX_KEYS + 1):
        assert t.allow(str(i)) == (0, 0)
    assert t.allow("0") == (0, 0)  # the oldest was forgotten: it may log again at once
    assert t.allow(str(MAX_KEYS)) is None  # the newest is still remembered
