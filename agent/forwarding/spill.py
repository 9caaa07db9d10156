"""Spill files: what a stopping forwarder could not hand over, kept on disk for an owner.

A file is `<dir>/<pid>-<ns>.msgpack` (wire.Spill: the pid, the events with their ids, the
loss counts not reported yet), written to a temp name, fsynced and renamed, so a reader
only ever sees whole files. The owner takes in those in its data dir's spill dir and in
the one next to its `listen` socket (Owner.take_spills).

A forwarder with `[agent] connect = "http://…"` has no owner reading its spill dir (its
own data dir), so the next such forwarder started on that data dir `claim()`s the files
and sends their events first, with their ids; a claimed file is removed once all its
events are acked (see Forwarder).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from agent.event import Event
from agent.forwarding import wire
from agent.storage.dirlock import pid_alive

log = logging.getLogger("sidecar_agent.forwarding")

SUFFIX = ".msgpack"
CLAIMED = ".claimed"  # <name>.msgpack.<pid>.claimed: taken by that forwarder


def write(d: Path, pid: int, events: list[Event], losses: dict[str, int]) -> Path:
    """Write one spill file in `d` (created 0700); raises OSError when it cannot."""
    path = d / f"{pid}-{time.time_ns()}{SUFFIX}"
    tmp = path.with_suffix(".tmp")
    wire.make_private_dir(d)
    body = wire.spill_encoder.encode(wire.Spill(pid=pid, events=events, losses=losses))
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    if events:
        log.warning("forwarder pid %d: %d event(s) not acked by an owner in time, spilled: %s", pid, len(events), path)
    return path


def release(claims: dict[Path, set[int]], seq: int) -> None:
    """Batch `seq` of a claimed file was acked (or refused for good): remove the file
    once all its batches are."""
    for path, seqs in claims.items():
        if seq in seqs:
            seqs.discard(seq)
            if not seqs:
                del claims[path]
                path.unlink(missing_ok=True)
            return


def claim(d: Path, pid: int) -> list[tuple[Path, wire.Spill]]:
    """Take the spill files in `d` that nobody holds: each is renamed to
    `<name>.<pid>.claimed` (a rename is atomic: of two claimers, one gets it), as are the
    claimed files of a forwarder that no longer runs. Returns them decoded; a file that
    does not decode is renamed to `.bad` and logged."""
    if not d.is_dir():
        return []
    out: list[tuple[Path, wire.Spill]] = []
    for path in sorted(d.iterdir()):
        name = path.name
        if name.endswith(CLAIMED):
            holder = name[: -len(CLAIMED)].rsplit(".", 1)[-1]
            if not holder.isdigit() or pid_alive(int(holder)):
                continue
        elif not name.endswith(SUFFIX):
            continue
        target = d / f"{name.split(SUFFIX)[0]}{SUFFIX}.{pid}{CLAIMED}"
        try:
            os.rename(path, target)
        except FileNotFoundError:  # another forwarder claimed it first
            continue
        try:
            out.append((target, wire.spill_decoder.decode(target.read_bytes())))
        except (OSError, ValueError) as exc:
            log.error("spill file %s unreadable (%s); renamed to .bad", path.name, exc)
            with contextlib.suppress(OSError):
                target.rename(d / f"{name.split(SUFFIX)[0]}.bad")
    return out
