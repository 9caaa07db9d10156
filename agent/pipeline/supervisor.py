"""Supervision: every long-running task of the agent (committer, housekeeping, one per
sink worker, one per source) runs under `supervise()`.

Why: a task that died on an unexpected exception stayed dead while status still said
"running" (a full disk made a sink worker's DLQ write fail, the worker died, and its
sink stayed behind for good until a restart). Under `supervise()` such an exception is
logged with its traceback, counted, shown in status, and the coroutine is started again
after a capped exponential backoff. A cancel ends the task (that is how stop() ends it),
and so does a clean return. The coroutine runs inside the supervising task itself, so a
cancel reaches it directly and stop()'s bounds apply unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sidecar_agent.supervisor")

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a run that lasted this long before failing starts the backoff over

# The states a supervised task shows: running; restarting (it failed, waiting out its
# backoff); finished (returned); stopped (cancelled); dead (a BaseException that is not a
# cancel, e.g. SystemExit from a plugin, ended it: never restarted, always reported).
STATES = ("running", "restarting", "finished", "stopped", "dead")


@dataclass
class Supervised:
    """What status shows about one supervised task."""

    name: str
    state: str = "running"
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # unix time

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


def supervise(
    name: str,
    factory: Callable[[], Awaitable[Any]],
    *,
    label: str = "",
    initial_s: float | None = None,
    max_s: float | None = None,
) -> tuple[asyncio.Task[None], Supervised]:
    """Start a task (named `name`) that runs `factory()` and restarts it after an
    unexpected exception; returns the task and its `Supervised` record. `label` names it
    in the log (default: "task NAME")."""
    record = Supervised(name)
    initial_s = INITIAL_BACKOFF_S if initial_s is None else initial_s
    max_s = MAX_BACKOFF_S if max_s is None else max_s
    coro = _run(record, factory, label or f"task {name}", initial_s, max_s)
    task = asyncio.get_running_loop().create_task(coro, name=name)
    return task, record


async def _run(
    record: Supervised, factory: Callable[[], Awaitable[Any]], label: str, initial_s: float, max_s: float
) -> None:
    delay = initial_s
    try:
        while True:
            record.state = "running"
            started = time.monotonic()
            try:
                await factory()
                record.state = "finished"
                return
            except Exception as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # a cancel turned into an error: still a cancel
                if time.monotonic() - started >= STABLE_S:
                    delay = initial_s
                record.restarts += 1
                record.last_error = f"{type(exc).__name__}: {exc}"
                record.last_error_at = time.time()
                record.state = "restarting"
                log.error("%s failed (restart %d in %.1fs): %r", label, record.restarts, delay, exc, exc_info=exc)
                del exc  # no traceback (and its frames) kept alive across the backoff
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_s)
    except asyncio.CancelledError:
        record.state = "stopped"
        raise
    except BaseException as exc:
        record.state = "dead"
        record.last_error = f"{type(exc).__name__}: {exc}"
        record.last_error_at = time.time()
        raise
