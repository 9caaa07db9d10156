"""The `sidecar-agent` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from agent.config import Config, load, resolve
from agent.errors import AgentError, ConfigError
from agent.version import __version__


def _config(path: str | None) -> Config:
    return load(path) if path else resolve(None)


def cmd_run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT, then stop gracefully and exit 0."""
    from agent.runtime import Agent

    cfg = _config(args.config)

    async def main() -> int:
        agent = Agent(cfg, require_server=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await agent.start()
        except OSError as exc:
            raise _data_dir_error(cfg, exc) from None
        # Processes with this data_dir (or `[agent] connect` to this socket) forward to us.
        from agent.forwarding.owner import serve_forwarders

        try:
            owner = await serve_forwarders(agent)
        except BaseException:
            await agent.stop()
            raise
        print(
            f"sidecar-agent {__version__} running as {agent.id}; dashboard at {agent.server_url}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        print("stopping...", file=sys.stderr, flush=True)
        await owner.stop(min(1.0, agent.config.agent.shutdown_timeout_s / 4))  # forwarders get their acks
        await agent.stop()  # bounded: shutdown_timeout_s + runtime.SHUTDOWN_GRACE_S
        if agent.abandoned:
            # stop() gave up on these (logged); asyncio.run() and the interpreter's exit
            # would wait for them (and their threads) for ever. Cursors and the ledger are
            # saved: what they had not delivered is delivered after the next start.
            logging.shutdown()
            sys.stderr.flush()
            os._exit(0)
        return 0

    return asyncio.run(main())


def _data_dir_error(cfg: Config, exc: OSError) -> OSError | AgentError:
    """An OSError about the data dir (or a folder above it) as one line naming both paths."""
    data_dir = Path(cfg.agent.data_dir).absolute()
    where = Path(str(exc.filename or "")).absolute()
    if exc.filename is None or not (where == data_dir or where in data_dir.parents or data_dir in where.parents):
        return exc
    return AgentError(f"data dir {data_dir}: cannot use {where}: {exc.strerror or exc}")


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file, plugin options included; name every problem, one per line."""
    from agent.cli.check import check

    result = check(args.file)
    if result.errors:
        raise ConfigError("\n".join(result.errors))
    store = "; plus the dashboard's history store sink 'store'" if result.store else ""
    print(f"{args.file}: ok ({_count(result.sources, 'source')}, {_count(result.sinks, 'sink')}{store})")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def cmd_plugins(args: argparse.Namespace) -> int:
    """List plugins: name, package, version, state and what each provides."""
    from agent.plugin.host import PluginHost

    cfg = _config(args.config)
    host = PluginHost(cfg.plugins).load()
    if args.json:
        print(json.dumps(host.describe(), indent=2))
        return 0
    for p in host.describe():
        line = f"{p['name']:<20} {p['package']} {p['version']:<10} {p['state']:<8} {', '.join(p['provides'])}"
        print(line + (f"  error: {p['error']}" if p["error"] else ""))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write the starter config (loopback only, data beside it) to a new file."""
    from importlib import resources

    target = Path(args.file)
    if target.exists() and not args.force:
        raise AgentError(f"{target} exists; pass --force to overwrite it")
    target.write_text(resources.files(__package__).joinpath("starter.toml").read_text(encoding="utf-8"))
    print(
        f"wrote {target}; check it with `sidecar-agent check-config {target}`, run it with"
        f" `sidecar-agent run --config {target}`"
    )
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"sidecar-agent {__version__}")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from agent.cli.dlq import run

    return run(args, _config(args.config))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar-agent", description="A monitoring agent that loses nothing.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the agent")
    r.add_argument("--config", "-c", help="TOML config file (default: embedded defaults)")
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)
    pl = sub.add_parser("plugins", help="list plugins")
    pl.add_argument("--config", "-c")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plugins)
    i = sub.add_parser("init", help="write a starter config: loopback only, data in .sidecar-agent/ beside it")
    i.add_argument("file", nargs="?", default="agent.toml", help="where to write it (default: agent.toml)")
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    i.set_defaults(fn=cmd_init)
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(fn=cmd_version)
    d = sub.add_parser("dlq", help="inspect, replay or purge the dead-letter queue")
    d.add_argument("action", choices=["list", "replay", "purge"])
    d.add_argument("--config", "-c")
    d.add_argument("--sink")
    d.add_argument("--status")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_dlq)
    from agent.cli import dashboard, flags, postgres

    flags.add_parser(sub, _config)
    postgres.add_parsers(sub)
    dashboard.add_parser(sub, _config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`sidecar-agent plugins --json | head`): that is its choice,
        # not an error. Point stdout at /dev/null so the interpreter's last flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as exc:
        _error(exc)
        return 2
    except AgentError as exc:
        _error(exc)
        return 1
    except OSError as exc:  # a data dir that cannot be created or written: name the path, no traceback
        if exc.filename is None:
            raise
        _error(f"{exc.filename}: {exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def _error(problem: object) -> None:
    """One `error:` line per problem (a ConfigError names each on its own line)."""
    for line in str(problem).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)
