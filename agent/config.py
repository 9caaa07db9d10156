"""Config: TOML decoded by msgspec into typed structs.

Unknown keys and wrong types are ConfigErrors naming the file and the key path.
`${VAR}` (or `${VAR:-default}`) in any string is read from the environment.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agent.errors import ConfigError

DEFAULT_POLICIES = ["timeout", "retry", "circuit_breaker"]


PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class AgentSection(_Section):
    """`[agent]`: identity, data directory, intake and journal tuning."""

    id: str = ""
    data_dir: str = ".sidecar-agent"
    intake_capacity: PositiveInt = 100_000
    commit_batch: PositiveInt = 2000
    commit_interval_ms: PositiveFloat = 5.0
    max_journal_mb: PositiveFloat = 1024.0
    overflow: Literal["drop_oldest", "reject"] = "drop_oldest"
    sync: Literal["full", "normal"] = "full"
    shutdown_timeout_s: PositiveFloat = 10.0
    max_future_s: PositiveFloat = 366 * 86400.0  # an event's ts may be at most this far ahead of now


class ServerSection(_Section):
    """`[server]`: the HTTP API and dashboard."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_body_bytes: int = 5 * 1024 * 1024
    allowed_origins: list[str] = []


class PluginsSection(_Section):
    """`[plugins]`: which plugins may load. Names are plugin (module or entry point) names."""

    allow: list[str] | None = None
    deny: list[str] = []
    entry_points: bool = True


class DlqSection(_Section):
    """`[dlq]`: dead-letter queue retention and replay rate."""

    ttl_hours: PositiveFloat = 168.0
    max_events: PositiveInt = 1_000_000  # pending events per sink; over it that sink's oldest go (dlq_full)
    replay_per_s: PositiveFloat = 2.0
    auto_replay: bool = True  # false: entries wait for `dlq replay` (CLI, HTTP, dashboard; offline CLI: next start)


class DashboardSection(_Section):
    """`[dashboard]`: the local history store and the dashboard's Supabase connection.

    `supabase_anon_key` is the public anon key the browser uses (row-level security
    limits it to reading); never put the service-role key here.
    """

    store: bool = True
    store_retention_h: PositiveFloat = 24.0
    supabase_url: str | None = None
    supabase_anon_key: str | None = None


class Config(_Section):
    """The whole config file."""

    agent: AgentSection = msgspec.field(default_factory=AgentSection)
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    plugins: PluginsSection = msgspec.field(default_factory=PluginsSection)
    dlq: DlqSection = msgspec.field(default_factory=DlqSection)
    dashboard: DashboardSection = msgspec.field(default_factory=DashboardSection)
    sources: dict[str, dict[str, Any]] = {}
    sinks: dict[str, dict[str, Any]] = {}
    flags: dict[str, Any] = {}
    # Where the config came from, for error messages; not a config key.
    origin: str = "<defaults>"

    def agent_id(self) -> str:
        """The configured agent id, or the host name."""
        return self.agent.id or socket.gethostname()


def default_config() -> dict[str, Any]:
    """The embedded defaults: system and process sources, dashboard on 127.0.0.1:8765."""
    return {"sources": {"system": {}, "process": {}}}


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(obj: Any, path: str, origin: str) -> Any:
    if isinstance(obj, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{origin}: {path}: environment variable {name} is not set")

        return _VAR.sub(sub, obj)
    if isinstance(obj, dict):
        return {k: _expand(v, f"{path}.{k}" if path else k, origin) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand(v, f"{path}[{i}]", origin) for i, v in enumerate(obj)]
    return obj


_MSG = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def format_validation_error(exc: msgspec.ValidationError, origin: str, prefix: str = "") -> str:
    """Turn msgspec's message into `origin: key.path: problem`."""
    m = _MSG.match(str(exc))
    msg = m.group("msg") if m else str(exc)
    path = (m.group("path") or "") if m else ""
    path = prefix + path
    unknown = re.match(r"Object contains unknown field `([^`]+)`", msg)
    if unknown:
        path = f"{path}.{unknown.group(1)}"
        msg = "unknown key"
    missing = re.match(r"Object missing required field `([^`]+)`", msg)
    if missing:
        path = f"{path}.{missing.group(1)}"
        msg = "required key is missing"
    msg = msg.replace("`", "")
    msg = msg[0].lower() + msg[1:] if msg else msg
    path = path.lstrip(".") or "<root>"
    return f"{origin}: {path}: {msg}"


def convert_section(raw: dict[str, Any], typ: type, origin: str, path: str) -> Any:
    """Convert one table into a struct, naming `origin: path.key` in any error."""
    try:
        return msgspec.convert(raw, typ, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin, "." + path)) from None


def from_dict(raw: dict[str, Any], origin: str = "<dict>") -> Config:
    """Build a Config from a plain dict (as parsed from TOML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: config must be a table, got {type(raw).__name__}")
    raw = _expand(raw, "", origin)
    if "origin" in raw:
        raise ConfigError(f"{origin}: origin: unknown key")
    for section in ("sources", "sinks"):  # msgspec would say `sinks[...]`, not which table
        tables = raw.get(section)
        if isinstance(tables, dict):
            for name, table in tables.items():
                if not isinstance(table, dict):
                    raise ConfigError(f"{origin}: {section}.{name}: expected a table, got {type(table).__name__}")
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None
    cfg.origin = origin
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    if cfg.server.enabled and not cfg.server.token and not _is_loopback(cfg.server.host):
        raise ConfigError(
            f"{cfg.origin}: server.token: required when server.host ({cfg.server.host}) is not a loopback address"
        )
    for section in ("sources", "sinks"):
        for name, table in getattr(cfg, section).items():
            if not isinstance(table, dict):
                raise ConfigError(f"{cfg.origin}: {section}.{name}: expected a table")


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return from_dict(raw, str(p))


def resolve(config: Config | dict[str, Any] | str | os.PathLike[str] | None) -> Config:
    """Accept a Config, a dict, a path, or None (the embedded defaults)."""
    if config is None:
        return from_dict(default_config(), "<defaults>")
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(config)
    return load(config)
