"""A tiny HTTP client the CLI uses to talk to a running agent."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from agent.config import Config
from agent.storage.dirlock import DataDirInUse


class AgentUnreachable(Exception):
    """No agent answered at the configured address."""


def url(cfg: Config) -> str:
    """The agent's base URL from the config (a wildcard host is reached on loopback; https when it serves TLS)."""
    host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    scheme = "https" if cfg.server.tls_cert else "http"
    return f"{scheme}://{host}:{cfg.server.port}"


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """For an agent serving TLS: trust the system CAs and, pinned, the very certificate the config names.

    The CLI reads the same config as the agent, so the configured file is the certificate it must
    be served: a self-signed one (the common case on a host) verifies without a CA. The host name
    is not checked, since the CLI may reach a wildcard listener on loopback; the pinned
    certificate or a CA-verified chain still is."""
    if not cfg.server.tls_cert:
        return None
    ctx = ssl.create_default_context()
    with contextlib.suppress(OSError, ssl.SSLError):  # unreadable here: the system CAs alone decide
        ctx.load_verify_locations(cafile=cfg.server.tls_cert)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a pinned leaf is trusted without its issuer
    ctx.check_hostname = False
    return ctx


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
        with urllib.request.urlopen(req, timeout=5, context=tls_context(cfg)) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not an object: show it as it is
            detail = json.loads(detail).get("error", detail)
        raise SystemExit(f"error: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
        raise AgentUnreachable(str(exc)) from None
