"""The owner's side: a Unix-socket listener in the data dir that takes forwarders' batches.

The process holding the data-dir lock runs it next to its Agent (agent.start() and
`sidecar-agent run` do, through `serve_forwarders`). It listens on `[agent] listen`
(default data_dir/forward/agent.sock) and answers a forwarder's Hello with its own, so
a forwarder can tell an owner change.
Each batch is checked (event.check(): the same rules as record()'s), queued with
Committer.submit(), and acked only once that future resolves, i.e. after the journal
commit. A flush request is answered with Agent.flush()'s result. Spill files left by
forwarders that could not hand over at exit are taken in the same way, then removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from agent import losses
from agent.errors import JournalFullError
from agent.event import Event, check
from agent.forwarding import wire
from agent.storage.dirlock import pid_alive

if TYPE_CHECKING:
    from agent.runtime import Agent

log = logging.getLogger("sidecar_agent.forwarding")

SPILL_SCAN_S = 1.0
# Forwarders that went away (recycled workers) stay listed, the most recent first, up to
# this many; older ones are folded into Owner.departed. Without a bound a server that
# recycles its workers (gunicorn --max-requests) would grow the status and /metrics by
# one pid per worker it ever ran.
KEEP_DEPARTED = 32


class _Event(Event, gc=False, kw_only=True):
    """An Event as decoded off a forwarder's frame, not tracked by the cycle collector.

    A batch decodes into thousands of objects at once; tracked, they trigger collections
    that walk the owner's whole heap (measured: decode took 4x as long, and half the
    owner's CPU per forwarded event, bench/prefork_throughput.py). An event holds strings,
    numbers and its own tags/data containers (those stay tracked when they can hold
    cycles), never a reference back to itself, so it cannot be part of a cycle. It is
    an Event (a subclass with the same fields): the pipeline, check() and the journal's
    encoder treat it as one."""


class _Batch(msgspec.Struct, tag="batch", kw_only=True):
    """wire.Batch, with its events decoded as _Event."""

    seq: int
    events: list[_Event]
    losses: dict[str, int] = {}


# What a forwarder sends (wire.Message's tags), decoded as the owner reads it.
_decoder = msgspec.msgpack.Decoder(wire.Hello | _Batch | wire.Flush | wire.Ack)


def _decode(body: bytes) -> wire.Hello | _Batch | wire.Flush | wire.Ack:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise wire.FrameError(str(exc)) from exc


class Peer:
    """What the owner knows of one forwarder (by pid)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.connected = False
        self.connections = 0
        self.open = 0  # connections open now (a reconnect may overlap the old one's end)
        self.events = 0  # committed for it
        self.batches = 0
        self.last_seen = 0.0
        self.losses: dict[str, int] = {}  # its cumulative loss counts, as it last reported them
        self.spilled = 0  # events taken in from its spill files

    def describe(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "connected": self.connected,
            "connections": self.connections,
            "events": self.events,
            "batches": self.batches,
            "last_seen": self.last_seen,
            "lost": sum(self.losses.values()),
            "losses": dict(self.losses),
            "spilled": self.spilled,
        }


async def serve_forwarders(agent: Agent) -> Owner:
    """Start an Owner for a started `agent` and show it in the agent's status."""
    owner = Owner(agent)
    await owner.start()
    agent.forwarding = owner  # type: ignore[attr-defined]  # read by status_of and /metrics
    return owner


class Owner:
    """Listens on `[agent] listen` (default data_dir/forward/agent.sock) for forwarders of `agent`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.data_dir = Path(agent.config.agent.data_dir)
        self.path = wire.listen_path(self.data_dir, agent.config.agent.listen)
        # Spill files: the data dir's, and those next to a `listen` socket elsewhere.
        self.spill_dirs = sorted({wire.spill_dir(self.data_dir), wire.spill_dir_for(self.path)})
        # Set when this process became the owner by failover: from which owner, when,
        # and the gap (agent.embed sets it; status shows it under `owner`).
        self.took_over: dict[str, Any] | None = None
        self.peers: dict[int, Peer] = {}
        # Totals of the forwarders no longer listed (see KEEP_DEPARTED).
        self.departed = {"forwarders": 0, "events": 0, "batches": 0, "lost": 0, "spilled": 0}
        self.sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spill_task: asyncio.Task[None] | None = None

    # -- lifecycle (on the agent's loop) ---------------------------------------------

    async def start(self) -> None:
        """Bind the socket (the lock holder owns the path, so a leftover file is stale)."""
        wire.make_private_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with wire.short_path(self.path) as addr:
                sock.bind(addr)
            os.chmod(self.path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        await self.take_spills()
        self._spill_task = asyncio.get_running_loop().create_task(self._scan_spills(), name="forward-spills")

    async def stop(self, grace: float) -> None:
        """Stop listening; give connections `grace` seconds to get the acks of batches
        already queued, then close them (what they had not had acked they send again
        to the next owner, or spill)."""
        if self._spill_task is not None:
            self._spill_task.cancel()
            await asyncio.gather(self._spill_task, return_exceptions=True)
            self._spill_task = None
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.sock = None

    def forget_in_child(self) -> None:
        """After fork(), in the child: close its copy of the listening socket (the parent
        keeps listening), so the socket cannot outlive the owner in its children."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def summary(self) -> dict[str, Any]:
        """Status `owner`: this process, its socket, and whether (and how) it took over."""
        return {"pid": os.getpid(), "socket": str(self.path), "took_over": self.took_over}

    def describe(self) -> list[dict[str, Any]]:
        """Status: one entry per forwarder pid seen (departed ones up to KEEP_DEPARTED)."""
        return [p.describe() for p in sorted(self.peers.values(), key=lambda p: p.pid)]

    def totals(self) -> dict[str, int]:
        """Every forwarder ever seen by this owner, listed or departed: connected now,
        forwarders, events committed, batches, lost and spilled."""
        out = dict(self.departed)
        out["connected"] = 0
        for p in self.peers.values():
            out["forwarders"] += 1
            out["connected"] += p.connected
            out["events"] += p.events
            out["batches"] += p.batches
            out["lost"] += sum(p.losses.values())
            out["spilled"] += p.spilled
        return out

    def _prune(self) -> None:
        """Fold the oldest departed forwarders past KEEP_DEPARTED into `departed`. Only
        those whose process has exited: one that is alive may reconnect and report its
        cumulative loss counts again, which its entry is needed to subtract."""
        gone = [p for p in self.peers.values() if not p.connected and not pid_alive(p.pid)]
        if len(gone) <= KEEP_DEPARTED:
            return
        gone.sort(key=lambda p: p.last_seen)
        for p in gone[: len(gone) - KEEP_DEPARTED]:
            del self.peers[p.pid]
            d = self.departed
            d["forwarders"] += 1
            d["events"] += p.events
            d["batches"] += p.batches
            d["lost"] += sum(p.losses.values())
            d["spilled"] += p.spilled

    # -- one connection --------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        acks: asyncio.Queue[tuple[int, asyncio.Future[Any] | None, float]] = asyncio.Queue()
        acker = asyncio.get_running_loop().create_task(self._ack(acks, writer), name="forward-acks")
        peer: Peer | None = None
        try:
            hello = await self._read(reader)
            if not isinstance(hello, wire.Hello):
                raise wire.FrameError(f"expected hello, got {type(hello).__name__}")
            peer = self.peers.get(hello.pid) or self.peers.setdefault(hello.pid, Peer(hello.pid))
            peer.connected, peer.last_seen = True, time.time()
            peer.connections += 1
            peer.open += 1
            for reason, n in hello.reported.items():  # counted by an earlier owner (failover)
                if n > peer.losses.get(reason, 0):
                    peer.losses[reason] = n
            # Before any ack (the acker writes only after a batch was read): who owns it now.
            writer.write(wire.encode(wire.Hello(pid=os.getpid(), agent_id=self.agent.id)))
            while True:
                msg = await self._read(reader)
                peer.last_seen = time.time()
                if isinstance(msg, (_Batch, wire.Batch)):
                    self._count_losses(peer, msg.losses)
                    acks.put_nowait((msg.seq, self._submit(msg.events, peer), 0.0))
                elif isinstance(msg, wire.Flush):
                    acks.put_nowait((msg.seq, None, msg.timeout))
                else:
                    raise wire.FrameError(f"unexpected {type(msg).__name__}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the forwarder went away; what it had not had acked it sends again
        except asyncio.CancelledError:
            # stop() cancels connections past its grace. End as a plain return: on 3.11
            # asyncio's stream callback calls exception() on a cancelled handler task and
            # logs a CancelledError traceback for each one.
            acker.cancel()
        except wire.FrameError as exc:
            log.error("forwarder connection dropped: %s", exc)
        finally:
            # Acks for what is queued still go out while the writer lasts.
            acks.put_nowait((-1, None, 0.0))
            with contextlib.suppress(asyncio.CancelledError):
                await acker
            writer.close()
            self._tasks.discard(task)
            if peer is not None:  # after the acker: its batches' counts are in
                peer.open -= 1
                peer.connected = peer.open > 0
                self._prune()

    async def _read(self, reader: asyncio.StreamReader) -> wire.Message | _Batch:
        n = wire.frame_length(await reader.readexactly(wire.HEADER.size))
        return _decode(await reader.readexactly(n))

    def _submit(self, events: Sequence[Event], peer: Peer | None) -> asyncio.Future[None]:
        c = self.agent.committer
        ts_max = time.time() + c.max_future_s
        ok: list[Event] = []
        bad = 0
        for e in events:
            try:
                ok.append(check(e, ts_max))
            except (TypeError, ValueError):
                bad += 1
        if bad:
            self.agent.ledger.add(losses.INVALID, bad)
        fut = c.submit(ok)
        if peer is not None:
            n = len(ok)

            def done(f: asyncio.Future[None]) -> None:
                if not f.cancelled() and f.exception() is None:
                    peer.events += n
                    peer.batches += 1

            fut.add_done_callback(done)
        return fut

    async def _ack(self, acks: asyncio.Queue[tuple[int, asyncio.Future[Any] | None, float]], writer: Any) -> None:
        """Answer in order: a batch once committed, a flush once Agent.flush() returned."""
        broken = False
        while True:
            seq, fut, timeout = await acks.get()
            if seq < 0:
                return
            ok, error = True, ""
            if fut is not None:
                try:
                    await fut
                except JournalFullError as exc:
                    ok, error = False, str(exc)
            else:
                ok = await self.agent.flush(timeout)
            if broken:
                continue  # keep awaiting the futures; nobody to tell
            try:
                writer.write(wire.encode(wire.Ack(seq=seq, ok=ok, error=error)))
                await writer.drain()
            except (ConnectionError, RuntimeError):
                broken = True

    def _count_losses(self, peer: Peer, totals: dict[str, int]) -> None:
        """Add to the owner's ledger what a forwarder's cumulative counts grew by."""
        for reason, n in totals.items():
            grew = n - peer.losses.get(reason, 0)
            if grew > 0:
                self.agent.ledger.add(reason, grew)
                peer.losses[reason] = n

    # -- spill files -----------------------------------------------------------------

    async def _scan_spills(self) -> None:
        while True:
            await asyncio.sleep(SPILL_SCAN_S)
            try:
                await self.take_spills()
            except Exception as exc:  # a bad disk must not end the scans; they retry
                log.error("taking in forwarder spill files failed: %s", exc)

    async def take_spills(self) -> int:
        """Commit every spill file's events and losses, then remove the file; returns events."""
        taken = 0
        for path in sorted(p for d in self.spill_dirs if d.is_dir() for p in d.glob("*.msgpack")):
            try:
                spill = wire.spill_decoder.decode(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.error("forwarder spill file %s unreadable (%s); renamed to .bad", path.name, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                continue
            peer = self.peers.get(spill.pid) or self.peers.setdefault(spill.pid, Peer(spill.pid))
            try:
                if spill.events:
                    await self._submit(spill.events, None)
            except JournalFullError as exc:
                log.warning("forwarder spill file %s not taken in yet: %s", path.name, exc)
                return taken
            for reason, n in spill.losses.items():
                if n > 0:
                    self.agent.ledger.add(reason, n)
                    peer.losses[reason] = peer.losses.get(reason, 0) + n
            peer.spilled += len(spill.events)
            taken += len(spill.events)
            path.unlink()
            log.info("took in %d event(s) spilled by forwarder pid %d", len(spill.events), spill.pid)
        return taken
