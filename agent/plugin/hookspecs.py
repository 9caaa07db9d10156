"""Plugin hooks. Each hook receives a `register` callback; the core validates what is
registered, rejects duplicates and owns the lifecycle. Every hook is documented in
docs/plugins.md under its exact signature (tests/test_docs.py keeps them in step)."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("sidecar_agent")
hookimpl = pluggy.HookimplMarker("sidecar_agent")


@hookspec
def register_sources(register):
    """Register source types: call ``register(type_name, factory, options=OptionsStruct)``."""


@hookspec
def register_sinks(register):
    """Register sink types: call ``register(type_name, factory, options=OptionsStruct)``."""


@hookspec
def register_policies(register):
    """Register resilience policy types: call ``register(type_name, factory, options=OptionsStruct)``."""


@hookspec
def register_flags(register):
    """Register feature flags: call ``register(flag)`` with a ``agent.flags.Flag``."""


@hookspec
def register_routes(register):
    """Register HTTP routes: call ``register(method, path, handler, mutating=False)``."""
