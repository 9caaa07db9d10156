"""Failover, from a forwarder's side: who owns the data dir, and becoming the owner.

The owner answers each connection's Hello with its own, so a forwarder knows the owner's
pid and counts a change of owner and the gap it cost (from losing the old owner to being
connected to the next one). While no owner answers, each failed connection attempt also
tries the data-dir lock without blocking: of several forwarders trying at once the flock
lets one win. The winner calls the forwarder's `takeover` (agent.embed sets it: it
starts an Agent in this process on that very lock); the others connect to the new owner
once it listens. A forwarder with `[agent] connect`, or one that is stopping, has no
`takeover` and never tries.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.storage.dirlock import DataDirLock

if TYPE_CHECKING:
    from agent.forwarding.forwarder import Forwarder

log = logging.getLogger("sidecar_agent.forwarding")

TAKEOVER_BACKOFF_S = 2.0  # after a takeover whose Agent failed to start
# Called on the drain thread with the data-dir lock the forwarder just took; True once an
# Agent owns the data dir in this process (agent.embed._take_over).
TakeOver = Callable[["Forwarder", DataDirLock], bool]


class OwnerWatch:
    """One forwarder's view of its owner: pid, changes, the last gap, and its own takeover."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.owner_pid: int | None = None
        self.owner_changes = 0
        self.last_failover_gap_s: float | None = None
        self.lost_at: float | None = None  # monotonic time the owner was lost, while it is
        self.took_over = False  # this process became the owner
        self._next_try = 0.0

    def lost(self) -> None:
        """The connection ended, or no owner answered."""
        if self.lost_at is None:
            self.lost_at = time.monotonic()

    def hello(self, pid: int) -> None:
        """The owner's Hello: count a change of owner and the gap it cost."""
        if self.owner_pid is not None and pid != self.owner_pid:
            self.owner_changes += 1
            if self.lost_at is not None:
                self.last_failover_gap_s = round(time.monotonic() - self.lost_at, 3)
            log.info("forwarder pid %d: pid %d owns the data dir now (was %d)", self.pid, pid, self.owner_pid)
        self.owner_pid = pid
        self.lost_at = None

    def try_take_over(self, fw: Forwarder) -> bool:
        """No owner answers: take the data-dir lock if it is free and become the owner."""
        takeover = fw.takeover
        if takeover is None or fw.state != "running" or time.monotonic() < self._next_try:
            return False
        lock = DataDirLock(Path(fw.data_dir))
        try:
            if lock.try_acquire() is not None:
                return False  # held: an owner is starting, stopping, or a CLI command runs
        except OSError as exc:
            log.warning("forwarder pid %d cannot try the data-dir lock: %s", self.pid, exc)
            return False
        try:
            took = takeover(fw, lock)
        except Exception:
            log.exception("forwarder pid %d took the data-dir lock but could not start the owner", self.pid)
            took = False
        if not took:
            lock.release()
            self._next_try = time.monotonic() + TAKEOVER_BACKOFF_S
            return False
        self.took_over = True
        fw.takeover = None
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "owner_pid": self.owner_pid,
            "owner_changes": self.owner_changes,
            "last_failover_gap_s": self.last_failover_gap_s,
            "took_over": self.took_over,
        }


PORT_WAIT_S = 5.0


def wait_port_free(cfg: Any) -> None:
    """Before a takeover starts its HTTP server on the old owner's port: wait (briefly)
    until that port can be bound, should the old owner's socket not be closed yet. The
    server binds with SO_REUSEADDR, so the probe does too (TIME_WAIT is no obstacle)."""
    s = cfg.server
    if not s.enabled or not s.port:
        return
    end = time.monotonic() + PORT_WAIT_S
    while True:
        try:
            with socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((s.host, s.port))
            return
        except OSError as exc:
            if time.monotonic() > end:
                log.warning("port %s:%d still held after %.0fs (%s); starting anyway", s.host, s.port, PORT_WAIT_S, exc)
                return
            time.sleep(0.1)
