"""structlog logs as agent events: structlog renders into the standard library's logging,
and agent.LogHandler records each log record (its key-values become the event's data).

    .venv/bin/pip install structlog
    .venv/bin/python examples/structlog_app.py  # prints what the jsonl sink writes
"""

from __future__ import annotations

import logging

import structlog

import agent

CONFIG = {
    "agent": {"data_dir": ".sidecar-agent-example"},
    "server": {"enabled": False},
    "sinks": {"stdout": {"type": "jsonl", "path": "-", "policies": []}},
}


def configure_logging() -> None:
    """structlog -> logging -> agent.LogHandler. render_to_log_kwargs passes the event's
    key-values as logging's `extra`, which the handler keeps as the event's data."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(agent.LogHandler(logging.INFO))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.render_to_log_kwargs,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def main() -> None:
    agent.start(CONFIG)
    configure_logging()
    log = structlog.get_logger("shop")
    for order in range(3):
        log.info("order placed", order_id=order, amount=9.5 * (order + 1), currency="EUR")
    try:
        1 / 0  # noqa: B018 - an error to log
    except ZeroDivisionError:
        log.exception("payment failed", order_id=3)
    agent.flush()
    agent.stop()


if __name__ == "__main__":
    main()
