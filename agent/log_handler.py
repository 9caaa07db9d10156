"""`agent.LogHandler`: Python logging records as events.

    import logging, agent
    agent.start()
    logging.getLogger().addHandler(agent.LogHandler(logging.INFO))

Each record becomes one event: name `log` (or the handler's `name`), kind `event`, no
value, `ts` the record's time, tags `level` and `logger`, and `data` with `message`,
`where` (file:line), `func`, `exception` (the formatted traceback, with `exc_info`),
`stack` (with `stack_info`) and every `extra` field (values JSON can carry are kept,
others become their repr()).

It costs about what record() costs plus the record's own message formatting: emit()
appends to the intake's deque and returns, and takes no handler lock (record() is
thread-safe). The traceback and the `extra` values are turned into text where the queue
is drained (the agent's committer or a forwarder's drain thread, agent.pipeline.intake.
Deferred), not on the caller's thread.

It never feeds on the agent's own logging: records from the `agent` and `sidecar_agent`
loggers and from the agent's threads (named `sidecar-agent...`) are ignored, and so is
any record logged while this thread is already inside emit(). Like record(), it works
before start() (counted as `not_started`) and in a child after fork() (the module-level
record() follows the process's agent).
"""

from __future__ import annotations

import logging
import math
import threading
import traceback
from typing import Any

from agent import embed
from agent.pipeline.intake import Deferred
from agent.pipeline.recording import RecordFn

# Attributes every LogRecord has: what is left in its __dict__ came from `extra`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_OWN_LOGGERS = ("agent", "sidecar_agent")
_OWN_PREFIXES = tuple(f"{n}." for n in _OWN_LOGGERS)
_OWN_THREADS = "sidecar-agent"
_INT64 = 1 << 63


def _own(logger: str) -> bool:
    return logger in _OWN_LOGGERS or logger.startswith(_OWN_PREFIXES)


def _json_safe(v: Any) -> Any:
    """What an event's data can carry as it is; anything else as its repr()."""
    if v is None or v.__class__ in (str, bool):
        return v
    if v.__class__ is int:
        return v if -_INT64 <= v < _INT64 else str(v)
    if v.__class__ is float:
        return v if math.isfinite(v) else repr(v)
    return repr(v)


class _LogData(Deferred):
    """The record's data, finished where the queue is drained: the traceback and extras as text."""

    __slots__ = ("data", "exc_info", "extra")

    def __init__(self, data: dict[str, Any], exc_info: Any, extra: dict[str, Any] | None) -> None:
        self.data, self.exc_info, self.extra = data, exc_info, extra

    def __call__(self) -> dict[str, Any]:
        data = self.data
        if self.extra:
            data = {k: _json_safe(v) for k, v in self.extra.items()} | data  # the record's own keys win
        if self.exc_info:
            data["exception"] = "".join(traceback.format_exception(*self.exc_info)).rstrip("\n")
            self.exc_info = None  # the traceback keeps frames alive: let them go
        return data


class LogHandler(logging.Handler):
    """A logging.Handler recording each record as an event (see the module docstring).

    `agent`: an Agent (or Forwarder) to record on; default: the process-wide agent of
    agent.start(), looked up at each record. `name`: the events' name.
    """

    def __init__(self, level: int | str = logging.NOTSET, *, name: str = "log", agent: Any = None) -> None:
        super().__init__(level)
        self.event_name = name
        self._agent = agent
        self._inside = threading.local()  # the reentrancy guard, per thread

    def handle(self, record: logging.LogRecord) -> logging.LogRecord | bool:  # type: ignore[override]
        # logging.Handler.handle takes the handler's lock around emit(); record() needs none.
        rv = self.filter(record)
        if rv:
            self.emit(rv if isinstance(rv, logging.LogRecord) else record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        """Record `record` unless it is the agent's own; never raises, never blocks."""
        if _own(record.name) or (record.threadName or "").startswith(_OWN_THREADS):
            return
        inside = self._inside
        if getattr(inside, "active", False):
            return
        inside.active = True
        try:
            record_fn: RecordFn = self._agent.record if self._agent is not None else embed.record
            data: dict[str, Any] = {
                "message": record.getMessage(),  # here: its args may change once we return
                "where": f"{record.pathname}:{record.lineno}",
                "func": record.funcName,
            }
            if record.stack_info:
                data["stack"] = record.stack_info
            extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
            record_fn(
                self.event_name,
                None,
                kind="event",
                tags={"level": record.levelname, "logger": record.name},
                ts=record.created,
                data=_LogData(data, record.exc_info, extra) if (extra or record.exc_info) else data,  # type: ignore[arg-type]
            )
        except Exception:
            self.handleError(record)
        finally:
            inside.active = False
