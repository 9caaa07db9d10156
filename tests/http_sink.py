"""A minimal HTTP sink, used only by tests: POST the batch as JSON, classify failures.

5xx and 429 -> RetryableError (Retry-After parsed), connection errors and timeouts ->
RetryableError, other 4xx -> PermanentError. This is the mapping every real sink makes
from its library's errors to the agent's two error kinds.
"""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec

from agent.errors import PermanentError, RetryableError
from agent.event import Event
from agent.plugin.base import BaseSink, parse_retry_after  # noqa: F401 (tests import it from here)

_encode = msgspec.json.Encoder().encode


class HttpSink(BaseSink):
    def __init__(self, url: str) -> None:
        self.url = url
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(headers={"Content-Type": "application/json"})

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(self, events: list[Event]) -> None:
        assert self.session is not None, "start() first"
        try:
            async with self.session.post(self.url, data=_encode(events)) as resp:
                if resp.status < 300:
                    return
                text = (await resp.text())[:200]
                msg = f"HTTP {resp.status}: {text}"
                if resp.status == 429 or resp.status >= 500:
                    raise RetryableError(msg, retry_after=parse_retry_after(resp.headers.get("Retry-After")))
                raise PermanentError(msg)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
