"""The house rules, read from the source: Ray at the edges, no module importing a CLI, no import cycle,
modules small enough to read."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raypipe"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}
CLIS = {"train", "sweep", "prepare", "bench", "generate", "export"}
RAY_ALLOWED = {"driver", "torch_backend", "joining", "sweep", "prepare", "prepare_ray"}  # the edges
MAX_LINES = 460


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The raypipe modules and the top-level packages that `module` imports."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif node.module:
                root = node.module.split(".")[0]
                found |= {node.module.split(".")[1]} if root == "raypipe" and "." in node.module else {root}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_cli(module):
    allowed = {"train"} if module == "__main__" else set()
    assert not (imports(module) & CLIS) - allowed - {module}, f"raypipe/{module}.py imports a CLI module"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_driver_sweep_and_prepare_import_ray(module):
    if module not in RAY_ALLOWED:
        assert "ray" not in imports(module), f"raypipe/{module}.py imports Ray"


def test_no_import_cycle():
    graph = {m: imports(m, top_level_only=True) & set(MODULES) for m in MODULES}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"raypipe/{module}.py has {lines} lines: split it at one of its seams"
