"""A tiny HTTP client the CLI uses to talk to a running agent."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .config import Config


class AgentUnreachable(Exception):
    """No agent answered at the configured address."""


def call(cfg: Config, method: str, path: str, query: dict[str, Any] | None = None,
         body: Any = None) -> dict[str, Any]:
    """Send one request; returns the decoded JSON, raises SystemExit on an HTTP error."""
    host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    q = urllib.parse.urlencode({k: v for k, v in (query or {}).items() if v is not None})
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{cfg.server.port}{path}" + (f"?{q}" if q else ""),
                                 method=method, data=data)
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
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise SystemExit(f"error: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise AgentUnreachable(str(exc)) from None
