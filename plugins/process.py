"""`process` source: one process's rss, cpu, threads and open fds (this one by default)."""

from __future__ import annotations

import os
import time
from typing import Annotated

import msgspec
import psutil

from agent.plugin import Event, PluginContext, PollingSource, RegisterComponent, hookimpl


class ProcessOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pid: int | None = None  # default: the agent's own process
    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class ProcessSource(PollingSource):
    """Samples one process every `interval_s` seconds."""

    def __init__(self, name: str, options: ProcessOptions, ctx: PluginContext) -> None:
        self.interval_s = options.interval_s
        self.pid = options.pid or os.getpid()
        self.proc = psutil.Process(self.pid)
        self.proc.cpu_percent(None)
        self.tags = {"pid": str(self.pid)}

    async def collect(self) -> list[Event]:
        now = time.time()
        p = self.proc
        with p.oneshot():
            figures = [
                ("process.memory.rss_bytes", p.memory_info().rss),
                ("process.cpu.percent", p.cpu_percent(None)),
                ("process.threads", p.num_threads()),
            ]
            if hasattr(p, "num_fds"):
                figures.append(("process.open_fds", p.num_fds()))
        return [Event(name=n, value=float(v), kind="gauge", ts=now, tags=self.tags) for n, v in figures]


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("process", ProcessSource, options=ProcessOptions)
