"""Sinks for tests and benchmarks, loaded with `Agent(config, plugins=[plugins_for_tests])`.

- memory: keeps every delivered event in STATE.delivered[sink name];
- null: accepts and forgets (benchmarks);
- hang: never returns from send();
- flaky: raises RetryableError while its name is in STATE.down;
- slow: like memory, but each send takes STATE.delay seconds; STATE.in_flight and
  STATE.most_in_flight count sends in progress across every slow sink;
- broken: its factory raises (a sink that fails to build);
- poison: raises RetryableError while its name is in STATE.down (an outage parks
  whole batches), else PermanentError for a batch holding any event whose name
  starts with "poison", otherwise behaves like memory.
State is module-global: call STATE.reset() at the start of a test.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent.errors import PermanentError, RetryableError
from agent.event import Event
from agent.plugin.hookspecs import hookimpl
from agent.plugin.base import BaseSink, PluginContext


@dataclass
class _State:
    delivered: dict[str, list[Event]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=dict)
    delay: float = 0.02
    in_flight: int = 0
    most_in_flight: int = 0

    def reset(self) -> None:
        self.delivered.clear()
        self.down.clear()
        self.calls.clear()
        self.delay, self.in_flight, self.most_in_flight = 0.02, 0, 0

    def ids(self, sink: str) -> list[str]:
        return [e.id for e in self.delivered.get(sink, [])]


STATE = _State()


class MemorySink(BaseSink):
    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        self.name = name
        STATE.delivered.setdefault(name, [])

    async def send(self, events: list[Event]) -> None:
        STATE.calls[self.name] = STATE.calls.get(self.name, 0) + 1
        STATE.delivered.setdefault(self.name, []).extend(events)


class NullSink(BaseSink):
    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        pass

    async def send(self, events: list[Event]) -> None:
        return None


class HangSink(BaseSink):
    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        self.name = name

    async def send(self, events: list[Event]) -> None:
        STATE.calls[self.name] = STATE.calls.get(self.name, 0) + 1
        await asyncio.Event().wait()  # forever


class SlowSink(MemorySink):
    async def send(self, events: list[Event]) -> None:
        STATE.in_flight += 1
        STATE.most_in_flight = max(STATE.most_in_flight, STATE.in_flight)
        try:
            await asyncio.sleep(STATE.delay)
            await super().send(events)
        finally:
            STATE.in_flight -= 1


class BrokenSink(BaseSink):
    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        raise RuntimeError(f"{name} cannot be built")


class FlakySink(MemorySink):
    async def send(self, events: list[Event]) -> None:
        if self.name in STATE.down:
            STATE.calls[self.name] = STATE.calls.get(self.name, 0) + 1
            raise RetryableError(f"{self.name} is down")
        await super().send(events)


class PoisonSink(MemorySink):
    async def send(self, events: list[Event]) -> None:
        if self.name in STATE.down:
            STATE.calls[self.name] = STATE.calls.get(self.name, 0) + 1
            raise RetryableError(f"{self.name} is down")
        bad = [e for e in events if e.name.startswith("poison")]
        if bad:
            STATE.calls[self.name] = STATE.calls.get(self.name, 0) + 1
            raise PermanentError(f"{len(bad)} poison event(s), first {bad[0].id}")
        await super().send(events)


@hookimpl
def register_sinks(register):
    register("memory", MemorySink)
    register("null", NullSink)
    register("hang", HangSink)
    register("flaky", FlakySink)
    register("slow", SlowSink)
    register("broken", BrokenSink)
    register("poison", PoisonSink)
