pytest_plugins = ["tests.conftest_supabase", "tests.conftest_leak"]


# -- fixtures for the core tests (appended; keep the line above) ---------------------------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (SIDECAR_AGENT_CI_STRICT=1, set by .ci/run) a skipped test is a failure:
    a missing service or browser must never pass silently."""
    import os

    outcome = yield
    report = outcome.get_result()
    if os.environ.get("SIDECAR_AGENT_CI_STRICT") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every service must be present: {report.longrepr}"


@pytest.fixture
def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    from tests.helpers import free_port

    return free_port()


@pytest.fixture
def jsonl_config(tmp_path: Path) -> dict:
    """An agent config: no sources, one jsonl sink in tmp_path, no server, no policies."""
    return {
        "agent": {"data_dir": str(tmp_path / "data"), "id": "test-agent"},
        "server": {"enabled": False},
        "dashboard": {"store": False},
        "sinks": {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": []}},
    }


@pytest.fixture
def embedded():
    """The process-wide agent module; whatever a test started is stopped afterwards."""
    import agent

    agent.stop()
    yield agent
    agent.stop()
