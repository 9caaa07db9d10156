"""The flag service: resolves every flag through its layers and owns runtime overrides.

Import it from agent.flags; this module only keeps agent/flags.py small.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.errors import FlagError
from agent.event import Event
from agent.flags.definition import ENV_PREFIX, Flag, FlagConfigError, UnknownFlagError, _show, env_var
from agent.flags.overrides import AuditLog, OverrideFile

log = logging.getLogger("sidecar_agent.flags")

LAYERS = ("default", "config", "env", "override")
CHANGED_EVENT = "sidecar_agent.flag_changed"

Subscriber = Callable[[str, Any, Any], None]
Check = Callable[[], list[str]]


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables into dotted names: {"sinks": {"a": {"enabled": False}}}
    -> {"sinks.a.enabled": False}. A name set twice raises ValueError(name)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        items = flatten(value, name).items() if isinstance(value, Mapping) else [(name, value)]
        for k, v in items:
            if k in out:
                raise ValueError(k)
            out[k] = v
    return out


class FlagService:
    """Resolves every flag through its layers and owns the runtime overrides.

    Construction raises FlagConfigError (a ConfigError and a FlagError) for a bad or
    unknown flag in config or the environment. Problems with the files in `data_dir`
    never raise: they show in `health()`.

    `definitions` holds Flags, or (plugin_name, Flag) pairs as PluginHost.flags has them.
    """

    def __init__(
        self,
        definitions: Iterable[Flag | tuple[str, Flag]],
        config_values: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        data_dir: str | os.PathLike[str] = ".sidecar-agent",
        emit: Callable[[list[Event]], None] | None = None,
        *,
        config_origin: str = "",
        audit_size: int = 200,
    ) -> None:
        self._lock = threading.RLock()
        self._emit = emit
        self._defs: dict[str, Flag] = {}
        self._owner: dict[str, str] = {}
        self._by_env: dict[str, str] = {}
        for item in definitions:
            owner, flag = item if isinstance(item, tuple) else ("core", item)
            self._define(owner, flag)
        self._config_label = f"config {config_origin} [flags]" if config_origin else "config [flags]"
        self._layers: dict[str, dict[str, Any]] = {
            "default": {n: f.default for n, f in self._defs.items()},
            "config": self._read_config(config_values or {}),
            "env": self._read_env(os.environ if environ is None else environ),
            "override": {},
        }
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._file = OverrideFile(self.data_dir)
        self._audit = AuditLog(self.data_dir, audit_size)
        self._problems: list[str] = []  # from loading the files; fixed for this process
        self._runtime: dict[str, str] = {}  # key -> problem, while it lasts
        self._kept: dict[str, tuple[Any, str]] = {}  # overrides in the file that do not apply
        self._load_overrides()
        self._problems += self._audit.load()
        self._values: dict[str, Any] = {}
        self._source: dict[str, str] = {}
        for name in self._defs:
            self._resolve(name)
        self._subscribers: list[Subscriber] = []
        self._checks: list[Check] = []

    @classmethod
    def offline(
        cls,
        definitions: Iterable[Flag | tuple[str, Flag]],
        data_dir: str | os.PathLike[str],
        config_values: Mapping[str, Any] | None = None,
        *,
        config_origin: str = "",
    ) -> FlagService:
        """For the CLI while the agent is stopped: list, set and clear the overrides in
        `data_dir` directly. Ignores the environment (it is the agent's, not the CLI's)
        and emits no events; changes are still audited in flags-audit.jsonl."""
        return cls(definitions, config_values, {}, data_dir, None, config_origin=config_origin)

    # -- construction ----------------------------------------------------------------

    def _define(self, owner: str, flag: Any) -> None:
        if not isinstance(flag, Flag):
            raise FlagError(f"{owner} registered {flag!r}, which is not an agent.flags.Flag")
        if flag.name in self._defs:
            raise FlagError(f"flag {flag.name} is defined twice (by {self._owner[flag.name]} and {owner})")
        var = env_var(flag.name)
        if var in self._by_env:
            other = self._by_env[var]
            raise FlagError(f"flags {other} and {flag.name} would share the environment variable {var}")
        self._defs[flag.name] = flag
        self._owner[flag.name] = owner
        self._by_env[var] = flag.name

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._defs), n=1)
        return "no such flag" + (f"; did you mean {close[0]}?" if close else "")

    def _read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        try:
            values = flatten(raw)
        except ValueError as exc:
            raise FlagConfigError(f"flag {exc} ({self._config_label}): set twice") from None
        out: dict[str, Any] = {}
        errors = []
        for name, value in values.items():
            flag = self._defs.get(name)
            if flag is None:
                errors.append(f"flag {name} ({self._config_label}): {self._unknown(name)}")
                continue
            try:
                out[name] = flag.convert(value, "typed")
            except ValueError as exc:
                errors.append(f"flag {name} ({self._config_label}): {exc}")
        if errors:
            raise FlagConfigError("\n".join(errors))
        return out

    def _read_env(self, environ: Mapping[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        errors = []
        for var in sorted(environ):
            if not var.startswith(ENV_PREFIX):
                continue
            text = environ[var]
            name = self._by_env.get(var)
            if name is None:
                guess = var[len(ENV_PREFIX) :].lower().replace("__", ".")
                errors.append(f"flag {guess} (environment {var}): {self._unknown(guess)}")
                continue
            if not text.strip():
                continue  # an empty variable counts as unset (compose files pass FOO=${FOO})
            try:
                out[name] = self._defs[name].convert(text, "text")
            except ValueError as exc:
                errors.append(f"flag {name} (environment {var}): {exc}")
        if errors:
            raise FlagConfigError("\n".join(errors))
        return out

    def _load_overrides(self) -> None:
        overrides, problems = self._file.load()
        self._problems += problems
        for name, value in overrides.items():
            flag = self._defs.get(name)
            if flag is None:
                self._kept[name] = (value, "no flag has this name now")
                continue
            try:
                self._layers["override"][name] = flag.convert(value, "typed")
            except ValueError as exc:
                self._kept[name] = (value, str(exc))

    def _resolve(self, name: str) -> None:
        for layer in reversed(LAYERS):
            values = self._layers[layer]
            if name in values:
                self._values[name] = values[name]
                self._source[name] = layer
                return

    # -- reading ---------------------------------------------------------------------

    def get(self, name: str) -> Any:
        """The flag's effective value (a dict lookup). Raises UnknownFlagError."""
        try:
            return self._values[name]
        except KeyError:
            raise UnknownFlagError(f"flag {name}: {self._unknown(name)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._defs

    def flag(self, name: str) -> Flag:
        """The definition of a flag. Raises UnknownFlagError."""
        try:
            return self._defs[name]
        except KeyError:
            raise UnknownFlagError(f"flag {name}: {self._unknown(name)}") from None

    def describe_flag(self, name: str) -> dict[str, Any]:
        """One flag as GET /api/v1/flags lists it."""
        f = self.flag(name)
        return {
            "name": name,
            "type": f.type,
            "value": self._values[name],
            "default": f.default,
            "layer": self._source[name],
            "description": f.description,
            "choices": list(f.choices) if f.type == "enum" else None,
            "min": f.min,
            "max": f.max,
            "env_var": env_var(name),
            "plugin": self._owner[name],
            "layers": {layer: self._layers[layer][name] for layer in LAYERS if name in self._layers[layer]},
        }

    def describe(self) -> list[dict[str, Any]]:
        """Every flag, sorted by name: {name, type, value, default, layer, description,
        choices, min, max, env_var, plugin, layers}."""
        with self._lock:
            return [self.describe_flag(n) for n in sorted(self._defs)]

    def audit(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The last changes, oldest first, across restarts: {flag, old, new, layer, actor, time, action}."""
        with self._lock:
            entries = list(self._audit.entries)
        if limit is None:
            return entries
        return entries[-limit:] if limit > 0 else []

    def health(self) -> list[str]:
        """Problems worth an operator's attention; an empty list when all is well."""
        with self._lock:
            out = list(self._problems)
            for name, (value, reason) in sorted(self._kept.items()):
                out.append(
                    f"override {name}={_show(value)} in {self._file.path} is kept but not applied: {reason} "
                    f"(remove it with: sidecar-agent flags clear {name})"
                )
            out += list(self._runtime.values())
            checks = list(self._checks)
        for check in checks:
            try:
                out += check()
            except Exception as exc:
                log.error("flag health check %r failed", check, exc_info=True)
                out.append(f"health check {getattr(check, '__qualname__', check)!s} failed: {exc!r}")
        return out

    # -- changing --------------------------------------------------------------------

    def set(self, name: str, value: Any, actor: str) -> dict[str, Any]:
        """Set a runtime override and persist it. `value` is typed (a JSON-decoded value)
        or a string parsed like an environment value. On a bad value raises FlagError
        naming the flag, and nothing changes. Returns the flag's new description."""
        with self._lock:
            flag = self.flag(name)
            try:
                new = flag.convert(value, "any")
            except ValueError as exc:
                raise FlagError(f"flag {name} (override): {exc}") from None
            overrides = self._layers["override"]
            if name in overrides and overrides[name] == new and name not in self._kept:
                return self.describe_flag(name)  # already so: nothing to persist or audit
            kept = {k: v for k, v in self._kept.items() if k != name}
            self._save({**overrides, name: new}, kept)
            old = self._values[name]
            overrides[name] = new
            self._kept = kept
            self._resolve(name)
            entry = self._record("set", name, old, actor)
            description = self.describe_flag(name)
        self._after_change(entry)
        return description

    def clear(self, name: str, actor: str) -> bool:
        """Remove a runtime override, so the value falls back to the next layer down.
        Also removes an override the service kept but could not apply (even for a flag
        that no longer exists). Returns whether anything was removed."""
        with self._lock:
            overrides = self._layers["override"]
            if name not in self._defs and name not in self._kept:
                raise UnknownFlagError(f"flag {name}: {self._unknown(name)}")
            if name not in overrides and name not in self._kept:
                return False
            remaining = {k: v for k, v in overrides.items() if k != name}
            kept = {k: v for k, v in self._kept.items() if k != name}
            self._save(remaining, kept)
            old = self._values[name] if name in self._defs else self._kept[name][0]
            overrides.pop(name, None)
            self._kept = kept
            if name in self._defs:
                self._resolve(name)
            entry = self._record("clear", name, old, actor)
        self._after_change(entry)
        return True

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(name, old, new)` after each set/clear that changes a flag's value,
        in the thread that made the change and after the lock is released (so a callback
        may call get/set; concurrent changes may arrive out of order, so re-read get()
        when order matters). Returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def add_check(self, fn: Check) -> None:
        """Add a health check: fn() returns a list of problem strings."""
        with self._lock:
            self._checks.append(fn)

    # -- internals -------------------------------------------------------------------

    def _save(self, overrides: dict[str, Any], kept: dict[str, tuple[Any, str]]) -> None:
        data = {name: value for name, (value, _) in kept.items()}
        data.update(overrides)
        try:
            self._file.save(data)
        except (OSError, ValueError) as exc:
            raise FlagError(f"cannot save overrides to {self._file.path}: {exc}") from None

    def _record(self, action: str, name: str, old: Any, actor: str) -> dict[str, Any]:
        defined = name in self._defs
        entry = {
            "flag": name,
            "old": old,
            "new": self._values[name] if defined else None,
            "layer": self._source[name] if defined else None,
            "actor": str(actor) or "unknown",
            "time": time.time(),
            "action": action,
        }
        try:
            self._audit.append(entry)
        except OSError as exc:
            log.error("cannot append to %s: %s", self._audit.path, exc)
            msg = f"audit file {self._audit.path} cannot be written ({exc}); changes are audited in memory only"
            self._problem("audit", msg)
        else:
            self._problem("audit", None)
        return entry

    def _after_change(self, entry: dict[str, Any]) -> None:
        if self._emit is not None:
            event = Event(
                name=CHANGED_EVENT,
                kind="event",
                ts=entry["time"],
                source="flags",
                tags={"flag": entry["flag"], "actor": entry["actor"]},
                data=dict(entry),
            )
            try:
                self._emit([event])
            except Exception as exc:  # the change stands; the audit file has it
                log.error("cannot emit %s: %s", CHANGED_EVENT, exc, exc_info=True)
                self._problem("emit", f"flag change events cannot be emitted ({exc!r}); see flags-audit.jsonl")
            else:
                self._problem("emit", None)
        if entry["old"] == entry["new"] or entry["layer"] is None:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for cb in subscribers:
            try:
                cb(entry["flag"], entry["old"], entry["new"])
            except Exception as exc:
                log.error("flag subscriber %r failed on %s", cb, entry["flag"], exc_info=True)
                who = getattr(cb, "__qualname__", repr(cb))
                self._problem(f"subscriber:{who}", f"flag subscriber {who} failed on {entry['flag']}: {exc!r}")

    def _problem(self, key: str, message: str | None) -> None:
        """Set (or with None, clear) a problem that lasts until the next attempt succeeds."""
        with self._lock:
            if message is None:
                self._runtime.pop(key, None)
            else:
                self._runtime[key] = message
