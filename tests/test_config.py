"""Config: defaults, ${VAR} expansion, errors that name the file and key path, check-config."""

from __future__ import annotations

import socket

import pytest

from agent.plan import plan
from agent.config import Config, from_dict, load, resolve
from agent.errors import ConfigError
from agent.plugin.host import PluginHost
from tests.helpers import plan_error, run_cli


def test_defaults():
    cfg = resolve(None)
    assert isinstance(cfg, Config)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8765 and cfg.server.enabled
    assert cfg.server.token is None
    assert cfg.agent.data_dir == ".sidecar-agent"
    assert cfg.agent_id() == socket.gethostname()
    assert set(cfg.sources) == {"system", "process"}
    assert cfg.sinks == {}
    assert cfg.plugins.allow is None and cfg.plugins.deny == []


def test_empty_file_is_all_defaults(tmp_path):
    p = tmp_path / "empty.toml"
    p.write_text("")
    cfg = load(p)
    assert cfg.origin == str(p)
    assert cfg.agent.intake_capacity == 100_000 and cfg.sources == {}


def test_env_vars_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_TEST_TOKEN", "s3cret")
    monkeypatch.delenv("SIDECAR_TEST_UNSET", raising=False)
    p = tmp_path / "agent.toml"
    p.write_text(
        '[agent]\nid = "${SIDECAR_TEST_UNSET:-web-1}"\n'
        '[server]\ntoken = "${SIDECAR_TEST_TOKEN}"\n'
        '[sinks.out]\ntype = "jsonl"\npath = "/tmp/${SIDECAR_TEST_UNSET:-x}-${SIDECAR_TEST_TOKEN}.jsonl"\n'
    )
    cfg = load(p)
    assert cfg.agent.id == "web-1"
    assert cfg.server.token == "s3cret"
    assert cfg.sinks["out"]["path"] == "/tmp/x-s3cret.jsonl"


def test_missing_env_var_names_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SIDECAR_TEST_UNSET", raising=False)
    p = tmp_path / "agent.toml"
    p.write_text('[sinks.main]\ntype = "jsonl"\npath = "${SIDECAR_TEST_UNSET}"\n')
    with pytest.raises(ConfigError) as err:
        load(p)
    assert str(err.value) == f"{p}: sinks.main.path: environment variable SIDECAR_TEST_UNSET is not set"


@pytest.mark.parametrize("toml, path, problem", [
    ("[agent]\nbogus = 1\n", "agent.bogus", "unknown key"),
    ("nonsense = 1\n", "nonsense", "unknown key"),
    ("[server]\nport = \"8765\"\n", "server.port", "expected int"),
    ("[agent]\nintake_capacity = 0\n", "agent.intake_capacity", ">= 1"),
    ("[agent]\noverflow = \"sometimes\"\n", "agent.overflow", "invalid enum value"),
    ("[plugins]\ndeny = \"jsonl\"\n", "plugins.deny", "expected array"),
])
def test_errors_name_file_and_key_path(tmp_path, toml, path, problem):
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: {path}: "), msg
    assert problem in msg
    assert "\n" not in msg


def test_invalid_toml_names_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[agent\n")
    with pytest.raises(ConfigError, match=rf"^{p}: invalid TOML"):
        load(p)


def _plan(tmp_path, toml):
    p = tmp_path / "agent.toml"
    p.write_text(toml)
    cfg = load(p)
    return p, plan(cfg, PluginHost(cfg.plugins).load())


@pytest.mark.parametrize("toml, path, problem", [
    ('[sinks.out]\ntype = "jsonl"\npath = 3\n', "sinks.out.path", "expected str"),
    ('[sinks.out]\ntype = "jsonl"\npaht = "x"\n', "sinks.out.paht", "unknown key"),
    ('[sources.sys]\ntype = "system"\ninterval_s = -1\n', "sources.sys.interval_s", "> 0"),
    ('[sinks.out]\ntype = "nope"\n', "sinks.out.type", "unknown sink type 'nope'"),
    ('[sinks.out]\ntype = "jsonl"\npolicies = ["nope"]\n', "sinks.out.policies", "unknown policy type 'nope'"),
    ('[sinks.out]\ntype = "jsonl"\nbatch_size = 0\n', "sinks.out.batch_size", "positive integer"),
    ('[sinks]\nout = 3\n', "sinks.out", "expected a table"),
])
def test_plugin_option_errors_name_key_path(tmp_path, toml, path, problem):
    msg = plan_error(tmp_path, toml)
    assert msg.startswith(f"{tmp_path / 'agent.toml'}: {path}: "), msg
    assert problem in msg


def test_type_defaults_to_table_name_and_two_sinks_of_one_type(tmp_path):
    _, specs = _plan(tmp_path, '[sinks.jsonl]\npath = "a"\n[sinks.copy]\ntype = "jsonl"\npath = "b"\n')
    by_name = {s.name: s for s in specs}
    assert by_name["jsonl"].registration.type_name == "jsonl"
    assert by_name["copy"].registration.type_name == "jsonl"
    assert (by_name["jsonl"].options.path, by_name["copy"].options.path) == ("a", "b")


def test_non_loopback_host_without_token_is_refused():
    with pytest.raises(ConfigError, match=r"server\.token: required when server\.host \(0\.0\.0\.0\)"):
        from_dict({"server": {"host": "0.0.0.0"}}, "x.toml")
    cfg = from_dict({"server": {"host": "0.0.0.0", "token": "t"}})
    assert cfg.server.token == "t"
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert from_dict({"server": {"host": host}}).server.host == host
    # A disabled server needs no token.
    assert not from_dict({"server": {"host": "0.0.0.0", "enabled": False}}).server.enabled


def test_origin_is_not_a_config_key():
    with pytest.raises(ConfigError, match="origin: unknown key"):
        from_dict({"origin": "x"})


def test_check_config_bad_file_prints_one_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[sinks.out]\ntype = "jsonl"\npath = 3\n')
    r = run_cli("check-config", str(p), cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "sinks.out.path" in lines[0] and str(p) in lines[0]
    assert r.stdout == ""


def test_check_config_good_file(tmp_path):
    p = tmp_path / "good.toml"
    p.write_text('[sources.system]\n[sinks.out]\ntype = "jsonl"\npath = "-"\n')
    r = run_cli("check-config", str(p), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{p}: ok (1 sources, 2 sinks)"  # out, and the implicit history store
