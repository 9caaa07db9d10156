"""The data-dir lock: an exclusive `flock` on `data_dir/agent.lock`.

An agent holds it from start to stop; an offline CLI command (`dlq`, `flags` while no
agent answers over HTTP) holds it for the length of the command. The file names the
holder: `PID` for an agent, `PID cli` for a CLI command. A CLI command holds the lock
only briefly, so whoever finds one holding it waits up to `CLI_WAIT_S`; an agent
holding it is an error (after one more look: a new holder writes its pid just after
taking the lock). The kernel releases the lock when the process dies.

Failover (agent.forwarding): a forwarder takes the lock before the Agent that will hold
it exists. It `reserve()`s the held lock for this process, and the Agent's own
DataDirLock on that data dir adopts it in `try_acquire()`: a second flock on a new fd
would conflict with the first one even in the same process, and releasing it in between
would let another process take it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from pathlib import Path
from typing import ClassVar

from agent.errors import AgentError

log = logging.getLogger("sidecar_agent.db")

LOCK_FILE = "agent.lock"
CLI_WAIT_S = 10.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0; EPERM means it exists but is not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class DataDirInUse(AgentError):
    """Another agent (or CLI command) holds this data dir."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        self.data_dir = data_dir
        self.pid = holder.split()[0]
        self.by_cli = holder.endswith(" cli")
        if self.by_cli:
            msg = f"a sidecar-agent CLI command (pid {self.pid}); try again when it is done"
        else:
            msg = f"another agent (pid {self.pid}); give each agent its own agent.data_dir"
        super().__init__(f"data dir {data_dir} is in use by {msg}")


class DataDirLock:
    """The lock on one data dir, taken as an agent or as a CLI command (`cli=True`)."""

    # Held locks handed from a forwarder to the Agent it starts, by lock file path (see
    # the module docstring); a class attribute, so it is empty until a failover.
    _reserved: ClassVar[dict[str, int]] = {}

    def __init__(self, data_dir: Path, *, cli: bool = False) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self.cli = cli
        self._fd: int | None = None

    def reserve(self) -> None:
        """Keep this held lock for the next DataDirLock of the same data dir in this process."""
        if self._fd is not None:
            DataDirLock._reserved[os.path.abspath(self.path)] = self._fd
            self._fd = None

    @staticmethod
    def release_reserved(data_dir: Path) -> None:
        """Release a reserved lock nobody adopted (the Agent failed before taking it)."""
        fd = DataDirLock._reserved.pop(os.path.abspath(Path(data_dir) / LOCK_FILE), None)
        if fd is not None:
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> str | None:
        """Take the lock if it is free and return None; else return what the file says of its holder."""
        if self._fd is not None:
            return None
        if (fd := DataDirLock._reserved.pop(os.path.abspath(self.path), None)) is not None:
            self._fd = fd  # taken for us by a forwarder (failover); the file already names this pid
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            return holder or "?"
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}{' cli' if self.cli else ''}".encode())
        self._fd = fd
        return None

    async def acquire(self, cli_wait_s: float = CLI_WAIT_S) -> DataDirLock:
        """Take the lock, waiting up to `cli_wait_s` while a CLI command holds it;
        raise DataDirInUse when an agent holds it (or the CLI command does not finish)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + cli_wait_s
        first, logged = True, False
        while (holder := self.try_acquire()) is not None:
            by_cli = holder.endswith(" cli")
            # A holder writes its name just after taking the lock: one more look before giving up.
            if loop.time() >= end or (not by_cli and not first):
                raise DataDirInUse(self.path.parent, holder)
            if by_cli and not logged:
                log.warning(
                    "data dir %s is locked by a CLI command (pid %s); waiting up to %.0fs",
                    self.path.parent,
                    holder.split()[0],
                    cli_wait_s,
                )
                logged = True
            first = False
            await asyncio.sleep(0.05)
        return self

    def release(self) -> None:
        """Release the lock (closing the file releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
