"""The plugin API: the one module a plugin imports.

    from agent.plugin import BaseSink, PluginContext, RetryableError, hookimpl

    @hookimpl
    def register_sinks(register: RegisterComponent) -> None:
        register("mysink", MySink, options=MyOptions)

Everything a source, sink or policy needs is here: the hook marker, the base classes
and protocols, the context a plugin instance is given, the error classes it raises,
the `probing` flag of a breaker's half-open probe, the aggregator a source can pre-aggregate
with (the one `[sinks.NAME] aggregate` uses), the Postgres table helpers the
built-in sinks share, and the typed `register` callbacks of each hook. Built-in
plugins import nothing else from the agent (tests/test_layout.py keeps it so).
"""

from agent.aggregation import Aggregator
from agent.errors import (
    AgentError,
    CircuitOpenError,
    ConfigError,
    IntakeFullError,
    JournalFullError,
    PermanentError,
    PluginError,
    RetryableError,
    SinkError,
)
from agent.event import MAX_TAGS, Event, json_encoder
from agent.flags.definition import Flag
from agent.history.board import HistoryBoard
from agent.history.store import STORE_FILE, HistoryStore
from agent.plugin.base import (
    BasePolicy,
    BaseSink,
    Emit,
    NoOptions,
    PluginContext,
    Policy,
    PollingSource,
    RegisterComponent,
    RegisterFlag,
    RegisterRoute,
    Sink,
    Source,
    Submit,
    ThrottledLog,
    parse_retry_after,
    probing,
)
from agent.plugin.hookspecs import hookimpl
from agent.plugin.listening import bind_with_retry
from agent.plugin.throttle import Throttle
from agent.table.ddl import check_identifier
from agent.table.rows import COLUMNS, sqlstate_retryable, to_record, to_rest_row

__all__ = [
    "COLUMNS",
    "MAX_TAGS",
    "STORE_FILE",
    "AgentError",
    "Aggregator",
    "BasePolicy",
    "BaseSink",
    "CircuitOpenError",
    "ConfigError",
    "Emit",
    "Event",
    "Flag",
    "HistoryBoard",
    "HistoryStore",
    "IntakeFullError",
    "JournalFullError",
    "NoOptions",
    "PermanentError",
    "PluginContext",
    "PluginError",
    "Policy",
    "PollingSource",
    "RegisterComponent",
    "RegisterFlag",
    "RegisterRoute",
    "RetryableError",
    "Sink",
    "SinkError",
    "Source",
    "Submit",
    "Throttle",
    "ThrottledLog",
    "bind_with_retry",
    "check_identifier",
    "hookimpl",
    "json_encoder",
    "parse_retry_after",
    "probing",
    "sqlstate_retryable",
    "to_record",
    "to_rest_row",
]
