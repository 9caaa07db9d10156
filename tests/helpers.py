"""The one module of helpers shared by the tests.

Servers and emulators the tests run against are fixtures, not helpers, and keep their
own modules (supabase_emulator.py, faultserver.py, http_sink.py, plugins_for_tests.py).

- child processes: `subprocess_env`, `run_cli`, `spawn_agent`, `wait_http`;
- waiting: `wait_until` (sync, polls) and `await_until` (async, polls inside the loop);
  both return the predicate's first truthy value and fail naming `what`;
- agents: `agent_config`, `jsonl_sink`, `make_agent`, `start_agent`, `write_toml`, `free_port`;
- HTTP: `post_events` (202 asserted, ids returned) and `post_raw` (any answer);
- reading back: `read_jsonl`, `journal_events`, `journal_ids`, `losses_in_db`;
- sink unit tests: `make_ctx`, `make_events`;
- config errors: `plan_error`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

if TYPE_CHECKING:
    import aiohttp

    from agent.event import Event
    from agent.plugin.base import PluginContext
    from agent.runtime import Agent

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


# -- child processes -------------------------------------------------------------------


def subprocess_env(extra_path: list[str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child python: this tree (then extra_path) first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(extra_path or [])])
    env.update(extra)
    return env


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None, timeout: float = 60,
            extra_path: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `sidecar-agent ARGS` (as `python -m agent.cli`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=cwd, env=subprocess_env(extra_path),
                          capture_output=True, text=True, timeout=timeout)


def spawn_agent(config: str | os.PathLike[str], cwd: str | os.PathLike[str],
                extra_path: list[str] | None = None) -> subprocess.Popen[str]:
    """Start `sidecar-agent run --config FILE` as a child process (stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=cwd,
                            env=subprocess_env(extra_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_http(url: str, proc: subprocess.Popen[str] | None = None, timeout: float = 30) -> Any:
    """Poll a URL until it answers 200; return the decoded JSON body."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read())
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s: {last}")


# -- waiting ---------------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], timeout: float = 20, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll `predicate()` (blocking) until it is truthy; return that value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def await_until(predicate: Callable[[], T], timeout: float = 20, what: str = "condition",
                      interval: float = 0.01) -> T:
    """Poll `predicate()` without blocking the event loop until it is truthy; return that
    value or fail naming `what`. The timeout is a generous bound, never the behaviour tested."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# -- agents ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl_sink(path: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """A `[sinks.NAME]` table: a jsonl file, no policies."""
    return {"type": "jsonl", "path": str(path), "policies": [], **options}


def agent_config(data_dir: Path, sinks: dict[str, dict[str, Any]] | None = None, **sections: Any) -> dict[str, Any]:
    """A config dict: `data_dir`, a 2 ms commit interval, the server on an ephemeral port,
    the given sinks (`policies = []` unless they say otherwise), no heartbeats. `agent=` and `server=`
    are merged into those defaults; other sections (`sources`, `dashboard`, ...) are used as given."""
    cfg: dict[str, Any] = {
        # No heartbeats unless a test asks: a test that runs past heartbeat_s and compares a
        # sink's whole contents would otherwise see one event it did not record.
        "agent": {"data_dir": str(data_dir), "commit_interval_ms": 2, "heartbeat_s": 0, **sections.pop("agent", {})},
        "server": {"port": 0, **sections.pop("server", {})},
        "sinks": {n: {"policies": [], **t} for n, t in (sinks or {}).items()},
    }
    cfg.update(sections)
    return cfg


def make_agent(data_dir: Path, sinks: dict[str, dict[str, Any]] | None = None, **sections: Any) -> Agent:
    """An Agent (not started) on `agent_config(...)`, with the test sinks of plugins_for_tests loaded."""
    from agent.runtime import Agent
    from tests import plugins_for_tests

    return Agent(agent_config(data_dir, sinks, **sections), plugins=[plugins_for_tests])


async def start_agent(data_dir: Path, sinks: dict[str, dict[str, Any]] | None = None, **sections: Any) -> Agent:
    """`make_agent(...)`, started, with its HTTP server up (the caller stops it)."""
    agent = make_agent(data_dir, sinks, **sections)
    await agent.start()
    assert agent.server_url, agent.server_error
    return agent


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def write_toml(path: Path, cfg: dict[str, Any]) -> Path:
    """Write a config dict (as `agent_config` makes) as a TOML file for a child process.
    Top-level tables become `[section]`, `sinks`/`sources` entries `[sinks.NAME]`."""
    lines: list[str] = []
    for section, table in cfg.items():
        plain = {k: v for k, v in table.items() if not (section in ("sinks", "sources") and isinstance(v, dict))}
        lines.append(f"[{section}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in plain.items()]
        for name, sub in table.items():
            if section in ("sinks", "sources") and isinstance(sub, dict):
                lines.append(f"[{section}.{json.dumps(name)}]")
                lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in sub.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- HTTP ------------------------------------------------------------------------------


class Answer(NamedTuple):
    """What the server answered: `status, body, headers = await post_raw(...)` works too."""

    status: int
    body: Any  # decoded JSON, or the text when it is not JSON
    headers: Any


async def post_raw(agent: Agent, data: Any, *, content_type: str | None = None, headers: dict[str, str] | None = None,
                   session: aiohttp.ClientSession | None = None, path: str = "/api/v1/events") -> Answer:
    """POST to the agent's server: `data` as bytes with `content_type`, or anything else as JSON."""
    import aiohttp

    async def go(s: aiohttp.ClientSession) -> Answer:
        kw: dict[str, Any] = {"headers": dict(headers or {})}
        if isinstance(data, bytes):
            kw["data"] = data
            if content_type:
                kw["headers"]["Content-Type"] = content_type
        else:
            kw["json"] = data
        async with s.post(agent.server_url + path, **kw) as r:
            text = await r.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            return Answer(r.status, body, r.headers)

    if session is not None:
        return await go(session)
    async with aiohttp.ClientSession() as s:
        return await go(s)


async def post_events(agent: Agent, events: list[dict[str, Any]] | dict[str, Any], *,
                      session: aiohttp.ClientSession | None = None) -> list[str]:
    """POST events as JSON; assert the 202 (given only after the journal commit) and return their ids."""
    answer = await post_raw(agent, events, session=session)
    assert answer.status == 202, answer.body
    return answer.body["ids"]


# -- reading back ----------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line of a jsonl sink's file, decoded. The sink writes a batch with one
    os.write in a thread, which a poll may catch half done: a last line without its newline
    is still being written and is left for the next read (every complete line must decode)."""
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    return [json.loads(line) for line in raw[: raw.rfind(b"\n") + 1].splitlines() if line.strip()]


def journal_events(db_path: Path) -> list[Event]:
    """Events stored in the journal's segments, read through a separate sqlite3 connection."""
    import msgspec

    from agent.event import Event

    dec = msgspec.msgpack.Decoder(list[Event])
    with sqlite3.connect(db_path) as conn:
        return [e for (b,) in conn.execute("SELECT body FROM journal ORDER BY seq") for e in dec.decode(b)]


def journal_ids(db_path: Path) -> list[str]:
    """Event ids in the journal, in order."""
    return [e.id for e in journal_events(db_path)]


def losses_in_db(db_path: Path) -> dict[tuple[str, str], int]:
    """The loss ledger as stored: {(reason, sink): count} for non-zero counts."""
    with sqlite3.connect(db_path) as conn:
        return {(r, s): n for r, s, n in conn.execute("SELECT reason, sink, count FROM losses") if n}


# -- sink unit tests -------------------------------------------------------------------


def make_ctx(name: str = "test", data_dir: Path = Path(".")) -> PluginContext:
    """A PluginContext for a sink built by hand."""
    from agent.plugin.base import PluginContext

    return PluginContext(name=name, agent_id="agent-1", data_dir=data_dir, log=logging.getLogger(f"test.{name}"),
                         emit=lambda events: None)


def make_events(n: int, **overrides: object) -> list[Event]:
    """`n` gauge events "cpu.percent" with values 0..n-1, distinct ids, tags and data."""
    from agent.event import Event, new_ids

    now = time.time()
    return [
        Event(id=i, name="cpu.percent", kind="gauge", value=float(k), ts=now + k * 0.001,
              tags={"host": "h1", "k": str(k)}, source="system", agent_id="agent-1", data={"k": k},
              **overrides)  # type: ignore[arg-type]
        for k, i in enumerate(new_ids(n))
    ]


# -- config errors ---------------------------------------------------------------------


def plan_error(tmp_path: Path, toml: str) -> str:
    """The ConfigError message that loading and planning `toml` (as agent.toml) gives."""
    import pytest

    from agent.config import load
    from agent.errors import ConfigError
    from agent.plan import plan
    from agent.plugin.host import PluginHost

    p = tmp_path / "agent.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as err:
        cfg = load(p)
        plan(cfg, PluginHost(cfg.plugins).load())
    return str(err.value)


# -- an agent in its own process -------------------------------------------------------


def spawn(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """`sidecar-agent run --config cfg` in a child process, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)


async def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the spawned agent answers /healthz on `port`; fail with its log if it exits."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(1200):
            if proc.poll() is not None:
                raise AssertionError(f"agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.025)
    raise AssertionError("agent did not come up")
