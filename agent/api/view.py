"""What the HTTP API reads of the agent: a read-only view, so the API depends on this
Protocol and not on agent.runtime (runtime.Agent satisfies it structurally)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.config import Config
    from agent.flags import FlagService
    from agent.history.board import HistoryBoard
    from agent.losses import LossLedger
    from agent.pipeline.delivery import SinkWorker
    from agent.pipeline.intake import Committer
    from agent.pipeline.journal import Journal
    from agent.pipeline.stream import StreamHub
    from agent.pipeline.supervisor import Supervised
    from agent.plugin.host import PluginHost
    from agent.storage.dlq import DeadLetterQueue


class AgentView(Protocol):
    """The agent as the API sees it. Properties: the API reads them, never rebinds them."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> Config: ...
    @property
    def state(self) -> str: ...
    @property
    def started_at(self) -> float | None: ...
    @property
    def components(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def workers(self) -> Mapping[str, SinkWorker]: ...
    @property
    def supervised(self) -> Mapping[str, Supervised]: ...  # by task name: state, restarts, last error
    @property
    def journal(self) -> Journal | None: ...
    @property
    def dlq(self) -> DeadLetterQueue | None: ...
    @property
    def committer(self) -> Committer | None: ...
    @property
    def flags(self) -> FlagService | None: ...
    @property
    def ledger(self) -> LossLedger: ...
    @property
    def stream(self) -> StreamHub: ...
    @property
    def host(self) -> PluginHost: ...  # the routes plugins registered; a clashing one marks its plugin failed
    @property
    def history(self) -> HistoryBoard: ...

    def status(self) -> dict[str, Any]: ...
