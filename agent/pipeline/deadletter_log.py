"""Dead-lettered batches show in the log: a WARNING naming the sink and the error, at
most once a minute per sink and error code, with a count of what was held back.

Why: a Postgres sink pointed at an unmigrated database dead-lettered every batch
(`42P01 relation ... does not exist`) while the log said nothing after the start line.
Every event is counted in status and /metrics; the log only has to say that it is
happening and why, and must not flood when every batch fails the same way.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from agent.plugin.throttle import Throttle

EVERY_S = 60.0

# A SQLSTATE (42P01: five capitals or digits, at least one digit) or an HTTP status (503).
_CODE = re.compile(r"\b((?=[0-9A-Z]*\d)[0-9A-Z]{5}|[45]\d\d)\b")

log = logging.getLogger("sidecar_agent.delivery")


def error_code(exc: BaseException) -> str:
    """What makes two failures "the same" for throttling: the error's type and its
    SQLSTATE or HTTP status when the message has one, e.g. `PermanentError 42P01`."""
    m = _CODE.search(str(exc))
    return f"{type(exc).__name__} {m.group(1)}" if m else type(exc).__name__


class DeadLetterLog:
    """One sink's throttled dead-letter warnings."""

    def __init__(self, sink: str, every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self._throttle = Throttle(every_s, clock)  # keyed by error code

    def __call__(self, events: int, exc: BaseException) -> None:
        allowed = self._throttle.allow(error_code(exc), events)
        if allowed is None:
            return
        batches, held = allowed
        more = f" (and {batches} more batches, {held} events, with this error since the last line)" if batches else ""
        log.warning(
            "sink %s: %d events dead-lettered: %s%s; `sidecar-agent dlq list --sink %s` shows them,"
            " they are replayed when the sink recovers",
            self.sink,
            events,
            exc,
            more,
            self.sink,
        )


def report(worker: Any, events: int, exc: BaseException) -> None:
    """Log that `worker` (a sink's delivery worker, with a `name`) dead-lettered `events`
    events after `exc`, throttled. The throttle is kept on the worker: nothing global."""
    throttle = worker.__dict__.get("_dead_letter_log")
    if throttle is None:
        throttle = worker._dead_letter_log = DeadLetterLog(worker.name)
    throttle(events, exc)
