"""The package's import graph: layers only import lower (or equal) layers, no cycles.

Every ``import`` in the source counts, function-level ones included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nidask

PACKAGE = Path(nidask.__file__).parent

#: Lowest first: a module may import modules of its own layer or below.  Each entry
#: names a top-level package (or one of the few modules kept at the root).
LAYERS = [
    {"config", "errors", "progress", "geometry", "cluster"},
    {"io"},
    {"ops"},
    {"data"},
    {"estimation"},
    {"validation", "reporting", "bids", "interop"},
    {"cli", "__main__", "__init__"},
]
#: Modules at the package root (beside ``__init__`` and ``__main__``); the rest live in
#: the package of their layer.
ROOT_MODULES = {"config", "errors", "progress", "geometry", "cluster"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """nidask modules that ``path`` imports (a ``from X import y`` counts X.y if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nidask")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("nidask"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in known else node.module)
    return {m for m in found if m in known}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, set(known)) - {name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_import_goes_down_the_layers():
    edges = graph()
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in edges.items()
        for b in targets
        if b != "nidask" and layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    # the package __init__ imports everything by design; modules themselves must not cycle
    edges = {a: {b for b in targets if b != "nidask"} for a, targets in graph().items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_graph_walker_sees_function_level_imports_and_cycles():
    # the checks above would pass vacuously if the walker missed imports
    edges = graph()
    assert "nidask.ops.resample" in edges["nidask.data.base"]  # imported inside a method
    assert "nidask.data.base" in edges["nidask.data.dmri.dataset"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_modalities_are_named_only_in_their_own_module():
    """No ``isinstance`` on a modality class outside its module (modalities stay pluggable)."""
    pattern = re.compile(r"isinstance\(.*\b(DWI|PET|BOLD)\b")
    own = {"DWI": "data/dmri/", "PET": "data/pet.py", "BOLD": "data/bold.py"}
    foreign = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (match := pattern.search(line))
        and not path.relative_to(PACKAGE).as_posix().startswith(own[match.group(1)])
    ]
    assert not foreign, "\n".join(foreign)


def test_the_root_holds_only_the_base_modules():
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert root == ROOT_MODULES
    assert len(ROOT_MODULES) <= 6


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set().union(*LAYERS) - ROOT_MODULES - {"__main__", "__init__"}


def test_short_import_paths_are_the_modules_themselves():
    import importlib

    for short, where in nidask.SHORT_NAMES.items():
        assert importlib.import_module(short) is importlib.import_module(where)
    from nidask.dmri import DWI

    assert DWI is nidask.DWI and nidask.dmri.from_nii is nidask.data.dmri.from_nii
