"""Deprecated: import from `agent.plugin` (this path goes in the next release)."""

import warnings

from agent.plugin import *  # noqa: F403
from agent.plugin import __all__  # noqa: F401

warnings.warn("agent.plugin_api is deprecated; import from agent.plugin", DeprecationWarning, stacklevel=2)
