"""The code's shape, checked: no import circle in qmpfd/ (counting imports under TYPE_CHECKING),
functions under ~50 lines and modules under ~300 in the whole package.

The checks parse the source with :mod:`ast` in a fresh interpreter: in a long-lived test process
CPython 3.11's AST constructor can fail with "recursion depth mismatch" (gh-106905: an
``ast.parse`` nested in another, e.g. a finalizer formatting a traceback during a parse).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "qmpfd"


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("qmpfd"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    graph[m].add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
    return graph


def run_isolated(check: str) -> None:
    out = subprocess.run([sys.executable, __file__, check], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_import_circle() -> None:
    run_isolated("check_no_import_circle")


def test_functions_and_modules_stay_small() -> None:
    run_isolated("check_small_functions")


def check_no_import_circle() -> None:
    graph = imports()
    state: dict[str, int] = {}        # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if t == m or t not in graph:
                continue
            assert state.get(t) != 1, " -> ".join([*path[path.index(t):], t])
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m)


def check_small_functions() -> None:
    """Every function of the package under ~50 lines and every module under ~300."""
    long = []
    for p in ROOT.rglob("*.py"):
        text = p.read_text()
        if len(text.splitlines()) > 300:
            long.append(f"{p.relative_to(ROOT)} {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 50:
                    long.append(f"{p.relative_to(ROOT)}:{node.name} {n} lines")
    assert not long, long


if __name__ == "__main__":
    {"check_no_import_circle": check_no_import_circle,
     "check_small_functions": check_small_functions}[sys.argv[1]]()
