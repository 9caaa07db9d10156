"""Config: defaults, ${VAR} expansion, errors that name the file and key path, check-config."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from agent.config import Config, from_dict, load, resolve
from agent.errors import ConfigError
from agent.plan import plan
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
    assert (by_name["jsonl"].options.path, by_name["copy"].options.path) == (str(tmp_path / "a"), str(tmp_path / "b"))


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
    # the user's one sink; the dashboard's history store is named apart, not counted as theirs
    assert r.stdout.strip() == f"{p}: ok (1 source, 1 sink; plus the dashboard's history store sink 'store')"


def test_check_config_without_the_store_counts_only_the_users_sinks(tmp_path):
    p = tmp_path / "good.toml"
    p.write_text('[dashboard]\nstore = false\n[sinks.a]\ntype = "jsonl"\n[sinks.b]\ntype = "jsonl"\n')
    r = run_cli("check-config", str(p), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{p}: ok (0 sources, 2 sinks)"


@pytest.mark.parametrize("toml, path", [
    ("[server]\nport = 70000\n", "server.port"),
    ("[server]\nport = -1\n", "server.port"),
    ("[server]\nmax_body_bytes = 0\n", "server.max_body_bytes"),
    ("[sources.statsd]\nport = 65536\n", "sources.statsd.port"),
])
def test_ports_and_sizes_out_of_range_fail_check_config(tmp_path, toml, path):
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    r = run_cli("check-config", str(p), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {p}: {path}: expected int "), r.stderr
    assert "Traceback" not in r.stderr


def test_ports_at_the_ends_of_the_range_are_accepted():
    assert from_dict({"server": {"port": 0}}).server.port == 0
    assert from_dict({"server": {"port": 65535}}).server.port == 65535


BAD = """\
[agent]
dat_dir = "x"
intake_capacity = 0
[server]
port = 70000
[sinkz.a]
[sinks.out]
type = "jsnl"
[sinks.b]
type = "jsonl"
paht = "x"
batch_size = 0
policies = ["retry", "circuit_braker"]
retry = { max_atempts = 3 }
[sources.sys]
type = "system"
interval_s = -1
"""


def test_check_config_names_every_error_with_did_you_mean(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(BAD)
    r = run_cli("check-config", str(p), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    # the core sections first: msgspec alone would stop at the first of these
    assert r.stderr.splitlines() == [
        f"error: {p}: agent.dat_dir: unknown key (did you mean 'data_dir'?)",
        f"error: {p}: agent.intake_capacity: expected int >= 1",
        f"error: {p}: server.port: expected int <= 65535",
        f"error: {p}: sinkz: unknown key (did you mean 'sinks'?)",
    ]
    p.write_text(BAD.replace('dat_dir = "x"\nintake_capacity = 0\n', "").replace("70000", "8765").replace(
        "[sinkz.a]\n", ""))
    r = run_cli("check-config", str(p), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert all(line.startswith(f"error: {p}: ") for line in lines), r.stderr
    problems = {line.removeprefix(f"error: {p}: ") for line in lines}
    # the sink types on offer depend on which plugins this environment has: check that the
    # list is there and names the built-ins, then compare the rest of the line
    (unknown_type,) = [line for line in problems if line.startswith("sinks.out.type:")]
    available = re.search(r"\(available: ([^)]*)\)", unknown_type).group(1).split(", ")
    assert {"jsonl", "postgres", "supabase"} <= set(available), unknown_type
    problems = problems - {unknown_type} | {re.sub(r" \(available: [^)]*\)", "", unknown_type)}
    assert problems == {
        "sources.sys.interval_s: expected float > 0.0",
        "sinks.out.type: unknown sink type 'jsnl' (did you mean 'jsonl'?)",
        "sinks.b.batch_size: expected a positive integer",
        "sinks.b.policies: unknown policy type 'circuit_braker'"
        " (available: circuit_breaker, concurrency, retry, timeout) (did you mean 'circuit_breaker'?)",
        "sinks.b.retry.max_atempts: unknown key (did you mean 'max_attempts'?)",
        "sinks.b.paht: unknown key (did you mean 'path'?)",
    }, r.stderr


def test_every_missing_env_var_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("SIDECAR_TEST_UNSET", raising=False)
    monkeypatch.delenv("SIDECAR_TEST_UNSET2", raising=False)
    with pytest.raises(ConfigError) as err:
        from_dict({"server": {"token": "${SIDECAR_TEST_UNSET}"}, "agent": {"id": "${SIDECAR_TEST_UNSET2}"}}, "x")
    assert str(err.value).splitlines() == [
        "x: server.token: environment variable SIDECAR_TEST_UNSET is not set",
        "x: agent.id: environment variable SIDECAR_TEST_UNSET2 is not set",
    ]


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    p = conf / "agent.toml"
    p.write_text('[agent]\ndata_dir = "data"\n'
                 '[sinks.out]\ntype = "jsonl"\npath = "out/events.jsonl"\n'
                 '[sinks.stdout]\ntype = "jsonl"\npath = "-"\n'
                 '[sinks.abs]\ntype = "jsonl"\npath = "/var/tmp/x.jsonl"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(Path("..") / "conf" / "agent.toml")
    assert cfg.agent.data_dir == str(conf / "data")
    assert cfg.sinks["out"]["path"] == str(conf / "out" / "events.jsonl")
    assert cfg.sinks["stdout"]["path"] == "-"  # stdout, not a file
    assert cfg.sinks["abs"]["path"] == "/var/tmp/x.jsonl"
    # a dict (embedded use) has no folder: its paths stay relative to the working directory
    assert from_dict({"agent": {"data_dir": "data"}}).agent.data_dir == "data"


def test_relative_paths_in_a_running_agent_land_next_to_the_config(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    p = conf / "agent.toml"
    p.write_text('[agent]\ndata_dir = "data"\n[server]\nenabled = false\n[dashboard]\nstore = false\n'
                 '[sinks.out]\ntype = "jsonl"\npath = "events.jsonl"\npolicies = []\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = run_cli("dlq", "list", "--config", str(p), cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (conf / "data").is_dir() and not (cwd / "data").exists()
