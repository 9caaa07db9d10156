"""Small helpers shared by the sink tests."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from agent.event import Event, new_ids
from agent.plugin.base import PluginContext


def make_ctx(name: str = "test") -> PluginContext:
    return PluginContext(
        name=name, agent_id="agent-1", data_dir=Path("."), log=logging.getLogger(f"test.{name}"), emit=lambda events: None
    )


def make_events(n: int, **overrides: object) -> list[Event]:
    now = time.time()
    return [
        Event(
            id=i,
            name="cpu.percent",
            kind="gauge",
            value=float(k),
            ts=now + k * 0.001,
            tags={"host": "h1", "k": str(k)},
            source="system",
            agent_id="agent-1",
            data={"k": k},
            **overrides,  # type: ignore[arg-type]
        )
        for k, i in enumerate(new_ids(n))
    ]
