"""The `sidecar-agent` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

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
        await agent.start()
        print(
            f"sidecar-agent {__version__} running as {agent.id}; dashboard at {agent.server_url}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        print("stopping...", file=sys.stderr, flush=True)
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


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file, plugin options included."""
    from agent.plan import build_flags, plan
    from agent.plugin.host import PluginHost

    cfg = load(args.file)
    host = PluginHost(cfg.plugins).load()
    specs = plan(cfg, host)
    build_flags(cfg, host, specs)  # bad [flags] values and SIDECAR_AGENT_FLAG_* fail here too
    print(
        f"{args.file}: ok ({sum(s.kind == 'sources' for s in specs)} sources, "
        f"{sum(s.kind == 'sinks' for s in specs)} sinks)"
    )
    return 0


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
    from agent.cli import flags, postgres

    flags.add_parser(sub, _config)
    postgres.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
