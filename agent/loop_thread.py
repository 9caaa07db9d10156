"""The end of an embedded agent's event loop (agent.embed runs it on a daemon thread),
and what a fork child must let go of from the parent's loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger("sidecar_agent")

LEFTOVER_GRACE_S = 0.5


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """End the agent's loop for good once stop() returned, also when it abandoned tasks
    (Agent.abandoned: a sink that swallows its cancels, a stuck close). Those would
    otherwise stay pending on a loop nobody runs, in the host process, for ever. They
    are cancelled once more and given LEFTOVER_GRACE_S; a task still pending then has its
    coroutine closed (GeneratorExit ends it where a cancel did not). Their events stay
    journaled, as stop() says. A blocking call in a worker thread cannot be ended from
    here; the loop no longer waits for it."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=LEFTOVER_GRACE_S))
    for t in pending:
        if not t.done():
            log.warning("closing the agent's loop: task %s ignored its cancel; its coroutine is closed", t.get_name())
            t._log_destroy_pending = False  # type: ignore[attr-defined]  # ended below, not forgotten
            with contextlib.suppress(RuntimeError):  # "coroutine ignored GeneratorExit"
                t.get_coro().close()
    with contextlib.suppress(TimeoutError):
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), LEFTOVER_GRACE_S))
    loop.close()


def release_listeners(loop: asyncio.AbstractEventLoop) -> None:
    """In a child of fork(): let go of the child's copies of the listening sockets the
    parent's loop serves (the HTTP port, the forwarder socket). A copy left open would
    keep the port bound, with nobody accepting, after the parent is gone, so a new owner
    (failover) could not bind it and clients would hang in its backlog. Each such fd is
    pointed at /dev/null with dup2: the parent's socket objects in the child's memory may
    close that fd number later, and must not close another file by then."""
    selector = getattr(loop, "_selector", None)  # the loop's own fds: no public API lists them
    if selector is None:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in {key.fd for key in selector.get_map().values()}:
            try:
                with socket.socket(fileno=os.dup(fd)) as probe:
                    listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError:
                continue  # not a socket (the loop's self-pipe is one, but does not listen)
            if listening:
                os.dup2(null, fd)
    finally:
        os.close(null)
