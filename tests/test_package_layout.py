"""The package layout: no import cycles among the project's modules, and the entry points
the README names still start."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders installed as tangram_sglang subpackages (pyproject's package-dir).
MAPPED = {"patches": "tangram_sglang.patches", "kernels": "tangram_sglang.kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "tangram_sglang").rglob("*.py")):
        if "shims" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for folder, package in MAPPED.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _import_nodes(node: ast.AST):
    """Import statements that run when the module is imported (not inside functions,
    not under `if TYPE_CHECKING`)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes(child)


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports when it is imported."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    targets = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parent, base]).strip(".")
        targets.add(base)
        targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def test_no_import_cycles():
    modules = _modules()
    assert "tangram_sglang.memory.reservation" in modules  # the walk sees the subpackages
    graph = {
        name: _module_level_imports(name, path, set(modules)) for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_calibrate_is_a_subcommand_of_the_package():
    out = subprocess.run(
        [sys.executable, "-m", "tangram_sglang", "calibrate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "python -m tangram_sglang calibrate" in out.stdout
    assert "--model-path" in out.stdout and "--method" in out.stdout
