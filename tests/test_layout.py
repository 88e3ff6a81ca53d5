"""The package layout of bnport, read from the source with ast (nothing is imported): every import, at module level or
inside a function, and every name a package re-exports lazily (bnport.lazy.lazy_exports), runs downhill, from a
stage to the same or an earlier one or to the core, in the order core < runtime < data < model < calibrate < export <
score < report < top; no two modules import each other, directly or round a longer loop (edges into a package's
__init__.py, which only re-exports names lazily, are left out); and no module is over 600 lines nor any function
over 80."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import REPO

PACKAGE = REPO / "bnport"
STAGES = ["core", "runtime", "data", "model", "calibrate", "export", "score", "report", "top"]
CORE = {"bnport", "bnport.errors", "bnport.atomic", "bnport.text", "bnport.runs", "bnport.demo", "bnport.options",
        "bnport.lazy"}
TOP = {"bnport.config", "bnport.pipeline", "bnport.cli", "bnport.__main__"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def stage(module: str) -> str:
    """The stage a bnport module belongs to: the core, a stage package (bnport.STAGE and below) or the top."""
    if module in TOP:
        return "top"
    if module in CORE or any(module.startswith(f"{core}.") for core in CORE - {"bnport"}):
        return "core"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    raise AssertionError(f"{module} is in no stage: add it to the core, the top or a stage package")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if module not in PACKAGES:
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[tuple[str, int]]:
    """(bnport module imported, line) for every import in `module`'s source, wherever it sits, and every module a
    lazy_exports table names. `from bnport.pkg import name` counts as an import of bnport.pkg.name when that is a
    module, else of bnport.pkg."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                found.append((target if target in MODULES else source, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            for table in node.args[1:2]:
                if isinstance(table, ast.Dict):
                    found += [(v.value, node.lineno) for v in table.values if isinstance(v, ast.Constant)]
    return [(name, line) for name, line in found if name == "bnport" or name.startswith("bnport.")]


IMPORTS = {module: imports_of(module) for module in MODULES}


def test_the_layout_sees_every_module_and_their_imports():
    """The check reads what it should: the stage packages, core and top modules, and imports of every kind."""
    assert {"bnport.cli", "bnport.score.scoring", "bnport.export.precision.make", "bnport.data"} <= set(MODULES)
    assert {stage(m) for m in MODULES} == set(STAGES)
    scoring = {name for name, _ in IMPORTS["bnport.score.scoring"]}
    assert "bnport.errors" in scoring and any(name.startswith("bnport.export") for name in scoring)
    assert "bnport.score.candidates" in {name for name, _ in IMPORTS["bnport.score"]}  # its lazy exports
    local = ast.parse("def f():\n    from . import table\n    from ..data import open_images\n").body[0].body
    assert _resolve("bnport.score.scoring", local[0]) == "bnport.score"
    assert _resolve("bnport.score.scoring", local[1]) == "bnport.data"
    assert _resolve("bnport.score", local[1]) == "bnport.data"
    assert stage("bnport.demo") == "core" and stage("bnport.export.precision.gate") == "export"
    assert stage("bnport.__main__") == "top" and stage("bnport") == "core"


def test_every_import_runs_from_a_later_stage_to_an_earlier_one_or_the_core():
    order = {name: k for k, name in enumerate(STAGES)}
    uphill = [f"{MODULES[module].relative_to(REPO)}:{line} ({stage(module)}) imports {name} ({stage(name)})"
              for module, found in IMPORTS.items() for name, line in found
              if name in MODULES and order[stage(name)] > order[stage(module)]]
    unknown = [f"{MODULES[module].relative_to(REPO)}:{line} imports {name}, which is not a module of bnport"
               for module, found in IMPORTS.items() for name, line in found if name not in MODULES]
    assert not unknown, "\n".join(unknown)
    assert not uphill, "imports that run uphill:\n" + "\n".join(uphill)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"c"}}) == [["c"]]


def test_no_import_cycle_between_modules():
    graph = {module: {name for name, _ in found if name in MODULES and name not in PACKAGES and name != module}
             for module, found in IMPORTS.items()}
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other (directly or round a loop):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_module_over_600_lines_and_no_function_over_80():
    too_long = []
    for path in MODULES.values():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)} has {len(text.splitlines())} lines (at most {MAX_MODULE_LINES})")
        too_long += [f"{path.relative_to(REPO)}:{node.lineno} {node.name}() has {node.end_lineno - node.lineno + 1} "
                     f"lines (at most {MAX_FUNCTION_LINES})" for node in ast.walk(ast.parse(text))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not too_long, "\n".join(too_long)
