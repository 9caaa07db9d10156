"""Every test must release what it opened: a leaked aiosqlite connection thread is
not a daemon, so it would hang the interpreter (and CI) at exit."""

from __future__ import annotations

import threading

import pytest


@pytest.fixture(autouse=True)
def _no_leaked_sqlite_threads(request):
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and "_connection_worker_thread" in t.name]
    for t in leaked:
        t.join(2.0)
    alive = [t.name for t in leaked if t.is_alive()]
    assert not alive, f"{request.node.nodeid} left SQLite connections open: {alive}"
