"""HTTPS and WSS with `server.tls_cert` / `server.tls_key` (certificates made by openssl),
their reload when the files change, bad TLS files as one clear error, and the 0660 Unix
socket listener."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from agent.api.server import ServerStartError
from tests.helpers import agent_config, await_until, make_agent, run_cli, start_agent, subprocess_env, write_toml

TOKEN = "tls-t0ken"


def make_cert(folder: Path, cn: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return cert, key


@pytest.fixture
def certs(tmp_path):
    """Two certificate pairs (`a` served first, `b` to rotate to) and where the agent reads them."""
    a = make_cert(tmp_path / "a", "sidecar-a")
    b = make_cert(tmp_path / "b", "sidecar-b")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(a[0], live / "cert.pem")
    shutil.copy(a[1], live / "key.pem")
    return {"a": a, "b": b, "cert": live / "cert.pem", "key": live / "key.pem"}


def client_context(*cas: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for ca in cas:
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


async def served_cn(url: str, ctx: ssl.SSLContext) -> str:
    """The CN of the certificate a new connection is served (it must also answer /healthz)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    try:
        peer = writer.get_extra_info("peercert")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return dict(x[0] for x in peer["subject"])["commonName"]


async def test_https_and_wss_serve_and_a_changed_certificate_is_used_for_new_connections(tmp_path, certs):
    agent = await start_agent(
        tmp_path / "d",
        server={"token": TOKEN, "tls_cert": str(certs["cert"]), "tls_key": str(certs["key"]), "tls_reload_s": 0.1},
    )
    try:
        assert agent.server_url.startswith("https://127.0.0.1:")
        ctx = client_context(certs["a"][0], certs["b"][0])
        assert await served_cn(agent.server_url, ctx) == "sidecar-a"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.get(agent.server_url + "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
            wss = agent.server_url.replace("https://", "wss://") + "/api/v1/stream"
            async with s.ws_connect(wss, headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
                agent.record("over.wss", 1)
                assert (await ws.receive_json(timeout=30))["type"] == "events"
            # Plain HTTP on the TLS port is not served.
            with pytest.raises(aiohttp.ClientError):
                async with s.get(agent.server_url.replace("https://", "http://") + "/healthz") as r:
                    await r.read()

        # A broken pair (the new certificate with the old key, as mid-rotation) is not
        # loaded: the old certificate stays in service.
        shutil.copy(certs["b"][0], certs["cert"])
        await await_until(
            lambda: agent._runner.reloader.stamp == agent._runner.reloader._stamp(),
            timeout=30,
            what="the reloader to look at the changed files",
        )
        assert await served_cn(agent.server_url, ctx) == "sidecar-a"
        # The whole new pair: new connections get the new certificate, without a restart.
        shutil.copy(certs["b"][1], certs["key"])
        await await_until(lambda: agent._runner.reloader.reloads >= 1, timeout=30, what="the certificate reload")
        assert await served_cn(agent.server_url, ctx) == "sidecar-b"
    finally:
        await agent.stop()


def _run_error(tmp_path: Path, **server: object) -> str:
    tmp_path.mkdir()
    cfg = write_toml(tmp_path / "agent.toml", agent_config(tmp_path / "d", server=server))
    r = run_cli("run", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_bad_tls_files_are_one_clear_line_and_exit_1(tmp_path, certs):
    line = _run_error(tmp_path / "missing", tls_cert=str(tmp_path / "nope.pem"), tls_key=str(certs["key"]))
    assert line.startswith("error: server.tls_cert: cannot read") and "nope.pem" in line
    line = _run_error(tmp_path / "mismatch", tls_cert=str(certs["a"][0]), tls_key=str(certs["b"][1]))
    assert line.startswith("error: server.tls_key:") and "is not the key of the certificate" in line
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    line = _run_error(tmp_path / "garbage", tls_cert=str(garbage), tls_key=str(certs["key"]))
    assert "must be a PEM certificate and its key" in line
    line = _run_error(tmp_path / "half", tls_cert=str(certs["cert"]))
    assert line == "error: server.tls_key: TLS needs both tls_cert and tls_key"
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        unreadable = tmp_path / "unreadable.pem"
        shutil.copy(certs["key"], unreadable)
        unreadable.chmod(0)
        line = _run_error(tmp_path / "perm", tls_cert=str(certs["cert"]), tls_key=str(unreadable))
        assert "server.tls_key: cannot read" in line


async def test_an_embedded_agent_with_bad_tls_files_raises_naming_the_key(tmp_path):
    from agent.runtime import Agent

    agent = Agent(
        agent_config(tmp_path / "d", server={"tls_cert": str(tmp_path / "x.pem"), "tls_key": str(tmp_path / "y.pem")}),
        require_server=True,
    )
    with pytest.raises(ServerStartError, match=r"server\.tls_cert: cannot read"):
        await agent.start()


async def test_the_unix_socket_listener_has_mode_0660_and_serves_the_api(tmp_path):
    sock_path = tmp_path / "run" / "agent.sock"
    sock_path.parent.mkdir()
    sock_path.write_bytes(b"")  # not a socket: refused, never deleted
    agent = make_agent(tmp_path / "d0", server={"unix_socket": str(sock_path)})
    await agent.start()
    try:
        assert agent.server_url is None and "is not a socket" in (agent.server_error or "")
    finally:
        await agent.stop()
    assert sock_path.read_bytes() == b""
    sock_path.unlink()

    agent = await start_agent(tmp_path / "d", server={"unix_socket": str(sock_path), "token": TOKEN})
    try:
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock_path))) as s:
            async with s.get("http://agent/healthz") as r:
                assert r.status == 200
            # Any Host is fine on the socket (no browser reaches it); the token still counts.
            async with s.get("http://pod-name/api/v1/status") as r:
                assert r.status == 401
            async with s.get("http://pod-name/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
            async with s.post(
                "http://agent/api/v1/events", json={"name": "via.unix"}, headers={"Authorization": f"Bearer {TOKEN}"}
            ) as r:
                assert r.status == 202
        # The TCP listener still refuses a foreign Host.
        async with (
            aiohttp.ClientSession() as s,
            s.get(agent.server_url + "/api/v1/status", headers={"Host": "pod-name"}) as r,
        ):
            assert r.status == 421
    finally:
        await agent.stop()
    assert not sock_path.exists()  # removed at stop


async def test_the_cli_reaches_an_agent_that_serves_only_https(tmp_path, certs):
    """`sidecar-agent flags` (and `dlq`) read the agent's config: with TLS on, they speak https to it and
    trust the configured (self-signed) certificate, instead of failing as if no agent answered."""
    server = {"token": TOKEN, "tls_cert": str(certs["cert"]), "tls_key": str(certs["key"])}
    agent = await start_agent(tmp_path / "d", server=server)
    try:
        port = int(agent.server_url.rsplit(":", 1)[1])
        cfg = write_toml(tmp_path / "agent.toml", agent_config(tmp_path / "d", server={**server, "port": port}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "flags",
            "list",
            "--config",
            str(cfg),
            "--json",
            env=subprocess_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        # Offline, the locked data dir would be refused (exit 1): this list came from the live agent.
        assert "sinks.store.enabled" in {f["name"] for f in json.loads(out)["flags"]}
    finally:
        await agent.stop()
