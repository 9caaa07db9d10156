"""A Celery app that embeds the agent; its tasks record events.

    cd examples/celery_app
    celery -A tasks worker --pool=prefork --concurrency=4     # the worker (Redis broker)
    python send.py 100                                         # queue 100 tasks

By default this module calls `agent.start()` at import. Celery's worker imports it in
its main process, so that process owns the data dir (journal, sinks, HTTP server). Each
pool child is forked after that and gets a forwarder from the at-fork hook, with no code
in the child. With SIDECAR_APP_START_IN=child, the agent is started in each pool child
instead (`worker_process_init`): the first child owns the data dir and the others forward.

Either way no other line is needed. A pool child ends with `os._exit()`, which skips the
interpreter's exit hooks; the agent connects Celery's `worker_process_shutdown` signal
itself (agent/celery_hook.py), so each child hands its events over before it exits. Each
event carries the pid of the child that ran the task in the tag `pid`. See
docs/multiprocess.md.

CELERY_BROKER_URL (default redis://127.0.0.1:6379/0), SIDECAR_APP_QUEUE,
SIDECAR_APP_DATA_DIR and SIDECAR_APP_JSONL (used by the tests) choose the broker, the
queue, the data dir and the jsonl file; without them it uses ./celery-agent-data and
./celery-events.jsonl and no HTTP server.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, signals

import agent

app = Celery("celery_app", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_default_queue=os.environ.get("SIDECAR_APP_QUEUE", "sidecar-example"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

CONFIG = {
    "agent": {"data_dir": os.environ.get("SIDECAR_APP_DATA_DIR", "celery-agent-data"), "id": "celery-app"},
    "server": {"enabled": False},
    "dashboard": {"store": False},
    "sinks": {
        "out": {"type": "jsonl", "path": os.environ.get("SIDECAR_APP_JSONL", "celery-events.jsonl"), "policies": []}
    },
}


@signals.worker_process_init.connect
def _start_in_child(**_: Any) -> None:
    if os.environ.get("SIDECAR_APP_START_IN") == "child":
        agent.start(CONFIG)


# No `worker_process_shutdown` handler calling agent.stop() is needed: a pool child exits
# with os._exit(), but agent.start() (and the at-fork hook) connect that signal to stop()
# themselves whenever Celery is loaded, so the child hands its events over first.


if os.environ.get("SIDECAR_APP_START_IN") != "child":
    agent.start(CONFIG)


@app.task(name="celery_app.work")
def work(i: int, seconds: float = 0.0) -> int:
    """One unit of work (`seconds` long): records one event (a deque append) and returns
    the pid of the process that ran it."""
    time.sleep(seconds)
    agent.record("celery.task", 1, kind="counter", data={"i": i})
    return os.getpid()
