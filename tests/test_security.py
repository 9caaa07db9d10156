"""Issue 15 over real sockets: the Host allowlist, no cross-site writes, reads behind the
token (the WebSocket and the dashboard's session cookie included), a taken port, and the
connection bounds of issue 18 (slowloris, the connection cap)."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import msgspec
import pytest

from agent.api.server import ServerStartError
from tests.helpers import (
    agent_config,
    await_until,
    free_port,
    make_agent,
    post_raw,
    run_cli,
    spawn,
    start_agent,
    wait_healthy,
    write_toml,
)

TOKEN = "s3cret-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENT = {"name": "sec.test", "value": 1}


async def _get(agent, path: str, **headers: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as s, s.get(agent.server_url + path, headers=headers) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


# -- 1. Host -------------------------------------------------------------------------------


async def test_a_foreign_host_gets_421_and_rebinding_reads_nothing(tmp_path):
    agent = await start_agent(tmp_path / "d", server={"allowed_hosts": ["agent.internal", ".corp.example"]})
    try:
        port = agent.server_url.rsplit(":", 1)[1]
        status, body = await _get(agent, "/api/v1/status", Host=f"evil.example:{port}")
        assert status == 421 and "server.allowed_hosts" in body["error"]
        assert (await _get(agent, "/api/v1/events", Host="evil.example"))[0] == 421
        assert (await post_raw(agent, EVENT, headers={"Host": "evil.example"})).status == 421
        for host in (
            f"localhost:{port}",
            f"127.0.0.1:{port}",
            "[::1]",
            "app.localhost",
            "10.1.2.3:8765",
            "agent.internal",
            "x.corp.example",
            "corp.example",
        ):
            assert (await _get(agent, "/api/v1/status", Host=host))[0] == 200, host
        assert (await _get(agent, "/api/v1/status", Host="evilcorp.example"))[0] == 421
        # Probes are never refused: kubelet sends the pod's address, a proxy may send anything.
        assert (await _get(agent, "/healthz", Host="evil.example"))[0] == 200
    finally:
        await agent.stop()


# -- 2. Cross-site writes ---------------------------------------------------------------------


async def test_no_cross_site_writes_without_a_token(tmp_path):
    origin_ok = "https://dash.example"
    agent = await start_agent(tmp_path / "d", server={"allowed_origins": [origin_ok]})
    try:
        assert agent.journal is not None
        before = agent.journal.last_seq
        base = agent.server_url
        # What a foreign page can send without a preflight: refused, nothing journaled.
        simple = [
            (b'{"name": "csrf"}', "text/plain"),
            (b'{"name": "csrf"}', "text/plain; charset=utf-8"),
            (b"name=csrf", "application/x-www-form-urlencoded"),
            (
                b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
                "multipart/form-data; boundary=b",
            ),
        ]
        for body, ctype in simple:
            answer = await post_raw(agent, body, content_type=ctype)
            assert answer.status == 415, (ctype, answer)
            assert "application/json" in answer.body["error"]
        assert (
            await post_raw(agent, b"", content_type="application/x-www-form-urlencoded", path="/api/v1/dlq/replay")
        ).status == 415
        # A JSON write from a foreign page (it would need a preflight, but the Origin tells).
        answer = await post_raw(agent, EVENT, headers={"Origin": "http://evil.example"})
        assert answer.status == 403 and "allowed_origins" in answer.body["error"]
        assert (await post_raw(agent, EVENT, headers={"Origin": "null"})).status == 403
        async with (
            aiohttp.ClientSession() as s,
            s.put(
                base + "/api/v1/flags/dashboard.data_source",
                data=b'"dual"',
                headers={"Origin": "http://evil.example", "Content-Type": "application/json"},
            ) as r,
        ):
            assert r.status == 403
        await asyncio.sleep(0.05)
        assert agent.journal.last_seq == before, "a refused write reached the journal"
        # The dashboard itself, a listed origin, and clients that send no Origin still work.
        assert (await post_raw(agent, EVENT, headers={"Origin": base})).status == 202
        assert (await post_raw(agent, EVENT, headers={"Origin": origin_ok})).status == 202
        assert (await post_raw(agent, EVENT)).status == 202
        assert (
            await post_raw(agent, b'{"name": "n1"}\n{"name": "n2"}\n', content_type="application/x-ndjson")
        ).status == 202
        packed = msgspec.msgpack.encode([EVENT])
        assert (await post_raw(agent, packed, content_type="application/msgpack")).status == 202
        assert (await post_raw(agent, b"", path="/api/v1/dlq/replay")).status == 202  # no body: no type needed
    finally:
        await agent.stop()


# -- 3. Reads behind the token ------------------------------------------------------------------

READS = [
    "/api/v1/status",
    "/api/v1/sinks",
    "/api/v1/losses",
    "/api/v1/events",
    "/api/v1/names",
    "/api/v1/flags",
    "/api/v1/flags/health",
    "/api/v1/dlq",
    "/api/v1/ui-config",
    "/api/v1/openapi.json",
    "/api/v1/series?all=1&agg=count",
]


async def test_with_a_token_every_api_read_needs_it_and_probes_never_do(tmp_path):
    agent = await start_agent(tmp_path / "d", server={"token": TOKEN})
    try:
        for path in READS:
            assert (await _get(agent, path))[0] == 401, path
            assert (await _get(agent, path, Authorization="Bearer wrong"))[0] == 401, path
            assert (await _get(agent, path, **AUTH))[0] == 200, path
        assert (await _get(agent, "/api/v1/status", **{"X-Sidecar-Token": TOKEN}))[0] == 200
        assert (await _get(agent, "/healthz"))[0] == 200
        assert (await _get(agent, "/readyz"))[0] == 200
        assert (await _get(agent, "/metrics"))[0] == 401
        status, text = await _get(agent, "/metrics", **AUTH)
        assert status == 200 and "sidecar_agent_" in str(text)
        assert (await _get(agent, "/"))[0] == 200  # the page itself: it asks for the token
    finally:
        await agent.stop()


async def test_metrics_public_opens_only_metrics(tmp_path):
    agent = await start_agent(tmp_path / "d", server={"token": TOKEN, "metrics_public": True})
    try:
        assert (await _get(agent, "/metrics"))[0] == 200
        assert (await _get(agent, "/api/v1/status"))[0] == 401
    finally:
        await agent.stop()


async def test_websocket_needs_the_token_header_or_the_session_cookie(tmp_path):
    agent = await start_agent(tmp_path / "d", server={"token": TOKEN})
    ws_url = agent.server_url + "/api/v1/stream"
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(ws_url)
            assert err.value.status == 401
            async with s.ws_connect(ws_url, headers=AUTH) as ws:
                agent.record("ws.header", 1)
                msg = await ws.receive_json(timeout=30)
                assert msg["type"] == "events"
        # The dashboard's way: POST /api/v1/session with the token sets an HttpOnly,
        # SameSite=Strict cookie, which the browser then sends with reads and the WebSocket.
        jar = aiohttp.CookieJar(unsafe=True)  # unsafe: cookies for an IP address host
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            async with s.post(agent.server_url + "/api/v1/session") as r:
                assert r.status == 401
            async with s.post(agent.server_url + "/api/v1/session", headers=AUTH) as r:
                assert r.status == 200
                cookie = r.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
            async with s.get(agent.server_url + "/api/v1/status") as r:
                assert r.status == 200
            async with s.ws_connect(ws_url) as ws:
                agent.record("ws.cookie", 1)
                assert (await ws.receive_json(timeout=30))["type"] == "events"
            # The cookie is for reads: a write still needs the token itself.
            async with s.post(agent.server_url + "/api/v1/events", json=EVENT) as r:
                assert r.status == 401
            async with s.delete(agent.server_url + "/api/v1/session", headers=AUTH) as r:
                assert r.status == 200
            async with s.get(agent.server_url + "/api/v1/status") as r:
                assert r.status == 401
    finally:
        await agent.stop()


# -- issue 17: a taken port ---------------------------------------------------------------------


def test_run_on_a_taken_port_prints_one_line_and_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_toml(
            tmp_path / "agent.toml", {"agent": {"data_dir": str(tmp_path / "d")}, "server": {"port": port}}
        )
        r = run_cli("run", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: cannot listen on 127.0.0.1:{port} (server.host, server.port): address already in use"]


async def test_an_embedded_agent_that_needs_its_server_raises_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        from agent.runtime import Agent

        agent = Agent(agent_config(tmp_path / "d", server={"port": port}), require_server=True)
        with pytest.raises(ServerStartError, match=rf"127\.0\.0\.1:{port} \(server\.host, server\.port\)"):
            await agent.start()
        assert agent.state == "failed"
        # Without require_server the agent runs on and says why it has no dashboard.
        other = make_agent(tmp_path / "d2", server={"port": port})
        await other.start()
        try:
            assert other.server_url is None and other.server_error and "server.port" in other.server_error
            assert other.status()["server"]["error"] == other.server_error
        finally:
            await other.stop()


# -- issue 18, item 5: connection bounds -------------------------------------------------------


async def _slowloris(port: int, stop: asyncio.Event) -> bool:
    """A connection that sends a request head a header line at a time, slowly, for as long
    as `stop` is not set; True when the server closed it first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        i = 0
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(reader.read(1024), 0.5)
            except TimeoutError:
                writer.write(b"X-Slow-%d: 1\r\n" % i)
                i += 1
                continue
            except ConnectionError:
                return True
            if not data or reader.at_eof():
                return True
        return False
    finally:
        writer.close()


async def test_slowloris_connections_are_closed_and_others_are_served(tmp_path):
    port = free_port()
    cfg = write_toml(
        tmp_path / "agent.toml",
        agent_config(
            tmp_path / "d",
            server={"port": port, "header_timeout_s": 2.0, "keepalive_timeout_s": 600.0, "max_connections": 2000},
        ),
    )
    log = tmp_path / "agent.log"
    proc = spawn(cfg, log)
    stop = asyncio.Event()
    try:
        await wait_healthy(port, proc, log)
        tasks = [asyncio.create_task(_slowloris(port, stop)) for _ in range(500)]
        # Meanwhile normal requests are served, on fresh connections.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(5):
                async with s.get(
                    f"http://127.0.0.1:{port}/api/v1/status", timeout=aiohttp.ClientTimeout(total=60)
                ) as r:
                    assert r.status == 200
        # Every slow connection is closed by the server while it is still trickling its head.
        await await_until(lambda: all(t.done() for t in tasks), timeout=120, what="500 slowloris connections closed")
        assert [t.result() for t in tasks] == [True] * 500
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)


async def test_connections_past_the_cap_get_503_and_the_server_recovers(tmp_path):
    port = free_port()
    cfg = write_toml(
        tmp_path / "agent.toml",
        agent_config(tmp_path / "d", server={"port": port, "header_timeout_s": 600.0, "max_connections": 20}),
    )
    log = tmp_path / "agent.log"
    proc = spawn(cfg, log)
    held = []
    try:
        await wait_healthy(port, proc, log)
        await asyncio.sleep(0.2)  # wait_healthy's own connections are closed by now
        # 20 idle connections fill the cap (the server accepted each one).
        for _ in range(20):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.5)

        async def one_more() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            try:
                return await asyncio.wait_for(reader.read(), 30)
            finally:
                writer.close()

        refused = await one_more()
        assert refused.startswith(b"HTTP/1.1 503"), refused
        assert b"max_connections" in refused
        for _, writer in held:
            writer.close()
        held.clear()

        async def served() -> bool:
            return (await one_more()).startswith(b"HTTP/1.1 200")

        for _ in range(200):
            if await served():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the server did not serve again after the held connections closed")
    finally:
        for _, writer in held:
            writer.close()
        proc.terminate()
        proc.wait(60)


async def test_a_late_head_gets_408_and_an_idle_connection_is_closed_silently(tmp_path):
    agent = await start_agent(tmp_path / "d", server={"header_timeout_s": 1.0, "keepalive_timeout_s": 600.0})
    port = int(agent.server_url.rsplit(":", 1)[1])
    try:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        part_r, part_w = await asyncio.open_connection("127.0.0.1", port)
        part_w.write(b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # Both are closed by the server; only the one that began a request is told why
        # (a browser's idle pre-opened connection gets no unasked-for answer).
        assert await asyncio.wait_for(idle_r.read(), 60) == b""
        assert (await asyncio.wait_for(part_r.read(), 60)).startswith(b"HTTP/1.1 408")
        idle_w.close()
        part_w.close()
        # A head that arrives in time is served, and its connection is kept alive past the deadline.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.5)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert b"HTTP/1.1 200" in await asyncio.wait_for(r.read(), 30)
        w.close()
    finally:
        await agent.stop()
