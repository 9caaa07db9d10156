"""An example sidecar-agent plugin: a `heartbeat` source and a `textfile` sink.

Installed, it is found through the `sidecar_agent` entry-point group (see pyproject.toml).
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import msgspec

# The one module a plugin imports from the agent.
from agent.plugin import (
    BaseSink,
    Event,
    PluginContext,
    PollingSource,
    RegisterComponent,
    RetryableError,
    hookimpl,
)


class HeartbeatOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[sources.NAME]` options for type `heartbeat`."""

    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    name: str = "heartbeat"


class HeartbeatSource(PollingSource):
    """Emits a counter increment every `interval_s` seconds."""

    def __init__(self, name: str, options: HeartbeatOptions, ctx: PluginContext) -> None:
        self.interval_s = options.interval_s
        self.metric = options.name
        self.tags = {"agent": ctx.agent_id}

    async def collect(self) -> list[Event]:
        # id, ts, source and agent_id are filled in by the agent
        return [Event(name=self.metric, kind="counter", value=1.0, tags=self.tags)]


class TextFileOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[sinks.NAME]` options for type `textfile`."""

    path: str


class TextFileSink(BaseSink):
    """Appends `<ts> <name> <value>` lines to a file, one batch per write."""

    def __init__(self, name: str, options: TextFileOptions, ctx: PluginContext) -> None:
        self.path = options.path
        self.log = ctx.log

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    async def send(self, events: list[Event]) -> None:
        text = "".join(f"{e.ts:.3f} {e.name} {e.value}\n" for e in events)
        try:
            await asyncio.to_thread(self._append, text)
        except OSError as exc:  # a full disk may clear up: let the policies retry
            raise RetryableError(f"cannot write {self.path}: {exc.strerror}") from exc

    def _append(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("heartbeat", HeartbeatSource, options=HeartbeatOptions)


@hookimpl
def register_sinks(register: RegisterComponent) -> None:
    register("textfile", TextFileSink, options=TextFileOptions)
