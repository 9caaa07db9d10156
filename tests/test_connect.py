"""`[agent] connect` (issue 12, item 5): a process that only forwards, to a separately run
`sidecar-agent run` (the sidecar), over its Unix socket (`[agent] listen`, e.g. a volume
shared in a pod) or its HTTP ingest (msgpack batches, the token sent).

Two client processes start before the sidecar: their events wait (flush() is False),
then the sidecar starts, they re-send and flush; every event arrives once in the
sidecar's jsonl sink, the sidecar's ledger is empty, and the clients never took a
data-dir lock or became owners.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import losses_in_db, read_jsonl, spawn, subprocess_env, wait_healthy, write_toml
from tests.test_forwarding import assert_exactly_once

TOKEN = "s3cret-token"
N = 1500

CLIENT = """
import json, os, sys
from pathlib import Path
import agent
from tests.test_forwarding import _wait_file

W, ADDR, TOKEN, N = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
CFG = {"agent": {"data_dir": f"client-{W}", "id": f"client-{W}", "connect": ADDR},
       "server": {"enabled": False, "token": TOKEN}, "dashboard": {"store": False}}

def produce(lo, hi):
    for k in range(lo, hi):
        agent.record("client.event", k, tags={"worker": str(W)}, data={"w": W, "k": k})

fw = agent.start(CFG)
assert type(fw).__name__ == "Forwarder", fw
produce(0, N // 2)
assert not agent.flush(0.5)  # no sidecar yet: the events wait
print("waiting", flush=True)
_wait_file(Path("sidecar-up"))
produce(N // 2, N)
ok = agent.flush(60)
print(json.dumps({"ok": ok, "pid": os.getpid(), "role": type(agent.current()).__name__, "fw": fw.status(),
                  "locked": os.path.exists(f"client-{W}/agent.lock")}), flush=True)
agent.stop()
"""


@pytest.mark.parametrize("mode", ["unix", "http"])
async def test_clients_forward_to_a_sidecar_exactly_once(tmp_path: Path, free_port: int, mode: str) -> None:
    sock = tmp_path / "shared" / "agent.sock"
    cfg = write_toml(tmp_path / "sidecar.toml", {
        "agent": {"data_dir": str(tmp_path / "sidecar"), "id": "sidecar", "listen": f"unix://{sock}",
                  "commit_interval_ms": 2},
        "server": {"host": "127.0.0.1", "port": free_port, "token": TOKEN},
        "dashboard": {"store": False},
        "sinks": {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": []}},
    })
    addr = f"unix://{sock}" if mode == "unix" else f"http://127.0.0.1:{free_port}"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENT))
    clients = [subprocess.Popen([sys.executable, str(script), str(w), addr, TOKEN, str(N)], cwd=tmp_path,
                                env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for w in (1, 2)]
    sidecar = None
    try:
        for c in clients:
            assert c.stdout is not None
            line = c.stdout.readline().strip()
            assert line == "waiting", c.stderr.read() if c.stderr else ""
        sidecar = spawn(cfg, tmp_path / "sidecar.log")
        await wait_healthy(free_port, sidecar, tmp_path / "sidecar.log")
        (tmp_path / "sidecar-up").touch()
        views = []
        for c in clients:
            out, err = c.communicate(timeout=120)
            assert c.returncode == 0, err
            assert "Traceback" not in err, err
            views.append(json.loads(out.strip().splitlines()[-1]))
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(60) == 0, (tmp_path / "sidecar.log").read_text()
    finally:
        for p in [*clients, sidecar]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    for v in views:
        assert v["ok"] and v["role"] == "Forwarder" and not v["locked"], v
        fw = v["fw"]
        assert fw["address"] == addr and fw["took_over"] is False
        assert fw["acked"] == N and fw["spilled"] == 0 and fw["losses"] == {}
        assert fw["owner_pid"] == (sidecar.pid if mode == "unix" else None)
    assert_exactly_once(read_jsonl(tmp_path / "out.jsonl"), {(w, k) for w in (1, 2) for k in range(N)})
    assert losses_in_db(tmp_path / "sidecar" / "agent.db") == {}
    assert not sock.exists()  # the sidecar removed its socket at stop


SPILLER = """
import json, os, sys
import agent

ADDR, TOKEN, W, N, STOP = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
fw = agent.start({"agent": {"data_dir": "client", "id": "client", "connect": ADDR},
                  "server": {"enabled": False, "token": TOKEN}, "dashboard": {"store": False}})
for k in range(N):
    agent.record("client.event", k, data={"w": W, "k": k})
ok = agent.flush(STOP) if STOP > 1 else False
agent.stop(STOP)
print(json.dumps({"ok": ok, "fw": fw.status()}), flush=True)
"""


async def test_an_http_forwarders_spill_is_sent_by_the_next_one_on_its_data_dir(tmp_path, free_port):
    """connect = http://: no sidecar reads the forwarder's own spill dir. A forwarder that
    stops while the sidecar is down spills there; the next forwarder started on that
    data dir claims the file, sends its events (same ids) before its own, and removes
    it once they are acked."""
    cfg = write_toml(tmp_path / "sidecar.toml", {
        "agent": {"data_dir": str(tmp_path / "sidecar"), "id": "sidecar", "commit_interval_ms": 2},
        "server": {"host": "127.0.0.1", "port": free_port, "token": TOKEN},
        "dashboard": {"store": False},
        "sinks": {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": []}},
    })
    script = tmp_path / "spiller.py"
    script.write_text(textwrap.dedent(SPILLER))
    addr = f"http://127.0.0.1:{free_port}"

    def client(w: int, n: int, stop: float) -> dict:
        r = subprocess.run([sys.executable, str(script), addr, TOKEN, str(w), str(n), str(stop)], cwd=tmp_path,
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = client(1, 300, 0.5)  # no sidecar: everything is spilled
    assert first["fw"]["spilled"] == 300 and first["fw"]["losses"] == {}
    spill_dir = tmp_path / "client" / "forward" / "spill"
    assert len(list(spill_dir.glob("*.msgpack"))) == 1
    sidecar = spawn(cfg, tmp_path / "sidecar.log")
    try:
        await wait_healthy(free_port, sidecar, tmp_path / "sidecar.log")
        second = client(2, 200, 60.0)
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(60) == 0, (tmp_path / "sidecar.log").read_text()
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait(10)
    assert second["ok"] and second["fw"]["acked"] == 500 and second["fw"]["spilled"] == 0
    assert not list(spill_dir.iterdir())
    expected = {(1, k) for k in range(300)} | {(2, k) for k in range(200)}
    assert_exactly_once(read_jsonl(tmp_path / "out.jsonl"), expected)
    assert losses_in_db(tmp_path / "sidecar" / "agent.db") == {}
