"""An asyncio app with the agent on its own loop: `async with Agent(config)`.

    .venv/bin/python examples/asyncio_app.py  # after make run; prints what the jsonl sink writes
"""

from __future__ import annotations

import asyncio
import random

from agent import Agent

CONFIG = {
    "agent": {"data_dir": ".sidecar-agent-example"},
    "server": {"port": 0},  # any free port; the dashboard URL is printed below
    "sinks": {"stdout": {"type": "jsonl", "path": "-", "policies": []}},
}


async def handle_request(agent: Agent, i: int) -> None:
    with agent.timer("request.seconds", tags={"route": "/orders"}):
        await asyncio.sleep(random.uniform(0.001, 0.01))  # the "work"
    agent.counter("orders.placed", tags={"region": random.choice(["eu", "us"])})
    if i % 5 == 0:
        agent.gauge("queue.depth", random.randint(0, 20))


async def main() -> None:
    async with Agent(CONFIG) as agent:
        print(f"dashboard at {agent.server_url}")
        await asyncio.gather(*(handle_request(agent, i) for i in range(20)))
        await agent.flush()  # wait until the sink has everything (optional: stop() flushes too)


if __name__ == "__main__":
    asyncio.run(main())
