"""Runs the dashboard's JavaScript unit tests (`node --test sidecar_ui/tests/`), so
`make test` covers them. Node is required: FAILS (never skips) without it under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UI = Path(__file__).resolve().parent.parent / "sidecar_ui"


def test_node_unit_tests():
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node (>= 20) is needed for the dashboard's JS tests", pytrace=False)
        pytest.skip("node is not installed")
    tests = sorted(str(p) for p in (UI / "tests").glob("*.test.js"))
    assert tests, "no JS tests found"
    proc = subprocess.run([node, "--test", *tests], capture_output=True, text=True, timeout=120, cwd=UI)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# fail 0" in proc.stdout, proc.stdout
