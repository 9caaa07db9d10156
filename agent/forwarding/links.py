"""A forwarder's connection to its owner: the owner's Unix socket, or a sidecar's HTTP ingest.

- UnixLink: the data dir's socket (or `[agent] connect = "unix://…"`): wire frames both
  ways, pipelined; a reader thread takes the owner's Hello and Acks.
- HttpLink (`[agent] connect = "http://host:port"`): each Batch is POSTed as a msgpack
  array to the sidecar's /api/v1/events, which answers 202 only after the journal commit,
  so a 202 is the Ack. A Flush polls /api/v1/status until every sink's cursor has passed
  the journal's last seq at the time of the flush. One thread posts in order.

Both take messages with send() (which never waits for the answer) and report from their
own thread what comes back, through `on_message(link, msg)`, and their end, through
`on_broken(link)`: the forwarder's window, acks, re-sends and flushes are one code path.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.event import msgpack_encoder
from agent.forwarding import wire

log = logging.getLogger("sidecar_agent.forwarding")

OnMessage = Callable[["Link", wire.Message], None]
OnBroken = Callable[["Link"], None]
HTTP_TIMEOUT_S = 30.0
FLUSH_POLL_S = 0.05


class Link:
    """One connection; `broken` once it ended (set by the forwarder, under its lock)."""

    broken = False

    def __init__(self, on_message: OnMessage, on_broken: OnBroken) -> None:
        self._on_message = on_message
        self._on_broken = on_broken

    def start(self) -> None:
        """Start the thread that reports answers (after the forwarder holds the link)."""
        threading.Thread(target=self._answers, name="sidecar-agent-forwarder-acks", daemon=True).start()

    def _answers(self) -> None:
        try:
            self._serve()
        except (OSError, wire.FrameError, http.client.HTTPException, ValueError) as exc:
            log.debug("forwarder link ended: %r", exc)
        self._on_broken(self)

    def _serve(self) -> None:
        raise NotImplementedError

    def send(self, msg: wire.Message) -> None:
        """Send (or queue) one message; raises OSError when the link is down."""
        raise NotImplementedError

    def close(self) -> None:
        """End the link (its thread then reports it broken)."""
        raise NotImplementedError

    def forget(self) -> None:
        """After fork(), in the child: drop the inherited connection without ending the parent's."""


class UnixLink(Link):
    """Frames on a Unix stream socket; the first frame each way is a Hello."""

    def __init__(self, path: Path, hello: wire.Hello, on_message: OnMessage, on_broken: OnBroken) -> None:
        super().__init__(on_message, on_broken)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with wire.short_path(path) as addr:
                sock.connect(addr)
            sock.sendall(wire.encode(hello))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._send_lock = threading.Lock()

    def _serve(self) -> None:
        while True:
            self._on_message(self, wire.recv_message(self.sock))

    def send(self, msg: wire.Message) -> None:
        frame = wire.encode(msg)
        with self._send_lock:
            self.sock.sendall(frame)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def forget(self) -> None:
        self.sock.close()  # never shutdown(): the parent still uses the connection


class HttpLink(Link):
    """Batches POSTed to a sidecar's /api/v1/events as msgpack, one at a time, in order."""

    def __init__(self, url: str, token: str | None, on_message: OnMessage, on_broken: OnBroken) -> None:
        super().__init__(on_message, on_broken)
        parts = urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.base = parts.path.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=HTTP_TIMEOUT_S)
        self._queue: queue.SimpleQueue[wire.Message | None] = queue.SimpleQueue()
        self._closed = False
        try:
            status, _ = self._request("GET", "/healthz")  # is a sidecar there at all?
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise ConnectionError(f"{url}: {exc}") from exc
        if status != 200:
            self._conn.close()
            raise ConnectionError(f"{url}/healthz answered {status}")

    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
        headers = dict(self._headers)
        if ctype:
            headers["Content-Type"] = ctype
        self._conn.request(method, self.base + path, body=body, headers=headers)
        r = self._conn.getresponse()
        return r.status, r.read()

    def send(self, msg: wire.Message) -> None:
        if self._closed:
            raise ConnectionError("link closed")
        self._queue.put(msg)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)

    def _serve(self) -> None:
        try:
            while (msg := self._queue.get()) is not None:
                if isinstance(msg, wire.Batch):
                    self._on_message(self, self._post(msg))
                elif isinstance(msg, wire.Flush):
                    self._on_message(self, wire.Ack(seq=msg.seq, ok=self._flush(msg.timeout)))
        finally:
            self._closed = True
            self._conn.close()

    def _post(self, batch: wire.Batch) -> wire.Ack:
        body = msgpack_encoder.encode(batch.events)
        status, body = self._request("POST", "/api/v1/events", body, "application/msgpack")
        if status == 202:
            return wire.Ack(seq=batch.seq)
        error = f"{status}: {body[:300].decode(errors='replace')}"
        if status in (400, 413):  # the same events would be refused again: never re-send them
            return wire.Ack(seq=batch.seq, ok=False, refused=True, error=error)
        if status == 401:
            log.error("the sidecar refused the token (connect = %s): %s", self.base or "/", error)
        # 401, 503 (journal full, stopping), anything else: the batch waits and goes again.
        return wire.Ack(seq=batch.seq, ok=False, error=error)

    def _flush(self, timeout: float) -> bool:
        """Until every running sink's cursor is past the journal's last seq as of now."""
        end = time.monotonic() + timeout
        target: int | None = None
        while True:
            status, body = self._request("GET", "/api/v1/status")
            if status != 200:
                return False
            st: dict[str, Any] = json.loads(body)
            last = int((st.get("journal") or {}).get("last_seq") or 0)
            target = last if target is None else target
            waiting = [
                s
                for s in st.get("sinks", [])
                if s.get("enabled", True)
                and s.get("state") != "failed"
                and last - int(s.get("lag_events") or 0) < target
            ]
            if not waiting:
                return True
            if time.monotonic() + FLUSH_POLL_S > end:
                return False
            time.sleep(FLUSH_POLL_S)
