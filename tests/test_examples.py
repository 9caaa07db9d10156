"""The runnable examples run and their events reach the sink (stdout)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT, subprocess_env


def _run(tmp_path, *args):
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def test_asyncio_app(tmp_path):
    events = _run(tmp_path, str(ROOT / "examples" / "asyncio_app.py"))
    names = [e["name"] for e in events]
    assert names.count("orders.placed") == 20 and names.count("request.seconds") == 20


def test_wsgi_app(tmp_path, free_port):
    events = _run(tmp_path, str(ROOT / "examples" / "wsgi_app.py"), str(free_port))
    routes = sorted(e["tags"]["route"] for e in events if e["name"] == "http.requests")
    assert routes == ["/", "/a", "/b"]
    assert sum(e["name"] == "http.request.seconds" for e in events) == 3
