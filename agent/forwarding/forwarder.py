"""The forwarder: record() in a process that does not own the data dir.

record() is the committer's fast path: a tuple appended to a bounded deque, with the
same threshold wake-up (see agent.pipeline.intake: `_signal_at` is re-armed to 1 before
each drain; the first record wakes the drain thread, the one that fills a batch cuts
its window short). The drain thread turns tuples into checked Events (event.check(),
as the committer does; refusals counted as `invalid`), gives them uuid7 ids and the
`pid` tag, and ships them in batches to the owner over the data dir's Unix socket
(agent.forwarding.wire). A reader thread takes the owner's acks. A batch stays in
`unacked` until acked, i.e. journaled by the owner; after a reconnect every unacked
batch is sent again with the same seq and ids.

Stop and exit: everything is shipped and the acks awaited until the deadline. What is
still unacked then is spilled to forward/spill/<pid>-<ns>.msgpack (written to a temp
name, fsynced, renamed) for the owner to take in: a count in a ledger would only say
what was lost, while the file keeps the events, and it works when no owner is
reachable at all (which is also when a count could not be reported). Only when the
spill itself cannot be written are the events counted as `forwarder_unsent` (logged,
and reported to the owner if the connection still stands).

Failover (agent.forwarding.failover): while no owner answers, the drain thread tries
the data-dir lock; the winner starts an Agent in its process (`takeover`), and this
forwarder then connects to it like any other and re-sends what was in flight.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from agent import losses
from agent.config import Config
from agent.event import MAX_TAGS, Event, assign_ids
from agent.forwarding import spill, wire
from agent.forwarding.failover import OwnerWatch, TakeOver
from agent.forwarding.links import HttpLink, Link, UnixLink
from agent.losses import LossLedger
from agent.pipeline.intake import event_from_record
from agent.pipeline.recording import Recorded, RecordQueue
from agent.timer import Recorder

log = logging.getLogger("sidecar_agent.forwarding")

FORWARDER_UNSENT = "forwarder_unsent"  # could neither be handed over nor spilled
FORWARDER_REFUSED = "forwarder_refused"  # a sidecar's HTTP ingest refused the batch for good (400, 413)
_time = time.time
RETRY_S = 0.2  # between connection attempts while no owner answers
WINDOW = 16  # batches in flight before the drain waits for acks


class Forwarder(RecordQueue, Recorder):
    """Ships this process's events to the data dir's owner. Same recording API as Agent."""

    def __init__(self, config: Config, *, pid: int | None = None) -> None:
        a = config.agent
        self.config = config
        self.id = config.agent_id()
        self.pid = os.getpid() if pid is None else pid
        self.data_dir = a.data_dir
        # Where the owner is: the data dir's socket, or `connect` (a sidecar, never taken over).
        kind, target = (
            wire.parse_address(a.connect) if a.connect else ("unix", str(wire.listen_path(a.data_dir, a.listen)))
        )
        self.address = a.connect or f"unix:{target}"
        self.url = target if kind == "http" else None
        self.path = Path(target) if kind == "unix" else None
        self.spill_to = wire.spill_dir(a.data_dir) if self.path is None else wire.spill_dir_for(self.path)
        self.takeover: TakeOver | None = None  # None with `connect`, or once this process owns the data dir
        super().__init__(LossLedger(), capacity=a.intake_capacity, commit_batch=a.commit_batch, signal_at=1)
        self.interval_s = a.commit_interval_ms / 1000
        self.max_future_s = a.max_future_s
        self.state = "new"
        self._wake = threading.Event()
        self._full = threading.Event()
        # Guards what follows; notified on every take, ack and connection change.
        self._cond = threading.Condition()
        self._seq = 0
        # Tuples taken off the deque; `_converting` of them are not in `_unacked` yet.
        # Both change under _cond, with the take, so a flush sees every taken tuple
        # either still converting or in a batch with a seq (never neither).
        self._taken = 0
        self._converting = 0
        self._unacked: dict[int, wire.Batch] = {}
        self._unacked_events = 0
        self._flushes: dict[int, bool | None] = {}
        self._reported: dict[str, int] = {}  # loss totals the owner acked
        self._sent_losses: dict[str, int] = {}
        self._link: Link | None = None
        # Spill files of an earlier http:// forwarder on this data dir, and the seqs of
        # their batches not acked yet (spill.claim): removed once all are acked.
        self._claims: dict[Path, set[int]] = {}
        self._closing = False
        self._thread: threading.Thread | None = None
        self.sent = self.acked = self.resent = self.connects = 0
        self.spilled = 0
        self.owner = OwnerWatch(self.pid)  # who owns the data dir, owner changes, the last gap

    # -- recording (any thread, never blocks) ----------------------------------------

    def _wake_up(self, n: int) -> None:
        self._wake.set()
        if n >= self.commit_batch:
            self._full.set()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Forwarder:
        if self.state == "new":
            self.state = "running"
            if self.url is not None:  # no sidecar reads this data dir's spill files: send them first
                self._claim_spills()
            self._thread = threading.Thread(target=self._run, name="sidecar-agent-forwarder", daemon=True)
            self._thread.start()
        return self

    def flush(self, timeout: float = 10.0) -> bool:
        """True once everything recorded before the call is journaled by the owner and
        the owner's sinks confirmed it (Agent.flush() there)."""
        end = time.monotonic() + timeout
        if not self._handed_over(end):
            return False
        while (left := end - time.monotonic()) > 0:
            with self._cond:
                link = self._link
                if link is None:
                    self._cond.wait(min(left, RETRY_S))
                    continue
                self._seq += 1
                seq = self._seq
                self._flushes[seq] = None
            try:
                link.send(wire.Flush(seq=seq, timeout=max(0.0, left - 0.05)))
            except OSError:
                self._drop(link)
            with self._cond:
                while self._flushes.get(seq) is None and self._link is link and time.monotonic() < end:
                    self._cond.wait(end - time.monotonic())
                result = self._flushes.pop(seq, None)
            if result is not None:
                return result
        return False

    def _handed_over(self, end: float, stopping: bool = False) -> bool:
        """Wait until every tuple recorded before now is taken and its batch acked.
        `stopping`: give up early once no owner is listening (its socket is gone)."""
        from agent import handles  # here, not at import: agent.handles imports agent.embed, which imports us

        handles.drain_into(self, flushing=True)  # what counter/gauge handles summed is handed over too
        with self._cond:  # the drain takes off the deque under _cond too: no tuple is missed
            target = len(self.records) + self._taken
        self._wake.set()
        self._full.set()
        with self._cond:
            while self._taken < target or self._converting:
                if not self._wait(end, stopping):
                    return False
            last = self._seq
            while any(s <= last for s in self._unacked):
                if not self._wait(end, stopping):
                    return False
        return True

    def _wait(self, end: float, stopping: bool) -> bool:
        left = end - time.monotonic()
        if left <= 0:
            return False
        if stopping and self._link is None and self.path is not None and not self.path.exists():
            return False  # the owner stopped (or died and its socket was removed): spill now
        self._cond.wait(min(left, 0.5) if stopping else left)
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Hand everything to the owner within `timeout` (default shutdown_timeout_s);
        spill what was not acked by then. Safe to call twice."""
        if self.state != "running":
            self.state = "stopped"
            return
        self.state = "stopping"
        self.takeover = None  # a stopping process does not become the owner
        t = self.config.agent.shutdown_timeout_s if timeout is None else timeout
        self.refused = losses.STOPPED
        self._handed_over(time.monotonic() + t, stopping=True)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
        with self._cond:
            link, self._link = self._link, None
            batches = [self._unacked[s] for s in sorted(self._unacked)]
            self._unacked.clear()
            self._unacked_events = 0
        if link is not None:
            link.close()
        events = [e for b in batches for e in b.events]
        rest = self._convert([self.records.popleft() for _ in range(len(self.records))])
        self._tag(rest)
        events += rest
        if self._spill(events):
            for path in self._claims:  # their events that were not acked are in the new file
                path.unlink(missing_ok=True)
        self.state = "stopped"

    def forget_in_child(self) -> None:
        """After fork(), in the child: close its copy of the connection (never shut it
        down: the parent still uses it). The parent's queue stays the parent's."""
        link, self._link = self._link, None
        self.takeover = None  # the child's own forwarder (a new one) decides for itself
        if link is not None:
            link.forget()

    def status(self) -> dict[str, Any]:
        with self._cond:
            unacked = self._unacked_events
        return {
            "role": "forwarder",
            "pid": self.pid,
            "state": self.state,
            "address": self.address,
            "connected": self._link is not None,
            **self.owner.describe(),
            "queued": len(self.records),
            "unacked": unacked,
            "sent": self.sent,
            "acked": self.acked,
            "resent": self.resent,
            "connects": self.connects,
            "spilled": self.spilled,
            "losses": self.ledger.by_reason(),
        }

    # -- the drain thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
            if self._link is None:
                self._connect()
            self._rearm()
            self._wake.clear()
            if not self.records:
                self._wake.wait(RETRY_S if self._link is None else 1.0)
            if self.records and len(self.records) < self.commit_batch:
                self._full.wait(self.interval_s)
            self._full.clear()
            try:
                self._ship()
            except Exception:  # never let the drain die: log and go on
                log.exception("forwarder drain failed")
                time.sleep(RETRY_S)

    def _convert(self, taken: list[Recorded]) -> list[Event]:
        events: list[Event] = []
        invalid: list[str] = []
        ts_max = _time() + self.max_future_s
        for t in taken:
            try:
                events.append(event_from_record(t, self.id, ts_max))
            except (TypeError, ValueError) as exc:
                invalid.append(str(exc))
        if invalid:
            self.ledger.add(losses.INVALID, len(invalid))
            log.warning("%d invalid event(s) dropped, e.g. %s", len(invalid), invalid[0])
        assign_ids(events)
        return events

    def _ship(self) -> None:
        """Take what is queued (as far as the in-flight bound allows) and send it."""
        from agent import handles

        handles.drain_into(self)  # the deltas of counter/gauge handles, once per round
        while True:
            with self._cond:
                while self._link is not None and not self._closing and len(self._unacked) >= WINDOW:
                    self._cond.wait(1.0)
                room = self.capacity - self._unacked_events
                if room <= 0 and self.records:  # the owner is behind or gone: records wait (or overflow)
                    self._cond.wait(RETRY_S)
                    return
                n = min(len(self.records), self.commit_batch, max(0, room))
                totals = self.ledger.by_reason()
                if n == 0 and totals == self._sent_losses:
                    return
                # Taken under _cond (record() never takes it): a flush counts these as
                # taken but converting, so it waits for their batch's seq and ack.
                popleft = self.records.popleft
                taken = [popleft() for _ in range(n)]
                self._taken += n
                self._converting += 1
            try:
                events = self._convert(taken)
                self._tag(events)
            except BaseException:
                with self._cond:
                    self._converting -= 1
                    self._cond.notify_all()
                raise
            with self._cond:
                self._converting -= 1
                self._seq += 1
                batch = wire.Batch(seq=self._seq, events=events, losses=totals)
                self._unacked[batch.seq] = batch
                self._unacked_events += len(events)
                self._sent_losses = totals
                link = self._link
                self._cond.notify_all()
            if link is not None:
                try:
                    link.send(batch)
                    self.sent += len(events)
                except OSError:
                    self._drop(link)
            if n < self.commit_batch:
                return

    def _open(self) -> Link:
        if self.url is not None:
            return HttpLink(self.url, self.config.server.token, self._on_message, self._drop)
        assert self.path is not None
        hello = wire.Hello(pid=self.pid, agent_id=self.id, reported=dict(self._reported))
        return UnixLink(self.path, hello, self._on_message, self._drop)

    def _connect(self) -> None:
        try:
            link = self._open()
        except OSError:
            self.owner.lost()
            if not self.owner.try_take_over(self):
                time.sleep(RETRY_S)
            return
        link.start()
        with self._cond:
            resend = [self._unacked[s] for s in sorted(self._unacked)]
        try:
            for b in resend:
                link.send(b)
        except OSError:
            self._drop(link)
            time.sleep(RETRY_S)
            return
        self.connects += 1
        self.resent += sum(len(b.events) for b in resend)
        with self._cond:
            if not link.broken:  # it may have ended already: then the next round reconnects
                self._link = link
            self._cond.notify_all()

    def _on_message(self, link: Link, msg: wire.Message) -> None:
        """From the link's thread: the owner's Hello, or an Ack."""
        if isinstance(msg, wire.Hello):
            self.owner.hello(msg.pid)
            return
        if not isinstance(msg, wire.Ack):
            raise wire.FrameError(f"unexpected {type(msg).__name__} from the owner")
        with self._cond:
            if msg.seq in self._flushes:
                self._flushes[msg.seq] = msg.ok
            elif (msg.ok or msg.refused) and (b := self._unacked.pop(msg.seq, None)) is not None:
                spill.release(self._claims, msg.seq)
                self._unacked_events -= len(b.events)
                self._reported = b.losses
                if msg.ok:
                    self.acked += len(b.events)
                else:
                    self.ledger.add(FORWARDER_REFUSED, len(b.events))
                    log.error("the sidecar refused %d event(s) for good: %s", len(b.events), msg.error)
            self._cond.notify_all()
        if not msg.ok and not msg.refused:
            # Not taken (the owner is stopping or its journal is full): the batch stays
            # unacked and goes again on the next connection.
            log.warning("the owner did not take batch %d: %s", msg.seq, msg.error)
            time.sleep(RETRY_S)
            raise ConnectionError(msg.error)

    def _drop(self, link: Link) -> None:
        with self._cond:
            link.broken = True
            if self._link is link:
                self._link = None
                self.owner.lost()
            self._cond.notify_all()
        link.close()

    def _tag(self, events: list[Event]) -> None:
        """The producing process, as the tag `pid` (unless the caller set one, or the
        event has no room for another tag)."""
        pid = str(self.pid)
        for e in events:
            tags = e.tags
            if "pid" not in tags and len(tags) < MAX_TAGS:
                tags["pid"] = pid

    # -- spill -----------------------------------------------------------------------

    def _spill(self, events: list[Event]) -> bool:
        """Write what could not be handed over to a spill file; False when that failed
        (the events are then counted as `forwarder_unsent`)."""
        totals = self.ledger.by_reason()
        unreported = {r: n - self._reported.get(r, 0) for r, n in totals.items() if n > self._reported.get(r, 0)}
        if not events and not unreported:
            return True
        try:
            spill.write(self.spill_to, self.pid, events, unreported)
        except OSError as exc:
            self.ledger.add(FORWARDER_UNSENT, len(events))
            log.error("forwarder pid %d: %d event(s) neither handed over nor spilled: %s", self.pid, len(events), exc)
            return False
        self.spilled += len(events)
        return True

    def _claim_spills(self) -> None:
        """Queue the events of the spill files an earlier forwarder left in this data dir
        (connect = http://), as unacked batches with their ids: they go out first."""
        for path, sp in spill.claim(self.spill_to, self.pid):
            seqs = set()
            for i in range(0, len(sp.events), self.commit_batch):
                self._seq += 1
                batch = wire.Batch(seq=self._seq, events=sp.events[i : i + self.commit_batch])
                self._unacked[batch.seq] = batch
                self._unacked_events += len(batch.events)
                seqs.add(batch.seq)
            if seqs:
                self._claims[path] = seqs
                log.info("forwarder pid %d: sending %d event(s) spilled by pid %d", self.pid, len(sp.events), sp.pid)
            else:
                path.unlink(missing_ok=True)
