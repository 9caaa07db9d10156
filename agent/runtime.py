"""The Agent: owns plugins, journal, DLQ, delivery workers, sources and the HTTP server.

Use `async with Agent(config)` in asyncio apps; sync apps use `agent.start()` (see
agent.embed). `record()` and friends are safe from any thread and never block.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import losses
from agent.config import Config, resolve
from agent.errors import IntakeFullError, JournalFullError
from agent.event import Event, check
from agent.history.board import HistoryBoard
from agent.losses import LossLedger
from agent.pipeline.delivery import SinkWorker
from agent.pipeline.intake import Committer
from agent.pipeline.journal import Journal
from agent.pipeline.recording import RecordFn
from agent.pipeline.resilience import chain_from_specs
from agent.pipeline.stream import StreamHub
from agent.pipeline.supervisor import Supervised, supervise
from agent.plan import ComponentSpec, build_flags, plan
from agent.plugin.base import PluginContext
from agent.plugin.host import PluginHost
from agent.status import status_of
from agent.storage.database import Database
from agent.storage.dlq import DeadLetterQueue
from agent.timer import Recorder

if TYPE_CHECKING:
    from agent.flags import FlagService

log = logging.getLogger("sidecar_agent")

# stop() ends within shutdown_timeout_s plus this grace, whatever a sink or plugin does.
# The timeout is the sinks' time to deliver what is journaled; the grace covers what
# follows it: cancelling the tasks still running (about 1 s), closing sinks (0.5 s), and
# persisting cursors and the ledger and closing the database (0.5 s). A task or close
# still running past its share is abandoned (cancelled, no longer awaited) and named in
# `Agent.abandoned`; what it had not confirmed stays journaled for the next start.
SHUTDOWN_GRACE_S = 2.0


class Agent(Recorder):
    """One monitoring agent. Construct, then `await start()` (or `async with`)."""

    def __init__(
        self,
        config: Config | dict[str, Any] | str | Path | None = None,
        *,
        require_server: bool = False,
        plugins: list[Any] | None = None,
    ):
        self.config = resolve(config)
        self.id = self.config.agent_id()
        self.require_server = require_server
        self.ledger = LossLedger()
        self._shared: dict[str, Any] = {}  # PluginContext.shared: one dict for all plugin instances
        self.history = HistoryBoard()  # where the store sink publishes its store for the API
        # `plugins`: extra plugin modules/objects (tests, embedders), loaded like built-ins.
        self.host = PluginHost(self.config.plugins, extra=plugins)
        self.stream = StreamHub()
        self.state = "new"
        self.started_at: float | None = None
        self.server_error: str | None = None
        self.server_url: str | None = None
        self.components: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, SinkWorker] = {}
        self._source_stats: dict[str, dict[str, Any]] = {}  # source name -> its ctx.stats
        self.db: Database | None = None
        self.journal: Journal | None = None
        self.dlq: DeadLetterQueue | None = None
        self.flags: FlagService | None = None
        # The intake exists from the start, so record() before start() is queued and
        # committed once the journal is open.
        self.committer = Committer(
            self.ledger,
            agent_id=self.id,
            capacity=self.config.agent.intake_capacity,
            commit_batch=self.config.agent.commit_batch,
            commit_interval_s=self.config.agent.commit_interval_ms / 1000,
            on_commit=self.stream.publish,
            max_future_s=self.config.agent.max_future_s,
            max_series_per_name=self.config.agent.max_series_per_name,
        )
        # The intake's own bound method: the hot path pays no extra call.
        self.record: RecordFn = self.committer.record
        # Set when a sink may have confirmed more, a flag changed or the agent stopped: flush() waits on it.
        self._progress = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        # Every long-running task runs under agent.pipeline.supervisor: its state, restarts
        # and last error, by task name ("committer", "housekeeping", "sink:N", "source:N").
        self.supervised: dict[str, Supervised] = {}
        self._runner: Any = None
        self._stopped: asyncio.Event | None = None  # created in start(), on the agent's loop
        # What stop() gave up waiting for (tasks, sink closes, the database close); a
        # process that exits after such a stop must not wait for them (agent.cli does not).
        self.abandoned: list[str] = []
        self._leftovers: set[asyncio.Future[Any]] = set()  # abandoned, still referenced

    # -- recording (any thread, never blocks) ------------------------------------------
    # record(name, value=None, *, kind=None, tags=None, ts=None, data=None, session_id=None):
    # thread-safe, non-blocking; see Committer.record (it is bound in __init__).

    # counter(), gauge(), histogram() and timer() come from Recorder.

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> Agent:
        """Load plugins, open the journal, start sinks, sources and the HTTP server.
        If that fails, whatever was started is stopped again (the data dir is released),
        the agent's state is "failed", and the error is raised."""
        if self.state == "failed":
            raise RuntimeError("this agent's start() failed; make a new Agent to try again")
        if self.state != "new":
            return self
        self.state = "starting"
        self._stopped = asyncio.Event()
        try:
            await self._start()
        except BaseException:
            await self._abandon_start()
            raise
        return self

    async def _abandon_start(self) -> None:
        """Undo a start that raised, as stop() does: what the committer can still journal
        is kept, sinks get the shutdown deadline to confirm what they were sending (so a
        restart does not send it twice), what cannot be journaled is counted as
        `start_failed`; the ledger and cursors are saved."""
        if self.state in ("stopping", "stopped"):  # the start already stopped itself
            return
        self.state = "failed"
        loop = asyncio.get_running_loop()
        await self._wind_down(losses.START_FAILED, loop.time() + self.config.agent.shutdown_timeout_s)
        assert self._stopped is not None
        self._stopped.set()
        self._progress.set()  # a flush() still waiting gives up

    async def _wind_down(self, reason: str, end: float) -> None:
        """Shared by stop() and a failed start: sources, server and intake close; what is
        queued is committed until `end` (the rest counted under `reason`); sinks get until
        `end` to confirm it; then tasks, sinks and the database close, the ledger saved.

        Every step is bounded, so this returns by `end + SHUTDOWN_GRACE_S` (plus a few
        hundredths of a second of floors): a step still running past its share is
        abandoned (see SHUTDOWN_GRACE_S), never awaited for ever."""
        loop = asyncio.get_running_loop()
        hard = end + SHUTDOWN_GRACE_S
        sources = {n: self._tasks.pop(n) for n in [n for n in self._tasks if n.startswith("source:")]}
        await self._finish_tasks(sources, min(end, loop.time() + 1.0))
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await self._bounded("http server", runner.cleanup(), end)  # open requests finish first
        self.committer.close(reason)
        await self.committer.drain(max(0.1, end - loop.time()))
        self.committer.discard()  # not committed by the deadline: counted under `reason`
        await self.flush(max(0.0, end - loop.time()))
        tasks, self._tasks = self._tasks, {}
        await self._finish_tasks(tasks, end + SHUTDOWN_GRACE_S / 2)
        closes = [self._bounded(f"close sink:{n}", w.close(), hard - 0.5) for n, w in self.workers.items()]
        await asyncio.gather(*closes)
        if self.journal is not None and self.db is not None and self.db.writer is not None:
            # The ledger and the cursors: everything past a cursor is delivered after restart.
            await self._bounded("checkpoint", self.journal.checkpoint(), hard - 0.25)
        if self.db is not None:
            await self._bounded("database close", self.db.close(), hard)

    async def _finish_tasks(self, tasks: dict[str, asyncio.Task[Any]], until: float) -> None:
        """Cancel `tasks` together and wait for them until `until` (loop time); the ones
        still running then are abandoned: a task that swallows its cancel cannot hold stop()."""
        for task in tasks.values():
            task.cancel()
        if not tasks:
            return
        loop = asyncio.get_running_loop()
        await asyncio.wait(tasks.values(), timeout=max(0.01, until - loop.time()))
        for name, task in tasks.items():
            if not task.done():
                self._abandon(name, task)

    async def _bounded(self, what: str, coro: Any, until: float) -> bool:
        """Run `coro` until `until` (loop time); past it, cancel and abandon it. An error
        it raises is logged (shutdown goes on). True when it finished in time."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.wait([task], timeout=max(0.05, until - loop.time()))
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            self._abandon(what, task)
            return False
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("stopping: %s failed: %r", what, exc, exc_info=exc)
        return True

    def _abandon(self, what: str, task: asyncio.Future[Any]) -> None:
        log.error("stopping: %s did not end within the shutdown bound; abandoned (its events stay journaled)", what)
        self.abandoned.append(what)
        self._leftovers.add(task)
        task.add_done_callback(self._leftovers.discard)

    async def _start(self) -> None:
        cfg = self.config
        self.host.load()
        specs = plan(cfg, self.host)  # config errors surface before anything starts
        data_dir = Path(cfg.agent.data_dir)
        self.db = Database(data_dir, sync=cfg.agent.sync)
        # The flag overrides are read under the data-dir lock, as offline CLI writes are made.
        await self.db.dir_lock.acquire()
        try:
            self.flags = build_flags(cfg, self.host, specs, emit=self.emit)
            await self.db.open()
        except BaseException:
            await self.db.close()
            raise
        self.journal = Journal(
            self.db, self.ledger, max_bytes=int(cfg.agent.max_journal_mb * 1024 * 1024), overflow=cfg.agent.overflow
        )
        await self.journal.open()
        self.dlq = DeadLetterQueue(self.db, self.ledger, ttl_s=cfg.dlq.ttl_hours * 3600, max_events=cfg.dlq.max_events)
        await self.dlq.open()
        self.journal.on_advance = self._progress.set
        for spec in specs:
            if spec.kind == "sinks":
                self._build_sink(spec, data_dir)
        # Every configured sink keeps its cursor, also one that failed to build: its
        # backlog stays journaled (compaction waits for it) until it runs again.
        self.journal.attach([s.name for s in specs if s.kind == "sinks"])
        for name in await self.dlq.take_replay_requests():  # asked for by the offline CLI
            if name in self.workers:
                self.workers[name].request_replay()
            else:
                log.warning("DLQ replay was requested for sink %s, which is not configured", name)
        self.committer.open(self.journal)
        self._spawn("committer", self.committer.run)
        self._spawn("housekeeping", self._housekeeping)
        if cfg.agent.heartbeat_s > 0:  # fleet heartbeats (agent/heartbeat.py)
            from agent.heartbeat import Heartbeat

            self._spawn("heartbeat", Heartbeat(self).run)
        for name, worker in self.workers.items():
            worker.supervision = self._spawn(f"sink:{name}", worker.run, f"sink {name} (plugin {worker.plugin})")
        for spec in specs:
            if spec.kind == "sources":
                self._start_source(spec, data_dir)
        if cfg.server.enabled:
            await self._start_server()
        self.started_at = time.time()
        self.state = "running"
        log.info(
            "agent %s running (%d sources, %d sinks)",
            self.id,
            sum(1 for s in specs if s.kind == "sources"),
            len(self.workers),
        )

    def _context(self, name: str, data_dir: Path) -> PluginContext:
        return PluginContext(
            name=name,
            agent_id=self.id,
            data_dir=data_dir,
            log=logging.getLogger(f"sidecar_agent.{name}"),
            emit=self.emit,
            submit=functools.partial(self.submit, source=name),
            ledger=self.ledger,
            shared=self._shared,
            history=self.history,
        )

    def _component(self, spec: ComponentSpec, state: str, error: str | None = None) -> None:
        self.components[f"{spec.kind[:-1]}:{spec.name}"] = {
            "kind": spec.kind[:-1],
            "name": spec.name,
            "type": spec.registration.type_name,
            "plugin": spec.registration.plugin,
            "state": state,
            "error": error,
        }

    def _build_sink(self, spec: ComponentSpec, data_dir: Path) -> None:
        ctx = self._context(spec.name, data_dir)
        try:
            sink = spec.registration.factory(spec.name, spec.options, ctx)
            chain = chain_from_specs(spec.policies, ctx)
        except Exception as exc:  # a broken plugin must not take the agent down
            log.error("sink %s (%s) failed to build: %s", spec.name, spec.registration.plugin, exc, exc_info=True)
            self.host.mark_failed(spec.registration.plugin, exc)
            self._component(spec, "failed", f"{type(exc).__name__}: {exc}")
            return
        assert self.journal is not None and self.dlq is not None and self.flags is not None
        flags, name = self.flags, spec.name
        worker = SinkWorker(
            name,
            sink,
            chain,
            ctx,
            self.journal,
            self.dlq,
            batch_size=spec.batch_size,
            max_in_flight=spec.max_in_flight,
            aggregate_s=spec.aggregate_s,
            replay_per_s=self.config.dlq.replay_per_s,
            auto_replay=self.config.dlq.auto_replay,
            plugin=spec.registration.plugin,
            enabled=lambda: flags.get(f"sinks.{name}.enabled"),
            rollout=lambda: flags.get(f"sinks.{name}.rollout_percent"),
        )
        self.workers[name] = worker
        watched = (f"sinks.{name}.enabled", f"sinks.{name}.rollout_percent")

        def changed(flag: str, old: Any, new: Any) -> None:
            if flag in watched:
                worker.nudge()
                self._progress.set()  # a flush() waiting for this sink may be done

        flags.subscribe(changed)
        self._component(spec, "running")

    def _start_source(self, spec: ComponentSpec, data_dir: Path) -> None:
        ctx = self._context(spec.name, data_dir)
        self._source_stats[spec.name] = ctx.stats
        try:
            source = spec.registration.factory(spec.name, spec.options, ctx)
        except Exception as exc:
            log.error("source %s (%s) failed to build: %s", spec.name, spec.registration.plugin, exc, exc_info=True)
            self.host.mark_failed(spec.registration.plugin, exc)
            self._component(spec, "failed", f"{type(exc).__name__}: {exc}")
            return
        self._component(spec, "running")
        emit = functools.partial(self._emit_from, spec.name)
        # A source that raises is restarted with backoff (status: restarting); one that
        # returns is finished.
        label = f"source {spec.name} (plugin {spec.registration.plugin})"
        self._spawn(f"source:{spec.name}", lambda: source.run(emit), label)

    def _emit_from(self, source: str, events: list[Event]) -> None:
        for e in events:
            if not e.source:
                e.source = source
        self.emit(events)

    def emit(self, events: list[Event]) -> None:
        """Hand events to the intake from the agent's loop thread (sources, plugins); they
        are checked like record()'s, and what fails is counted as `invalid`."""
        self.committer.emit(events)

    async def submit(self, events: list[Event], source: str = "") -> list[str]:
        """The durable way in for sources that ack their senders (OTLP, NATS): returns after
        the journal commit. Each event is checked as an emitted one is; those that fail are
        left out and their errors returned (the sender is told, so they are not losses).
        Raises IntakeFullError when the intake is full (a single batch larger than the whole
        capacity is still taken when the intake is empty, or it could never be) and
        JournalFullError when the journal is full or the agent is stopping."""
        committer = self.committer
        if not committer.accepting:
            raise JournalFullError("the agent is not accepting events")
        now = time.time()
        ts_max = now + self.config.agent.max_future_s
        good: list[Event] = []
        errors: list[str] = []
        for e in events:
            e.source = e.source or source
            e.agent_id = e.agent_id or self.id
            e.ts = e.ts or now
            try:
                good.append(check(e, ts_max))
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        if good:
            queued = len(committer.records) + committer.pending_events
            if queued and queued + len(good) > committer.capacity:
                raise IntakeFullError(f"the intake holds {queued} of {committer.capacity} events")
            await committer.submit(good)
        return errors

    def _spawn(self, name: str, factory: Callable[[], Awaitable[Any]], label: str = "") -> Supervised:
        """Run `factory()` as the supervised task `name` (restarted after an unexpected error)."""
        task, record = supervise(name, factory, label=label)
        self._tasks[name] = task
        self.supervised[name] = record
        task.add_done_callback(functools.partial(self._task_done, name))
        return record

    def _task_done(self, name: str, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s died: %r", name, task.exception(), exc_info=task.exception())

    async def _housekeeping(self) -> None:
        """Persist cursors and the ledger, compact, and expire the DLQ, on a timer."""
        assert self.journal is not None and self.dlq is not None
        last_expire = 0.0
        while True:
            await asyncio.sleep(0.2)
            try:
                await self.journal.checkpoint()
                if time.monotonic() - last_expire > 60:
                    last_expire = time.monotonic()
                    await self.dlq.expire()
            except Exception as exc:  # a full disk must not kill housekeeping; it retries
                log.error("housekeeping failed: %s", exc)

    async def _start_server(self) -> None:
        from agent.api.server import HttpServer, ServerStartError

        server = HttpServer(self)
        try:
            self.server_url = await server.start()
        except ServerStartError as exc:
            self.server_error = str(exc)
            if self.require_server:
                raise  # start() undoes the rest and leaves the agent "failed"; the CLI prints it
            log.error("HTTP server not started: %s", exc)
            return
        self._runner = server

    async def flush(self, timeout: float = 10.0) -> bool:
        """Commit everything recorded so far and wait until every sink has confirmed it."""
        if self.journal is None:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not await self.committer.drain(timeout):
            return False
        target = self.journal.last_seq
        for w in self.workers.values():
            w.hurry()  # an aggregating sink would otherwise linger up to its interval
        try:
            async with asyncio.timeout_at(deadline):
                while not self._confirmed(target):
                    if self._stopped is not None and self._stopped.is_set():
                        return False
                    # Cleared before waiting with no await in between, so no signal is missed.
                    self._progress.clear()
                    await self._wait_progress()
            return True
        except TimeoutError:
            return False

    def _confirmed(self, target: int) -> bool:
        assert self.journal is not None
        # A sink that is switched off or failing to start cannot confirm anything:
        # waiting for it would only burn the deadline (its events stay journaled).
        return all(
            self.journal.cursors.get(n, target) >= target
            or not w.enabled()
            or (not w.started and w.stats.state == "failed")
            for n, w in self.workers.items()
        )

    async def _wait_progress(self) -> None:
        """Until a cursor moves, a flag changes, the agent stops, or a sink's start attempt
        ends (SinkWorker has no signal of its own for that: we await the attempt itself)."""
        waits: list[asyncio.Future[Any]] = [
            f for w in self.workers.values() if not w.started and (f := w._starting) is not None and not f.done()
        ]
        if not waits:
            await self._progress.wait()
            return
        progress = asyncio.ensure_future(self._progress.wait())
        try:
            await asyncio.wait([progress, *waits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            progress.cancel()

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: stop intake, commit what is in memory, give sinks a deadline
        (`timeout`, default shutdown_timeout_s), persist cursors. Returns within the
        deadline plus SHUTDOWN_GRACE_S: what is still running then is abandoned (see
        `abandoned`). Safe to call twice; undelivered events wait in the journal."""
        if self.state in ("stopping", "stopped"):
            if self._stopped is not None:
                await self._stopped.wait()
            return
        if self.state == "new":  # never started: what was recorded can go nowhere
            self.state = "stopped"
            self.committer.close(losses.STOPPED)
            self.committer.discard()
            return
        if self.state == "failed":  # a start that raised has already released everything
            return
        self.state = "stopping"
        # Bounded: this returns within `deadline` + SHUTDOWN_GRACE_S (see _wind_down).
        deadline = self.config.agent.shutdown_timeout_s if timeout is None else timeout
        await self._wind_down(losses.SHUTDOWN_TIMEOUT, asyncio.get_running_loop().time() + deadline)
        self.state = "stopped"
        if self._stopped is not None:
            self._stopped.set()
        self._progress.set()  # a flush() still waiting gives up
        log.info("agent %s stopped", self.id)

    async def wait_stopped(self) -> None:
        """Wait until stop() has finished."""
        if self._stopped is not None:
            await self._stopped.wait()

    # -- reporting -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What /api/v1/status serves (see agent/status.py)."""
        return status_of(self)
