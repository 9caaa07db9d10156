"""The data-dir lock between agents and offline CLI commands: a second agent is refused,
offline `flags` writes take the lock (and are refused while an agent holds the dir),
an agent starting while a CLI command holds it waits and then reads what it wrote,
and a running agent's flags are changed over HTTP, not on disk."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from agent.api.server import ServerStartError
from agent.flags import FlagService, core_flags
from agent.runtime import Agent
from agent.storage.dirlock import DataDirInUse, DataDirLock
from tests.helpers import agent_config, await_until, free_port, jsonl_sink, subprocess_env, write_toml


def lock_config(tmp_path: Path, port: int | None) -> dict:
    """One jsonl sink `out`; the HTTP server on `port`, or none."""
    return agent_config(
        tmp_path / "data",
        {"out": jsonl_sink(tmp_path / "out.jsonl")},
        agent={"shutdown_timeout_s": 1},
        server={"port": port} if port else {"enabled": False},
    )


async def start_cli(tmp_path: Path, port: int, *args: str) -> asyncio.subprocess.Process:
    """Start `sidecar-agent ARGS --config` with the agent's data dir and sink, server at `port`."""
    cfg = write_toml(tmp_path / "cli.toml", lock_config(tmp_path, port))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        *args,
        "--config",
        str(cfg),
        "--json",
        env=subprocess_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def cli(tmp_path: Path, port: int, *args: str) -> tuple[int, str, str]:
    proc = await start_cli(tmp_path, port, *args)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def overrides(tmp_path: Path) -> dict:
    path = tmp_path / "data" / "flags.json"
    return json.loads(path.read_text())["overrides"] if path.exists() else {}


async def test_a_second_agent_on_the_same_data_dir_is_refused(tmp_path):
    async with Agent(lock_config(tmp_path, None)):
        with pytest.raises(DataDirInUse, match=rf"in use by another agent \(pid {os.getpid()}\)"):
            await Agent(lock_config(tmp_path, None)).start()


async def test_offline_flags_set_is_refused_while_an_agent_without_http_holds_the_dir(tmp_path):
    async with Agent(lock_config(tmp_path, None)) as agent:
        code, _, err = await cli(tmp_path, free_port(), "flags", "set", "sinks.out.enabled", "false")
        assert code == 1
        assert f"in use by an agent (pid {os.getpid()}) that did not answer" in err
        assert overrides(tmp_path) == {}  # nothing written behind the running agent's back
        assert agent.flags.get("sinks.out.enabled") is True
        code, _, err = await cli(tmp_path, free_port(), "flags", "list")
        assert code == 1 and "did not answer" in err
    code, out, err = await cli(tmp_path, free_port(), "flags", "set", "sinks.out.enabled", "false")
    assert code == 0, err
    assert json.loads(out)["value"] is False and overrides(tmp_path) == {"sinks.out.enabled": False}


async def test_flags_set_goes_over_http_while_the_agent_runs(tmp_path):
    port = free_port()
    async with Agent(lock_config(tmp_path, port)) as agent:
        code, out, err = await cli(tmp_path, port, "flags", "set", "sinks.out.enabled", "false")
        assert code == 0, err
        assert "offline" not in json.loads(out)
        assert agent.flags.get("sinks.out.enabled") is False  # the running agent changed it
        code, out, err = await cli(tmp_path, port, "flags", "clear", "sinks.out.enabled")
        assert code == 0 and json.loads(out)["layer"] == "default"
        assert agent.flags.get("sinks.out.enabled") is True
        online = json.loads(out)
    # offline, `flags clear` answers the same way
    code, out, err = await cli(tmp_path, port, "flags", "set", "sinks.out.enabled", "false")
    assert code == 0, err
    code, out, err = await cli(tmp_path, port, "flags", "clear", "sinks.out.enabled")
    assert code == 0, err
    offline = json.loads(out)
    assert offline["cleared"] is online["cleared"] is True
    assert {k: v for k, v in offline.items() if k != "offline"} == online


async def test_an_agent_starting_while_a_cli_command_holds_the_dir_waits_and_reads_its_change(tmp_path, caplog):
    lock = await DataDirLock(tmp_path / "data", cli=True).acquire()
    assert (tmp_path / "data" / "agent.lock").read_text() == f"{os.getpid()} cli"
    agent = Agent(lock_config(tmp_path, None))
    starting = asyncio.ensure_future(agent.start())
    try:
        await await_until(lambda: "locked by a CLI command" in caplog.text, what="the agent to wait for the lock")
        assert not starting.done()
        # What `flags set` does under the lock, while the agent waits for it.
        FlagService.offline(core_flags(["out", "store"]), tmp_path / "data").set("sinks.out.enabled", False, "cli")
        lock.release()
        await starting
        assert agent.state == "running" and agent.flags.get("sinks.out.enabled") is False
    finally:
        lock.release()
        await asyncio.gather(starting, return_exceptions=True)
        await agent.stop()


async def test_an_offline_cli_command_waits_for_another_to_finish(tmp_path):
    lock = await DataDirLock(tmp_path / "data", cli=True).acquire()
    try:
        proc = await start_cli(tmp_path, free_port(), "flags", "set", "sinks.out.enabled", "false")
        line = await proc.stderr.readline()
        assert b"locked by a CLI command" in line, line
        assert overrides(tmp_path) == {}  # it waits instead of writing
    finally:
        lock.release()
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert overrides(tmp_path) == {"sinks.out.enabled": False}


async def test_a_failed_start_is_reported_as_failed_and_holds_nothing(tmp_path):
    """A start that raises early (the data dir is taken; a config error) says "failed",
    stop() is a no-op, and the dir and port are usable once freed."""
    first = await Agent(lock_config(tmp_path, None)).start()
    port = free_port()
    second = Agent(lock_config(tmp_path, port))
    with pytest.raises(DataDirInUse):
        await second.start()
    assert second.state == "failed"
    await second.stop()  # nothing to do, returns at once
    assert second.state == "failed"
    await first.stop()
    third = await Agent(lock_config(tmp_path, port)).start()  # the dir and the port are free
    assert third.state == "running" and third.server_url
    await third.stop()
    # a config error (before anything opened) is a failed start too
    bad = Agent({**lock_config(tmp_path, None), "sinks": {"x": {"type": "no-such-sink"}}})
    with pytest.raises(Exception, match="no-such-sink"):
        await bad.start()
    assert bad.state == "failed"


async def test_events_recorded_around_a_start_that_fails_late_are_journaled_or_counted(tmp_path, monkeypatch):
    """A start that raises after the committer and the sinks run (here: the last step,
    the HTTP server, is made to fail) journals what was recorded before, counts what is
    recorded after as start_failed, saves the ledger and releases the data dir."""

    async def broken_server(self):
        raise RuntimeError("injected: the server could not start")

    cfg = lock_config(tmp_path, free_port())
    good_sink = cfg["sinks"]["out"]
    cfg["sinks"] = {"out": {"type": "hang", "policies": []}}  # nothing leaves the journal meanwhile
    from tests import plugins_for_tests

    failing = Agent(cfg, plugins=[plugins_for_tests])
    for i in range(10):
        failing.record("early", float(i))
    with monkeypatch.context() as m:
        m.setattr(Agent, "_start_server", broken_server)
        with pytest.raises(RuntimeError, match="injected"):
            await failing.start()
    assert failing.state == "failed" and not failing._tasks
    failing.record("late", 1.0)
    failing.record("late", 2.0)
    assert failing.ledger.snapshot() == {("start_failed", ""): 2}
    with pytest.raises(RuntimeError, match="make a new Agent"):
        await failing.start()
    # the dir is free, and the ten early events were journaled: the next start delivers them
    cfg["sinks"] = {"out": good_sink}
    async with Agent(cfg) as agent:
        assert await agent.flush(5)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(e["value"] for e in lines if e["name"] == "early") == [float(i) for i in range(10)]


async def test_a_journal_write_cut_off_by_a_failed_start_is_counted(tmp_path, monkeypatch):
    """The drain of a failed start has a deadline: a write still running then (a stalled
    disk, here a write that takes 5 s) is abandoned, and its events are counted."""
    from agent.pipeline.journal import Journal

    async def broken_server(self):
        raise RuntimeError("injected: the server could not start")

    real_append = Journal.append

    async def stalled_append(self, events):
        await asyncio.sleep(5)
        await real_append(self, events)

    cfg = lock_config(tmp_path, free_port())
    cfg["agent"]["shutdown_timeout_s"] = 0.3
    failing = Agent(cfg)
    for i in range(10):
        failing.record("stalled", float(i))
    monkeypatch.setattr(Agent, "_start_server", broken_server)
    monkeypatch.setattr(Journal, "append", stalled_append)
    with pytest.raises(RuntimeError, match="injected"):
        await failing.start()
    assert failing.ledger.snapshot() == {("start_failed", ""): 10}


async def test_a_port_in_use_fails_the_start_of_a_sidecar(tmp_path):
    """`sidecar-agent run` needs its server: a taken port is a failed start, not a stop."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = Agent(lock_config(tmp_path, port), require_server=True)
        agent.record("early", 1.0)
        with pytest.raises(ServerStartError, match=r"cannot listen on 127\.0\.0\.1:\d+ \(server\.host, server\.port\)"):
            await agent.start()
    assert agent.state == "failed" and "cannot listen" in agent.server_error
    agent.record("late", 1.0)
    assert agent.ledger.snapshot() == {("start_failed", ""): 1}  # "early" was journaled
    async with Agent(lock_config(tmp_path, None)) as again:  # the dir was released
        assert await again.flush(5)
    assert [json.loads(line)["name"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == ["early"]
