"""The code base stays ruff- and mypy-clean (run as part of the test suite, so CI enforces it)."""

from __future__ import annotations

import ast
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed in this environment (pip install -e '.[test]')")
    return found


def test_ruff_clean() -> None:
    proc = subprocess.run([tool("ruff"), "check", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean() -> None:
    proc = subprocess.run([tool("mypy")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_redis_call_lives_in_the_redis_plugin() -> None:
    """Only the Redis plugin package (plugins/redis/) imports redis-py."""
    offenders = []
    for path in [*ROOT.glob("ms1/**/*.py"), *ROOT.glob("plugins/**/*.py")]:
        if path.is_relative_to(ROOT / "plugins" / "redis"):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import redis", "from redis")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert not offenders, offenders


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts[0] = "ms1_plugins"
    if parts[0] == "tools":
        parts.pop(0)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, package: str) -> set[str]:
    """Modules ``path`` imports: when it runs, inside functions too, and under ``if
    TYPE_CHECKING:`` (a type-only import is an arrow all the same: issue 23)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 \
                        else package
                    base = f"{anchor}.{base}" if base else anchor
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the ms1 modules it imports (:func:`_imports`), over ms1 and the built-in
    plugins."""
    paths = [*ROOT.glob("ms1/**/*.py"), *ROOT.glob("plugins/**/*.py"),
             *ROOT.glob("tools/ms1_tools/*.py")]
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    return graph


def test_no_import_cycles() -> None:
    """The module graph of ms1 and its built-in plugins has no cycle (imports inside
    functions count too, and so do ``TYPE_CHECKING`` imports)."""
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


#: the packages of ms1 by concern; a module elsewhere in ms1 is a top-level one
PACKAGES = ("ms1.pipeline", "ms1.runtime", "ms1.ops", "ms1.cli", "ms1.console")
#: what each layer may not import (arrows point down: the stages never reach the plugin
#: loader, the service, operations or the command line; plugins use the core's contracts)
FORBIDDEN = {
    "ms1.pipeline": ("ms1.runtime", "ms1.ops", "ms1.cli", "ms1.console", "ms1.hookspecs",
                     "ms1.api"),
    "ms1.ops": ("ms1.runtime", "ms1.cli", "ms1.console", "ms1.hookspecs"),
    "ms1.console": ("ms1.runtime", "ms1.cli"),
    "ms1_plugins": ("ms1.runtime", "ms1.cli", "ms1.console", "ms1.ops.metrics",
                    "ms1.ops.publisher", "ms1.ops.overview", "ms1.ops.logs", "ms1.ops.notify"),
}


def _package(module: str) -> str:
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return module.split(".")[0] if module.startswith(("ms1_plugins", "ms1_tools")) else module


def test_packages_import_downward_only() -> None:
    """Issue 23: no circle between packages either (``TYPE_CHECKING`` included), and the
    forbidden arrows are absent."""
    graph = import_graph()
    between: dict[str, set[str]] = {}
    wrong: list[str] = []
    for module, imported in graph.items():
        for target in imported:
            source_pkg, target_pkg = _package(module), _package(target)
            if source_pkg != target_pkg:
                between.setdefault(source_pkg, set()).add(target_pkg)
            for banned in FORBIDDEN.get(source_pkg, ()):
                if target == banned or target.startswith(banned + "."):
                    wrong.append(f"{module} -> {target}")
    assert not wrong, "\n".join(sorted(wrong))
    state: dict[str, int] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(between.get(node, ())):
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                walk(nxt, [*path, node])
        state[node] = 2

    for node in sorted(between):
        if node not in state:
            walk(node, [])


def test_the_top_level_holds_at_most_twelve_modules() -> None:
    modules = sorted(p.name for p in (ROOT / "ms1").glob("*.py"))
    assert len(modules) <= 12, modules


def test_no_module_shadows_the_standard_library() -> None:
    names = {p.stem for p in [*ROOT.glob("ms1/**/*.py"), *ROOT.glob("plugins/*.py")]}
    shadowing = sorted(names & set(sys.stdlib_module_names))
    assert not shadowing, shadowing


def _requirements(text: str) -> dict[str, str]:
    """``name -> specifier`` of each requirement line (extras dropped, names normalised)."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([<>=!~].*)?$", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = (match[3] or "").replace(" ", "")
    return found


def test_the_floors_file_pins_exactly_setup_cfgs_floors() -> None:
    """requirements/floors.in holds one ``==`` pin per install requirement, at the floor
    setup.cfg declares: the floors CI tests are the floors the wheel promises."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    declared = _requirements(parser["options"]["install_requires"])
    floors = _requirements((ROOT / "requirements" / "floors.in").read_text())
    assert set(floors) == set(declared)
    for name, spec in declared.items():
        floor = next(p[2:] for p in spec.split(",") if p.startswith(">="))
        assert floors[name] == f"=={floor}" or floors[name].startswith(f"=={floor}."), name
    for lock in ("lock.txt", "floors.txt"):
        pinned = _requirements((ROOT / "requirements" / lock).read_text())
        assert set(declared) <= set(pinned), lock
        assert all(spec.startswith("==") for spec in pinned.values()), lock


def test_module_docstrings_are_short() -> None:
    """Issue 23: a module opens with what it is (about ten lines at most); the prose is in
    docs/ (docs/internals.md holds the longer notes, by module)."""
    long = []
    for path in [*ROOT.glob("ms1/**/*.py"), *ROOT.glob("plugins/**/*.py"),
                 *ROOT.glob("tools/ms1_tools/*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        if len(doc.splitlines()) > 12:
            long.append(f"{path.relative_to(ROOT)}: {len(doc.splitlines())} lines")
    assert not long, long


#: where the core reads a loaded configuration: the schema and the settings layer
SETTINGS_LAYER = ("ms1/config.py", "ms1/runtime/settings.py")
_GETTERS = {"get_int", "get_float", "get_str", "get_bool", "get_address"}


def test_only_the_settings_layer_reads_the_configuration() -> None:
    """Issue 23: stages get typed settings built in ms1/runtime/settings.py; no
    ``config.get_*("section", ...)`` anywhere else in the core (plugins read their own
    sections in their hooks), and no pipeline stage imports ``Config`` at all."""
    found = []
    for path in ROOT.glob("ms1/**/*.py"):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if rel not in SETTINGS_LAYER and isinstance(node, ast.Call) \
                    and isinstance(node.func, ast.Attribute) \
                    and (node.func.attr in _GETTERS or (node.func.attr == "get"
                         and ast.unparse(node.func.value).endswith("config"))) \
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            if rel.startswith("ms1/pipeline/") and isinstance(node, ast.ImportFrom) \
                    and node.module == "ms1.config" \
                    and any(alias.name == "Config" for alias in node.names):
                found.append(f"{rel}:{node.lineno}: a stage imports Config")
    assert not found, "\n".join(sorted(found))


#: the built-in plugins the core must not single out (the in-memory twins ship in the core)
_PLUGIN_NAMES = {"redis", "http", "files", "jsonl", "policies"}


def test_the_core_names_no_plugin() -> None:
    """Issue 23: the core decides nothing by a plugin's name (before: a source named
    "redis" acked, a queue on "redis" chose the Redis fleet, the watchdog check read
    [transport.http] and [redis] timeouts): plugins declare traits
    (``ms1_component_traits``) and components say how long a call may take
    (``longest_call``)."""
    found = []
    for path in ROOT.glob("ms1/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare) or "scheme" in ast.unparse(node):
                continue  # (a URL's scheme "http" is no plugin)
            for operand in [node.left, *node.comparators]:
                values = [operand] if isinstance(operand, ast.Constant) else \
                    list(operand.elts) if isinstance(operand, (ast.Tuple, ast.Set, ast.List)) \
                    else []
                if any(isinstance(v, ast.Constant) and v.value in _PLUGIN_NAMES
                       for v in values):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)
