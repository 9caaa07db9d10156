"""StatsD loss at a given rate: the agent's statsd source against a bare receive loop, and
collectd's statsd plugin when collectd is installed, all fed by the same sender.

    .venv/bin/python bench/statsd_throughput.py [--seconds 4] [--rounds 3]

Each receiver runs in its own process and is measured alone (2 cores): a sender process
sends paced datagrams for `--seconds` (one line each at 25k and 50k packets/s; ten lines
each at 5k and 10k packets/s), and the loss is what the kernel dropped on the receiver's
socket (`/proc/net/udp`, the drops column of the bound port; on loopback nothing else
drops) plus, for the agent, what its loss ledger counted. Receivers:

- "bare loop": `recv_into` in a tight loop, counting datagrams: the least any receiver
  does (same 8 MiB SO_RCVBUF asked as the agent);
- "agent": `sidecar-agent run` with the statsd source (aggregate = true, the default)
  and a jsonl sink;
- "agent, aggregate = false": one journaled event per sample;
- "collectd": collectd 5.x with only its statsd plugin (skipped when not installed).

Prints one row per receiver and rate: loss per round and the range; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATES = [(25_000, 1), (50_000, 1), (5_000, 10), (10_000, 10)]  # (packets/s, lines per packet)

SENDER = r"""
import socket, sys, time
port, rate, lines, seconds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
payload = "\n".join(f"bench.l{i}:1|c" for i in range(lines)).encode()  # plain StatsD: collectd takes no tags
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
total = int(rate * seconds)
start = time.perf_counter()
sent = 0
while sent < total:
    due = min(total, int((time.perf_counter() - start) * rate) + 1)
    while sent < due:
        s.sendto(payload, ("127.0.0.1", port))
        sent += 1
    time.sleep(0.0005)  # caught up: wait for the next few to be due
print(sent, time.perf_counter() - start)
"""

BARE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
s.bind(("127.0.0.1", int(sys.argv[1])))
buf = bytearray(65536)
n = 0
while True:
    s.recv_into(buf)
    n += 1
"""


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernel_drops(port: int) -> int | None:
    """The drops column of the UDP socket bound to 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == want:
            return int(f[12])
    return None


def wait_bound(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while kernel_drops(port) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"receiver did not bind udp {port} (exit {proc.poll()})")
        time.sleep(0.05)


def send(port: int, rate: int, lines: int, seconds: float) -> tuple[int, float]:
    """Datagrams sent, and the rate achieved (the sender falls behind on a loaded machine)."""
    out = subprocess.run([sys.executable, "-c", SENDER, str(port), str(rate), str(lines), str(seconds)],
                         capture_output=True, text=True, check=True)
    sent, took = out.stdout.split()
    return int(sent), int(sent) / float(took)


class Receiver:
    name = ""

    def start(self, port: int, tmp: Path) -> subprocess.Popen:
        raise NotImplementedError

    def extra_losses(self) -> int:
        return 0

    def stop(self, proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bare(Receiver):
    name = "bare loop (recv_into, count)"

    def start(self, port: int, tmp: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", BARE, str(port)], stdout=subprocess.DEVNULL,
                                stderr=(tmp / "log").open("w"), text=True)


class Agent(Receiver):
    def __init__(self, aggregate: bool) -> None:
        self.aggregate = aggregate
        self.name = "agent statsd source" + ("" if aggregate else ", aggregate = false")
        self.http = 0

    def start(self, port: int, tmp: Path) -> subprocess.Popen:
        self.http = free_port(socket.SOCK_STREAM)
        cfg = tmp / "agent.toml"
        cfg.write_text(textwrap.dedent(f"""
            [agent]
            data_dir = "{tmp / 'data'}"
            [server]
            port = {self.http}
            [dashboard]
            store = false
            [sources.statsd]
            port = {port}
            flush_interval_s = 1
            aggregate = {str(self.aggregate).lower()}
            [sinks.out]
            type = "jsonl"
            path = "{tmp / 'out.jsonl'}"
        """))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=(tmp / "log").open("w"), text=True)

    def extra_losses(self) -> int:
        # what the agent itself dropped after receiving (intake full, ...); kernel drops are read apart
        time.sleep(1.5)  # one flush interval, so the last batches are in
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/api/v1/losses", timeout=30) as r:
            by_reason = json.loads(r.read())["by_reason"]
        return sum(n for reason, n in by_reason.items() if reason != "statsd_socket_overflow")


class Collectd(Receiver):
    name = "collectd statsd plugin"

    def start(self, port: int, tmp: Path) -> subprocess.Popen:
        conf = tmp / "collectd.conf"
        conf.write_text(textwrap.dedent(f"""
            Interval 1
            BaseDir "{tmp}"
            PIDFile "{tmp / 'collectd.pid'}"
            AutoLoadPlugin false
            LoadPlugin statsd
            <Plugin statsd>
              Host "127.0.0.1"
              Port "{port}"
            </Plugin>
        """))
        # its log to a file: an unread pipe would fill and stall it
        return subprocess.Popen([shutil.which("collectd") or "collectd", "-f", "-C", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=(tmp / "log").open("w"), text=True)


def measure(rx: Receiver, rate: int, lines: int, seconds: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        port = free_port(socket.SOCK_DGRAM)
        proc = rx.start(port, Path(d))
        try:
            wait_bound(port, proc)
            time.sleep(0.5)  # let it settle (the agent starts its other parts)
            before = kernel_drops(port) or 0
            sent, achieved = send(port, rate, lines, seconds)
            time.sleep(0.5)
            dropped = (kernel_drops(port) or 0) - before
            lost_lines = dropped * lines + rx.extra_losses()
        finally:
            rx.stop(proc)
    return lost_lines / (sent * lines), achieved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    receivers: list[Receiver] = [Bare(), Agent(True), Agent(False)]
    if shutil.which("collectd"):
        receivers.append(Collectd())
    else:
        print("collectd not installed: its rows are left out")
    print(f"{args.seconds:g} s per run, {args.rounds} rounds; loss = lines dropped / lines sent")
    for rate, lines in RATES:
        for rx in receivers:
            runs = [measure(rx, rate, lines, args.seconds) for _ in range(args.rounds)]
            losses = [loss for loss, _ in runs]
            each = " ".join(f"{loss:.2%} at {got / 1000:.1f}k" for loss, got in runs)
            span = f"{min(losses):.2%}-{max(losses):.2%}"
            print(f"{rate:>6,} pkt/s x {lines:>2} lines  {rx.name:<40} loss {span}  ({each} pkt/s)", flush=True)


if __name__ == "__main__":
    main()
