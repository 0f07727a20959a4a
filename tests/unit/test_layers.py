"""The layout's rules, checked on the code: ckptdpo <- tasks <- flows <- commands, no circles, no Prefect below.

A scan of every module's imports (absolute and relative, at any depth in the module, so imports inside functions
count too), and an import of every library module in a fresh interpreter where Prefect cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"ckptdpo": 0, "tasks": 1, "flows": 2, "commands": 3}


def modules() -> dict[str, Path]:
    out = {}
    for top in LAYERS:
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def edges() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name in imports_of(m, path):
            target = max((t for t in mods if name == t or name.startswith(t + ".")), key=len, default=None)
            if target and target != m:
                graph[m].add(target)
    return graph


def test_no_import_goes_up_a_layer():
    graph = edges()
    upward = [(m, t) for m, ts in graph.items() for t in ts if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert upward == []


def test_no_import_circle():
    graph = edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_library_never_imports_prefect_anywhere_in_its_code():
    offenders = [m for m, p in modules().items() if m.startswith("ckptdpo") and any(
        n == "prefect" or n.startswith("prefect.") for n in imports_of(m, p))]  # fmt: skip
    assert offenders == []


def test_every_library_module_imports_with_prefect_unimportable():
    names = sorted(m for m in modules() if m.startswith("ckptdpo") and not m.endswith("__main__"))
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'prefect' or name.startswith('prefect.'):\n"
        "            raise ImportError('prefect is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules)\n"
        "print('ok', len(sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
