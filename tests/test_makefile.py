"""`make`'s .venv handling (issue 17): an older Python is one error line and no .venv; a .venv
an older Python made (or an interrupted run half made) is made again, never reused; a failed
install writes no stamp, so the next run retries it. Run on a copy of the Makefile in a temp
folder, with `PIP=true`/`PIP=false` standing in for pip so nothing is downloaded."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.helpers import ROOT

OLD_PYTHON = """#!/bin/sh
# A Python 3.10 as far as the Makefile can tell: -V names it, every -c check fails.
case "$1" in -V) echo "Python 3.10.13" ;; *) exit 1 ;; esac
"""


def _make(folder, *args):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=folder, capture_output=True, text=True,
                          timeout=300)


def _folder(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    return tmp_path


def _old_python(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OLD_PYTHON)
    path.chmod(0o755)
    return path


def test_an_older_python_is_one_error_line_and_makes_no_venv(tmp_path):
    folder = _folder(tmp_path)
    old = _old_python(tmp_path / "old" / "python3")
    r = _make(folder, "run", f"PY={old}")
    assert r.returncode != 0
    assert f"error: sidecar-agent needs Python >= 3.11; '{old}' is Python 3.10.13. Try: make run PY=python3.11" \
        in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (folder / ".venv").exists()


def test_a_venv_an_older_python_made_is_made_again(tmp_path):
    folder = _folder(tmp_path)
    _old_python(folder / ".venv" / "bin" / "python")  # what an earlier failed run with 3.10 left
    (folder / ".venv" / ".installed").touch()  # and the old Makefile's stamp
    r = _make(folder, ".venv/.checked", f"PY={sys.executable}", "PIP=true")
    assert r.returncode == 0, r.stderr
    python = str(folder / ".venv" / "bin" / "python")
    version = subprocess.run([python, "-c", "import sys, pip; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "True", version.stderr
    assert not (folder / ".venv" / ".installed").exists()  # the old .venv is gone, not patched


def test_a_failed_install_writes_no_stamp_and_is_retried(tmp_path):
    folder = _folder(tmp_path)
    r = _make(folder, ".venv/.checked", f"PY={sys.executable}", "PIP=true")
    assert r.returncode == 0, r.stderr
    r = _make(folder, "install", "PIP=false")
    assert r.returncode != 0
    assert "error: .venv/.installed-run failed" in r.stderr
    assert not (folder / ".venv" / ".installed-run").exists()
    r = _make(folder, "install", "PIP=true")  # the next run tries again, and a success is stamped
    assert r.returncode == 0, r.stderr
    assert (folder / ".venv" / ".installed-run").exists()
    again = _make(folder, "install", "PIP=false")  # and then not again: pip (false) is not called
    assert again.returncode == 0 and "pip" not in again.stdout, again.stdout + again.stderr
