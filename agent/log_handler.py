"""`agent.LogHandler`: Python logging records as events.

    import logging, agent
    agent.start()
    logging.getLogger().addHandler(agent.LogHandler(logging.INFO))

Each record becomes one event: name `log` (or the handler's `name`), kind `event`, no
value, `ts` the record's time, tags `level` (`error`, `warning`, ...: the level name in
lower case) and `logger`, and `data` with `message`, `where` (file:line), `func`,
`exception` (the formatted traceback, with `exc_info`), `stack` (with `stack_info`) and
every `extra` field (values JSON can carry are kept, others become their repr()).

On the caller's thread emit() formats the message (its args may change once it
returns), copies the `extra` attributes and appends to the intake's deque with record();
it takes no handler lock (record() is thread-safe). The traceback and the `extra`
values are turned into data where the queue is drained (the agent's committer or a
forwarder's drain thread: agent.pipeline.intake.Deferred). bench/intake_extras.py
measures what it adds to a logging call.

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
_PLAIN = len(logging.makeLogRecord({}).__dict__)  # attributes of a record without extras
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


class _LogData(Deferred, tuple):
    """What the record's data needs (a tuple: built in C on the caller's thread), turned
    into the data where the queue is drained."""

    __slots__ = ()

    def __call__(self) -> dict[str, Any]:
        message, pathname, lineno, func, stack, exc_info, extra = self
        data = {k: _json_safe(v) for k, v in extra.items()} if extra else {}
        # the record's own keys win over extras of the same names
        data.update(message=message, where=f"{pathname}:{lineno}", func=func)
        if stack:
            data["stack"] = stack
        if exc_info:
            data["exception"] = "".join(traceback.format_exception(*exc_info)).rstrip("\n")
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
            d = record.__dict__
            extra = None
            if len(d) > _PLAIN:  # `extra` added attributes (or a formatter added message/asctime)
                extra = {k: d[k] for k in d.keys() - _STANDARD} or None
            record_fn(
                self.event_name,
                None,
                kind="event",
                # lower case, as the dashboard's error rate and the otlp source's severities read it
                tags={"level": record.levelname.lower(), "logger": record.name},
                ts=record.created,
                # The message is formatted here (its args may change once we return); the rest later.
                data=_LogData(  # type: ignore[arg-type]
                    (
                        record.getMessage(),
                        record.pathname,
                        record.lineno,
                        record.funcName,
                        record.stack_info,
                        record.exc_info,  # its traceback keeps frames alive only until the drain
                        extra,
                    )
                ),
            )
        except Exception:
            self.handleError(record)
        finally:
            inside.active = False
