"""Events/s the owner commits from 1, 2, 4 and 8 forwarding processes recording flat
out, and record()'s cost in a forwarder against the owner's, in one run.

    PYTHONPATH=. python bench/prefork_throughput.py [--events 300000] [--calls 200000] [--repeat 5]

The parent starts the agent (it owns the data dir: a jsonl sink to /dev/null, no
server, no history store) and forks P children after start(), so each child's
agent.record() is a forwarder's (the at-fork hook). Throughput: the children share
`events` between them, each records its share in a tight loop, then flush()es (the
owner journaled it and the sink confirmed it). The figure is events / seconds from the
fork to the last child's flush returning; the owner does nothing but commit. Intake is
sized so nothing overflows, and the owner's ledger is reported (lost must be 0).
The children's own loop time per record() is shown too; it includes competing for the
CPU with the owner and the other children.

Each row is run twice, alternating: `untracked` is the owner as it is (batches decode
into Events the cycle collector does not track, agent/forwarding/owner.py), `tracked`
the named baseline (wire's decoder, tracked Events, as before). The CPU columns are the
owner's (all its threads) and the forwarders' (from wait4) per event.

record() cost: best of `repeat` timeit loops of `calls` module-level agent.record()
calls, in the owner with no child running, then in one forked forwarder with the owner
idle, each flushed between loops (as bench/record_overhead.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import timeit

COMMAND = "PYTHONPATH=. python bench/prefork_throughput.py"


def record_cost_ns(calls: int, repeat: int) -> float:
    import agent

    best = float("inf")
    for _ in range(repeat):
        t = timeit.timeit(lambda: agent.record("bench.cost", 1.0), number=calls)
        best = min(best, t / calls * 1e9)
        assert agent.flush(120), "flush failed"
    return best


def in_child(fn) -> dict:  # type: ignore[no-untyped-def]
    """Fork; run fn() in the child (a forwarder), return what it reports as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.write(w, json.dumps(fn()).encode())
        except BaseException as exc:
            print("child failed:", repr(exc), file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    os.close(w)
    return {"pid": pid, "fd": r}


def collect(child: dict) -> dict:
    chunks = []
    while chunk := os.read(child["fd"], 65536):
        chunks.append(chunk)
    os.close(child["fd"])
    _, st, usage = os.wait4(child["pid"], 0)
    assert os.waitstatus_to_exitcode(st) == 0, "a child failed"
    return {**json.loads(b"".join(chunks)), "cpu_s": usage.ru_utime + usage.ru_stime}


def run_procs(agent, owner, n: int, share: int, variant: str) -> float:  # type: ignore[no-untyped-def]
    """Fork n forwarders recording `share` events each; print a row, return events/s."""
    lost0 = sum(owner.ledger.snapshot().values())
    committed0 = owner.committer.committed

    def work() -> dict:
        rec = agent.record
        t0 = time.perf_counter()
        for k in range(share):
            rec("bench.event", k)
        t1 = time.perf_counter()
        assert agent.flush(120), "flush failed"
        return {"ns": (t1 - t0) / share * 1e9}

    t0, cpu0 = time.perf_counter(), time.process_time()
    kids = [in_child(work) for _ in range(n)]
    results = [collect(k) for k in kids]
    elapsed = time.perf_counter() - t0
    owner_us = (time.process_time() - cpu0) / (share * n) * 1e6  # every thread of the owner
    fw_us = sum(r["cpu_s"] for r in results) / (share * n) * 1e6
    committed = owner.committer.committed - committed0
    lost = sum(owner.ledger.snapshot().values()) - lost0
    assert committed >= share * n, (committed, share * n)  # the owner may add an event of its own
    child_ns = sum(r["ns"] for r in results) / n
    rate = share * n / elapsed
    print(
        f"{variant:>9} {n:>5} {share * n:>8} {elapsed:>8.2f} {rate:>10,.0f} {lost:>5} {child_ns:>16.0f}"
        f" {owner_us:>16.2f} {fw_us:>14.2f}"
    )
    return rate


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=300_000, help="events per run, shared by its processes")
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--procs", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=2, help="each variant's best events/s over this many rounds")
    args = p.parse_args()
    procs = [int(x) for x in args.procs.split(",")]
    print(
        f"$ {COMMAND} --events {args.events} --calls {args.calls} --repeat {args.repeat} --procs {args.procs}"
        f" --rounds {args.rounds}"
    )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus\n")

    import agent

    tmp = tempfile.mkdtemp(prefix="prefork-bench-")
    owner = agent.start(
        {
            "agent": {"data_dir": os.path.join(tmp, "data"), "id": "bench", "intake_capacity": args.events + 10_000},
            "server": {"enabled": False},
            "dashboard": {"store": False},
            "sinks": {"null": {"type": "jsonl", "path": os.devnull, "policies": []}},
        }
    )
    assert type(owner).__name__ == "Agent"

    # record() in the owner, then in one forwarder, the other side idle each time.
    owner_ns = record_cost_ns(args.calls, args.repeat)
    fw_ns = collect(in_child(lambda: {"ns": record_cost_ns(args.calls, args.repeat)}))["ns"]
    print(
        f"record(): owner {owner_ns:.0f} ns/call, forwarder {fw_ns:.0f} ns/call "
        f"(forwarder/owner {fw_ns / owner_ns:.2f}x); best of {args.repeat} x {args.calls} calls\n"
    )

    import msgspec

    from agent.forwarding import owner as owner_mod
    from agent.forwarding import wire

    # The named baseline, in the same run: the owner decoding batches into tracked Events
    # (wire's own decoder, as before the owner's untracked _Event), each run alternating.
    decoders = {"tracked": msgspec.msgpack.Decoder(wire.Message), "untracked": owner_mod._decoder}
    print(
        f"{'decode':>9} {'procs':>5} {'events':>8} {'seconds':>8} {'events/s':>10} {'lost':>5}"
        f" {'child ns/record':>16} {'owner cpu us/ev':>16} {'fwd cpu us/ev':>14}"
    )
    rates: dict[tuple[str, int], float] = {}
    for n in procs:
        for _round, (variant, decoder) in ((r, v) for r in range(args.rounds) for v in decoders.items()):
            owner_mod._decoder = decoder
            rate = run_procs(agent, owner, n, args.events // n, variant)
            rates[variant, n] = max(rate, rates.get((variant, n), 0.0))
    owner_mod._decoder = decoders["untracked"]
    print(
        "\nbest untracked/tracked events/s: "
        + ", ".join(f"{n} procs {rates['untracked', n] / rates['tracked', n]:.2f}x" for n in procs)
    )
    agent.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
