"""The resilience chain: a sink's policies composed around its `send` call.

ORDER RULE. A sink's ``policies`` list is read from the sink outward: the first
policy wraps the sink call directly and each next one wraps the previous. So

    policies = ["timeout", "retry", "circuit_breaker"]

means ``circuit_breaker(retry(timeout(send)))``: the timeout applies to each
attempt, retry repeats timed-out or failed attempts, and the breaker sees one
outcome per batch (after retries) and can refuse a batch without touching the
sink. An empty list calls the sink directly.

Each policy's options come from the sink's config table of the same name, e.g.
``retry = { max_attempts = 6 }``, decoded into the policy's msgspec Struct; a bad key
is a ConfigError naming ``sinks.<sink>.<policy>.<key>``.

The chain is composed once, at build time: ``Chain.call(fn)`` allocates only the
``functools.partial`` objects that carry `fn` into the inner layers (one per policy
after the first) and the policies' own coroutines.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from agent.config import convert_section
from agent.errors import ConfigError, PluginError
from agent.plugin.base import PluginContext, Policy

if TYPE_CHECKING:
    from agent.plugin.host import PluginHost

T = TypeVar("T")
log = logging.getLogger("sidecar_agent.resilience")


class Chain:
    """A sink's composed policies. Await ``chain.call(fn)``; fn makes ONE attempt."""

    __slots__ = ("_closed", "call", "names", "policies")

    def __init__(self, names: Sequence[str], policies: Sequence[Policy]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.policies: tuple[Policy, ...] = tuple(policies)  # innermost first, as configured
        self.call: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] = _compose(self.policies)
        self._closed = False

    async def close(self) -> None:
        """Close every policy that has an async ``close()`` (optional on the Protocol), once,
        outermost first; one that fails is logged and the others still close."""
        if self._closed:
            return
        self._closed = True
        for name, policy in reversed(list(zip(self.names, self.policies, strict=True))):
            close = getattr(policy, "close", None)
            if close is None:
                continue
            try:
                await close()
            except Exception as exc:  # a policy's cleanup must not stop the others'
                log.error("policy %s failed to close: %s", name, exc)

    def get(self, name: str) -> Policy | None:
        """The first policy configured under `name` (e.g. "circuit_breaker"), or None."""
        for n, p in zip(self.names, self.policies, strict=True):
            if n == name:
                return p
        return None

    def __repr__(self) -> str:
        return f"<Chain {' -> '.join(self.names) or '(direct)'}>"


def _direct(fn: Callable[[], Awaitable[T]]) -> Awaitable[T]:
    return fn()


def _compose(policies: Sequence[Policy]) -> Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]:
    """Build the call function once. Specialized for the common lengths."""
    calls = [p.call for p in policies]  # bound methods, looked up once
    if not calls:
        return _direct
    if len(calls) == 1:
        return calls[0]
    if len(calls) == 2:
        c0, c1 = calls

        def call2(fn: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
            return c1(partial(c0, fn))

        return call2
    if len(calls) == 3:
        c0, c1, c2 = calls

        def call3(fn: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
            return c2(partial(c1, partial(c0, fn)))

        return call3
    inner, outer = calls[:-1], calls[-1]

    def calln(fn: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        for c in inner:
            fn = partial(c, fn)
        return outer(fn)

    return calln


def build_chain(
    policy_names: list[str],
    policy_tables: Mapping[str, Mapping[str, Any]],
    host: PluginHost,
    ctx: PluginContext,
    *,
    origin: str = "<config>",
) -> Chain:
    """Instantiate and compose a sink's policies (see the ORDER RULE in the module doc).

    `policy_tables` maps a policy name to its raw config table (missing = defaults).
    Each factory is called once as ``factory(name, options, ctx)`` with the sink's ctx.
    """
    if len(set(policy_names)) != len(policy_names):
        raise ConfigError(f"{origin}: sinks.{ctx.name}.policies: a policy is listed twice: {policy_names}")
    policies: list[Policy] = []
    for pname in policy_names:
        try:
            reg = host.get("policies", pname)
        except PluginError as exc:
            raise ConfigError(f"{origin}: sinks.{ctx.name}.policies: {exc}") from None
        raw = policy_tables.get(pname) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{origin}: sinks.{ctx.name}.{pname}: expected a table")
        options = convert_section(dict(raw), reg.options, origin, f"sinks.{ctx.name}.{pname}")
        policy = reg.factory(ctx.name, options, ctx)
        if not callable(getattr(policy, "call", None)):
            raise ConfigError(f"{origin}: sinks.{ctx.name}.policies: policy {pname!r} has no call(fn) method")
        policies.append(policy)
    return Chain(policy_names, policies)


def chain_from_specs(specs: Sequence[tuple[str, Any, Any]], ctx: PluginContext) -> Chain:
    """Compose a chain from already validated (name, registration, options) triples,
    as agent.plan.plan produces them."""
    policies: list[Policy] = []
    for pname, reg, options in specs:
        policy = reg.factory(ctx.name, options, ctx)
        if not callable(getattr(policy, "call", None)):
            raise PluginError(f"policy {pname!r} for sink {ctx.name} has no call(fn) method")
        policies.append(policy)
    return Chain([name for name, _, _ in specs], policies)
