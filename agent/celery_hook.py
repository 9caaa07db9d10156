"""Celery prefork with no code change: hand a pool child's events over before it exits.

billiard ends a pool child with `os._exit()` (`Worker._do_exit`), which skips the
interpreter's exit hooks, so the agent's exit hook never runs there and what the child
recorded since its last acked batch would vanish uncounted. Just before that, in the
child, Celery sends `worker_process_shutdown` (the pool's `on_exit`). `connect()` hooks
that signal to the agent's `stop()`, which hands everything over (or spills it) within
`shutdown_timeout_s`.

It is called when an agent or forwarder starts and in every child forked from a process
that had one, and does something only when `celery.signals` is already imported: the
agent never imports Celery. billiard's own exit hooks (`billiard.util.Finalize`) are not
used: they run from `Process._bootstrap`, which a pool child's `os._exit()` never reaches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

DISPATCH_UID = "sidecar-agent-hand-over"  # connecting again (each start, each fork) is a no-op


def connect(stop: Callable[[], None]) -> bool:
    """Connect Celery's `worker_process_shutdown` to `stop` if Celery is loaded in this
    process; True when connected (or already was)."""
    signals = sys.modules.get("celery.signals")
    if signals is None:
        return False
    signal = signals.worker_process_shutdown
    # Already connected (a forked child inherits its parent's receivers): return without
    # connect(), which takes the signal's lock, and in a child of fork() that lock may
    # have been held by another thread of the parent at fork time.
    if any(key[0] == DISPATCH_UID for key, _ in list(getattr(signal, "receivers", ()))):
        return True

    def hand_over(**_: Any) -> None:
        # Sent in the pool child just before billiard's os._exit(): no exit hook follows.
        stop()

    # weak=False: the receiver is a closure nobody else references.
    signal.connect(hand_over, weak=False, dispatch_uid=DISPATCH_UID)
    return True
