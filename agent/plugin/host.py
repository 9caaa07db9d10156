"""A typed wrapper around pluggy's PluginManager: one per Agent, loaded explicitly.

Built-in plugins (the repository's plugins/ folder, installed as `agent.builtin_plugins`)
and third-party ones (entry-point group `sidecar_agent`) load the same way. A plugin that
fails to import or to register is recorded with its error and skipped; the agent keeps
running without it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pluggy

from agent.config import PluginsSection
from agent.errors import PluginError
from agent.plugin import hookspecs
from agent.plugin.base import NoOptions
from agent.version import __version__

log = logging.getLogger("sidecar_agent.plugins")

ENTRY_POINT_GROUP = "sidecar_agent"
KINDS = ("sources", "sinks", "policies")
SINGULAR = {"sources": "source", "sinks": "sink", "policies": "policy"}
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass
class Registration:
    """One registered source, sink or policy type."""

    kind: str
    type_name: str
    factory: Callable[..., Any]
    options: type[msgspec.Struct]
    plugin: str


@dataclass
class PluginInfo:
    """A loaded (or failed) plugin, as /api/v1/status and `sidecar-agent plugins` show it."""

    name: str
    package: str
    version: str
    state: str = "loaded"  # loaded | failed | blocked
    error: str | None = None
    provides: list[str] = field(default_factory=list)


BUILTIN_PACKAGE = "agent.builtin_plugins"  # the repository's plugins/ folder, installed under agent/


def _builtin_modules() -> list[str]:
    # Loaded by name, like an entry point: the core has no static import of a built-in.
    return list(importlib.import_module(BUILTIN_PACKAGE).BUILTIN)


class PluginHost:
    """Loads plugins and holds what they registered."""

    def __init__(self, settings: PluginsSection | None = None, extra: list[Any] | None = None) -> None:
        self.settings = settings or PluginsSection()
        self.extra = list(extra or [])  # plugin modules/objects given in code (tests, embedders)
        self.pm = pluggy.PluginManager("sidecar_agent")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.registry: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}
        self.flags: list[Any] = []
        self.routes: list[tuple[str, str, Callable[..., Any], bool, str]] = []
        self._loaded = False

    # -- loading -------------------------------------------------------------------

    def _allowed(self, name: str) -> bool:
        allow = self.settings.allow
        return name not in self.settings.deny and (allow is None or name in allow)

    def _add(self, name: str, package: str, version: str, load: Callable[[], Any]) -> None:
        if not self._allowed(name):
            self.info[name] = PluginInfo(name, package, version, state="blocked")
            return
        try:
            module = load()
            self.pm.register(module, name=name)
        except Exception as exc:  # a broken plugin must not take the agent down
            log.error("plugin %s failed to load: %s", name, exc, exc_info=True)
            self.info[name] = PluginInfo(name, package, version, state="failed", error=_describe(exc))
            return
        self.info[name] = PluginInfo(name, package, version)

    def load(self) -> PluginHost:
        """Import built-in, in-process (`extra`) and entry-point plugins, then collect their registrations."""
        if self._loaded:
            return self
        self._loaded = True
        for modname in _builtin_modules():
            short = modname.rsplit(".", 1)[-1]
            self._add(short, "sidecar-agent", __version__, functools.partial(importlib.import_module, modname))
        for obj in self.extra:  # registered like built-ins, named by __name__
            name = getattr(obj, "__name__", None) or type(obj).__name__
            self._add(name, "<in-process>", __version__, functools.partial(_itself, obj))
        if self.settings.entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = ep.dist
                self._add(
                    ep.name,
                    dist.name if dist else "?",
                    dist.version if dist else "?",
                    ep.load,
                )
        self._check_pending()
        self._collect()
        return self

    def _check_pending(self) -> None:
        """pm.check_pending(), but a plugin with a misspelled hook is unregistered and
        marked failed (named, with the hook) instead of taking the agent down."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
                self.pm.unregister(exc.plugin)
                log.error("plugin %s failed validation: %s", name, exc)
                info = self.info.get(name)
                if info is not None:
                    info.state, info.error = "failed", f"PluginValidationError: {exc}"

    def _collect(self) -> None:
        for kind in KINDS:
            hook = getattr(self.pm.hook, f"register_{kind}")
            for impl in hook.get_hookimpls():
                self._call_impl(impl, functools.partial(self._registrar, kind))
        for impl in self.pm.hook.register_flags.get_hookimpls():
            self._call_impl(impl, lambda plugin: lambda flag: self.flags.append((plugin, flag)))
        for impl in self.pm.hook.register_routes.get_hookimpls():
            self._call_impl(impl, self._route_registrar)

    def _call_impl(self, impl: Any, make_register: Callable[[str], Callable[..., None]]) -> None:
        plugin = impl.plugin_name
        try:
            impl.function(register=make_register(plugin))
        except Exception as exc:
            log.error("plugin %s failed to register: %s", plugin, exc, exc_info=True)
            info = self.info.get(plugin)
            if info:
                info.state, info.error = "failed", _describe(exc)
            for kind in KINDS:  # drop whatever it registered before failing
                for key in [k for k, r in self.registry[kind].items() if r.plugin == plugin]:
                    del self.registry[kind][key]

    def _registrar(self, kind: str, plugin: str) -> Callable[..., None]:
        def register(type_name: str, factory: Callable[..., Any], options: type[msgspec.Struct] = NoOptions) -> None:
            if not isinstance(type_name, str) or not _TYPE_NAME.match(type_name):
                raise PluginError(f"plugin {plugin}: invalid {SINGULAR[kind]} type name {type_name!r}")
            if not callable(factory):
                raise PluginError(f"plugin {plugin}: factory for {type_name!r} is not callable")
            if not (isinstance(options, type) and issubclass(options, msgspec.Struct)):
                raise PluginError(f"plugin {plugin}: options for {type_name!r} must be a msgspec.Struct")
            existing = self.registry[kind].get(type_name)
            if existing is not None:
                raise PluginError(
                    f"plugin {plugin}: {SINGULAR[kind]} type {type_name!r} is already registered by {existing.plugin}"
                )
            self.registry[kind][type_name] = Registration(kind, type_name, factory, options, plugin)
            if plugin in self.info:
                self.info[plugin].provides.append(f"{SINGULAR[kind]}:{type_name}")

        return register

    def _route_registrar(self, plugin: str) -> Callable[..., None]:
        def register(method: str, path: str, handler: Callable[..., Any], mutating: bool = False) -> None:
            if not path.startswith("/"):
                raise PluginError(f"plugin {plugin}: route path {path!r} must start with /")
            self.routes.append((method.upper(), path, handler, mutating, plugin))

        return register

    # -- lookups -------------------------------------------------------------------

    def get(self, kind: str, type_name: str) -> Registration:
        """The registration for a type, or a PluginError naming what is available."""
        reg = self.registry[kind].get(type_name)
        if reg is None:
            known = ", ".join(sorted(self.registry[kind])) or "none"
            raise PluginError(f"unknown {SINGULAR[kind]} type {type_name!r} (available: {known})")
        return reg

    def mark_failed(self, plugin: str, exc: BaseException) -> None:
        """Record that a plugin's component failed at run time."""
        info = self.info.get(plugin)
        if info is not None:
            info.state, info.error = "failed", _describe(exc)

    def describe(self) -> list[dict[str, Any]]:
        """Every plugin with its state, for status output."""
        return [msgspec.structs.asdict(_as_struct(i)) for i in sorted(self.info.values(), key=lambda i: i.name)]


class _PluginInfoStruct(msgspec.Struct):
    name: str
    package: str
    version: str
    state: str
    error: str | None
    provides: list[str]


def _as_struct(info: PluginInfo) -> _PluginInfoStruct:
    return _PluginInfoStruct(info.name, info.package, info.version, info.state, info.error, list(info.provides))


def _itself(obj: Any) -> Any:
    return obj


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
