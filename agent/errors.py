"""The agent's error hierarchy: every error it raises on purpose derives from AgentError."""

from __future__ import annotations


class AgentError(Exception):
    """Base class for errors raised deliberately by the agent."""


class ConfigError(AgentError):
    """A config file or value is invalid; the message names the file and key path."""


class PluginError(AgentError):
    """A plugin failed to load, registered something invalid, or failed to start."""


class SinkError(AgentError):
    """A sink could not deliver a batch."""


class RetryableError(SinkError):
    """A transient failure: the same batch may succeed later (5xx, 429, timeouts, resets).

    `retry_after` is the server's hint in seconds (e.g. from a Retry-After header).
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(SinkError):
    """A failure that retrying cannot fix (validation, constraint, permission errors)."""


class CircuitOpenError(RetryableError):
    """The sink's circuit breaker is open; `retry_after` says when it will admit a probe."""


class JournalFullError(AgentError):
    """The journal is at its size cap and the overflow policy is `reject`."""


class IntakeFullError(AgentError):
    """The intake already holds its capacity: a durable submit is refused (HTTP 429), not dropped."""


class FlagError(AgentError):
    """A feature flag is unknown, badly defined, or given a bad value; the message names the flag and layer."""


class SchemaVersionError(AgentError):
    """One of the agent's SQLite files was written by a newer release (a higher schema
    version than this code knows); it is refused rather than downgraded."""

    def __init__(self, file: str, found: int, known: int) -> None:
        self.file, self.found, self.known = file, found, known
        super().__init__(
            f"{file} has schema version {found}, but this release knows versions up to {known}: it was written"
            " by a newer sidecar-agent; run that release (or newer) on this data dir, or restore a backup"
        )
