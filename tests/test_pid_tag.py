"""Who sent what (issue 12, item 6): every event recorded in a process carries that
process's pid as the tag `pid`, whichever way it was recorded (Agent.record, its
counter/gauge/histogram/timer, agent.record, a forwarder). The committer adds it where it
drains the intake, off the caller's thread. Events that other processes sent (HTTP
ingest, sources) are not tagged with the agent's pid: it did not produce them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.helpers import jsonl_sink, post_events, read_jsonl, start_agent, subprocess_env


async def test_agent_record_tags_the_producing_pid(tmp_path):
    agent = await start_agent(tmp_path / "data", {"out": jsonl_sink(tmp_path / "out.jsonl")})
    try:
        full = {f"t{i}": "x" for i in range(64)}  # the most tags an event may have
        agent.record("plain", 1.0)
        agent.record("tagged", 1.0, tags={"route": "/a"})
        agent.record("own.pid", 1.0, tags={"pid": "worker-7"})
        agent.record("full", 1.0, tags=full)
        agent.counter("counted")
        with agent.timer("timed"):
            pass
        (posted,) = await post_events(agent, {"name": "posted", "value": 1.0, "tags": {"route": "/b"}})
        assert await agent.flush(30)
    finally:
        await agent.stop()
    got = {e["name"]: e for e in read_jsonl(tmp_path / "out.jsonl")}
    me = str(os.getpid())
    assert got["plain"]["tags"] == {"pid": me}
    assert got["tagged"]["tags"] == {"route": "/a", "pid": me}
    assert got["own.pid"]["tags"] == {"pid": "worker-7"}  # the caller's pid is kept
    assert got["full"]["tags"] == full  # no room for a 65th tag: still a valid event
    assert got["counted"]["tags"] == {"pid": me}
    assert got["timed"]["tags"] == {"pid": me}
    assert got["posted"]["id"] == posted and got["posted"]["tags"] == {"route": "/b"}


def test_a_process_forked_before_it_started_an_agent_tags_its_own_pid(tmp_path):
    """The agent package imported in a parent, the Agent started in a child forked after
    that (a Celery pool child calling start in worker_process_init, say): the child's pid."""
    script = textwrap.dedent("""
        import asyncio, json, os, sys
        from agent.runtime import Agent

        def child():
            async def main():
                async with Agent({"agent": {"data_dir": "data", "id": "pid-test"}, "server": {"enabled": False},
                                  "dashboard": {"store": False},
                                  "sinks": {"out": {"type": "jsonl", "path": "out.jsonl", "policies": []}}}) as a:
                    a.record("from.child", 1.0)
                    assert await a.flush(30)
            asyncio.run(main())

        pid = os.fork()
        if pid == 0:
            try:
                child()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        print(json.dumps({"parent": os.getpid(), "child": pid}))
    """)
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    pids = json.loads(r.stdout.strip().splitlines()[-1])
    (event,) = read_jsonl(tmp_path / "out.jsonl")
    assert event["tags"] == {"pid": str(pids["child"])}
