"""Plugin hooks. Each hook receives a `register` callback; the core validates what is
registered, rejects duplicates and owns the lifecycle. Every hook is documented in
docs/plugins.md under its exact signature (tests/test_docs.py keeps them in step); the
`register` callbacks are typed by the Protocols in agent.plugin.base."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from agent.plugin.base import RegisterComponent, RegisterFlag, RegisterRoute

hookspec = pluggy.HookspecMarker("sidecar_agent")
hookimpl = pluggy.HookimplMarker("sidecar_agent")


@hookspec
def register_sources(register: RegisterComponent):
    """Register source types: call ``register(type_name, factory, options=OptionsStruct)``."""


@hookspec
def register_sinks(register: RegisterComponent):
    """Register sink types: call ``register(type_name, factory, options=OptionsStruct)``."""


@hookspec
def register_policies(register: RegisterComponent):
    """Register resilience policy types: call ``register(type_name, factory, options=OptionsStruct)``."""


@hookspec
def register_flags(register: RegisterFlag):
    """Register feature flags: call ``register(flag)`` with an ``agent.plugin.Flag``."""


@hookspec
def register_routes(register: RegisterRoute):
    """Register HTTP routes: call ``register(method, path, handler, mutating=False)``."""
