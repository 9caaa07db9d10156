"""Config: TOML decoded by msgspec into typed structs.

Unknown keys and wrong types are ConfigErrors naming the file and the key path.
`${VAR}` (or `${VAR:-default}`) in any string is read from the environment.
"""

from __future__ import annotations

import difflib
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
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0: any free port


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
    # agent/cardinality.py: distinct tag sets per name in a rolling hour; past it, tags become {"overflow": "true"}.
    max_series_per_name: PositiveInt = 2000
    # agent.heartbeat: a sidecar_agent.heartbeat event every heartbeat_s seconds (0: none), for the Fleet tab.
    heartbeat_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # docs/multiprocess.md. connect: only forward, to a separately run agent ("unix:///path.sock" or
    # "http://host:port"); never owns data_dir. listen: the owner's forwarder socket ("unix:///path.sock";
    # default data_dir/forward/agent.sock).
    connect: Annotated[str, msgspec.Meta(pattern=r"^(unix:///.+|https?://.+)?$")] = ""
    listen: Annotated[str, msgspec.Meta(pattern=r"^(unix:///.+)?$")] = ""


class ServerSection(_Section):
    """`[server]`: the HTTP API and dashboard."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8765
    token: str | None = None
    max_body_bytes: PositiveInt = 5 * 1024 * 1024
    allowed_origins: list[str] = []
    # docs/security.md: the Host allowlist, /metrics without the token, TLS, the Unix socket.
    allowed_hosts: list[str] = []  # beside loopback names, IP literals and `host`; "*" any, ".example.com"
    metrics_public: bool = False
    tls_cert: str | None = None  # PEM files; both or neither. Re-read when they change
    tls_key: str | None = None
    tls_reload_s: PositiveFloat = 10.0  # how often the TLS files' mtimes are checked
    unix_socket: str | None = None  # a second listener (mode 0660), e.g. for a pod's other containers
    # Connection bounds (issue 18): headers must arrive within header_timeout_s; an idle
    # keep-alive connection closes after keepalive_timeout_s; past max_connections a new
    # connection is answered 503 and closed at once.
    header_timeout_s: PositiveFloat = 10.0
    keepalive_timeout_s: PositiveFloat = 15.0
    max_connections: PositiveInt = 512
    # A live-stream (WebSocket) client's queue bound; past it its oldest events go (`stream_dropped`).
    stream_client_max_bytes: PositiveInt = 4 * 1024 * 1024
    # /readyz: a sink whose oldest undelivered event is older than this is `degraded`.
    ready_max_lag_s: PositiveFloat = 60.0


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
    max_store_mb: PositiveFloat = 1024.0  # store.db's cap: past it the oldest raw events go, then the oldest roll-ups
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


def _expand(obj: Any, path: str, origin: str, errors: list[str] | None = None) -> Any:
    """Expand `${VAR}` in every string; an unset variable raises, or is appended to `errors`."""
    if isinstance(obj, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            problem = f"{origin}: {path}: environment variable {name} is not set"
            if errors is None:
                raise ConfigError(problem)
            errors.append(problem)
            return ""

        return _VAR.sub(sub, obj)
    if isinstance(obj, dict):
        return {k: _expand(v, f"{path}.{k}" if path else k, origin, errors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand(v, f"{path}[{i}]", origin, errors) for i, v in enumerate(obj)]
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


def from_dict(raw: dict[str, Any], origin: str = "<dict>", base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Build a Config from a plain dict (as parsed from TOML). A ConfigError names every
    problem, one per line. With `base_dir` (a config file's folder), relative paths resolve against it."""
    errors = config_errors(raw, origin)
    if errors:
        raise ConfigError("\n".join(errors))
    raw = _expand(raw, "", origin)
    if base_dir is not None:
        raw = resolve_paths(raw, Path(base_dir))
    try:  # config_errors checked each key alone; this is the whole
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None
    cfg.origin = origin
    return cfg


def did_you_mean(key: str, candidates: Any) -> str:
    """` (did you mean 'x'?)` naming the candidate closest to a misspelt `key`, or ''."""
    close = difflib.get_close_matches(key, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_errors(raw: Any, origin: str) -> list[str]:
    """Every problem in a config dict, as `origin: key.path: problem` lines; [] when it is valid.

    msgspec stops at the first error, so each section is converted key by key: every
    Section field has a default, so a one-key table checks that key alone. Plugin
    options (inside `[sources.*]` / `[sinks.*]`) are checked by check-config's plan step.
    """
    if not isinstance(raw, dict):
        return [f"{origin}: config must be a table, got {type(raw).__name__}"]
    errors: list[str] = []
    raw = _expand(raw, "", origin, errors)
    fields = {f.name: f.type for f in msgspec.structs.fields(Config) if f.name != "origin"}
    for key, value in raw.items():
        typ = fields.get(key)
        if typ is None:
            errors.append(f"{origin}: {key}: unknown key{did_you_mean(key, fields)}")
        elif isinstance(typ, type) and issubclass(typ, _Section):
            errors += _section_errors(value, typ, origin, key)
        elif key in ("sources", "sinks"):  # msgspec would say `sinks[...]`, not which table
            if not isinstance(value, dict):
                errors.append(f"{origin}: {key}: expected a table, got {type(value).__name__}")
                continue
            for name, table in value.items():
                if not isinstance(table, dict):
                    errors.append(f"{origin}: {key}.{name}: expected a table, got {type(table).__name__}")
        else:
            try:
                msgspec.convert(value, typ, strict=True)
            except msgspec.ValidationError as exc:
                errors.append(format_validation_error(exc, origin, "." + key))
    server = raw.get("server", {})
    if isinstance(server, dict) and not any(e.startswith(f"{origin}: server.") for e in errors):
        section = msgspec.convert(server, ServerSection, strict=True)
        if section.enabled and not section.token and not _is_loopback(section.host):
            errors.append(
                f"{origin}: server.token: required when server.host ({section.host}) is not a loopback address"
            )
    return errors


def _section_errors(value: Any, typ: type, origin: str, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{origin}: {path}: expected a table, got {type(value).__name__}"]
    known = [f.name for f in msgspec.structs.fields(typ)]
    errors = []
    for key, item in value.items():
        if key not in known:
            errors.append(f"{origin}: {path}.{key}: unknown key{did_you_mean(key, known)}")
            continue
        try:
            msgspec.convert({key: item}, typ, strict=True)
        except msgspec.ValidationError as exc:
            errors.append(format_validation_error(exc, origin, "." + path))
    return errors


def _is_path_key(key: str) -> bool:
    return key in ("path", "data_dir", "tls_cert", "tls_key", "unix_socket") or key.endswith(("_path", "_dir", "_file"))


def resolve_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of `raw` whose relative file paths are under `base_dir` (the config file's
    folder), so a config means the same files whatever the working directory: `data_dir`,
    `tls_cert`, `tls_key`, `unix_socket`, and in `[agent]`, `[server]` and each source or sink table
    `path` and any key ending in `_path`, `_dir` or `_file`. `-` (stdout) and URLs stay."""

    def fix(table: Any) -> Any:
        if not isinstance(table, dict):
            return table
        out = dict(table)
        for key, value in table.items():
            if _is_path_key(key) and isinstance(value, str) and value not in ("", "-") and "://" not in value:
                path = Path(value).expanduser()
                out[key] = str(path if path.is_absolute() else base_dir / path)
        return out

    raw = dict(raw)
    for section in ("agent", "server"):
        if section in raw:
            raw[section] = fix(raw[section])
    for section in ("sources", "sinks"):
        if isinstance(raw.get(section), dict):
            raw[section] = {name: fix(table) for name, table in raw[section].items()}
    return raw


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; its relative paths are relative to its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return from_dict(raw, str(p), base_dir=p.resolve().parent)


def resolve(config: Config | dict[str, Any] | str | os.PathLike[str] | None) -> Config:
    """Accept a Config, a dict, a path, or None (the embedded defaults)."""
    if config is None:
        return from_dict(default_config(), "<defaults>")
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(config)
    return load(config)


def differences(a: Config, b: Config) -> list[str]:
    """The key paths where two configs differ (`agent.data_dir`, `sinks`), their origin aside."""
    out: list[str] = []
    for f in msgspec.structs.fields(Config):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "origin" or x == y:
            continue
        if isinstance(x, msgspec.Struct):
            out += [f"{f.name}.{g.name}" for g in msgspec.structs.fields(x) if getattr(x, g.name) != getattr(y, g.name)]
        else:
            out.append(f.name)
    return out
