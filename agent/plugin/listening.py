"""Binding a source's listener: a taken address is the user's problem, not a bug."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

BIND_RETRY_INITIAL_S = 0.5
BIND_RETRY_MAX_S = 10.0


async def bind_with_retry(
    bind: Callable[[], Awaitable[T]], where: str, stats: dict[str, Any], log: logging.Logger, label: str
) -> T:
    """Call `bind` until it stops raising OSError. Each failure is one WARNING naming `where`
    (no traceback) and `error` in the source's status, then a retry with backoff
    (0.5 s doubling to 10 s); success clears `error`."""
    delay = BIND_RETRY_INITIAL_S
    while True:
        try:
            bound = await bind()
        except OSError as exc:
            stats["error"] = f"cannot listen on {where}: {exc.strerror or exc}"
            log.warning("%s: %s; retrying in %.1fs", label, stats["error"], delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BIND_RETRY_MAX_S)
            continue
        stats["error"] = None
        return bound
