"""Docs and hooks stay in step: every hook is documented in docs/plugins.md under its
exact signature, and exercised by at least one test (datasette's test_docs.py style)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from agent.plugin import hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent


def hooks() -> dict[str, str]:
    """Hook name -> its exact signature, e.g. 'register_sources(register)'."""
    out = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, "sidecar_agent_spec"):
            out[name] = f"{name}{inspect.signature(fn)}"
    return out


def documented(text: str) -> set[str]:
    """Signatures shown as a heading (`### sig` or ``### `sig` ``) or alone on a code line."""
    found = set()
    for line in text.splitlines():
        m = re.match(r"^#+\s+`?([a-z_]+\([^)]*\))`?\s*$", line) or re.match(r"^\s*([a-z_]+\([^)]*\))\s*$", line)
        if m:
            found.add(m.group(1))
    return found


def exercised(name: str) -> bool:
    return any(name in p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)


def test_there_are_hooks():
    assert set(hooks()) >= {"register_sources", "register_sinks", "register_policies", "register_flags",
                            "register_routes"}


@pytest.mark.parametrize("name, signature", sorted(hooks().items()))
def test_hook_documented_under_exact_signature(name, signature):
    assert signature in documented(DOCS.read_text()), f"docs/plugins.md lacks a heading `{signature}`"


@pytest.mark.parametrize("name", sorted(hooks()))
def test_hook_exercised_by_a_test(name):
    assert exercised(name), f"no test mentions {name}"


@pytest.mark.parametrize("name", sorted(hooks()))
def test_hook_has_a_docstring(name):
    assert (getattr(hookspecs, name).__doc__ or "").strip()


def test_checks_fail_for_an_undocumented_untested_hook():
    # the checks above really catch a hook without docs or tests
    text = DOCS.read_text()
    assert "register_widgets(register)" not in documented(text)
    assert not exercised("register_" + "widgets")
    # and would accept a heading in either form
    assert documented("### `register_widgets(register)`\n") == {"register_widgets(register)"}
    assert documented("## register_widgets(register)\n") == {"register_widgets(register)"}
    assert documented("    register_widgets(register)\n") == {"register_widgets(register)"}


def test_doc_links_resolve():
    for target in re.findall(r"\]\(([a-z_]+\.md)(?:#[^)]*)?\)", DOCS.read_text()):
        assert (DOCS.parent / target).exists(), target


# -- the commands in README, docs/ and the examples work as written ---------------------------
#
# Every shell command in a ```sh fence (README.md, docs/*.md, examples/**/README.md), every
# inline `.venv/bin/...` / `python ...` / `PYTHONPATH=...` span in those files, and the usage
# lines of the examples' docstrings is checked as a new user would type it in a fresh clone
# after `make run`: `make` targets with `make -n`, `sidecar-agent` commands with the CLI's own
# parser, scripts exist and (bench/) answer --help, paths exist. A bare `python`/`pip` is an
# error: on a fresh machine it is not the project's environment (issue 17). Commands that need
# a running agent or a service (curl, nc, `run`) are parsed, not run; `test_readme_start_here_runs`
# runs the README's first config commands for real.

import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md"))]
SHELL_FENCE = re.compile(r"^( *)```(?:sh|bash|shell|console)\n(.*?)^\1```", re.S | re.M)
INLINE = re.compile(r"`((?:\.venv/bin/|python3? |PYTHONPATH=)[^`]+)`")
NEEDS_A_RUNNING_AGENT = ("curl", "nc")  # their target is the agent `make run` starts


def doc_commands() -> list[tuple[str, str, str]]:
    """(where, cwd relative to the root, command) for every command the docs show."""
    found = []
    for path in DOC_FILES:
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        for m in SHELL_FENCE.finditer(text):
            cwd = "."
            for line in m.group(2).replace("\\\n", " ").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("cd "):
                    cwd = line[3:].strip()
                    continue
                found.append((rel, cwd, line))
        found += [(rel, ".", m.group(1)) for m in INLINE.finditer(text)]
    for path in sorted((ROOT / "examples").glob("*.py")):
        doc = (path.read_text().split('"""') + ["", ""])[1]
        found += [(str(path.relative_to(ROOT)), ".", line.strip()) for line in doc.splitlines()
                  if re.match(r"\s+(\S*python\S*|PYTHONPATH=\S+) ", line)]
    return found


def _words(command: str) -> list[str]:
    """The command's words up to a comment, pipe or redirection, without VAR=value prefixes."""
    words = []
    for word in shlex.split(command, comments=True):
        if word in ("|", ">", ">>", "2>&1", "&&"):
            break
        words.append(word)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words.pop(0)
    return words


def check_command(cwd: str, command: str) -> str | None:
    """None when the command works as written from `cwd` in a fresh clone, else the problem."""
    from agent.cli import build_parser

    words = _words(re.sub(r"<[a-z_-]+>", "x", command))  # a placeholder such as <project>
    if not words:
        return "no command"
    program, args = words[0], words[1:]
    base = ROOT / cwd
    if program == "make":
        r = subprocess.run(["make", "-n", *args], cwd=base, capture_output=True, text=True, timeout=60)
        return None if r.returncode == 0 else f"make -n {' '.join(args)}: {r.stderr.strip()}"
    if program in ("sidecar-agent", ".venv/bin/sidecar-agent"):
        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            return f"sidecar-agent {' '.join(args)}: the CLI refuses these arguments" if exc.code else None
        return None
    if program in ("python", "python3", "pip", "pip3"):
        return f"a bare {program} is not the project's environment on a fresh machine: write .venv/bin/{program}"
    if program == ".venv/bin/pip":
        paths = [a for a in args if a.startswith((".", "/"))]
        return next((f"{p} does not exist" for p in paths if not (base / p).exists()), None)
    if program == ".venv/bin/python":
        script = base / args[0]
        if not script.is_file():
            return f"{args[0]} does not exist"
        if script.parent.name == "bench":  # a benchmark must at least start and know its options
            r = subprocess.run([sys.executable, str(script), *args[1:], "--help"], cwd=base, capture_output=True,
                               text=True, timeout=120)
            return None if r.returncode == 0 else f"{command}: {r.stderr.strip()[-300:]}"
        return None
    if program in NEEDS_A_RUNNING_AGENT or (program == "echo" and "| nc " in command):
        return None
    return f"unknown command {program!r}: teach tests/test_docs.py how to check it"


# examples/celery_app is a walkthrough in its own folder, with a worker and Redis: its README
# names the environment it runs in; its commands are not checked here.
OWN_WALKTHROUGHS = ("examples/celery_app/",)


@pytest.mark.parametrize("where, cwd, command", [c for c in doc_commands() if not c[0].startswith(OWN_WALKTHROUGHS)])
def test_documented_command_works_as_written(where, cwd, command):
    assert check_command(cwd, command) is None, f"{where}: {command!r}: {check_command(cwd, command)}"


def test_the_command_check_catches_what_fails():
    assert "bare python" in check_command(".", "python examples/asyncio_app.py")
    assert "bare python" in check_command(".", "PYTHONPATH=. python bench/record_overhead.py")
    assert "does not exist" in check_command(".", ".venv/bin/python examples/no_such_app.py")
    assert "refuses" in check_command(".", ".venv/bin/sidecar-agent chek-config agent.toml")
    assert "refuses" in check_command(".", "sidecar-agent dlq list --no-such-option")
    assert "make -n" in check_command(".", "make no-such-target")
    assert "unknown command" in check_command(".", "docker run sidecar-agent")
    assert check_command(".", "make run CONFIG=agent.toml") is None
    assert check_command(".", ".venv/bin/sidecar-agent supabase sql > monitoring_events.sql") is None


def test_readme_start_here_runs(tmp_path):
    """The README's config commands, run for real in an empty folder (init, then check-config)."""
    text = (ROOT / "README.md").read_text()
    block = next(m.group(2) for m in SHELL_FENCE.finditer(text) if "sidecar-agent init" in m.group(2))
    ran = 0
    for line in block.splitlines():
        words = _words(line)
        if words[:1] == [".venv/bin/sidecar-agent"]:
            r = subprocess.run([sys.executable, "-m", "agent.cli", *words[1:]], cwd=tmp_path,
                               env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, f"{line}: {r.stderr}"
            ran += 1
    assert ran == 2 and (tmp_path / "agent.toml").exists()
