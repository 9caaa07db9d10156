"""`system` source: host CPU, memory, load, disk and network I/O, via psutil."""

from __future__ import annotations

import os
import time
from typing import Annotated

import msgspec
import psutil

from agent.plugin import Event, PluginContext, PollingSource, RegisterComponent, hookimpl


class SystemOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class SystemSource(PollingSource):
    """Samples host-wide figures every `interval_s` seconds."""

    def __init__(self, name: str, options: SystemOptions, ctx: PluginContext) -> None:
        self.interval_s = options.interval_s
        psutil.cpu_percent(None)  # prime: the first call has no interval to measure

    async def collect(self) -> list[Event]:
        now = time.time()
        vm = psutil.virtual_memory()
        disk = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        figures: list[tuple[str, float, str]] = [
            ("system.cpu.percent", psutil.cpu_percent(None), "gauge"),
            ("system.memory.used_bytes", vm.used, "gauge"),
            ("system.memory.available_bytes", vm.available, "gauge"),
            ("system.memory.percent", vm.percent, "gauge"),
        ]
        if hasattr(os, "getloadavg"):
            l1, l5, l15 = os.getloadavg()
            figures += [
                ("system.load.1m", l1, "gauge"),
                ("system.load.5m", l5, "gauge"),
                ("system.load.15m", l15, "gauge"),
            ]
        if disk is not None:
            figures += [
                ("system.disk.read_bytes", disk.read_bytes, "counter"),
                ("system.disk.write_bytes", disk.write_bytes, "counter"),
            ]
        if net is not None:
            figures += [
                ("system.net.recv_bytes", net.bytes_recv, "counter"),
                ("system.net.sent_bytes", net.bytes_sent, "counter"),
            ]
        return [Event(name=n, value=float(v), kind=k, ts=now) for n, v, k in figures]


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("system", SystemSource, options=SystemOptions)
