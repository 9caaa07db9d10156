"""Per-batch overhead of the default resilience chain on the success path.

Compares ``await chain.call(send)`` (chain = ["timeout", "retry", "circuit_breaker"],
breaker closed) with ``await send()``, where send is a trivial async no-op.
Target: under 5 µs of overhead per call.

    PYTHONPATH=. python bench/chain_overhead.py [--n 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.plugin.base import PluginContext  # noqa: E402
from agent.plugin.host import PluginHost  # noqa: E402
from agent.pipeline.resilience import build_chain  # noqa: E402

TARGET_NS = 5000.0


async def send() -> None:
    return None


async def direct_loop(n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await send()
    return (time.perf_counter_ns() - t0) / n


async def chain_loop(chain, n: int) -> float:
    call = chain.call
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await call(send)
    return (time.perf_counter_ns() - t0) / n


async def main(n: int, repeat: int) -> int:
    host = PluginHost().load()
    ctx = PluginContext("bench", "bench", Path("."), logging.getLogger("bench"), lambda events: None)
    chain = build_chain(["timeout", "retry", "circuit_breaker"], {}, host, ctx)
    await chain_loop(chain, n // 10)  # warm up
    await direct_loop(n // 10)
    direct = min([await direct_loop(n) for _ in range(repeat)])
    chained = min([await chain_loop(chain, n) for _ in range(repeat)])
    overhead = chained - direct
    print(f"direct  await send():        {direct:8.0f} ns/call")
    print(f"chain   await chain.call():  {chained:8.0f} ns/call   ({chain!r})")
    print(f"overhead:                    {overhead:8.0f} ns/call   ratio chain/direct = {chained / direct:.1f}x")
    print(f"target < {TARGET_NS:.0f} ns: {'OK' if overhead < TARGET_NS else 'OVER'}")
    assert ctx.stats["breaker_state"] == "closed" and ctx.stats["retries"] == 0
    return 0 if overhead < TARGET_NS else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="calls per timing run")
    ap.add_argument("--repeat", type=int, default=5, help="timing runs; the best is reported")
    args = ap.parse_args()
    print("$ " + " ".join(["PYTHONPATH=.", shlex.quote(sys.executable), *map(shlex.quote, sys.argv)]))
    print(f"python {sys.version.split()[0]}, n={args.n}, best of {args.repeat}")
    sys.exit(asyncio.run(main(args.n, args.repeat)))
