"""The package builds without packaging warnings and ships its data files (issue 17: `make
run` printed 184 lines of setuptools warnings; the sql and vendor folders were not declared)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.helpers import ROOT

WARNINGS = ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "is absent from", "deprecated")


def test_the_wheel_builds_without_warnings_and_holds_its_data_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "node_modules")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("agent", "plugins", "sidecar_ui"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    output = r.stdout + r.stderr
    assert not [w for w in WARNINGS if w in output], output
    (wheel,) = (tmp_path / "dist").glob("sidecar_agent-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("agent/table/sql/monitoring_events.sql", "agent/cli/starter.toml",
                     "agent/builtin_plugins/statsd.py", "sidecar_ui/index.html",
                     "sidecar_ui/vendor/uplot/uPlot.esm.min.js", "sidecar_ui/vendor/supabase-js/supabase.esm.js"):
        assert required in names, sorted(names)
    assert not [n for n in names if n.startswith(("tests/", "sidecar_ui/tests/", "plugins/"))]
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in metadata and "Requires-Python: >=3.11" in metadata
