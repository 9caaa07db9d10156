"""One data dir, many processes: the owner and its forwarders (agent.forwarding).

Each scenario runs as its own python process (forking a pytest process with threads is
not something to test through), records events with a unique (worker, k) in `data`,
and checks the jsonl sink: every recorded event is there, each id once (jsonl is
at-least-once: a re-sent batch may repeat a line, but with the same id and content),
nothing counted as lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.event import Event
from agent.forwarding import wire
from tests.helpers import read_jsonl, subprocess_env

PRELUDE = """
import json, os, sys, time
import agent

CFG = {"agent": {"data_dir": "data", "id": "fw-test", "shutdown_timeout_s": 10},
       "server": {"enabled": False}, "dashboard": {"store": False},
       "sinks": {"out": {"type": "jsonl", "path": "out.jsonl", "policies": []}}}

def produce(worker, n):
    for k in range(n):
        agent.record("fw.event", k, tags={"worker": str(worker)}, data={"w": worker, "k": k})
"""


def _script(tmp_path: Path, body: str, name: str = "s.py") -> Path:
    path = tmp_path / name
    path.write_text(PRELUDE + textwrap.dedent(body))
    return path


def _run(tmp_path: Path, body: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    path = _script(tmp_path, body)
    r = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def assert_exactly_once(rows: list[dict], expected: set[tuple[int, int]]) -> None:
    """Every expected (worker, k) arrived, under one id each; repeats only of the same event."""
    by_id: dict[str, dict] = {}
    for row in rows:
        seen = by_id.setdefault(row["id"], row)
        assert seen == row, f"id {row['id']} carries two different events"
    got = [(e["data"]["w"], e["data"]["k"]) for e in by_id.values()]
    assert len(got) == len(set(got)), "an event arrived under two ids"
    assert set(got) == expected


def test_wire_frames_round_trip_and_refuse_oversize():
    e = Event(id="01a22d9e-99ae-7d8b-8233-6231e6460505", name="n", value=1.0, ts=1.0, tags={"pid": "1"})
    frame = wire.encode(wire.Batch(seq=3, events=[e], losses={"invalid": 2}))
    n = wire.frame_length(frame[:4])
    assert n == len(frame) - 4
    msg = wire.decode(frame[4:])
    assert msg == wire.Batch(seq=3, events=[e], losses={"invalid": 2})
    assert wire.decode(wire.encode(wire.Ack(seq=3))[4:]) == wire.Ack(seq=3, ok=True)
    with pytest.raises(wire.FrameError):
        wire.frame_length((wire.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(wire.FrameError):
        wire.decode(b"\xc1garbage")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_share_one_data_dir(tmp_path, method):
    """The parent owns the data dir; 4 children (fork or spawn) call agent.start() with
    the same config, become forwarders, record, flush and exit without stop()."""
    r = _run(
        tmp_path,
        f"""
        import multiprocessing as mp

        def work(worker):
            fw = agent.start(CFG)
            assert type(fw).__name__ == "Forwarder", fw
            produce(worker, 2000)
            assert agent.flush(60), "flush failed"
            # flush() means the owner's sinks confirmed: the events are in the file now.
            rows = [json.loads(l) for l in open("out.jsonl")]
            assert sum(1 for e in rows if e["tags"].get("pid") == str(os.getpid())) >= 2000
            print("child", os.getpid(), json.dumps(fw.status()), flush=True)

        if __name__ == "__main__":
            a = agent.start(CFG)
            assert type(a).__name__ == "Agent"
            ctx = mp.get_context("{method}")
            ps = [ctx.Process(target=work, args=(i,)) for i in range(4)]
            for p in ps:
                p.start()
            for p in ps:
                p.join(120)
            assert [p.exitcode for p in ps] == [0] * 4, [p.exitcode for p in ps]
            produce(99, 100)
            assert agent.flush(30)
            s = a.status()
            print(json.dumps({{"losses": s["losses"], "forwarders": s["forwarders"]}}))
            agent.stop()
        """,
    )
    rows = read_jsonl(tmp_path / "out.jsonl")
    expected = {(w, k) for w in range(4) for k in range(2000)} | {(99, k) for k in range(100)}
    assert_exactly_once(rows, expected)
    status = json.loads(r.stdout.strip().splitlines()[-1])
    assert status["losses"] == {}
    fws = status["forwarders"]
    assert len(fws) == 4 and all(f["events"] >= 2000 and f["lost"] == 0 for f in fws)
    # Who sent what: the pid tag names the producing process.
    pids = {str(f["pid"]) for f in fws}
    by_worker = {e["data"]["w"]: e["tags"]["pid"] for e in rows}
    assert {by_worker[w] for w in range(4)} == pids
    assert by_worker[99] not in pids  # the owner's own events carry its own pid


def test_children_of_a_started_agent_forward_with_no_code_change(tmp_path):
    """An agent started before fork(): each child's record() reaches the parent's
    journal without calling start(); the children exit through os._exit after a flush
    and through a normal exit (the exit hook hands over) without one."""
    r = _run(
        tmp_path,
        """
        a = agent.start(CFG)
        produce(0, 10)
        kids = []
        for w in (1, 2, 3):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    fw = agent.current()
                    assert type(fw).__name__ == "Forwarder", fw
                    assert agent.start(CFG) is fw  # idempotent, as before
                    produce(w, 1000)
                    if w == 1:
                        assert agent.flush(60)
                        os._exit(0)
                except BaseException as exc:
                    print("child failed:", repr(exc), file=sys.stderr, flush=True)
                    code = 1
                if code:
                    os._exit(code)
                sys.exit(0)  # the exit hook stops the forwarder: hands everything over
            kids.append(pid)
        for pid in kids:
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        assert agent.flush(30)
        print(json.dumps(a.status()["losses"]))
        agent.stop()
        """,
    )
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert_exactly_once(rows, {(0, k) for k in range(10)} | {(w, k) for w in (1, 2, 3) for k in range(1000)})
    pids = {e["data"]["w"]: e["tags"]["pid"] for e in rows}
    assert len(set(pids.values())) == 4


def test_forwarder_spills_when_no_owner_answers_and_the_next_owner_takes_it_in(tmp_path):
    """The owner is killed with kill -9; a forwarder that stops then cannot hand over:
    it spills to forward/spill/, and the next owner of the data dir commits the file.
    The forwarder connects to the socket explicitly (`connect`), so it does not take the
    data dir over itself (tests/test_failover.py covers that)."""
    owner = _script(
        tmp_path,
        """
        agent.start(CFG)
        print("ready", flush=True)
        sys.stdin.readline()
        """,
        "owner.py",
    )
    fw = _script(
        tmp_path,
        """
        CFG["agent"]["connect"] = "unix://" + os.path.abspath("data/forward/agent.sock")
        fw = agent.start(CFG)
        assert type(fw).__name__ == "Forwarder", fw
        produce(1, 500)
        assert agent.flush(60)  # these reached the owner
        print("flushed", flush=True)
        sys.stdin.readline()  # the owner is killed now
        produce(2, 500)
        agent.stop(2.0)
        print(json.dumps(fw.status()), flush=True)
        """,
        "fw.py",
    )
    env = subprocess_env()
    po = subprocess.Popen([sys.executable, str(owner)], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    pf = None
    try:
        assert po.stdout is not None and po.stdout.readline().strip() == "ready"
        pf = subprocess.Popen([sys.executable, str(fw)], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert pf.stdout is not None and pf.stdout.readline().strip() == "flushed"
        os.kill(po.pid, signal.SIGKILL)
        po.wait(30)
        out, err = pf.communicate("\n", timeout=60)
        assert pf.returncode == 0, err
        status = json.loads(out.strip().splitlines()[-1])
        assert status["spilled"] == 500 and status["losses"] == {}
    finally:
        for p in (po, pf):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    spills = list((tmp_path / "data" / "forward" / "spill").glob("*.msgpack"))
    assert len(spills) == 1
    r = _run(
        tmp_path,
        """
        a = agent.start(CFG)
        assert type(a).__name__ == "Agent"
        assert agent.flush(30)
        print(json.dumps(a.status()), flush=True)
        agent.stop()
        """,
    )
    status = json.loads(r.stdout.strip().splitlines()[-1])
    assert status["losses"] == {}
    assert [f["spilled"] for f in status["forwarders"]] == [500]
    assert not list((tmp_path / "data" / "forward" / "spill").glob("*"))
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert_exactly_once(rows, {(w, k) for w in (1, 2) for k in range(500)})


def _wait_file(path: Path) -> None:
    for _ in range(1200):
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_forwarder_holds_its_batches_until_it_can_take_the_data_dir_over(tmp_path):
    """Batches recorded while no owner listens wait in the forwarder (not lost, not
    refused). The lock is held by a plain process (no socket), so the forwarder cannot
    take over; once that process lets go, the forwarder takes the lock, becomes the owner
    and its waiting batches are journaled and delivered."""
    fw = _script(
        tmp_path,
        """
        import fcntl
        from tests.test_forwarding import _wait_file
        from pathlib import Path
        # Hold the lock as a plain process (no socket): the forwarder finds no owner.
        os.makedirs("data", exist_ok=True)
        fd = os.open("data/agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"1")
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(fd)
                fw = agent.start(CFG)
                assert type(fw).__name__ == "Forwarder", fw
                produce(1, 300)
                assert not agent.flush(0.5)  # nobody to hand over to
                print("recorded", flush=True)
                assert agent.flush(60)  # once the lock is free, this process owns the data dir
                a = agent.current()
                print(json.dumps({"fw": fw.status(), "role": type(a).__name__, "owner": a.status()["owner"],
                                  "losses": a.status()["losses"]}), flush=True)
                agent.stop()
            except BaseException as exc:
                print("child failed:", repr(exc), file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        _wait_file(Path("release"))
        os.close(fd)
        _, st = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(st))
        """,
        "fw.py",
    )
    pf = subprocess.Popen([sys.executable, str(fw)], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        assert pf.stdout is not None and pf.stdout.readline().strip() == "recorded"
        (tmp_path / "release").touch()
        out, err = pf.communicate(timeout=90)
        assert pf.returncode == 0, err
    finally:
        if pf.poll() is None:
            pf.kill()
            pf.wait(10)
    st = json.loads(out.strip().splitlines()[-1])
    assert st["role"] == "Agent" and st["fw"]["took_over"] is True
    assert st["fw"]["acked"] == 300 and st["fw"]["spilled"] == 0 and st["fw"]["losses"] == {}
    assert st["owner"]["took_over"] is not None and st["losses"] == {}
    assert_exactly_once(read_jsonl(tmp_path / "out.jsonl"), {(1, k) for k in range(300)})


def test_socket_and_dir_are_private(tmp_path):
    r = _run(
        tmp_path,
        """
        import stat
        agent.start(CFG)
        st = os.stat("data/forward/agent.sock")
        d = os.stat("data/forward")
        print(oct(stat.S_IMODE(st.st_mode)), oct(stat.S_IMODE(d.st_mode)), stat.S_ISSOCK(st.st_mode))
        agent.stop()
        print(os.path.exists("data/forward/agent.sock"))
        """,
    )
    lines = r.stdout.strip().splitlines()
    assert lines[-2] == "0o600 0o700 True"
    assert lines[-1] == "False"


def test_long_data_dir_paths_still_reach_the_socket(tmp_path):
    """Unix socket paths are limited to ~108 bytes; a deep data dir must still work."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    r = _run(
        tmp_path,
        f"""
        CFG["agent"]["data_dir"] = {str(deep / "data")!r}
        a = agent.start(CFG)
        pid = os.fork()
        if pid == 0:
            produce(1, 50)
            ok = agent.flush(30)
            os._exit(0 if ok else 3)
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        agent.stop()
        """,
    )
    assert r.returncode == 0
    assert_exactly_once(read_jsonl(tmp_path / "out.jsonl"), {(1, k) for k in range(50)})


def test_forwarder_record_is_bounded_like_the_owners():
    """record() on a forwarder only queues, under intake_capacity; past it, intake_full."""
    from agent.config import resolve
    from agent.forwarding.forwarder import Forwarder

    fw = Forwarder(resolve({"agent": {"data_dir": "/nonexistent", "intake_capacity": 3}, "server": {"enabled": False}}))
    for k in range(5):
        fw.record("x", k, tags={"a": "b"})
    assert len(fw.records) == 3 and fw.ledger.by_reason() == {"intake_full": 2}


def test_multiprocessing_pool_tasks_forward_every_event_once(tmp_path):
    """A fork-context Pool started after agent.start(): its workers are forwarders with
    no code change; maxtasksperchild recycles them (each exit hands over). 40 tasks of
    250 events each, close() and join(), then the owner's flush."""
    r = _run(
        tmp_path,
        """
        import multiprocessing as mp

        def task(worker):
            assert type(agent.current()).__name__ == "Forwarder"
            produce(worker, 250)
            return os.getpid()

        if __name__ == "__main__":
            a = agent.start(CFG)
            assert type(a).__name__ == "Agent"
            pool = mp.get_context("fork").Pool(4, maxtasksperchild=5)
            pids = set(pool.map(task, range(40), chunksize=1))
            pool.close()
            pool.join()  # the workers exit normally: the exit hook hands everything over
            assert len(pids) > 4, pids  # recycled
            produce(99, 10)
            assert agent.flush(30)
            s = a.status()
            print(json.dumps({"losses": s["losses"], "forwarders": s["forwarders"], "pids": sorted(pids)}))
            agent.stop()
        """,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["losses"] == {}
    # Every worker is a forwarder, those that ran tasks and the last replacements that
    # ran none (they connected, sent nothing, and exited at join()).
    fws = {f["pid"]: f for f in out["forwarders"]}
    assert set(out["pids"]) <= set(fws)
    assert all(f["lost"] == 0 and (f["events"] > 0) == (pid in out["pids"]) for pid, f in fws.items())
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert_exactly_once(rows, {(w, k) for w in range(40) for k in range(250)} | {(99, k) for k in range(10)})
    assert {e["tags"]["pid"] for e in rows if e["data"]["w"] != 99} == {str(p) for p in out["pids"]}


def test_metrics_have_per_forwarder_counters(tmp_path, free_port):
    """/metrics on the owner: per pid, events committed, batches, lost, spilled and
    whether it is connected; and totals over every forwarder. One child flushes and
    leaves (os._exit), the other stays connected while the owner scrapes itself."""
    from prometheus_client.parser import text_string_to_metric_families

    r = _run(
        tmp_path,
        f"""
        import urllib.request
        from pathlib import Path
        from tests.test_forwarding import _wait_file
        CFG["server"] = {{"enabled": True, "host": "127.0.0.1", "port": {free_port}}}
        a = agent.start(CFG)
        kids = []
        for w, n in ((1, 300), (2, 200)):
            pid = os.fork()
            if pid == 0:
                produce(w, n)
                ok = agent.flush(60)
                if w == 1:
                    os._exit(0 if ok else 3)
                Path("flushed").touch()
                _wait_file(Path("go"))
                sys.exit(0 if ok else 3)
            kids.append(pid)
        _, st = os.waitpid(kids[0], 0)
        assert os.waitstatus_to_exitcode(st) == 0
        _wait_file(Path("flushed"))
        for _ in range(600):  # until the owner saw the first child leave (bounded)
            text = urllib.request.urlopen("http://127.0.0.1:{free_port}/metrics", timeout=10).read().decode()
            if f'sidecar_agent_forwarder_connected{{{{pid="{{kids[0]}}"}}}} 0' in text:
                break
            time.sleep(0.05)
        Path("go").touch()
        _, st = os.waitpid(kids[1], 0)
        assert os.waitstatus_to_exitcode(st) == 0
        agent.stop()
        print(json.dumps({{"kids": kids, "text": text}}))
        """,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    one, two = (str(p) for p in out["kids"])
    samples: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(out["text"]):
        for s in fam.samples:
            samples[(s.name, s.labels.get("pid", ""))] = s.value
    pre = "sidecar_agent_"
    assert samples[(pre + "forwarder_events_total", one)] == 300
    assert samples[(pre + "forwarder_events_total", two)] == 200
    assert samples[(pre + "forwarder_batches_total", one)] >= 1
    assert samples[(pre + "forwarder_connected", one)] == 0
    assert samples[(pre + "forwarder_connected", two)] == 1
    for pid in (one, two):
        assert samples[(pre + "forwarder_lost_total", pid)] == 0
        assert samples[(pre + "forwarder_spilled_total", pid)] == 0
        assert samples[(pre + "forwarder_connections_total", pid)] >= 1
        assert samples[(pre + "forwarder_last_seen_timestamp_seconds", pid)] > 0
    assert samples[(pre + "forwarders_connected", "")] == 1
    assert samples[(pre + "forwarders_seen_total", "")] == 2
    assert samples[(pre + "forwarded_events_total", "")] == 500
    assert samples[(pre + "forwarded_lost_total", "")] == 0
    assert_exactly_once(read_jsonl(tmp_path / "out.jsonl"), {(1, k) for k in range(300)} | {(2, k) for k in range(200)})


def test_departed_forwarders_are_folded_into_totals():
    """Recycled workers do not grow the status and /metrics for ever: past KEEP_DEPARTED,
    the oldest forwarders whose process has exited are folded into the owner's totals."""
    from agent.forwarding import owner as owner_mod

    o = owner_mod.Owner.__new__(owner_mod.Owner)
    o.peers = {}
    o.departed = {"forwarders": 0, "events": 0, "batches": 0, "lost": 0, "spilled": 0}
    dead = []
    for _ in range(owner_mod.KEEP_DEPARTED + 5):
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        dead.append(p.pid)
    for i, pid in enumerate(dead):
        peer = owner_mod.Peer(pid)
        peer.events, peer.batches, peer.last_seen, peer.losses = 10, 1, float(i), {"invalid": 1}
        o.peers[pid] = peer
    live = owner_mod.Peer(os.getpid())  # alive and disconnected: kept (it may reconnect)
    live.events, live.last_seen = 7, -1.0
    o.peers[os.getpid()] = live
    o._prune()
    assert len(o.peers) == owner_mod.KEEP_DEPARTED + 1 and os.getpid() in o.peers
    assert set(o.peers) - {os.getpid()} == set(dead[5:])  # the most recently seen stay
    t = o.totals()
    assert t["forwarders"] == len(dead) + 1 and t["events"] == 10 * len(dead) + 7 and t["lost"] == len(dead)
    assert o.departed["forwarders"] == 5 and t["connected"] == 0


def test_embedded_stop_ends_what_it_abandoned_and_closes_its_loop(tmp_path):
    """agent.stop() on an embedded agent whose sink swallows its cancels: stop() abandons
    the sink's task past its bound (Agent.abandoned), and then the agent's loop is closed
    for good. The leftover coroutine is ended (its `finally` ran), not left pending on a
    loop nobody runs, the agent's thread is gone, and no "Task was destroyed but it is
    pending" is logged."""
    r = _run(
        tmp_path,
        """
        import asyncio, threading, types
        import agent.embed as embed
        from agent.plugin.hookspecs import hookimpl
        from agent.runtime import Agent

        class Deaf:
            sending, ended = threading.Event(), threading.Event()

            def __init__(self, name, options, ctx):
                pass

            async def start(self):
                pass

            async def send(self, events):
                Deaf.sending.set()
                try:
                    while True:
                        try:
                            await asyncio.sleep(3600)
                        except asyncio.CancelledError:
                            continue  # as a buggy plugin might
                finally:
                    Deaf.ended.set()

            async def close(self):
                pass

        plugin = types.ModuleType("deaf_plugin")

        @hookimpl
        def register_sinks(register):
            register("deaf", Deaf)

        plugin.register_sinks = register_sinks

        class WithDeaf(Agent):
            def __init__(self, cfg):
                super().__init__(cfg, plugins=[plugin])

        embed.Agent = WithDeaf
        a = agent.start({"agent": {"data_dir": "data", "shutdown_timeout_s": 0.5}, "server": {"enabled": False},
                         "dashboard": {"store": False}, "sinks": {"deaf": {"type": "deaf", "policies": []}}})
        agent.record("x", 1)
        assert Deaf.sending.wait(30)
        loop = embed._loop
        agent.stop()
        print(json.dumps({"abandoned": a.abandoned, "closed": loop.is_closed(), "ended": Deaf.ended.is_set(),
                          "threads": [t.name for t in threading.enumerate()]}), flush=True)
        """,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "sink:deaf" in out["abandoned"]
    assert out["closed"] and out["ended"], out
    assert "sidecar-agent" not in out["threads"]
    assert "Task was destroyed" not in r.stderr, r.stderr


async def test_a_new_owner_counts_only_the_losses_an_earlier_owner_had_not(tmp_path):
    """After a failover a forwarder reconnects with the loss counts an earlier owner
    acked (its Hello's `reported`); the new owner adds only what grew since, instead of
    counting that earlier owner's share (already in the shared ledger) again."""
    import asyncio

    from agent.forwarding.owner import serve_forwarders
    from tests.helpers import jsonl_sink, make_agent

    agent_ = make_agent(tmp_path / "data", {"out": jsonl_sink(tmp_path / "out.jsonl")}, server={"enabled": False},
                        dashboard={"store": False})
    await agent_.start()
    owner = await serve_forwarders(agent_)
    try:
        reader, writer = await asyncio.open_unix_connection(str(owner.path))
        writer.write(wire.encode(wire.Hello(pid=4242, reported={"intake_full": 5, "invalid": 1})))
        e = Event(id="01a22d9e-99ae-7d8b-8233-6231e6460505", name="n", value=1.0, ts=1.0, tags={"pid": "4242"})
        writer.write(wire.encode(wire.Batch(seq=1, events=[e], losses={"intake_full": 7, "invalid": 1})))
        await writer.drain()
        answers = []
        while len(answers) < 2:  # the owner's Hello, then the batch's ack (after the commit)
            n = wire.frame_length(await asyncio.wait_for(reader.readexactly(wire.HEADER.size), 30))
            answers.append(wire.decode(await reader.readexactly(n)))
        writer.close()
        assert isinstance(answers[0], wire.Hello) and answers[0].pid == os.getpid()
        assert answers[1] == wire.Ack(seq=1)
        assert agent_.ledger.by_reason() == {"intake_full": 2}
    finally:
        await owner.stop(1.0)
        await agent_.stop()
