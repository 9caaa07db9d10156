"""`sidecar-agent dashboard export DIR`: the dashboard as a static folder in Supabase-only
mode (Realtime and PostgREST reads with the anon key), which a team hosts anywhere, with
no agent. docs/dashboard.md, "The Supabase-only dashboard".

The browser sees every byte of the folder, so the key written into it must be the public
anon key: a key that is the service key (a JWT whose role is service_role, a `sb_secret_`
key, or a supabase sink's own key) is refused.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import shutil
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import AgentError, ConfigError

CONFIG_FILE = "sidecar-config.json"

# What the anon role needs, on Supabase, for the page's reads (the migration,
# `sidecar-agent supabase sql`, creates the same policy).
RLS_SQL = """ALTER TABLE {schema}.{table} ENABLE ROW LEVEL SECURITY;
CREATE POLICY {table}_read ON {schema}.{table} FOR SELECT TO anon, authenticated USING (true);
GRANT USAGE ON SCHEMA {schema} TO anon, authenticated;
GRANT SELECT ON {schema}.{table} TO anon, authenticated;
ALTER PUBLICATION supabase_realtime ADD TABLE {schema}.{table};"""


def jwt_role(key: str) -> str | None:
    """The `role` claim of a key that is a JWT (Supabase's legacy anon and service keys), else None."""
    parts = key.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    role = claims.get("role") if isinstance(claims, dict) else None
    return role if isinstance(role, str) else None


def check_public_key(key: str, cfg: Config) -> None:
    """Raise AgentError unless `key` may be shown to every visitor of the page."""
    if jwt_role(key) == "service_role" or key.startswith("sb_secret_"):
        raise AgentError(
            "the key is a service-role key: the page would give every visitor full access; use the anon key"
        )
    for name, table in cfg.sinks.items():
        if (table.get("type") or name) == "supabase" and table.get("key") == key:
            raise AgentError(f"the key is sink {name}'s key (the service key the agent writes with); use the anon key")


def _sink_table(cfg: Config) -> tuple[str, str]:
    for name, t in cfg.sinks.items():
        if (t.get("type") or name) == "supabase":
            return str(t.get("table", "monitoring_events")), str(t.get("schema", "public"))
    return "monitoring_events", "public"


def settings(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """The page's Supabase settings: the options, else `[dashboard]` and the supabase sink's table."""
    table, schema = _sink_table(cfg)
    url = args.url or cfg.dashboard.supabase_url
    key = args.anon_key or cfg.dashboard.supabase_anon_key
    if not url or not key:
        raise ConfigError(
            "dashboard export needs the Supabase URL and anon key: --url and --anon-key, or"
            " [dashboard] supabase_url and supabase_anon_key in --config"
        )
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"the Supabase URL must be http(s)://host, got {url!r}")
    check_public_key(key, cfg)
    return {"url": url.rstrip("/"), "anon_key": key, "table": args.table or table, "schema": args.schema or schema}


def page(index: str, supabase_url: str) -> str:
    """index.html for a static folder: paths relative to it (it may live under any path),
    no preloads of the agent's API, the config file named, and a CSP as a meta tag (a
    static host may set no headers) that lets the page talk to its own files and Supabase only."""
    ws = re.sub(r"^http", "ws", supabase_url)
    csp = (
        f"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {supabase_url} {ws}; object-src 'none'; base-uri 'none'"
    )
    dropped = ('href="/api/', "The first data the page needs")  # the API preloads and their comment
    out = "\n".join(line for line in index.splitlines() if not any(d in line for d in dropped)) + "\n"
    out = out.replace('"/ui/', '"ui/')
    head = (
        f'<meta name="sidecar-config" content="{CONFIG_FILE}">\n'
        f'  <meta http-equiv="Content-Security-Policy" content="{csp}">'
    )
    return out.replace('<meta charset="utf-8">', f'<meta charset="utf-8">\n  {head}', 1)


def export(target: Path, sb: dict[str, Any], force: bool = False) -> list[Path]:
    """Write the static dashboard into `target`; returns the files written."""
    from agent.api.ui import TYPES, is_licence, ui_root

    if target.exists() and any(target.iterdir()) and not force:
        raise AgentError(f"{target} is not empty; pass --force to write into it")
    root = ui_root()
    written: list[Path] = []
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root)
        if not src.is_file() or rel.parts[0] == "tests" or any(p.startswith((".", "__")) for p in rel.parts):
            continue
        if src.suffix.lower() not in TYPES and not is_licence(src):
            continue
        if rel == Path("index.html"):
            continue
        dest = target / "ui" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(dest)
    index = target / "index.html"
    index.write_text(page((root / "index.html").read_text(encoding="utf-8"), sb["url"]), encoding="utf-8")
    conf = target / CONFIG_FILE
    conf.write_text(json.dumps({"data_source": "supabase", "supabase": sb}, indent=2) + "\n", encoding="utf-8")
    return [index, conf, *written]


def cmd_export(args: argparse.Namespace, load_config: Any) -> int:
    cfg = load_config(args.config)
    sb = settings(args, cfg)
    target = Path(args.dir)
    files = export(target, sb, force=args.force)
    print(f"wrote the Supabase-only dashboard to {target} ({len(files)} files); serve the folder with any static")
    print(f"file server. It reads {sb['schema']}.{sb['table']} with the anon key; the table needs this read policy:")
    print(RLS_SQL.format(schema=sb["schema"], table=sb["table"]))
    return 0


def add_parser(sub: argparse._SubParsersAction, load_config: Any) -> None:
    """The `dashboard export` subcommand."""
    d = sub.add_parser("dashboard", help="the dashboard as a static folder (Supabase-only)")
    d.add_argument("action", choices=["export"])
    d.add_argument("dir", help="where to write it (created; must be empty unless --force)")
    d.add_argument("--config", "-c", help="[dashboard] supabase_url / supabase_anon_key and the supabase sink's table")
    d.add_argument("--url", help="the Supabase project URL")
    d.add_argument("--anon-key", help="the anon (public) key; a service-role key is refused")
    d.add_argument("--table", help="the events table (default: the supabase sink's, else monitoring_events)")
    d.add_argument("--schema", help="its schema (default: the supabase sink's, else public)")
    d.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    d.set_defaults(fn=lambda args: cmd_export(args, load_config))
