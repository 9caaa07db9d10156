"""Helpers for the dashboard tests: an agent on a free port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.runtime import Agent


def agent_config(data_dir: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"agent": {"id": "test-agent", "data_dir": str(data_dir), "commit_interval_ms": 2.0},
                           "server": {"port": 0}, "sources": {}}
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


async def start_agent(data_dir: Path, **extra: Any) -> Agent:
    agent = Agent(agent_config(data_dir, **extra))
    await agent.start()
    assert agent.server_url, agent.server_error
    return agent
