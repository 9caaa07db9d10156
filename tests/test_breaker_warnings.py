"""Failures are loud (issue 17, item 2): a breaker opening and a failed send each log a
WARNING naming the sink and the error, at most once a minute per sink."""

from __future__ import annotations

import logging

import pytest

from agent.plugin import CircuitOpenError, PermanentError, RetryableError
from plugins.circuit_breaker import WARN_EVERY_S, CircuitBreakerOptions, CircuitBreakerPolicy
from tests.helpers import make_ctx


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def refused() -> None:
    raise RetryableError("connection refused by 127.0.0.1:5432")


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.endswith("breaker")]


async def attempt(policy: CircuitBreakerPolicy) -> None:
    with pytest.raises((RetryableError, CircuitOpenError)):
        await policy.call(refused)


async def test_opening_and_failed_sends_warn_throttled(caplog):
    caplog.set_level(logging.INFO, logger="sidecar_agent.circuit_breaker")
    clock = Clock()
    policy = CircuitBreakerPolicy(
        "pg-main", CircuitBreakerOptions(failure_threshold=3, reset_timeout_s=30), make_ctx(), clock=clock
    )
    await attempt(policy)
    await attempt(policy)
    lines = warnings(caplog)
    assert len(lines) == 1, lines  # the second failure is held back
    assert "sink pg-main: a send failed (1 in a row, the circuit opens at 3)" in lines[0]
    assert "connection refused by 127.0.0.1:5432" in lines[0]

    await attempt(policy)  # the third opens the circuit
    assert policy.state == "open"
    opened = warnings(caplog)[1]
    assert "sink pg-main: circuit breaker opened (closed -> open), no deliveries for 30s" in opened
    assert "connection refused by 127.0.0.1:5432" in opened

    # half-open after 30 s; the probe fails and it opens again: within the minute, no new line
    clock.now += 31
    await attempt(policy)
    assert policy.state == "open"
    assert len(warnings(caplog)) == 2
    assert any("circuit open -> half_open" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)

    # past the minute, the next opening is logged again, with the count held back
    clock.now += WARN_EVERY_S
    await attempt(policy)
    last = warnings(caplog)[-1]
    assert len(warnings(caplog)) == 3
    assert "circuit breaker opened (half_open -> open)" in last and "(1 more since the last such line)" in last


async def test_each_sink_has_its_own_throttle_and_answers_are_not_failures(caplog):
    caplog.set_level(logging.WARNING, logger="sidecar_agent.circuit_breaker")
    clock = Clock()
    opts = CircuitBreakerOptions(failure_threshold=1, reset_timeout_s=30)
    a = CircuitBreakerPolicy("a", opts, make_ctx("a"), clock=clock)
    b = CircuitBreakerPolicy("b", opts, make_ctx("b"), clock=clock)
    await attempt(a)
    await attempt(b)
    assert [line.split(":")[0] for line in warnings(caplog)] == ["sink a", "sink b"]

    async def rejected() -> None:
        raise PermanentError("42P01 relation does not exist")

    c = CircuitBreakerPolicy("c", opts, make_ctx("c"), clock=clock)
    with pytest.raises(PermanentError):
        await c.call(rejected)  # the remote answered: the dead-letter log reports it, not the breaker
    assert len(warnings(caplog)) == 2
