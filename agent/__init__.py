"""sidecar-agent: a monitoring agent that loses nothing, duplicates nothing and shows everything.

    import agent
    agent.start()                      # embedded defaults, or a path / dict
    agent.record("orders.placed", 1, kind="counter", tags={"region": "eu"})

In asyncio apps: ``async with agent.Agent(config) as a: a.record(...)``.
"""

from agent.embed import counter, current, flush, gauge, histogram, record, start, stop, timer
from agent.runtime import Agent
from agent.version import __version__

__all__ = [
    "Agent",
    "__version__",
    "counter",
    "current",
    "flush",
    "gauge",
    "histogram",
    "record",
    "start",
    "stop",
    "timer",
]
