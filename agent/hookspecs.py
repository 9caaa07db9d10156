"""Deprecated: import `hookimpl` from `agent.plugin` (this path goes in the next release)."""

import warnings

from agent.plugin.hookspecs import hookimpl, hookspec  # noqa: F401

warnings.warn(
    "agent.hookspecs is deprecated; use `from agent.plugin import hookimpl`", DeprecationWarning, stacklevel=2
)
