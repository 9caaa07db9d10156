"""deploy/: the Kubernetes manifests and the Compose file parse, point their probes and ports
at what the agent really serves, share the Unix socket's folder with the app, and mount a
config that passes `sidecar-agent check-config` and runs. (No cluster or Docker engine here:
the images are not built or started.)"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from agent.api.openapi import spec
from tests.helpers import ROOT, make_agent, subprocess_env

DEPLOY = ROOT / "deploy"
ENV = {"SIDECAR_AGENT_TOKEN": "deploy-t0ken", "POD_NAME": "web-0", "POSTGRES_PASSWORD": "pw"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s() -> dict[str, dict[str, Any]]:
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _docs(f)]
    return {d["kind"]: d for d in docs}


def _check_config(text: str, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(cfg)],
        env=subprocess_env(**ENV),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def _served(path: str) -> bool:
    return path in spec()["paths"]


def test_kubernetes_sidecar_probes_ports_volumes_and_hardening(tmp_path):
    kinds = _k8s()
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (agent,) = [c for c in pod["initContainers"] if c["name"] == "sidecar-agent"]
    (app,) = pod["containers"]
    assert agent["restartPolicy"] == "Always"  # a native sidecar: up before the app, down after it
    toml_text = kinds["ConfigMap"]["data"]["agent.toml"]
    cfg = tomllib.loads(toml_text)
    _check_config(toml_text, tmp_path)

    ports = {p["name"]: p for p in agent["ports"]}
    assert ports["http"]["containerPort"] == cfg["server"]["port"]
    assert ports["statsd"]["containerPort"] == cfg["sources"]["statsd"]["port"] and ports["statsd"]["protocol"] == "UDP"
    probes = {k: agent[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert _served(probe["path"]) and probe["port"] in ports
        assert "security" in spec()["paths"][probe["path"]]["get"]  # public: a probe sends no token
    svc = kinds["Service"]["spec"]["ports"][0]
    assert svc["targetPort"] in ports

    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        mounts["/etc/sidecar-agent"] == "config"
        and volumes["config"]["configMap"]["name"] == (kinds["ConfigMap"]["metadata"]["name"])
    )
    assert "/etc/sidecar-agent/agent.toml" in agent["args"]
    assert mounts[cfg["agent"]["data_dir"]] == "data"
    assert "emptyDir" in volumes["data"] or "persistentVolumeClaim" in volumes["data"]
    sock_dir = str(Path(cfg["server"]["unix_socket"]).parent)
    assert "emptyDir" in volumes[mounts[sock_dir]]
    assert {m["mountPath"]: m["name"] for m in app["volumeMounts"]}[sock_dir] == mounts[sock_dir]
    # The token comes from a Secret; the config reads it from the environment.
    env = {e["name"]: e for e in agent["env"]}
    assert "secretKeyRef" in env["SIDECAR_AGENT_TOKEN"]["valueFrom"] and "${SIDECAR_AGENT_TOKEN}" in toml_text

    # Non-root, read-only root filesystem, resource requests; the socket's group is shared.
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in (agent, app):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    writable = {m["mountPath"] for m in agent["volumeMounts"] if not m.get("readOnly")}
    assert {cfg["agent"]["data_dir"], sock_dir, "/tmp"} <= writable
    # stop() ends within shutdown_timeout_s + 2 s: inside the pod's grace period.
    assert cfg["agent"]["shutdown_timeout_s"] + 2 < pod["terminationGracePeriodSeconds"]


async def test_the_kubernetes_config_runs_and_the_kubelets_probes_get_200(tmp_path, monkeypatch):
    """The ConfigMap's config, started (its paths moved under tmp_path): the probes as the
    kubelet sends them (Host: the pod's IP) answer 200, and the app's socket works."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    pod = _k8s()["Deployment"]["spec"]["template"]["spec"]
    (agent_c,) = pod["initContainers"]
    cfg = tomllib.loads(_k8s()["ConfigMap"]["data"]["agent.toml"])
    cfg["agent"]["data_dir"] = str(tmp_path / "data")
    cfg["server"].update(port=0, unix_socket=str(tmp_path / "agent.sock"))
    cfg["sources"] = {}
    cfg["sinks"]["archive"]["path"] = str(tmp_path / "events.jsonl")
    sections = {k: v for k, v in cfg.items() if k not in ("agent", "server", "sinks")}
    agent = make_agent(cfg["agent"]["data_dir"], cfg["sinks"], agent=cfg["agent"], server=cfg["server"], **sections)
    await agent.start()
    try:
        port = agent.server_url.rsplit(":", 1)[1]
        async with aiohttp.ClientSession() as s:
            for key in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = agent_c[key]["httpGet"]["path"]
                async with s.get(agent.server_url + path, headers={"Host": f"10.244.1.7:{port}"}) as r:
                    assert r.status == 200, (key, await r.text())
            async with s.get(agent.server_url + "/metrics", headers={"Host": f"10.244.1.7:{port}"}) as r:
                assert r.status == 200  # metrics_public: the cluster's Prometheus scrapes it
        unix = aiohttp.UnixConnector(path=str(tmp_path / "agent.sock"))
        auth = {"Authorization": f"Bearer {ENV['SIDECAR_AGENT_TOKEN']}"}
        async with (
            aiohttp.ClientSession(connector=unix) as s,
            s.post("http://localhost/api/v1/events", json={"name": "from.app"}, headers=auth) as r,
        ):
            assert r.status == 202
    finally:
        await agent.stop()


def test_compose_app_agent_and_postgres_fit_together(tmp_path):
    (compose,) = _docs(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"app", "agent", "postgres"} <= set(services)
    agent = services["agent"]
    (config_mount,) = [v for v in agent["volumes"] if v.endswith("/etc/sidecar-agent/agent.toml:ro")]
    config_file = DEPLOY / config_mount.split(":", 1)[0]
    text = config_file.read_text()
    _check_config(text, tmp_path)
    cfg = tomllib.loads(text)
    assert "/etc/sidecar-agent/agent.toml" in agent["command"]
    # The published port is the configured one; the health check asks a served, public route.
    assert agent["ports"] == [f"127.0.0.1:{cfg['server']['port']}:{cfg['server']['port']}"]
    check = " ".join(agent["healthcheck"]["test"])
    assert f"127.0.0.1:{cfg['server']['port']}/healthz" in check and _served("/healthz")
    # The journal is on a named volume; the root filesystem is read-only.
    assert any(v.endswith(":" + cfg["agent"]["data_dir"]) for v in agent["volumes"]) and agent["read_only"] is True
    # The Postgres sink reaches the postgres service; the table is migrated before the agent starts.
    assert "@postgres:5432/" in cfg["sinks"]["pg"]["dsn"]
    assert agent["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"][:2] == ["postgres", "migrate"]
    # The app posts to the agent by service name, which the Host allowlist lets in.
    assert "http://agent:8765/api/v1/events" in " ".join(services["app"]["command"])
    assert "agent" in cfg["server"]["allowed_hosts"]
    for name in ("SIDECAR_AGENT_TOKEN", "POSTGRES_PASSWORD"):
        assert name in agent["environment"]
