"""What per-event framing (segment format 1) costs the journal, against the unframed codec
(format 0: the msgpack array alone, as 0.1.0 wrote it) in the same run.

    PYTHONPATH=. python bench/journal_framing.py [--segments 60] [--rounds 5] [--sync full]

- codec: encoding and decoding one segment of 1000 events, in memory;
- commit: Journal.append of `segments` segments of 1000 events each into a real agent.db
  (WAL, the given synchronous setting), events/s;
- read: a sink catching up from SQLite (Journal.read_batch with the in-memory tail
  dropped, so every segment is read back and decoded), events/s.

Framed and unframed alternate, `rounds` times each; the medians and their ratio
(framed / unframed) are printed. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.event import Event, msgpack_encoder, new_ids
from agent.losses import LossLedger
from agent.pipeline.journal import Journal
from agent.storage import segment
from agent.storage.database import Database

BATCH = 1000
FRAMED = segment.encode


def unframed(events: list[Event]) -> tuple[bytes, None]:
    """The format-0 codec: the body alone (frames NULL)."""
    return msgpack_encoder.encode(events), None


def sample(n: int) -> list[Event]:
    now = time.time()
    return [
        Event(id=i, name=f"http.request.duration.{k % 20}", kind="histogram", value=0.001 * (k % 997), ts=now,
              tags={"route": f"/api/v1/items/{k % 50}", "method": "GET", "status": "200"}, source="http",
              agent_id="bench")
        for k, i in enumerate(new_ids(n))
    ]


def per_call_us(fn: Callable[[], object], n: int = 200) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


async def journal_run(encode: Callable[..., tuple[bytes, bytes | None]], segments: int, sync: str,
                      batches: list[list[Event]]) -> tuple[float, float]:
    """(commit events/s, catch-up read events/s) with `encode` as the journal's codec."""
    segment.encode = encode  # type: ignore[assignment]  # the journal looks it up at each append
    try:
        with tempfile.TemporaryDirectory(prefix="bench-framing-") as tmp:
            db = Database(Path(tmp), sync=sync)
            await db.open()
            try:
                journal = Journal(db, LossLedger(), max_bytes=1 << 40)
                await journal.open()
                journal.attach(["reader"])
                t0 = time.perf_counter()
                for k in range(segments):
                    await journal.append(batches[k % len(batches)])
                commit = segments * BATCH / (time.perf_counter() - t0)
                journal._tail.clear()  # a sink catching up reads every segment back from SQLite
                journal._tail_events = 0
                t0 = time.perf_counter()
                after, got = 0, 0
                while after < journal.last_seq:
                    pairs, after = await journal.read_batch(after, 2000)
                    got += len(pairs)
                read = got / (time.perf_counter() - t0)
                assert got == segments * BATCH
            finally:
                await db.close()
    finally:
        segment.encode = FRAMED  # type: ignore[assignment]
    return commit, read


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sync", choices=["full", "normal"], default="full")
    args = ap.parse_args()

    events = sample(BATCH)
    body, frames = FRAMED(events)
    plain = msgpack_encoder.encode(events)
    print(f"segment of {BATCH} events: body {len(body)} bytes, frames {len(frames)} bytes "
          f"(+{100 * len(frames) / len(body):.1f}%)")
    enc = (per_call_us(lambda: FRAMED(events)), per_call_us(lambda: unframed(events)))
    dec = (per_call_us(lambda: segment.decode(1, BATCH, BATCH, body, frames)),
           per_call_us(lambda: segment.decode(1, BATCH, BATCH, plain, None)))
    print(f"codec encode: framed {enc[0]:.0f} us, unframed {enc[1]:.0f} us per segment (ratio {enc[0] / enc[1]:.2f})")
    print(f"codec decode: framed {dec[0]:.0f} us, unframed {dec[1]:.0f} us per segment (ratio {dec[0] / dec[1]:.2f})")

    batches = [sample(BATCH) for _ in range(8)]
    results: dict[str, list[tuple[float, float]]] = {"framed": [], "unframed": []}
    for _ in range(args.rounds):  # interleaved, so load on the machine hits both alike
        results["framed"].append(await journal_run(FRAMED, args.segments, args.sync, batches))
        results["unframed"].append(await journal_run(unframed, args.segments, args.sync, batches))
    med = {k: (statistics.median(c for c, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    for i, what in enumerate(("commit", "catch-up read")):
        f, u = med["framed"][i], med["unframed"][i]
        print(f"journal {what} (sync={args.sync}, {args.segments} x {BATCH} events, median of {args.rounds}): "
              f"framed {f:,.0f} ev/s, unframed {u:,.0f} ev/s, ratio {f / u:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
