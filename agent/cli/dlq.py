"""`sidecar-agent dlq list|replay|purge`: talks to the running agent's HTTP API, or,
when none answers, works on the data dir directly under the data-dir lock (a replay is
then queued in the database and runs when the agent next starts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec

from agent.cli import client
from agent.config import Config


async def _offline(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    from agent.losses import LossLedger
    from agent.storage.database import Database, DataDirInUse
    from agent.storage.dlq import DeadLetterQueue

    db = Database(Path(cfg.agent.data_dir), sync=cfg.agent.sync, cli=True)
    try:
        await db.open()  # takes the data-dir lock for the length of the command
    except DataDirInUse as exc:
        await db.close()
        raise client.offline_refused(cfg, exc) from None
    try:
        ledger = LossLedger()
        rows = await db.fetchall("SELECT reason, sink, count FROM losses")
        ledger.load([tuple(r) for r in rows])
        ledger.take_dirty()
        dlq = DeadLetterQueue(db, ledger, ttl_s=cfg.dlq.ttl_hours * 3600, max_events=cfg.dlq.max_events)
        await dlq.open()
        if args.action == "list":
            entries = await dlq.entries(sink=args.sink, status=args.status, limit=args.limit)
            return {"entries": msgspec.to_builtins(entries), "offline": True}
        if args.action == "purge":
            n = await dlq.purge(sink=args.sink, status=args.status or "pending")
            async with db.tx() as conn:
                await conn.executemany(
                    "INSERT INTO losses (reason, sink, count) VALUES (?, ?, ?)"
                    " ON CONFLICT (reason, sink) DO UPDATE SET count = excluded.count",
                    ledger.take_dirty(),
                )
            return {"purged_events": n, "offline": True}
        # No agent to replay now: queue the request; the next start replays these sinks'
        # pending entries at once, as a replay asked of a running agent does.
        queued = [s for s in ([args.sink] if args.sink else dlq.sinks()) if dlq.depth(s)]
        if queued:
            await dlq.request_replay(queued)
        note = (
            (
                "the agent is not running: the replay is queued and runs when the agent next starts"
                " (whether or not [dlq] auto_replay is on)"
            )
            if queued
            else "nothing is pending"
        )
        return {"queued": queued, "pending_events": dlq.depth(args.sink), "offline": True, "note": note}
    finally:
        await db.close()


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Dispatch one dlq action; prints JSON with --json, a table otherwise."""
    method, path = {
        "list": ("GET", "/api/v1/dlq"),
        "replay": ("POST", "/api/v1/dlq/replay"),
        "purge": ("DELETE", "/api/v1/dlq"),
    }[args.action]
    query = {"sink": args.sink, "status": args.status}
    if args.action == "list":
        query["limit"] = args.limit
    try:
        result = client.call(cfg, method, path, query)
    except client.AgentUnreachable:
        result = asyncio.run(_offline(cfg, args))
    if args.json or args.action != "list":
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'id':>6} {'sink':<14} {'status':<10} {'events':>7} {'attempts':>8}  {'last attempt':<20} error")
    for e in result["entries"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["last_attempt"]))
        print(
            f"{e['id']:>6} {e['sink']:<14} {e['status']:<10} {e['count']:>7} {e['attempts']:>8}  {when:<20} "
            f"{e['error_class']}: {e['error']}"
        )
    return 0
