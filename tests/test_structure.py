"""The package's shape: no import cycles among simulator modules, every error class in
errors.py (issue 9, "Structure")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "simulator"

# Exception classes that live beside the code raising them, with the reason. Anything new
# goes into errors.py.
ALLOWED_ELSEWHERE = {
    # the user pressed Esc in a menu: control flow of the questionnaire, not an error
    ("interactive.questions", "Cancelled"),
    # the scripted model's simulated process death (a BaseException on purpose; llm/ is
    # another engineer's package)
    ("llm.scripted", "InjectedCrash"),
    # PyYAML's own error type, raised inside its loader and turned into ValidationError
    ("experiment", "_DuplicateKey"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """simulator modules imported anywhere in the file: top level, in functions, in
    TYPE_CHECKING blocks (a cycle there still couples the two modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from simulator import display` imports the module simulator.display
            targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = targets or [base]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_simulator_modules():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    assert "simulator.cli_results" in graph["simulator.cli"]  # the parser sees imports
    assert "simulator.interactive" in graph["simulator.cli"]  # function-level ones too
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_error_class_lives_in_errors_py():
    errors_module = ast.parse((PACKAGE / "errors.py").read_text(encoding="utf-8"))
    error_names = {n.name for n in errors_module.body if isinstance(n, ast.ClassDef)}
    elsewhere = set()
    for name, path in modules().items():
        if name == "simulator.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {
                b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
            }
            if any(b.endswith(("Error", "Exception")) or b in error_names for b in bases):
                elsewhere.add((name.removeprefix("simulator."), node.name))
    assert elsewhere <= ALLOWED_ELSEWHERE, elsewhere - ALLOWED_ELSEWHERE


def test_python_dash_m_simulator():
    done = subprocess.run(
        [sys.executable, "-m", "simulator", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("simulator "), done.stderr
