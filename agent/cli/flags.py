"""`sidecar-agent flags`: list, set and clear feature flags, online or offline."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from agent.cli import client
from agent.config import Config


def _offline_flags(cfg: Config):
    from agent.flags import FlagService, core_flags
    from agent.plan import plan
    from agent.plugin.host import PluginHost

    host = PluginHost(cfg.plugins).load()
    sinks = [s.name for s in plan(cfg, host) if s.kind == "sinks"]
    defs = [("core", f) for f in core_flags(sinks)] + list(host.flags)
    return FlagService.offline(defs, Path(cfg.agent.data_dir), cfg.flags, config_origin=cfg.origin)


def _flags_offline(cfg: Config, action: str, name: str | None, value: object) -> dict:
    """No agent answered: work on the data dir's flag files under the data-dir lock, so an
    agent starting meanwhile reads them before or after the change, never in between.
    Listing takes the lock too: loading may clean up or compact those files."""
    from agent.flags import FlagError
    from agent.storage.dirlock import DataDirInUse, DataDirLock

    lock = DataDirLock(Path(cfg.agent.data_dir), cli=True)
    try:
        asyncio.run(lock.acquire())
    except DataDirInUse as exc:
        raise client.offline_refused(cfg, exc) from None
    try:
        service = _offline_flags(cfg)
        if action == "list":
            return {"flags": service.describe(), "offline": True}
        if action == "set":
            return service.set(name, value, "cli (offline)")
        cleared = service.clear(name, "cli (offline)")
        # The same answer as DELETE /api/v1/flags/NAME: the flag as it now is, and whether
        # an override was removed.
        return (
            {**service.describe_flag(name), "cleared": cleared}
            if name in service
            else {"name": name, "cleared": cleared}
        )
    except FlagError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        lock.release()


def flags(args: argparse.Namespace, cfg: Config) -> int:
    """`flags list|set NAME VALUE|clear NAME`: via the running agent, else the data dir."""
    if args.action in ("set", "clear") and not args.name:
        raise SystemExit(f"error: flags {args.action} needs a flag name")
    if args.action == "set" and args.value is None:
        raise SystemExit("error: flags set needs a value")
    value = None
    if args.value is not None:
        try:
            value = json.loads(args.value)
        except ValueError:
            value = args.value  # a bare word like `supabase` or `off`
    try:
        if args.action == "list":
            result = client.call(cfg, "GET", "/api/v1/flags")
        elif args.action == "set":
            result = client.call(cfg, "PUT", f"/api/v1/flags/{args.name}", body=value)
        else:
            result = client.call(cfg, "DELETE", f"/api/v1/flags/{args.name}")
    except client.AgentUnreachable:
        result = _flags_offline(cfg, args.action, args.name, value)
    if args.action == "list" and not args.json:
        for f in result["flags"]:
            print(f"{f['name']:<40} {json.dumps(f['value']):<12} ({f['layer']})  {f['description']}")
        return 0
    print(json.dumps(result, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction, config_fn) -> None:
    """`sidecar-agent flags list|set|clear [NAME] [VALUE]`."""
    f = sub.add_parser("flags", help="list, set or clear feature flags")
    f.add_argument("action", choices=["list", "set", "clear"])
    f.add_argument("name", nargs="?")
    f.add_argument("value", nargs="?", help='a JSON value (true, 25, "dual") or a bare word')
    f.add_argument("--config", "-c")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=lambda a: flags(a, config_fn(a.config)))
