"""The shape of the code: no import cycles, and every import inside a function says why it is there.

Both read the source, function-level imports included (grimp parses every import statement),
so a cycle hidden behind a lazy import fails here as surely as one at the top of a file.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qlora_engine", "app")


def _cycles(adjacency: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in adjacency:
        if root in index:
            continue
        work = [(root, iter(adjacency[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(adjacency[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": [], "c": ["a"]}) == []


def test_no_import_cycles_in_the_engine_or_the_app():
    graph = grimp.build_graph(*PACKAGES)
    adjacency = {
        m: sorted(n for n in graph.find_modules_directly_imported_by(m) if n in graph.modules)
        for m in sorted(graph.modules)
    }
    assert _cycles(adjacency) == []


# Tool pragmas are comments, but they say nothing about why the import waits.
_PRAGMAS = ("# noqa", "# type:", "# pragma", "# pyright:")


def _comment_lines(source: str) -> set[int]:
    """Line numbers that carry a comment (a real one: ``#`` inside a string does not count)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT and not t.string.lower().startswith(_PRAGMAS)}


def undocumented_imports(source: str) -> list[int]:
    """Line numbers of imports inside a function with no comment on their (last) line or the line above."""
    comments = _comment_lines(source)
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                last = node.end_lineno or node.lineno
                if not ({node.lineno - 1, node.lineno, last} & comments):
                    found.append(node.lineno)
    return sorted(set(found))


def test_the_import_check_finds_an_import_without_a_reason():
    snippet = (
        "import os\n"
        "def f():\n"
        "    import json\n"  # line 3: no reason
        "    # lazy: a reason above\n"
        "    import csv\n"
        "    import re  # lazy: a reason beside\n"
        "    from a import (\n"
        "        b,\n"
        "    )  # lazy: a reason on the last line\n"
        "    x = 1\n"
        "    import zlib  # noqa: F401\n"  # line 11: a pragma is no reason
        "    s = '# not a comment'\n"
        "    import gzip\n"  # line 13: the '#' above is inside a string
        "    class C:\n"
        "        def g(self):\n"
        "            import bz2\n"  # line 16: nested, no reason
    )
    assert undocumented_imports(snippet) == [3, 11, 13, 16]


def test_every_import_inside_a_function_says_why():
    files = _package_files()
    missing = [
        f"{name}:{line}" for name in files for line in undocumented_imports((ROOT / name).read_text(encoding="utf-8"))
    ]
    assert missing == [], "say why each import waits (a comment on its line or the line above): " + ", ".join(missing)


def _package_files() -> list[str]:
    """Every .py file under the engine and the app, relative to the repository root."""
    return sorted(p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_walk_covers_both_packages():
    files = _package_files()
    assert {"qlora_engine/cli.py", "app/main_window.py", "qlora_engine/export/__init__.py"} <= set(files)


def _module_path(module: str) -> Path | None:
    """The file of one of our modules (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``), or None."""
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(path: Path) -> set[str] | None:
    """What a module defines at its top level (also under top-level ``if``/``try``); None when it
    has a module ``__getattr__`` (its names are not all written down)."""
    names: set[str] = set()
    pending = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            pending += [n for h in getattr(node, "handlers", []) for n in h.body]
    return None if "__getattr__" in names else names


def unresolved_late_imports(source: str) -> list[str]:
    """Imports inside functions that name one of our modules or a name it does not have: a lazy
    import breaks only when its function runs, so nothing at start-up notices a moved function."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                wanted = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                wanted = [(node.module, a.name) for a in node.names]
            else:
                continue
            for module, name in wanted:
                if module.split(".")[0] not in PACKAGES:
                    continue
                path = _module_path(module)
                if path is None:
                    found.append(f"{node.lineno}: no module {module}")
                    continue
                names = _top_level_names(path)
                if name is None or names is None or name in names or _module_path(f"{module}.{name}"):
                    continue
                found.append(f"{node.lineno}: {module} has no {name}")
    return found


def test_the_late_import_check_finds_a_moved_function():
    snippet = (
        "def f():\n"
        "    from qlora_engine.runner import run  # fine\n"
        "    from qlora_engine.train import run  # line 3: run moved to runner\n"
        "    from qlora_engine import export  # a subpackage\n"
        "    import qlora_engine.no_such_module  # line 5\n"
        "    from json import nothing_checked  # not ours\n"
    )
    assert unresolved_late_imports(snippet) == [
        "3: qlora_engine.train has no run",
        "5: no module qlora_engine.no_such_module",
    ]


def test_every_import_inside_a_function_resolves():
    broken = [
        f"{name}:{problem}"
        for name in _package_files()
        for problem in unresolved_late_imports((ROOT / name).read_text(encoding="utf-8"))
    ]
    assert broken == [], "imports that fail when their function first runs: " + ", ".join(broken)
