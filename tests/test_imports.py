"""The import graph of the package: imports run downward only and no module imports itself back.

Every ``import`` of every module counts, also those inside functions (a late import is still a
dependency). Layers, top to bottom: cli -> experiments -> train/eval (and the types the loop is
handed) -> rules -> nets, losses, data and the small shared modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import locallearn

ROOT = Path(locallearn.__file__).parent

#: (layer, module prefixes); a module may import only from its own layer or those below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("locallearn.cli", "locallearn.__main__")),
    ("experiments", ("locallearn.experiments",)),
    ("train/eval", ("locallearn.train", "locallearn.eval", "locallearn.schema",
                    "locallearn.task", "locallearn.parallel", "locallearn.delay")),
    ("rules", ("locallearn.rules",)),
    ("base", ("locallearn.nets", "locallearn.losses", "locallearn.data", "locallearn.theory",
              "locallearn.config", "locallearn.runfiles", "locallearn.errors",
              "locallearn.runtime", "locallearn.distributed", "locallearn")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (``a.b.c`` may be a module or a name in ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in ``path`` (relative imports are not used here)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            bases = names
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            base = node.module or ""
            names = [f"{base}.{a.name}" for a in node.names]
            bases = [base]
        for base in bases if names else ():
            if base.startswith("locallearn"):
                assert base in known, f"{path} imports {base}, which does not exist"
        for name in names:
            if name == "locallearn" or name.startswith("locallearn."):
                target = resolve(name, known)
                if target is not None:
                    out.add(target)
    return out


def layer_of(module: str) -> int:
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"module {module} has no layer; add it to LAYERS"
    return index


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(p, known) - {m} for m, p in known.items()}


def test_every_module_has_a_layer_and_imports_downward():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) < layer_of(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports upward: " + "; ".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The checker itself: a planted circle and an upward edge are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("locallearn.rules.base") > layer_of("locallearn.train")
    assert layer_of("locallearn.experiments.tasks") < layer_of("locallearn.train")


def test_the_loop_loads_no_task_and_no_experiments_module():
    code = (
        "import sys, locallearn.train, locallearn.rules; "
        "bad = [m for m in sys.modules if m.startswith(('locallearn.experiments', "
        "'locallearn.cli'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
