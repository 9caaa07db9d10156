"""The forwarder <-> owner wire: frames on a Unix domain socket in the data dir.

A frame is a 4-byte big-endian unsigned length, then that many bytes of msgpack: one
tagged map (`{"t": "batch", "seq": 7, "events": [...], "losses": {...}}`).

Why this framing:
- a length prefix lets either side read a whole frame with two exact reads
  (`readexactly` on the owner's loop, `recv_into` on the forwarder's thread): no
  scanning for delimiters, and event data may hold any bytes;
- msgpack because the journal already stores events as msgpack through msgspec, so an
  Event is encoded and decoded by the same compiled codec straight into the Struct,
  with no intermediate dicts (a tagged union decodes the message type in one pass);
- big-endian is network order; 4 bytes would allow 4 GiB, MAX_FRAME caps it so a
  corrupt length cannot make the owner allocate gigabytes.

The conversation, per connection:
  forwarder -> owner: Hello(pid, agent_id), then Batch(seq, events, losses) and
                      Flush(seq, timeout) in any number, pipelined;
  owner -> forwarder: Hello(pid, agent_id) (who owns the data dir now: a forwarder
                      counts an owner change by it), then Ack(seq, ok) for each, in
                      order. A Batch is acked after the journal commit that holds it; a
                      Flush after Agent.flush() for everything committed until then (ok =
                      its result). ok=False means "not taken" (the owner is stopping, its
                      journal is full): the forwarder keeps the batch and sends it again.
`seq` numbers a forwarder's messages (one space for batches and flushes). A batch sent
again after a reconnect keeps its seq and its event ids, so a sink that dedupes by id
(postgres, supabase, store) stores it once. `losses` are the forwarder's cumulative
loss counts by reason; the owner adds what grew since the last batch from that pid (or
since the `reported` counts of the Hello, which an earlier owner had already counted).
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import msgspec

from agent.event import Event

VERSION = 1
DIR_NAME = "forward"  # in the data dir, mode 0700: the socket and the spill files
SOCKET_NAME = "agent.sock"  # mode 0600
SPILL_DIR = "spill"  # forward/spill/<pid>-<ns>.msgpack: what a forwarder could not hand over
MAX_FRAME = 64 * 1024 * 1024
HEADER = struct.Struct(">I")
# Unix socket paths are limited to 108 bytes (sun_path); longer ones are reached
# through /proc/self/fd/<dirfd>/<name> (see short_path).
_SUN_PATH_MAX = 100


class Hello(msgspec.Struct, tag="hello", kw_only=True):
    """First message of a connection: who is forwarding."""

    pid: int
    agent_id: str = ""
    version: int = VERSION
    # The forwarder's loss counts some owner already acked: a new owner (failover) takes
    # them as the baseline, so it adds only what grew, not what the old owner counted.
    reported: dict[str, int] = {}


class Batch(msgspec.Struct, tag="batch", kw_only=True):
    """Events with their ids, and the forwarder's cumulative loss counts by reason."""

    seq: int
    events: list[Event]
    losses: dict[str, int] = {}


class Flush(msgspec.Struct, tag="flush", kw_only=True):
    """Ask the owner to flush (sinks confirm) everything it committed so far."""

    seq: int
    timeout: float


class Ack(msgspec.Struct, tag="ack", kw_only=True):
    """The owner's answer to a Batch (committed) or a Flush (its result)."""

    seq: int
    ok: bool = True
    error: str = ""
    # Never to be sent again: a sidecar's HTTP ingest refused the batch (400, 413). The
    # forwarder drops it and counts it as `forwarder_refused`.
    refused: bool = False


class Spill(msgspec.Struct, kw_only=True):
    """A spill file: what a stopping forwarder could not hand over, for the owner to take in."""

    pid: int
    events: list[Event]
    losses: dict[str, int] = {}


Message = Hello | Batch | Flush | Ack

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
spill_encoder = _encoder
spill_decoder = msgspec.msgpack.Decoder(Spill)


class FrameError(ValueError):
    """A frame that is too large or does not decode."""


def encode(msg: Message) -> bytes:
    """The frame for one message: length header and msgpack body."""
    body = _encoder.encode(msg)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length a header announces; raises FrameError past MAX_FRAME."""
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return int(n)


def decode(body: bytes | memoryview) -> Message:
    """One message from a frame body; raises FrameError when it is not one."""
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(str(exc)) from exc


def parse_address(address: str) -> tuple[str, str]:
    """`unix:///path/agent.sock` -> ("unix", "/path/agent.sock"); `http://host:port` (or
    https) -> ("http", the URL without a trailing slash). Raises ValueError otherwise."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"{address!r}: a unix:// address needs an absolute path (unix:///dir/agent.sock)")
        return "unix", path
    if address.startswith(("http://", "https://")) and len(address.split("://", 1)[1].strip("/")) > 0:
        return "http", address.rstrip("/")
    raise ValueError(f"{address!r}: expected unix:///path/agent.sock or http://host:port")


def listen_path(data_dir: Path | str, listen: str = "") -> Path:
    """The owner's socket: `[agent] listen` (unix://) when set, else data_dir/forward/agent.sock."""
    return Path(parse_address(listen)[1]) if listen else socket_path(data_dir)


def spill_dir_for(sock: Path) -> Path:
    """Where forwarders of the owner listening on `sock` spill: `spill/` next to the socket
    (data_dir/forward/spill for the default socket), which that owner scans."""
    return sock.parent / SPILL_DIR


def forward_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / DIR_NAME


def socket_path(data_dir: Path | str) -> Path:
    return forward_dir(data_dir) / SOCKET_NAME


def spill_dir(data_dir: Path | str) -> Path:
    return forward_dir(data_dir) / SPILL_DIR


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700: only this user reaches the socket."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class short_path:
    """A bind()/connect() address for `path` that fits sun_path: the path itself when
    short, else /proc/self/fd/<fd of its directory>/<name> for the duration of the block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> str:
        full = str(self.path)
        if len(full.encode()) <= _SUN_PATH_MAX:
            return full
        self._fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._fd}/{self.path.name}"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes from a blocking socket; raises ConnectionError on EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by the owner")
        got += k
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """Read one frame from a blocking socket."""
    n = frame_length(recv_exact(sock, HEADER.size))
    return decode(recv_exact(sock, n))
