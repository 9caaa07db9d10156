pytest_plugins = ["tests.conftest_supabase", "tests.conftest_leak"]



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
