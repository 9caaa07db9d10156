"""Feature flags: layers, errors, persistence, audit, subscriptions and rollout."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, FlagError
from agent.event import Event
from agent.flags import (
    CHANGED_EVENT,
    Flag,
    FlagService,
    UnknownFlagError,
    core_flags,
    data_source_check,
    env_var,
    flatten,
    in_rollout,
    rollout_bucket,
)

ROOT = Path(__file__).resolve().parents[1]
LEVEL = Flag.int("test.level", 0, "a flag to layer", min=0, max=10)
PCT = "sinks.jsonl.rollout_percent"
PCT_ENV = "SIDECAR_AGENT_FLAG_SINKS__JSONL__ROLLOUT_PERCENT"


def service(tmp_path, config=None, environ=None, defs=None, emit=None, **kw):
    defs = defs if defs is not None else [*core_flags(["jsonl", "supabase-main"]), LEVEL]
    return FlagService(defs, config or {}, environ or {}, tmp_path, emit, **kw)


# -- precedence ------------------------------------------------------------------------

LAYER_VALUES = {"config": 1, "env": 2, "override": 3}


@pytest.mark.parametrize(
    "layers",
    [c for n in range(4) for c in itertools.combinations(("config", "env", "override"), n)],
    ids=lambda c: "+".join(c) or "default",
)
def test_precedence_matrix(tmp_path, layers):
    config = {"test": {"level": 1}} if "config" in layers else {}
    environ = {"SIDECAR_AGENT_FLAG_TEST__LEVEL": "2"} if "env" in layers else {}
    svc = service(tmp_path, config, environ)
    if "override" in layers:
        svc.set("test.level", 3, actor="tester")
    top = layers[-1] if layers else "default"
    assert svc.get("test.level") == LAYER_VALUES.get(top, 0)
    info = svc.describe_flag("test.level")
    assert info["layer"] == top
    assert info["layers"] == {"default": 0, **{name: LAYER_VALUES[name] for name in layers}}

    # Clearing the override falls back to the next layer down; a restart agrees.
    svc.clear("test.level", actor="tester")
    lower = [name for name in layers if name != "override"]
    below = lower[-1] if lower else "default"
    assert svc.get("test.level") == LAYER_VALUES.get(below, 0)
    assert svc.describe_flag("test.level")["layer"] == below
    again = service(tmp_path, config, environ)
    assert again.get("test.level") == LAYER_VALUES.get(below, 0)


def test_describe_lists_every_flag_with_its_metadata(tmp_path):
    rows = {row["name"]: row for row in service(tmp_path).describe()}
    assert list(rows) == sorted(rows)
    assert set(rows) == {
        "dashboard.data_source",
        "sinks.jsonl.enabled",
        "sinks.jsonl.rollout_percent",
        "sinks.supabase-main.enabled",
        "sinks.supabase-main.rollout_percent",
        "test.level",
    }
    pct = rows[PCT]
    assert pct["type"] == "float" and pct["value"] == 100.0 and pct["default"] == 100.0
    assert (pct["min"], pct["max"], pct["layer"], pct["choices"]) == (0, 100, "default", None)
    assert "stable hash" in pct["description"]
    assert pct["env_var"] == PCT_ENV
    ds = rows["dashboard.data_source"]
    assert ds["type"] == "enum" and ds["choices"] == ["websocket", "supabase", "dual"]
    assert rows["sinks.jsonl.enabled"]["description"].startswith("kill switch")
    assert json.loads(json.dumps(list(rows.values()))) == list(rows.values())  # JSON-ready


def test_env_var_naming():
    assert env_var("sinks.jsonl.enabled") == "SIDECAR_AGENT_FLAG_SINKS__JSONL__ENABLED"
    assert env_var("sinks.supabase-main.rollout_percent") == (
        "SIDECAR_AGENT_FLAG_SINKS__SUPABASE_MAIN__ROLLOUT_PERCENT"
    )


# -- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True),
     ("false", False), ("0", False), ("No", False), ("OFF", False), (" off ", False)],
)  # fmt: skip
def test_env_bool_words(tmp_path, text, value):
    svc = service(tmp_path, environ={"SIDECAR_AGENT_FLAG_SINKS__JSONL__ENABLED": text})
    assert svc.get("sinks.jsonl.enabled") is value


def test_env_numbers_and_enums_parse_per_type(tmp_path):
    flags = [*core_flags(["jsonl"]), LEVEL]
    environ = {
        PCT_ENV: "12.5",
        "SIDECAR_AGENT_FLAG_TEST__LEVEL": "7",
        "SIDECAR_AGENT_FLAG_DASHBOARD__DATA_SOURCE": "dual",
    }
    svc = service(tmp_path, environ=environ, defs=flags)
    assert svc.get(PCT) == 12.5
    assert svc.get("test.level") == 7 and type(svc.get("test.level")) is int
    assert svc.get("dashboard.data_source") == "dual"


def test_empty_env_var_counts_as_unset(tmp_path):
    assert service(tmp_path, environ={PCT_ENV: ""}).describe_flag(PCT)["layer"] == "default"


def test_config_int_for_float_flag_and_nested_tables(tmp_path):
    config = {"sinks": {"jsonl": {"rollout_percent": 30, "enabled": False}}, "dashboard.data_source": "supabase"}
    svc = service(tmp_path, config=config)
    assert svc.get(PCT) == 30.0 and type(svc.get(PCT)) is float
    assert svc.get("sinks.jsonl.enabled") is False
    assert svc.get("dashboard.data_source") == "supabase"


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}}, "d.e": 2}) == {"a.b.c": 1, "d.e": 2}
    with pytest.raises(ValueError):
        flatten({"a.b": 1, "a": {"b": 2}})


# -- errors name the flag and the layer --------------------------------------------------


def test_bad_env_value_fails_construction_naming_flag_and_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        service(tmp_path, environ={PCT_ENV: "150"})
    assert str(info.value) == (
        f"flag {PCT} (environment {PCT_ENV}): expected a number from 0 to 100, got '150'"
    )
    assert isinstance(info.value, FlagError)


@pytest.mark.parametrize(
    ("var", "text", "needle"),
    [
        ("SIDECAR_AGENT_FLAG_SINKS__JSONL__ENABLED", "maybe", "expected true or false, got 'maybe'"),
        ("SIDECAR_AGENT_FLAG_TEST__LEVEL", "2.5", "expected a whole number from 0 to 10, got '2.5'"),
        (PCT_ENV, "nan", "expected a number from 0 to 100, got 'nan'"),
        ("SIDECAR_AGENT_FLAG_DASHBOARD__DATA_SOURCE", "ws", "expected one of websocket, supabase, dual, got 'ws'"),
    ],
)
def test_bad_env_values(tmp_path, var, text, needle):
    with pytest.raises(ConfigError, match=f"\\(environment {var}\\): ") as info:
        service(tmp_path, environ={var: text})
    assert needle in str(info.value)


def test_unknown_env_flag_is_an_error_but_other_variables_are_ignored(tmp_path):
    environ = {"SIDECAR_AGENT_FLAG_SINKS__JSNL__ENABLED": "1", "SIDECAR_AGENT_TOKEN": "x", "PATH": "/bin"}
    with pytest.raises(ConfigError) as info:
        service(tmp_path, environ=environ)
    msg = str(info.value)
    assert msg.startswith("flag sinks.jsnl.enabled (environment SIDECAR_AGENT_FLAG_SINKS__JSNL__ENABLED): no such flag")
    assert "did you mean sinks.jsonl.enabled?" in msg


def test_bad_config_values_name_flag_origin_and_layer(tmp_path):
    config = {"sinks": {"jsonl": {"enabled": "true", "rollout_percent": 150}}, "nope": 1}
    with pytest.raises(ConfigError) as info:
        service(tmp_path, config=config, config_origin="agent.toml")
    lines = str(info.value).splitlines()
    assert lines == [
        "flag sinks.jsonl.enabled (config agent.toml [flags]): expected true or false, got 'true' "
        "(a string: write the value without quotes)",
        f"flag {PCT} (config agent.toml [flags]): expected a number from 0 to 100, got 150",
        "flag nope (config agent.toml [flags]): no such flag",
    ]


@pytest.mark.parametrize("value", [True, "5", 2.0, [1]])
def test_config_is_strict_about_types(tmp_path, value):
    with pytest.raises(ConfigError, match=r"flag test.level \(config \[flags\]\): expected a whole number"):
        service(tmp_path, config={"test.level": value})


def test_bad_definitions_are_refused(tmp_path):
    with pytest.raises(FlagError, match="definition"):
        Flag.bool("Bad Name", True)
    with pytest.raises(FlagError, match=r"flag x.pct \(default\): expected a number from 0 to 100, got 101"):
        Flag.float("x.pct", 101, min=0, max=100)
    with pytest.raises(FlagError, match="enum needs"):
        Flag.enum("x.mode", "a", [])
    with pytest.raises(FlagError, match="defined twice"):
        service(tmp_path, defs=[LEVEL, ("myplugin", LEVEL)])
    with pytest.raises(FlagError, match="share the environment variable"):
        service(tmp_path, defs=[Flag.bool("a.b-c", True), Flag.bool("a.b_c", True)])
    with pytest.raises(FlagError, match="not an agent.flags.Flag"):
        service(tmp_path, defs=[("myplugin", {"name": "x"})])


# -- runtime changes ---------------------------------------------------------------------


def test_bad_runtime_value_is_refused_and_nothing_changes(tmp_path):
    events: list[Event] = []
    svc = service(tmp_path, emit=events.extend)
    svc.set(PCT, 40, actor="alice")
    before = (svc.describe(), svc.audit(), (tmp_path / "flags.json").read_bytes())
    for bad in (150, -1, True, "lots", None, float("inf")):
        with pytest.raises(FlagError, match=rf"^flag {PCT} \(override\): expected a number from 0 to 100"):
            svc.set(PCT, bad, actor="mallory")
    with pytest.raises(FlagError, match=r"^flag dashboard.data_source \(override\): expected one of"):
        svc.set("dashboard.data_source", "carrier-pigeon", actor="mallory")
    assert (svc.describe(), svc.audit(), (tmp_path / "flags.json").read_bytes()) == before
    assert len(events) == 1


def test_runtime_values_accept_json_values_and_strings(tmp_path):
    svc = service(tmp_path)
    assert svc.set("sinks.jsonl.enabled", False, "a")["value"] is False
    assert svc.set("sinks.jsonl.enabled", "on", "a")["value"] is True
    assert svc.set(PCT, "25", "a")["value"] == 25.0
    assert svc.set("test.level", 4, "a")["value"] == 4


def test_unknown_flag(tmp_path):
    svc = service(tmp_path)
    with pytest.raises(UnknownFlagError, match="no such flag"):
        svc.get("sinks.nope.enabled")
    with pytest.raises(UnknownFlagError):
        svc.set("sinks.nope.enabled", True, "a")
    with pytest.raises(UnknownFlagError):
        svc.clear("sinks.nope.enabled", "a")
    assert "sinks.jsonl.enabled" in svc and "sinks.nope.enabled" not in svc


def test_overrides_persist_across_restart(tmp_path):
    svc = service(tmp_path)
    svc.set("sinks.jsonl.enabled", False, "alice")
    svc.set(PCT, 12.5, "alice")
    assert json.loads((tmp_path / "flags.json").read_text()) == {
        "version": 1,
        "overrides": {"sinks.jsonl.enabled": False, PCT: 12.5},
    }
    again = service(tmp_path)
    assert again.get("sinks.jsonl.enabled") is False and again.get(PCT) == 12.5
    assert again.describe_flag(PCT)["layer"] == "override"
    assert again.health() == []
    assert not list(tmp_path.glob("*.tmp"))


def test_clear_without_override_is_a_no_op(tmp_path):
    events: list[Event] = []
    svc = service(tmp_path, emit=events.extend)
    assert svc.clear(PCT, "a") is False
    assert events == [] and svc.audit() == []


def test_subscribers_get_old_and_new(tmp_path):
    svc = service(tmp_path, config={"test": {"level": 1}})
    seen = []
    unsubscribe = svc.subscribe(lambda *change: seen.append(change))
    svc.set("test.level", 5, "a")
    svc.set("test.level", 5, "a")  # already so: no call
    svc.clear("test.level", "a")
    svc.set("test.level", 1, "a")  # same as config: the value does not change, no call
    unsubscribe()
    svc.set("test.level", 9, "a")
    assert seen == [("test.level", 1, 5), ("test.level", 5, 1)]


def test_failing_subscriber_does_not_undo_the_change(tmp_path):
    svc = service(tmp_path)
    calls = []

    def broken(name, old, new):
        raise RuntimeError("boom")

    svc.subscribe(broken)
    svc.subscribe(lambda *change: calls.append(change))
    svc.set("test.level", 2, "a")
    assert svc.get("test.level") == 2 and calls == [("test.level", 0, 2)]
    assert any("broken" in p and "boom" in p for p in svc.health())


def test_changes_emit_audit_events_and_persist_the_trail(tmp_path):
    events: list[Event] = []
    svc = service(tmp_path, environ={PCT_ENV: "50"}, emit=events.extend)
    svc.set(PCT, 10, actor="alice")
    svc.clear(PCT, actor="bob")
    assert [e.name for e in events] == [CHANGED_EVENT, CHANGED_EVENT]
    assert {e.kind for e in events} == {"event"}
    first, second = (e.data for e in events)
    assert {k: first[k] for k in ("flag", "old", "new", "layer", "actor")} == {
        "flag": PCT, "old": 50.0, "new": 10.0, "layer": "override", "actor": "alice",
    }  # fmt: skip
    assert {k: second[k] for k in ("flag", "old", "new", "layer", "actor")} == {
        "flag": PCT, "old": 10.0, "new": 50.0, "layer": "env", "actor": "bob",
    }  # fmt: skip
    assert isinstance(first["time"], float) and events[0].ts == first["time"]
    assert svc.audit() == [first, second]

    again = service(tmp_path, environ={PCT_ENV: "50"})
    assert again.audit() == [first, second]
    assert again.audit(limit=1) == [second] and again.audit(limit=0) == []
    lines = (tmp_path / "flags-audit.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [first, second]


def test_audit_memory_is_bounded(tmp_path):
    svc = service(tmp_path, audit_size=5)
    for i in range(8):
        svc.set("test.level", i % 2 + 1, "a")
    assert [e["new"] for e in svc.audit()] == [2, 1, 2, 1, 2]
    assert len(service(tmp_path, audit_size=5).audit()) == 5
    assert len((tmp_path / "flags-audit.jsonl").read_text().splitlines()) == 8


def test_torn_audit_line_is_skipped_reported_and_repaired(tmp_path):
    svc = service(tmp_path)
    svc.set("test.level", 1, "a")
    with open(tmp_path / "flags-audit.jsonl", "a") as f:
        f.write('{"flag": "test.le')  # a crash mid-append
    again = service(tmp_path)
    assert len(again.audit()) == 1
    assert any("skipped 1 unreadable line" in p for p in again.health())
    again.set("test.level", 2, "a")
    assert [e["new"] for e in service(tmp_path).audit()] == [1, 2]


def test_failing_emit_does_not_undo_the_change(tmp_path):
    def emit(events):
        raise RuntimeError("intake closed")

    svc = service(tmp_path, emit=emit)
    svc.set("test.level", 3, "a")
    assert svc.get("test.level") == 3 and service(tmp_path).get("test.level") == 3
    assert any("intake closed" in p for p in svc.health())


def test_unwritable_override_file_refuses_the_change(tmp_path, monkeypatch):
    svc = service(tmp_path)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agent.flags.overrides.atomic_write", fail)
    with pytest.raises(FlagError, match="cannot save overrides"):
        svc.set("test.level", 3, "a")
    assert svc.get("test.level") == 0 and svc.audit() == []


# -- the override file on disk -------------------------------------------------------------


def write_overrides(tmp_path, overrides):
    (tmp_path / "flags.json").write_text(json.dumps({"version": 1, "overrides": overrides}))


def test_override_for_a_flag_no_longer_defined_is_kept_and_reported(tmp_path):
    write_overrides(tmp_path, {"sinks.old.enabled": False, "test.level": 4})
    svc = service(tmp_path)
    assert svc.get("test.level") == 4
    (problem,) = svc.health()
    assert "sinks.old.enabled=false" in problem and "no flag has this name" in problem
    svc.set("test.level", 5, "a")  # rewriting the file keeps the unknown override
    assert json.loads((tmp_path / "flags.json").read_text())["overrides"] == {
        "sinks.old.enabled": False,
        "test.level": 5,
    }
    assert svc.clear("sinks.old.enabled", "a") is True  # and it can be cleared by name
    assert svc.health() == []
    assert json.loads((tmp_path / "flags.json").read_text())["overrides"] == {"test.level": 5}


def test_override_no_longer_valid_is_not_applied(tmp_path):
    write_overrides(tmp_path, {"test.level": 99})
    svc = service(tmp_path)
    assert svc.get("test.level") == 0
    (problem,) = svc.health()
    assert "test.level=99" in problem and "expected a whole number from 0 to 10" in problem
    svc.set("test.level", 2, "a")
    assert svc.health() == [] and service(tmp_path).get("test.level") == 2


@pytest.mark.parametrize(
    "content", [b"{not json", b"[]", b'{"version": 1}', b'{"version": 9, "overrides": {}}', b"\xff\xfe"]
)
def test_corrupt_override_file_is_moved_aside_and_reported(tmp_path, content):
    (tmp_path / "flags.json").write_bytes(content)
    svc = service(tmp_path)
    assert svc.get("test.level") == 0
    (problem,) = svc.health()
    assert "was corrupt" in problem and "moved to" in problem
    (moved,) = tmp_path.glob("flags.json.corrupt-*")
    assert moved.read_bytes() == content
    assert not (tmp_path / "flags.json").exists()
    svc.set("test.level", 1, "a")
    assert service(tmp_path).get("test.level") == 1


# -- offline mode (the CLI when the agent is stopped) ---------------------------------------


def test_offline_set_list_clear(tmp_path):
    defs = core_flags(["jsonl"])
    offline = FlagService.offline(defs, tmp_path, {"sinks": {"jsonl": {"enabled": True}}})
    offline.set("sinks.jsonl.enabled", "off", actor="cli")
    assert {r["name"]: r["layer"] for r in offline.describe()}["sinks.jsonl.enabled"] == "override"
    with pytest.raises(FlagError, match=r"\(override\): expected true or false"):
        offline.set("sinks.jsonl.enabled", "perhaps", actor="cli")
    running = FlagService(defs, {}, {}, tmp_path, None)
    assert running.get("sinks.jsonl.enabled") is False
    assert running.audit()[-1]["actor"] == "cli"
    assert FlagService.offline(defs, tmp_path).clear("sinks.jsonl.enabled", actor="cli") is True
    assert FlagService(defs, {}, {}, tmp_path, None).get("sinks.jsonl.enabled") is True


def test_offline_ignores_the_cli_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_AGENT_FLAG_NOT__A__FLAG", "1")
    assert FlagService.offline(core_flags([]), tmp_path).get("dashboard.data_source") == "websocket"


# -- health checks ----------------------------------------------------------------------------


def test_health_checks(tmp_path):
    svc = service(tmp_path)
    svc.add_check(data_source_check(svc, {"jsonl": "jsonl"}))
    assert svc.health() == []
    svc.set("dashboard.data_source", "supabase", "a")
    assert svc.health() == ["dashboard.data_source=supabase but no supabase sink is configured"]

    def broken():
        raise RuntimeError("check blew up")

    svc.add_check(broken)
    assert any("check blew up" in p for p in svc.health())
    ok = service(tmp_path)
    ok.add_check(data_source_check(ok, {"supabase-main": "supabase"}))
    assert ok.health() == []


# -- rollout ------------------------------------------------------------------------------------

_ROLLOUT_CHILD = """
import sys
from agent.flags import in_rollout
ids = open(sys.argv[1]).read().split()
sys.stdout.write("\\n".join(i for i in ids if in_rollout(i, 30)))
"""


def test_rollout_share_and_cross_process_stability(tmp_path):
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    chosen = [i for i in ids if in_rollout(i, 30)]
    assert 2800 <= len(chosen) <= 3200
    assert [i for i in ids if in_rollout(i, 30)] == chosen  # recomputation in this process

    path = tmp_path / "ids.txt"
    path.write_text("\n".join(ids))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _ROLLOUT_CHILD, str(path)], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.split() == chosen


def test_rollout_edges_and_monotonicity():
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    assert all(in_rollout(i, 100) for i in ids) and not any(in_rollout(i, 0) for i in ids)
    assert all(in_rollout(i, 150) for i in ids) and not any(in_rollout(i, -5) for i in ids)
    # Raising the percentage only adds events: an event in at 10% stays in at 30%.
    at10 = {i for i in ids if in_rollout(i, 10)}
    at30 = {i for i in ids if in_rollout(i, 30)}
    assert at10 <= at30
    assert all(0 <= rollout_bucket(i) < 10000 for i in ids)
    # A known value pins the hash function itself (blake2b, 8 bytes, big-endian, mod 10000).
    assert rollout_bucket("00000000-0000-0000-0000-000000000000") == 8970


def test_custom_validator(tmp_path):
    def even(v):
        return None if v % 2 == 0 else "expected an even number"

    def broken(v):
        raise ZeroDivisionError("oops")

    defs = [Flag.int("x.even", 2, "even only", validate=even), Flag.int("x.broken", 0, validate=lambda v: None)]
    svc = service(tmp_path, defs=defs)
    with pytest.raises(FlagError, match=r"^flag x.even \(override\): expected an even number, got 3$"):
        svc.set("x.even", 3, "a")
    with pytest.raises(ConfigError, match=r"flag x.even \(environment SIDECAR_AGENT_FLAG_X__EVEN\): expected an even"):
        service(tmp_path, environ={"SIDECAR_AGENT_FLAG_X__EVEN": "5"}, defs=defs)
    assert svc.set("x.even", 4, "a")["value"] == 4
    with pytest.raises(FlagError, match="validator failed: ZeroDivisionError: oops"):
        Flag.int("x.bad", 0, validate=broken)


@settings(max_examples=60, deadline=None)
@given(
    value=st.floats(min_value=0, max_value=100, allow_nan=False),
    level=st.integers(min_value=0, max_value=10),
)
def test_any_valid_value_survives_a_restart_exactly(value, level):
    with tempfile.TemporaryDirectory() as d:
        svc = FlagService([*core_flags(["jsonl"]), LEVEL], {}, {}, d, None)
        svc.set(PCT, value, "prop")
        svc.set("test.level", str(level), "prop")  # a string parses like an env value
        again = FlagService([*core_flags(["jsonl"]), LEVEL], {}, {}, d, None)
        assert again.get(PCT) == value and again.get("test.level") == level
