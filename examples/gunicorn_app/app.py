"""A WSGI app for gunicorn that embeds the agent: `agent.start()` at import.

    gunicorn -w 4 examples.gunicorn_app.app:app              # each worker calls start()
    gunicorn -w 4 --preload examples.gunicorn_app.app:app    # the master calls it once

Either way one process owns the data dir (the journal, sinks and HTTP server) and
every other worker forwards its events to it over the data dir's Unix socket; each
event carries the producing worker's pid in the tag `pid`. See docs/multiprocess.md.

SIDECAR_APP_DATA_DIR and SIDECAR_APP_JSONL (used by the tests) point the agent at a
data dir and a jsonl file; without them it uses ./gunicorn-agent-data and
./gunicorn-events.jsonl and no HTTP server.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

import agent

agent.start(
    {
        "agent": {"data_dir": os.environ.get("SIDECAR_APP_DATA_DIR", "gunicorn-agent-data"), "id": "gunicorn-app"},
        "server": {"enabled": False},
        "dashboard": {"store": False},
        "sinks": {
            "out": {"type": "jsonl", "path": os.environ.get("SIDECAR_APP_JSONL", "gunicorn-events.jsonl"),
                    "policies": []}
        },
    }
)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ.get("PATH_INFO") == "/healthz":  # readiness probes record nothing
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    request = query.get("i", ["-1"])[0]
    with agent.timer("http.request.seconds", tags={"path": environ.get("PATH_INFO", "/")}):
        agent.record("http.request", 1, kind="counter", data={"i": int(request)})
        body = f"{os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
