"""Property tests for the retry policy's pure backoff functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.builtin_plugins.retry import backoff_ceiling, retry_delay

index = st.integers(min_value=0, max_value=10_000)
ms = st.floats(min_value=0, max_value=3_600, allow_nan=False)
unit = st.floats(min_value=0, max_value=1, exclude_max=True)


@given(index, ms, ms)
def test_ceiling_is_capped_and_never_negative(n: int, initial: float, cap: float) -> None:
    c = backoff_ceiling(n, initial, cap)
    assert 0 <= c <= cap
    if n < 62:
        assert c == min(cap, initial * 2.0**n)


@given(st.integers(min_value=0, max_value=200), ms, ms)
def test_ceiling_is_monotonic_in_the_attempt(n: int, initial: float, cap: float) -> None:
    assert backoff_ceiling(n, initial, cap) <= backoff_ceiling(n + 1, initial, cap)


@given(index, ms, ms, unit)
def test_full_jitter_stays_within_zero_and_the_ceiling(n: int, initial: float, cap: float, u: float) -> None:
    d = retry_delay(n, initial, cap, u)
    assert d is not None and 0 <= d <= backoff_ceiling(n, initial, cap)


@given(index, ms, ms, unit, st.floats(min_value=0, max_value=10_000))
def test_retry_after_is_a_floor(n: int, initial: float, cap: float, u: float, hint: float) -> None:
    d = retry_delay(n, initial, cap, u, retry_after=hint)
    assert d is not None and d >= hint


@given(index, ms, ms, unit, st.none() | st.floats(min_value=0, max_value=10_000),
       st.floats(min_value=0, max_value=1_000), st.floats(min_value=0.001, max_value=1_000))
def test_never_waits_past_max_elapsed(n, initial, cap, u, hint, elapsed, max_elapsed) -> None:
    d = retry_delay(n, initial, cap, u, retry_after=hint, elapsed_s=elapsed, max_elapsed_s=max_elapsed)
    if d is None:
        floor = u * backoff_ceiling(n, initial, cap)
        assert elapsed + max(floor, hint or 0) > max_elapsed
    else:
        assert elapsed + d <= max_elapsed
