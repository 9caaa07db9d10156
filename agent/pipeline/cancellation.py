"""Cancellation that survives callees which swallow it: a loop that catches `Exception`
and carries on asks these first, so a plugin or library that turns a CancelledError
into an ordinary error cannot keep a task alive past stop()."""

from __future__ import annotations

import asyncio


def cancelling() -> bool:
    """Whether the current task has been asked to stop (a cancel not yet withdrawn)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancelling() -> None:
    """Re-raise a cancel that a callee turned into an ordinary exception.

    Called wherever a loop catches `Exception` and carries on: if this task was asked to
    stop (Task.cancelling()), whatever the callee raised instead, the cancel wins, so a
    plugin or library that swallows a CancelledError cannot keep a worker alive past stop().
    """
    if cancelling():
        raise asyncio.CancelledError
