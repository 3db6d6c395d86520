"""The shape of the jobspool package: its import graph, read from the source with ``ast``.

Every module under ``jobspool/`` is parsed, and every import of a module is
recorded with where it stands:

- ``module``: at the top of the file (or in a class body), run on import;
- ``function``: inside a function, run when the function is called (the
  lazy imports that keep ``jobspool status`` light);
- ``type``: under ``if TYPE_CHECKING:``, never run, read by mypy.

All three count for cycles. An import inside a function is a dependency
like any other: the module cannot be read, moved or tested without the one
it imports, and a cycle through it is a cycle that only waits for the call.
An import under ``TYPE_CHECKING`` is a dependency of the module's types:
mypy follows it, a reader follows it, and one module's signatures then
cannot be understood without the other's. "No import cycle at any level"
means these too; a type that would need one belongs in the module both
import.

Importing ``jobspool.x`` also runs ``jobspool/__init__.py``; that implicit
step is not an edge (the package's ``__init__`` is kept tiny for it), but an
explicit ``from jobspool import __version__`` is an edge to ``jobspool``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jobspool

PACKAGE = Path(jobspool.__file__).parent

# What the core (outside jobspool/cli and jobspool/http) never imports: the
# command line and the web stack. jobspool/__main__.py is the command's own
# entry point (`python -m jobspool`), part of the command line.
FRONTS = ("jobspool.cli", "jobspool.http")
ENTRY_POINTS = {"jobspool.__main__"}
WEB_STACK = {"click", "starlette", "uvicorn", "anyio", "h11", "bcrypt"}

# The read commands and what they must not load: the same commands and the
# same names tests/test_cli_read.py checks in sys.modules of a real run.
READ_COMMANDS = ("status", "queue", "log")
NOT_ON_THE_READ_PATH = {"lxml", "yaml", "jobspool.check"}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from the module that has it."""

    source: str  # the importing module, e.g. "jobspool.cli.http"
    target: str  # a module of the package ("jobspool.cli") or a top-level name ("click")
    kind: str  # "module", "function" or "type"
    line: int
    function: str | None  # the enclosing top-level function or class, if any

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.kind}, line {self.line})"


class Graph:
    """The imports of every module of a package directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules = {_module_name(root, path): path for path in sorted(root.rglob("*.py"))}
        self.imports = [imp for name in self.modules for imp in self._imports_of(name)]

    def _imports_of(self, name: str) -> Iterator[Import]:
        tree = ast.parse(self.modules[name].read_text(), str(self.modules[name]))
        package = name if self.modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for node, kind, function in _walk(tree.body, "module", None):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(name, self._resolve(alias.name), kind, node.lineno, function)
            else:
                base = node.module or ""
                if node.level:  # relative: from the package of this module, upwards
                    parts = package.split(".")
                    up = parts[: len(parts) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    member = f"{base}.{alias.name}"
                    target = member if member in self.modules else self._resolve(base)
                    yield Import(name, target, kind, node.lineno, function)

    def _resolve(self, dotted: str) -> str:
        """The package's own module a dotted name is in, or the name's top level."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.modules:
                return ".".join(parts[:n])
        return parts[0]

    def edges(self, kinds: set[str]) -> dict[str, list[Import]]:
        """Module -> its imports of the package's own modules, of the given kinds."""
        out: dict[str, list[Import]] = {name: [] for name in self.modules}
        for imp in self.imports:
            if imp.kind in kinds and imp.target in self.modules and imp.target != imp.source:
                out[imp.source].append(imp)
        return out

    def cycles(self) -> list[list[Import]]:
        """Each group of modules that import each other (at any level), as the imports
        that tie it together; empty when the graph has no cycle."""
        edges = self.edges({"module", "function", "type"})
        groups = _strongly_connected({m: [i.target for i in out] for m, out in edges.items()})
        return [
            list(dict.fromkeys(i for m in sorted(group) for i in edges[m] if i.target in group))
            for group in groups
            if len(group) > 1
        ]

    def eager_closure(self, roots: set[str]) -> set[str]:
        """What importing ``roots`` loads: module-level imports, followed through the
        package (parent packages included), plus the top-level names of the rest."""
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name not in self.modules:
                continue
            parts = name.split(".")
            todo += [".".join(parts[:n]) for n in range(1, len(parts))]  # its packages run first
            todo += [i.target for i in self.imports if i.source == name and i.kind == "module"]
        return seen


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(
    body: list[ast.stmt], kind: str, function: str | None
) -> Iterator[tuple[ast.Import | ast.ImportFrom, str, str | None]]:
    """Every import statement under ``body``, with its kind and enclosing definition."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, kind, function
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = "type" if kind == "type" else "function"
            yield from _walk(node.body, inner, function or node.name)
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, kind, function or node.name)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _walk(node.body, "type", function)
            yield from _walk(node.orelse, kind, function)
        else:  # if/try/with/for/while/match blocks: the same level as where they stand
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _walk([child], kind, function)
                elif isinstance(child, ast.ExceptHandler | ast.match_case):
                    yield from _walk(child.body, kind, function)


def _strongly_connected(graph: dict[str, list[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _shown(cycles: list[list[Import]]) -> str:
    return "\n\n".join("\n".join(f"  {i}" for i in cycle) for cycle in cycles)


# --- the analysis itself ----------------------------------------------------------------------


def test_imports_inside_functions_and_for_type_checking_make_cycles_too(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.low import helper\n")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n"
    )
    (pkg / "sub" / "low.py").write_text(
        "import click\ntry:\n    from .. import c\nexcept ImportError:\n    pass\n"
    )
    (pkg / "c.py").write_text("class C:\n    def m(self):\n        import pkg.sub\n")
    graph = Graph(pkg)

    cycles = {frozenset((i.source, i.target, i.kind) for i in cycle) for cycle in graph.cycles()}
    assert cycles == {
        frozenset({("pkg.a", "pkg.b", "function"), ("pkg.b", "pkg.a", "type")}),
        frozenset(
            {
                ("pkg.sub", "pkg.sub.low", "module"),
                ("pkg.sub.low", "pkg.c", "module"),
                ("pkg.c", "pkg.sub", "function"),
            }
        ),
    }
    assert graph.eager_closure({"pkg.sub.low"}) == {"pkg", "pkg.sub", "pkg.sub.low", "pkg.c"} | {
        "click"
    }


# --- the package ------------------------------------------------------------------------------


def test_the_package_has_no_import_cycle_at_any_level() -> None:
    cycles = Graph(PACKAGE).cycles()
    assert cycles == [], f"import cycles:\n{_shown(cycles)}"


def test_the_core_never_imports_the_command_line_or_the_web_stack() -> None:
    graph = Graph(PACKAGE)
    core = {
        name for name in graph.modules if not name.startswith(FRONTS) and name not in ENTRY_POINTS
    }
    assert {"jobspool", "jobspool.spool", "jobspool.daemon"} <= core
    wrong = [
        str(i)
        for i in graph.imports
        if i.source in core and (i.target in WEB_STACK or i.target.startswith(FRONTS))
    ]
    assert wrong == []


def test_the_read_commands_load_no_xml_machinery() -> None:
    graph = Graph(PACKAGE)
    cli = [i for i in graph.imports if i.source == "jobspool.cli"]
    found = {i.function for i in cli}
    assert set(READ_COMMANDS) <= found, f"the read commands are not in jobspool/cli: {found}"
    # What `jobspool status|queue|log` import: the command line itself, what
    # each of the three imports when it runs, and the configuration, which
    # every command loads (lazily, through the group's state).
    roots = {"jobspool.cli", "jobspool.config"}
    roots |= {i.target for i in cli if i.function in READ_COMMANDS}
    loaded = graph.eager_closure(roots)
    assert {"jobspool.spool", "click"} <= loaded
    assert sorted(loaded & NOT_ON_THE_READ_PATH) == []
    # And none of their modules imports lxml, even in a function.
    direct = [
        str(i)
        for i in graph.imports
        if i.source in loaded and i.source != "jobspool.cli" and i.target == "lxml"
    ]
    assert direct == []
