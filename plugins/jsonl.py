"""`jsonl` sink: NDJSON, one event per line, to stdout (`path = "-"`) or a file."""

from __future__ import annotations

import asyncio
import os
import sys

import msgspec

from agent.plugin import (
    BaseSink,
    Event,
    PermanentError,
    PluginContext,
    RegisterComponent,
    RetryableError,
    hookimpl,
    json_encoder,
)


class JsonlOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str = "-"
    fsync: bool = False  # fsync after every batch: slower, survives power loss


class JsonlSink(BaseSink):
    """Appends each batch as lines; the write is one os.write per batch in a thread."""

    def __init__(self, name: str, options: JsonlOptions, ctx: PluginContext) -> None:
        self.path = options.path
        self.fsync = options.fsync
        self.fd: int | None = None

    async def start(self) -> None:
        if self.path == "-":
            self.fd = sys.stdout.fileno()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def send(self, events: list[Event]) -> None:
        data = b"".join(json_encoder.encode(e) + b"\n" for e in events)
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise RetryableError(f"cannot write {self.path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc

    def _write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        if self.fsync and self.path != "-":
            os.fsync(self.fd)

    async def close(self) -> None:
        if self.fd is not None and self.path != "-":
            os.close(self.fd)
        self.fd = None


@hookimpl
def register_sinks(register: RegisterComponent) -> None:
    register("jsonl", JsonlSink, options=JsonlOptions)
