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
