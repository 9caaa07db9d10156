"""Queue N tasks for examples/celery_app/tasks.py, by name (this process starts no agent).

    python send.py 100 [first] [seconds]   # celery_app.work(first) .. work(first + 99), each
                                           # sleeping `seconds` (default 0)

CELERY_BROKER_URL and SIDECAR_APP_QUEUE as for tasks.py.
"""

from __future__ import annotations

import os
import sys

from celery import Celery


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    client = Celery("celery_app", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
    queue = os.environ.get("SIDECAR_APP_QUEUE", "sidecar-example")
    for i in range(first, first + n):
        client.send_task("celery_app.work", args=[i, seconds], queue=queue)
    print(f"queued {n} tasks on {queue}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
