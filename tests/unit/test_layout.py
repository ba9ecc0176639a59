"""The code's shape, checked: no import circle in qmpfd/ (counting imports under TYPE_CHECKING),
and the VM and hotplug layers in small functions."""

import ast
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


def test_no_import_circle() -> None:
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


def test_vm_and_hotplug_functions_stay_small() -> None:
    long = []
    for layer in ("vm", "hotplug", "qemu"):
        for p in (ROOT / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    if n > 50:
                        long.append(f"{p.relative_to(ROOT)}:{node.name} {n} lines")
    assert not long, long
