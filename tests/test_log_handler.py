"""agent.LogHandler: log records as events through a real agent, the agent's own logging
never fed back, tracebacks formatted off the caller's thread, the module-level agent
before start() and after fork(), and the structlog example."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import traceback

import pytest

import agent
from agent.log_handler import LogHandler
from tests.helpers import ROOT, await_until, jsonl_sink, read_jsonl, start_agent, subprocess_env


@pytest.fixture
def app_log():
    """A logger of the app's, with no handlers of its own left behind."""
    log = logging.getLogger("test_app.orders")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)


async def _logged(tmp_path, agent_, n: int) -> list[dict]:
    assert await agent_.flush(10)
    return await await_until(lambda: len(events := read_jsonl(tmp_path / "out.jsonl")) >= n and events,
                             what=f"{n} log events in the sink")


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque 7>"


async def test_records_become_events_with_level_logger_message_exception_and_extra(tmp_path, app_log):
    a = await start_agent(tmp_path / "data", sinks={"out": jsonl_sink(tmp_path / "out.jsonl")},
                          dashboard={"store": False})
    try:
        app_log.addHandler(LogHandler(logging.INFO, agent=a))
        app_log.debug("below the handler's level")
        app_log.info("order %s placed for %.2f", "A-1", 9.5,
                     extra={"order_id": 42, "user": "ann", "obj": Opaque(), "ratio": float("nan"), "big": 1 << 70})
        try:
            {}["missing"]
        except KeyError:
            app_log.exception("lookup failed", extra={"where": "an extra cannot replace the record's own keys"})
        app_log.warning("with a stack", stack_info=True)
        events = await _logged(tmp_path, a, 3)
    finally:
        await a.stop()
    info, error, warning = events
    assert (info["name"], info["kind"], info["value"], info["source"]) == ("log", "event", None, "app")
    assert {k: v for k, v in info["tags"].items() if k != "pid"} == {"level": "info", "logger": "test_app.orders"}
    d = info["data"]
    assert d["message"] == "order A-1 placed for 9.50"
    assert (d["order_id"], d["user"], d["obj"], d["ratio"], d["big"]) == (42, "ann", "<Opaque 7>", "nan",
                                                                          str(1 << 70))
    assert d["where"].endswith("test_log_handler.py:" + d["where"].rsplit(":", 1)[1]) and d["func"].startswith("test_")
    assert "exception" not in d
    assert error["tags"]["level"] == "error" and error["data"]["message"] == "lookup failed"
    assert error["data"]["where"] != "an extra cannot replace the record's own keys"
    exc = error["data"]["exception"]
    assert exc.startswith("Traceback (most recent call last):") and exc.endswith("KeyError: 'missing'")
    assert warning["data"]["stack"].startswith("Stack (most recent call last):")
    assert a.ledger.total() == 0


async def test_the_agents_own_logging_and_threads_are_never_recorded(tmp_path, app_log):
    a = await start_agent(tmp_path / "data", sinks={"out": jsonl_sink(tmp_path / "out.jsonl")},
                          dashboard={"store": False})
    root = logging.getLogger()
    handler = LogHandler(agent=a)
    root.addHandler(handler)
    try:
        for name in ("agent", "agent.runtime", "sidecar_agent", "sidecar_agent.intake"):
            logging.getLogger(name).warning("own")
        t = threading.Thread(target=lambda: logging.getLogger("test_app.lib").warning("own thread"),
                             name="sidecar-agent-worker")
        t.start()
        t.join()
        logging.getLogger("agentx").warning("not ours")  # a prefix of a name is not the name
        logging.getLogger("test_app.lib").warning("app")
        events = await _logged(tmp_path, a, 2)
    finally:
        root.removeHandler(handler)
        await a.stop()
    assert [(e["tags"]["logger"], e["data"]["message"]) for e in events] == [("agentx", "not ours"),
                                                                            ("test_app.lib", "app")]


def test_a_record_logged_while_recording_does_not_recurse(app_log):
    class Recorder:
        """An agent whose record() logs (as a buggy sink or a wrapper could)."""

        calls = 0

        def record(self, *a, **kw) -> None:
            self.calls += 1
            app_log.error("logged from inside record()")

    r = Recorder()
    app_log.addHandler(LogHandler(agent=r))
    app_log.warning("once")
    assert r.calls == 1
    app_log.warning("and again")
    assert r.calls == 2  # the guard was released


async def test_tracebacks_are_formatted_off_the_callers_thread(tmp_path, app_log, monkeypatch):
    formatted_on: list[str] = []
    real = traceback.format_exception

    def spy(*args, **kw):
        formatted_on.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(traceback, "format_exception", spy)
    a = await start_agent(tmp_path / "data", sinks={"out": jsonl_sink(tmp_path / "out.jsonl")},
                          dashboard={"store": False})
    caller: list[str] = []

    def work() -> None:
        caller.append(threading.current_thread().name)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            app_log.exception("failed")
        assert formatted_on == []  # nothing formatted before the call returned

    try:
        app_log.addHandler(LogHandler(agent=a))
        t = threading.Thread(target=work, name="app-request-1")
        t.start()
        t.join()
        (event,) = await _logged(tmp_path, a, 1)
    finally:
        await a.stop()
    assert event["data"]["exception"].endswith("RuntimeError: boom")
    assert formatted_on and caller[0] not in formatted_on


def test_the_process_wide_agent_before_start_and_in_a_forked_child(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import logging, os, sys
        import agent

        log = logging.getLogger("app")
        log.addHandler(agent.LogHandler())
        log.setLevel(logging.INFO)
        log.info("before start")  # like record(): counted as not_started
        a = agent.start({"agent": {"data_dir": "data"}, "server": {"enabled": False},
                         "sinks": {"out": {"type": "jsonl", "path": "out.jsonl", "policies": []}}})
        log.info("parent")
        pid = os.fork()
        if pid == 0:
            log.info("child")
            ok = agent.flush(10)
            agent.stop()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert agent.flush(10)
        print(a.ledger.by_reason())
        agent.stop()
        print(pid)
        sys.exit(os.waitstatus_to_exitcode(status))
    """))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    losses, child_pid = r.stdout.split("\n")[:2]
    assert losses == "{'not_started': 1}"
    events = {e["data"]["message"]: e for e in read_jsonl(tmp_path / "out.jsonl")}
    assert sorted(events) == ["child", "parent"]
    assert events["child"]["tags"]["pid"] == child_pid != events["parent"]["tags"]["pid"]


def test_the_structlog_example(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "structlog_app.py")], cwd=tmp_path,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    placed = [e for e in events if e["data"]["message"] == "order placed"]
    assert [(e["data"]["order_id"], e["data"]["currency"]) for e in placed] == [(0, "EUR"), (1, "EUR"), (2, "EUR")]
    (failed,) = [e for e in events if e["tags"]["level"] == "error"]
    assert failed["data"]["order_id"] == 3
    assert failed["data"]["exception"].endswith("ZeroDivisionError: division by zero")
    assert agent.LogHandler is LogHandler
