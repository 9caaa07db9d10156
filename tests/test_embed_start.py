"""An embedded agent.start() says what it started, and a second start() with another
config is an error instead of silently returning the first agent (issue 17, item 2)."""

from __future__ import annotations

import copy
import logging

import pytest

from agent.errors import ConfigError


def test_a_second_start_with_another_config_raises_naming_what_differs(embedded, jsonl_config, tmp_path):
    a = embedded.start(jsonl_config)
    assert embedded.start(copy.deepcopy(jsonl_config)) is a  # the same config: the running agent
    assert embedded.start() is a  # no config: the running agent, whatever it runs with
    other = copy.deepcopy(jsonl_config)
    other["sinks"]["out"]["path"] = str(tmp_path / "other.jsonl")
    other["agent"]["id"] = "another-id"
    with pytest.raises(ConfigError) as err:
        embedded.start(other)
    assert "already runs in this process with another config (agent.id, sinks differ)" in str(err.value)
    assert "agent.stop()" in str(err.value)
    assert embedded.current() is a and a.state == "running"  # the running agent is untouched
    embedded.stop()
    b = embedded.start(other)  # after stop(), another config is fine
    assert b is not a and b.id == "another-id"


def test_start_logs_one_line_with_dashboard_data_dir_and_sinks(embedded, jsonl_config, caplog):
    jsonl_config["server"] = {"port": 0}
    with caplog.at_level(logging.INFO, logger="sidecar_agent"):
        a = embedded.start(jsonl_config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sidecar-agent started")]
    data_dir = jsonl_config["agent"]["data_dir"]
    url = a.server_url
    assert lines == [f"sidecar-agent started in this process: dashboard {url}, data dir {data_dir}, sinks: out"]
    assert a.server_url.startswith("http://127.0.0.1:")
