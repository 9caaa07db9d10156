"""A tiny HTTP client the CLI uses to talk to a running agent."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from agent.config import Config
from agent.storage.dirlock import DataDirInUse


class AgentUnreachable(Exception):
    """No agent answered at the configured address."""


def url(cfg: Config) -> str:
    """The agent's base URL from the config (a wildcard host is reached on loopback)."""
    host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{cfg.server.port}"


def offline_refused(cfg: Config, exc: DataDirInUse) -> SystemExit:
    """The exit for an offline command that found the data dir locked."""
    if exc.by_cli:
        return SystemExit(f"error: {exc}")
    return SystemExit(
        f"error: data dir {exc.data_dir} is in use by an agent (pid {exc.pid}) that did not answer at"
        f" {url(cfg)}: it is still starting, runs without [server], or listens elsewhere (check --config)"
    )


def call(cfg: Config, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None) -> dict[str, Any]:
    """Send one request; returns the decoded JSON, raises SystemExit on an HTTP error."""
    q = urllib.parse.urlencode({k: v for k, v in (query or {}).items() if v is not None})
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url(cfg) + path + (f"?{q}" if q else ""), method=method, data=data)
    req.add_header("X-Sidecar-Actor", "cli")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token = cfg.server.token or os.environ.get("SIDECAR_AGENT_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not an object: show it as it is
            detail = json.loads(detail).get("error", detail)
        raise SystemExit(f"error: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise AgentUnreachable(str(exc)) from None
