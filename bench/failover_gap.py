"""How long a data dir has no owner after its owner is killed (failover), against the
baseline of starting an owner in a fresh process, in one run.

    PYTHONPATH=. python bench/failover_gap.py [--rounds 5] [--forwarders 3]

Each round: a fresh data dir; an owner process (agent.start(): jsonl sink, no server, no
history store); F forwarder processes recording 2,000 events/s each; kill -9 of the
owner. Reported per round: the new owner's gap (from its forwarder losing the old owner
to its own listener being up: `status()["owner"]["took_over"]["gap_s"]`), the other
forwarders' gap (from losing the old owner to being connected to the new one:
`last_failover_gap_s`), and the events lost (the ledger; must be 0). Baseline: the
seconds `agent.start()` takes to return an owner in a fresh process on a fresh data dir,
measured in each round before the kill; the ratio says what failover adds to an owner's
own start (noticing the loss, the lock, the reconnects).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

COMMAND = "PYTHONPATH=. python bench/failover_gap.py"

CFG = """
import json, os, sys, time
from pathlib import Path
import agent
CFG = {"agent": {"data_dir": "data", "id": "bench"}, "server": {"enabled": False}, "dashboard": {"store": False},
       "sinks": {"out": {"type": "jsonl", "path": os.devnull, "policies": []}}}
"""

OWNER = (
    CFG
    + """
t0 = time.perf_counter()
a = agent.start(CFG)
print(json.dumps({"start_s": time.perf_counter() - t0}), flush=True)
sys.stdin.readline()
"""
)

FORWARDER = (
    CFG
    + """
fw = agent.start(CFG)
print("up", flush=True)
end = time.monotonic() + 120
while not (Path("gone").exists() and (fw.owner.owner_changes or fw.owner.took_over)) and time.monotonic() < end:
    for _ in range(20):
        agent.record("bench.event", 1.0)
    time.sleep(0.01)
ok = agent.flush(60)
cur = agent.current()
out = {"ok": ok, "gap_s": fw.owner.last_failover_gap_s, "took_over": fw.owner.took_over}
if type(cur).__name__ == "Agent":
    st = cur.status()
    out["owner_gap_s"] = st["owner"]["took_over"]["gap_s"]
    out["lost"] = sum(st["losses"].values())
print(json.dumps(out), flush=True)
sys.stdin.readline()
agent.stop()
"""
)


def _proc(code: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), *sys.path]))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise SystemExit(f"process {p.pid} ended early ({p.wait()})")
    return line.strip()


def one_round(forwarders: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d)
        owner = _proc(OWNER, cwd)
        fws: list[subprocess.Popen[str]] = []
        try:
            start_s = json.loads(_line(owner))["start_s"]
            fws = [_proc(FORWARDER, cwd) for _ in range(forwarders)]
            for p in fws:
                assert _line(p) == "up"
            time.sleep(0.5)  # traffic flows
            os.kill(owner.pid, signal.SIGKILL)
            owner.wait()
            (cwd / "gone").touch()
            views = [json.loads(_line(p)) for p in fws]
            for p in fws:
                assert p.stdin is not None
                p.stdin.write("\n")
                p.stdin.flush()
            for p in fws:
                p.wait(60)
        finally:
            for p in [owner, *fws]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    new = [v for v in views if v["took_over"]]
    assert len(new) == 1 and all(v["ok"] for v in views), views
    others = [v["gap_s"] for v in views if not v["took_over"]]
    return {
        "start_s": start_s,
        "owner_gap_s": new[0]["owner_gap_s"],
        "reconnect_s": max(others),
        "lost": new[0]["lost"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--forwarders", type=int, default=3)
    args = ap.parse_args()
    rows = [one_round(args.forwarders) for _ in range(args.rounds)]
    print(f"$ {COMMAND} --rounds {args.rounds} --forwarders {args.forwarders}  (load average {os.getloadavg()[0]:.1f})")
    print("| round | owner start, s (baseline) | new owner's gap, s | ratio | others reconnected, s | lost |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        print(
            f"| {i} | {r['start_s']:.3f} | {r['owner_gap_s']:.3f} | {r['owner_gap_s'] / r['start_s']:.2f}x "
            f"| {r['reconnect_s']:.3f} | {r['lost']:.0f} |"
        )
    med = {k: statistics.median(r[k] for r in rows) for k in ("start_s", "owner_gap_s", "reconnect_s")}
    print(
        f"| median | {med['start_s']:.3f} | {med['owner_gap_s']:.3f} | {med['owner_gap_s'] / med['start_s']:.2f}x "
        f"| {med['reconnect_s']:.3f} | {sum(r['lost'] for r in rows):.0f} |"
    )


if __name__ == "__main__":
    main()
