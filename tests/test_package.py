"""The package as a whole (sparse_coding/): no import cycle, neither inside the config package (at the top of a
module or in a function) nor between any modules at their top; the old module paths do not come back."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT


def _package_imports(path: Path) -> set[str]:
    """The sparse_coding modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_coding"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sparse_coding")}
    return found


def test_the_config_package_has_no_import_cycle():
    """No module of sparse_coding/config imports one that imports it back (at the top or in a function)."""
    folder = ROOT / "sparse_coding" / "config"
    names = {f"sparse_coding.config.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    edges = {n: {m for m in _package_imports(p) if m in names and m != n} for n, p in names.items()}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in edges[start])

    cycles = sorted(n for n in names if reaches(n, n))
    assert not cycles, {n: sorted(edges[n]) for n in cycles}
    for old in ("config.py", "run_checks.py", "overrides.py", "preflight.py", "trainer.py"):
        assert not (ROOT / "sparse_coding" / old).exists(), f"sparse_coding/{old} is back"


def _top_level_imports(path: Path, modules: set) -> set:
    """The sparse_coding modules (of `modules`) a file imports when it is imported: at its top, not in a function."""
    found = set()
    nodes = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:`, `try: import x`: still the module's top
            nodes += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [n for h in getattr(node, "handlers", []) for n in h.body]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_coding"):
            found |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if m in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


def test_the_package_has_no_import_cycle_at_module_top_level():
    """Importing any module of sparse_coding never comes back to it (imports inside functions left aside)."""
    package = ROOT / "sparse_coding"
    names = {".".join(("sparse_coding", *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    edges = {n: _top_level_imports(p, set(names)) - {n} for n, p in names.items()}
    done: set = set()

    def visit(n, stack):
        if n in stack:
            return stack[stack.index(n):] + [n]
        if n in done:
            return None
        for m in sorted(edges[n]):
            cycle = visit(m, stack + [n])
            if cycle:
                return cycle
        done.add(n)
        return None

    cycles = [c for c in (visit(n, []) for n in sorted(names)) if c]
    assert not cycles, " -> ".join(cycles[0])
    for old in ("cache.py", "cache_store.py", "cache_build.py", "streaming.py", "datamodule.py", "synthetic.py",
                "preprocess.py", "rundir.py", "checkpoints.py"):
        assert not (package / old).exists(), f"sparse_coding/{old} is back"
