"""`sidecar-agent dashboard export DIR`: the static, Supabase-only dashboard.

The CLI refuses a service key; the exported folder, served by a plain static file server
(python -m http.server in a child process) with no agent anywhere, shows two agents'
events live from the Supabase emulator (over the real PostgreSQL) and lists both in its
Fleet tab. Browser fixtures come from test_dashboard_browser.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from typing import Any

from agent.runtime import Agent
from tests.dashboard_support import agent_config
from tests.helpers import free_port, run_cli, wait_until
from tests.test_dashboard_browser import TIMEOUT_MS, browser, open_page  # noqa: F401  (fixtures)


def jwt(role: str) -> str:
    """A JWT-shaped key with this role claim (the signature is never checked by the CLI)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'iss': 'supabase', 'role': role})}.c2lnbmF0dXJl"


def test_a_service_role_key_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "site"
    r = run_cli("dashboard", "export", str(out), "--url", "http://127.0.0.1:1", "--anon-key", jwt("service_role"))
    assert r.returncode == 1
    assert "service-role key" in r.stderr
    assert not out.exists()
    r = run_cli("dashboard", "export", str(out), "--url", "http://127.0.0.1:1", "--anon-key", "sb_secret_abc")
    assert r.returncode == 1 and "service-role key" in r.stderr


def test_the_sinks_own_key_is_refused(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[dashboard]\nsupabase_url = "http://127.0.0.1:1"\nsupabase_anon_key = "the-service-key"\n'
        '[sinks.sb]\ntype = "supabase"\nurl = "http://127.0.0.1:1"\nkey = "the-service-key"\n'
    )
    r = run_cli("dashboard", "export", str(tmp_path / "site"), "--config", str(cfg))
    assert r.returncode == 1 and "sink sb's key" in r.stderr


def test_export_without_url_or_key_names_what_is_missing(tmp_path):
    r = run_cli("dashboard", "export", str(tmp_path / "site"))
    assert r.returncode == 2 and "--url and --anon-key" in r.stderr


def test_export_writes_a_relative_agentless_page_and_the_anon_key_only(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[dashboard]\nsupabase_url = "https://proj.example.test"\n'
        f'supabase_anon_key = "{jwt("anon")}"\n'
        '[sinks.sb]\ntype = "supabase"\nurl = "https://proj.example.test"\nkey = "service-key-0f9e8d"\n'
        'table = "events_x"\nschema = "mon"\n'
    )
    out = tmp_path / "site"
    r = run_cli("dashboard", "export", str(out), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "CREATE POLICY events_x_read ON mon.events_x FOR SELECT TO anon" in r.stdout
    conf = json.loads((out / "sidecar-config.json").read_text())
    assert conf["supabase"] == {
        "url": "https://proj.example.test",
        "anon_key": jwt("anon"),
        "table": "events_x",
        "schema": "mon",
    }
    page = (out / "index.html").read_text()
    assert '<meta name="sidecar-config" content="sidecar-config.json">' in page
    assert '"/ui/' not in page and "/api/" not in page  # relative paths, no agent API
    assert "connect-src 'self' https://proj.example.test wss://proj.example.test" in page
    assert (out / "ui" / "fleet.js").is_file() and (out / "ui" / "vendor" / "supabase-js" / "supabase.esm.js").is_file()
    assert not (out / "ui" / "tests").exists() and not (out / "ui" / "__init__.py").exists()
    assert not [p for p in out.rglob("*") if p.is_file() and b"service-key-0f9e8d" in p.read_bytes()]
    # a second export into the same folder needs --force
    again = run_cli("dashboard", "export", str(out), "--config", str(cfg))
    assert again.returncode == 1 and "--force" in again.stderr
    assert run_cli("dashboard", "export", str(out), "--config", str(cfg), "--force").returncode == 0


async def test_the_exported_folder_served_statically_shows_two_agents_live(
    tmp_path,
    open_page,  # noqa: F811  (the fixture)
    supabase_emulator,
    pg_table,
):
    emu = supabase_emulator
    site = tmp_path / "site"
    r = run_cli(
        "dashboard", "export", str(site), "--url", emu.url, "--anon-key", emu.anon_key, "--table", pg_table.table
    )
    assert r.returncode == 0, r.stderr
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agents: list[Agent] = []
    try:
        for agent_id in ("edge-a", "edge-b"):  # writers only: no HTTP server, no dashboard
            cfg = agent_config(
                tmp_path / agent_id,
                agent={"id": agent_id, "heartbeat_s": 1.0},
                server={"enabled": False},
                dashboard={"store": False},
                sinks={
                    "sb": {
                        "type": "supabase",
                        "url": emu.url,
                        "key": emu.key,
                        "table": pg_table.table,
                        "policies": [],
                        "batch_size": 50,
                    }
                },
            )
            agents.append(await Agent(cfg).start())
        url = f"http://127.0.0.1:{port}/"

        def up() -> bool:
            import urllib.request

            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(up, timeout=60, what="the static file server")
        page = await open_page(url)
        await page.wait_for_selector("#conn.live", timeout=TIMEOUT_MS)
        assert await page.text_content("#data-source") == "supabase"
        # only the tabs that need no agent
        tabs = await page.locator("#tabs a").evaluate_all("els => els.map(e => e.dataset.tab)")
        assert tabs == ["overview", "sessions", "fleet"]
        a, b = agents
        a.record("from.a", 1.0)
        b.record("from.b", 2.0)
        assert await a.flush(30) and await b.flush(30)
        rows = await pg_table.fetch("SELECT id::text AS id, agent_id FROM {t} WHERE event_type LIKE 'from.%'")
        assert {r["agent_id"] for r in rows} == {"edge-a", "edge-b"}
        for row in rows:  # each live, through Realtime
            await page.wait_for_selector(f'#events tbody tr[data-id="{row["id"]}"]', timeout=TIMEOUT_MS)
        await page.click("a[data-tab=fleet]")
        for agent_id in ("edge-a", "edge-b"):
            await page.wait_for_selector(
                f'#fleet tbody tr[data-agent="{agent_id}"][data-state="live"]', timeout=TIMEOUT_MS
            )
        # the cards come from the fleet's heartbeats, not from an agent
        await page.click("a[data-tab=overview]")
        await page.wait_for_function(
            "() => document.querySelector('#health').textContent === '2 agents, 0 stale'", timeout=TIMEOUT_MS
        )
        # every request to Supabase carries the anon key (a reload makes them again, watched)
        keys: list[str | None] = []
        page.on("request", lambda req: req.url.startswith(emu.url) and keys.append(req.headers.get("apikey")))
        await page.reload()
        await page.wait_for_selector("#conn.live", timeout=TIMEOUT_MS)
        await page.wait_for_function(
            "() => document.querySelector('#health').textContent.startsWith('2 agents')", timeout=TIMEOUT_MS
        )
        assert keys and set(keys) == {emu.anon_key}
    finally:
        await open_page.close_all()  # before the agents, the static server and the emulator go away
        for a in agents:
            await a.stop(timeout=2)
        server.terminate()
        server.wait(10)
