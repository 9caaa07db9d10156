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
