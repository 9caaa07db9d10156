"""Shared helpers for the durability tests: in-process agents with test sinks, waits."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.runtime import Agent
from tests import plugins_for_tests

WORKTREE = Path(__file__).resolve().parent.parent


def config(data_dir: Path, sinks: dict[str, dict[str, Any]] | None = None, **sections: dict[str, Any]) -> dict:
    """A config dict: data dir, ephemeral port, given sinks (policies = [] each)."""
    cfg: dict[str, Any] = {
        "agent": {"data_dir": str(data_dir), "commit_interval_ms": 2, **sections.pop("agent", {})},
        "server": {"port": 0, **sections.pop("server", {})},
        "sinks": {n: {"policies": [], **t} for n, t in (sinks or {}).items()},
    }
    cfg.update(sections)
    return cfg


def make_agent(data_dir: Path, sinks: dict[str, dict[str, Any]] | None = None, **sections: Any) -> Agent:
    return Agent(config(data_dir, sinks, **sections), plugins=[plugins_for_tests])


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `pred` until true; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def journal_ids(db_path: Path) -> list[str]:
    """Event ids in the journal table, read through a separate sqlite3 connection."""


    return [e.id for e in journal_events(db_path)]


def journal_events(db_path: Path) -> list:
    """Events stored in the journal's segments, read through a separate sqlite3 connection."""
    import msgspec

    from agent.event import Event

    dec = msgspec.msgpack.Decoder(list[Event])
    with sqlite3.connect(db_path) as conn:
        return [e for (b,) in conn.execute("SELECT body FROM journal ORDER BY seq") for e in dec.decode(b)]


def losses_in_db(db_path: Path) -> dict[tuple[str, str], int]:
    with sqlite3.connect(db_path) as conn:
        return {(r, s): n for r, s, n in conn.execute("SELECT reason, sink, count FROM losses") if n}
