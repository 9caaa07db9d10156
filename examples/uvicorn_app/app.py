"""An ASGI app for uvicorn that embeds the agent: `agent.start()` at import.

    uvicorn --workers 4 --app-dir examples/uvicorn_app app:app

uvicorn starts its workers with multiprocessing's `spawn`, so each worker imports this
module and calls agent.start() itself: the first to take the data-dir lock owns it (the
journal, sinks and HTTP server) and the others forward their events to it over the data
dir's Unix socket. Each event carries the producing worker's pid in the tag `pid`.
record() is a deque append, so calling it from async code does not block the loop.
See docs/multiprocess.md.

SIDECAR_APP_DATA_DIR and SIDECAR_APP_JSONL (used by the tests) point the agent at a
data dir and a jsonl file; without them it uses ./uvicorn-agent-data and
./uvicorn-events.jsonl and no HTTP server.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

import agent

agent.start(
    {
        "agent": {"data_dir": os.environ.get("SIDECAR_APP_DATA_DIR", "uvicorn-agent-data"), "id": "uvicorn-app"},
        "server": {"enabled": False},
        "dashboard": {"store": False},
        "sinks": {
            "out": {"type": "jsonl", "path": os.environ.get("SIDECAR_APP_JSONL", "uvicorn-events.jsonl"),
                    "policies": []}
        },
    }
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":  # nothing to set up: the agent started at import
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/healthz":  # readiness probes record nothing
        body = b"ok\n"
    else:
        query = parse_qs(scope.get("query_string", b"").decode())
        request = query.get("i", ["-1"])[0]
        with agent.timer("http.request.seconds", tags={"path": scope["path"]}):
            agent.record("http.request", 1, kind="counter", data={"i": int(request)})
            body = f"{os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
