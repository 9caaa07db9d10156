"""The package layout keeps its promises: a host app's own `plugins` package does not
collide with the built-ins, the core has no import cycles, and the plugin boundary
holds both ways (built-ins import only `agent.plugin`; the core never imports a
built-in or recognises one by its class name)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "agent"
BUILTINS = ROOT / "plugins"
SHIMS = {"agent.hookspecs", "agent.plugin_api"}  # deprecated re-exports, go next release
PLUGIN_API = "agent.plugin"


# -- a host app with its own `plugins` package --------------------------------------------

HOST_PLUGINS = 'BUILTIN = None  # not the agent\'s\nOWNER = "host app"\n'

HOST_APP = """
import json, sys
import plugins                       # the host app's own package, first on sys.path
import agent

config = {
    "agent": {"data_dir": sys.argv[1] + "/data", "id": "host-app"},
    "server": {"enabled": False},
    "dashboard": {"store": False},
    "sources": {"system": {"interval_s": 60}},
    "sinks": {"out": {"type": "jsonl", "path": sys.argv[1] + "/out.jsonl", "policies": []}},
}
a = agent.start(config)
agent.record("host.ready", 1, kind="counter")
flushed = agent.flush(10)
agent.stop()
import plugins as again
print(json.dumps({
    "flushed": flushed,
    "plugins": {p["name"]: p["state"] for p in a.status()["plugins"]},
    "components": {c["name"]: c["state"] for c in a.status()["components"]},
    "own_plugins_file": plugins.__file__,
    "own_owner": plugins.OWNER,
    "own_builtin": plugins.BUILTIN,
    "same_module": again is plugins and sys.modules["plugins"] is plugins,
}))
"""


@pytest.mark.parametrize("repo_on_path", [False, True], ids=["installed", "repo-on-pythonpath"])
def test_a_host_app_with_its_own_plugins_package_starts_the_agent(tmp_path, repo_on_path):
    app = tmp_path / "app"
    (app / "plugins").mkdir(parents=True)
    (app / "plugins" / "__init__.py").write_text(HOST_PLUGINS)
    (app / "main.py").write_text(textwrap.dedent(HOST_APP))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    if repo_on_path:  # the repository's own top-level plugins/ folder reachable too
        env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "main.py", str(tmp_path)], cwd=app, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["flushed"]
    assert {"system", "jsonl", "postgres", "retry", "circuit_breaker", "store"} <= set(out["plugins"])
    assert set(out["plugins"].values()) == {"loaded"}
    assert out["components"] == {"out": "running", "system": "running"}
    events = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert any(e["name"] == "host.ready" for e in events)
    # the app's own package is untouched: same module, same contents, nothing added
    assert out["own_plugins_file"] == str(app / "plugins" / "__init__.py")
    assert out["own_owner"] == "host app" and out["own_builtin"] is None and out["same_module"]


# -- the import graph -------------------------------------------------------------------


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import run when the module is imported: the
    module body and its if/try blocks, not `if TYPE_CHECKING:` and not inside functions."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, list[str]]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_package else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                found.append((base, [alias.name for alias in node.names]))
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    visit(block)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                visit(node.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    return found


def core_modules() -> dict[str, Path]:
    return {module_name(p, CORE, "agent"): p for p in CORE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """agent.* module -> the agent.* modules it imports at import time (a `from pkg import
    sub` names the submodule; importing a submodule is not counted as importing its parent)."""
    modules = core_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules if m not in SHIMS}
    for mod in graph:
        for target, names in module_level_imports(modules[mod], mod):
            if not target.startswith("agent"):
                continue
            subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
            if subs:
                graph[mod] |= subs
            if not subs or len(subs) < len(names):
                graph[mod].add(target)
        graph[mod] &= graph.keys()
        graph[mod].discard(mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_what_python_imports():
    graph = import_graph()
    assert "agent.runtime" in graph["agent"]  # agent/__init__ imports the runtime
    assert "agent.version" in graph["agent.status"]
    assert "agent.api.metrics" in graph["agent.api.health"]  # `from agent.api import metrics`


def test_no_import_cycles_among_core_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_http_api_does_not_import_the_runtime():
    graph = import_graph()
    reach, todo = set(), ["agent.api"]
    while todo:
        for m in graph[todo.pop()] - reach:
            reach.add(m)
            todo.append(m)
    assert "agent.runtime" not in reach and "agent" not in reach
    # not even for type hints: the API is typed against agent.api.view.AgentView
    for path in (CORE / "api").glob("*.py"):
        assert [m for _, m, _ in _all_imports(path) if m == "agent.runtime"] == [], path.name


# -- the plugin boundary --------------------------------------------------------------------


def _all_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import anywhere in the file (functions and TYPE_CHECKING blocks included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.lineno, node.module or "", [a.name for a in node.names]))
    return out


def builtin_leaks(path: Path) -> list[str]:
    """Imports from the agent other than the public plugin API."""
    leaks = []
    for line, module, names in _all_imports(path):
        if module == "agent" and names:
            leaks.append(f"{path.name}:{line}: from agent import {', '.join(names)}")
        elif module.startswith("agent") and module != PLUGIN_API and module != "agent.builtin_plugins" \
                and not module.startswith("agent.builtin_plugins."):
            leaks.append(f"{path.name}:{line}: {module}")
    return leaks


def core_leaks(path: Path, builtin_classes: set[str]) -> list[str]:
    """A core module importing a built-in, or naming a built-in's class in a string."""
    leaks = []
    for line, module, names in _all_imports(path):
        if module.startswith("agent.builtin_plugins") or module == "plugins" or module.startswith("plugins."):
            leaks.append(f"{path}:{line}: imports {module}")
        elif module == "agent" and "builtin_plugins" in names:
            leaks.append(f"{path}:{line}: imports agent.builtin_plugins")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in builtin_classes:
            leaks.append(f"{path}:{node.lineno}: matches the built-in class {node.value!r} by name")
    return leaks


def builtin_class_names() -> set[str]:
    return {node.name for p in BUILTINS.glob("*.py")
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef)}


@pytest.mark.parametrize("path", sorted(BUILTINS.glob("*.py")), ids=lambda p: p.name)
def test_a_builtin_imports_only_the_plugin_api(path):
    assert builtin_leaks(path) == []


def test_the_core_never_imports_a_builtin_or_matches_its_class_name():
    classes = builtin_class_names()
    assert {"StoreSink", "CircuitBreakerPolicy", "ConcurrencyPolicy"} <= classes
    leaks = [leak for p in sorted(CORE.rglob("*.py")) for leak in core_leaks(p, classes)]
    assert leaks == []


def test_the_boundary_checks_catch_a_leak(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from agent.pipeline.resilience import probing\nimport agent.event\n"
                   "from agent import plugin\nfrom agent.plugin import hookimpl\n"
                   "def f():\n    from agent.builtin_plugins.store import find_store\n"
                   "    return w.sink.__class__.__name__ == 'StoreSink'\n")
    assert builtin_leaks(bad) == ["bad.py:1: agent.pipeline.resilience", "bad.py:2: agent.event",
                                  "bad.py:3: from agent import plugin"]
    assert [leak.split(": ", 1)[1] for leak in core_leaks(bad, {"StoreSink"})] == [
        "imports agent.builtin_plugins.store", "matches the built-in class 'StoreSink' by name"]


# -- the deprecated import paths ------------------------------------------------------------


@pytest.mark.parametrize("old, names", [
    ("agent.hookspecs", ["hookimpl"]),
    ("agent.plugin_api", ["hookimpl", "BaseSink", "PluginContext", "RetryableError", "probing", "NoOptions"]),
])
def test_deprecated_plugin_paths_warn_and_still_work(old, names):
    import importlib

    import agent.plugin

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and "agent.plugin" in str(w.message) for w in caught)
    for name in names:
        assert getattr(module, name) is getattr(agent.plugin, name)
