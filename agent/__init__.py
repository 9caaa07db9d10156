"""sidecar-agent: a monitoring agent that loses nothing, duplicates nothing and shows everything.

    import agent
    agent.start()                      # embedded defaults, or a path / dict
    agent.record("orders.placed", 1, kind="counter", tags={"region": "eu"})
    orders = agent.counter_handle("orders.placed", tags={"region": "eu"})  # hot paths: bound once
    orders.inc()

In asyncio apps: ``async with agent.Agent(config) as a: a.record(...)``.
"""

from agent.embed import counter, current, flush, gauge, histogram, record, start, stop, timer
from agent.handles import counter_handle, gauge_handle, histogram_handle
from agent.log_handler import LogHandler
from agent.runtime import Agent
from agent.version import __version__

__all__ = [
    "Agent",
    "LogHandler",
    "__version__",
    "counter",
    "counter_handle",
    "current",
    "flush",
    "gauge",
    "gauge_handle",
    "histogram",
    "histogram_handle",
    "record",
    "start",
    "stop",
    "timer",
]
