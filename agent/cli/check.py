"""`check-config`: every problem in a config file in one run, plugin options included.

The core sections are checked key by key by `agent.config.config_errors`. Each
`[sources.*]` / `[sinks.*]` table is planned alone; after an error the offending key
is left out and the table planned again, so one run names every bad key of a table.
Unknown keys, types and policies get a "did you mean" from what is really there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from agent.config import Config, did_you_mean, load
from agent.errors import AgentError, ConfigError, PluginError
from agent.plugin.host import PluginHost

MAX_ERRORS_PER_TABLE = 50  # a bound on the re-plan loop, far above any real table


@dataclass
class CheckResult:
    """The problems found (each one line naming the file and key path), and the counts."""

    errors: list[str]
    sources: int = 0
    sinks: int = 0  # the user's sinks, without the implicit history store
    store: bool = False  # the dashboard's history store sink `store` is added


def check(path: str) -> CheckResult:
    """Load, plan and build the flags of the config at `path`, collecting every problem."""
    from agent.plan import build_flags, plan

    try:
        cfg = load(path)
    except ConfigError as exc:
        return CheckResult(str(exc).splitlines())
    host = PluginHost(cfg.plugins).load()
    errors: list[str] = []
    for kind in ("sources", "sinks"):
        for name, table in getattr(cfg, kind).items():
            errors += _table_errors(cfg, host, kind, name, dict(table))
    if errors:
        return CheckResult(errors)
    try:
        specs = plan(cfg, host)  # what needs every table at once: check_together, the implicit store
        build_flags(cfg, host, specs)  # bad [flags] values and SIDECAR_AGENT_FLAG_* fail here too
    except AgentError as exc:
        return CheckResult(str(exc).splitlines())
    user_sinks = set(cfg.sinks)
    return CheckResult(
        [],
        sources=sum(s.kind == "sources" for s in specs),
        sinks=sum(s.kind == "sinks" and s.name in user_sinks for s in specs),
        store=any(s.kind == "sinks" and s.name not in user_sinks for s in specs),
    )


def _table_errors(cfg: Config, host: PluginHost, kind: str, name: str, table: dict[str, Any]) -> list[str]:
    from agent.plan import plan

    errors: list[str] = []
    for _ in range(MAX_ERRORS_PER_TABLE):
        alone = msgspec.structs.replace(
            cfg,
            sources={name: table} if kind == "sources" else {},
            sinks={name: table} if kind == "sinks" else {},
            dashboard=msgspec.structs.replace(cfg.dashboard, store=False),
        )
        try:
            plan(alone, host)
            return errors
        except ConfigError as exc:
            message = str(exc)
        prefix = f"{cfg.origin}: {kind}.{name}"
        keys = message[len(prefix) :].split(":", 1)[0].lstrip(".").split(".") if message.startswith(prefix) else []
        errors.append(message + _hint(host, kind, name, table, keys, message))
        if not _leave_out(table, keys):
            return errors
    return errors


def _hint(host: PluginHost, kind: str, name: str, table: dict[str, Any], keys: list[str], message: str) -> str:
    """A "did you mean" for an unknown type, policy or key at `keys` inside `table`."""
    if keys == ["type"] and "unknown" in message:
        return did_you_mean(str(table.get("type")), host.registry[kind])
    if keys == ["policies"] and (m := re.search(r"unknown policy type '([^']*)'", message)):
        return did_you_mean(m.group(1), host.registry["policies"])
    if not message.endswith("unknown key") or not keys:
        return ""
    try:
        reg = host.get(kind, str(table.get("type", name)))
    except PluginError:
        return ""
    if len(keys) == 1:
        known = [f.name for f in msgspec.structs.fields(reg.options)] + ["type"]
        if kind == "sinks":
            known += ["policies", "batch_size", *host.registry["policies"]]
        return did_you_mean(keys[0], known)
    policy = host.registry["policies"].get(keys[0])
    return did_you_mean(keys[1], [f.name for f in msgspec.structs.fields(policy.options)]) if policy else ""


def _leave_out(table: dict[str, Any], keys: list[str]) -> bool:
    """Remove the key an error named so the next plan finds the next error; False when
    there is nothing to remove (the table's type, or an error about the whole table)."""
    if len(keys) == 1 and keys[0] in table and keys[0] != "type":
        del table[keys[0]]
        return True
    if len(keys) == 2 and isinstance(table.get(keys[0]), dict) and keys[1] in table[keys[0]]:
        table[keys[0]] = {k: v for k, v in table[keys[0]].items() if k != keys[1]}
        return True
    return False
