"""One import direction through ``headreg``, no import cycles, and no module over 400 lines.

The layers, from the bottom (:data:`LAYERS`; a package name covers its submodules, the bare
``headreg`` stands for ``headreg/__init__.py`` alone):

========  ===========================================================================================
base      ``errors``, ``_version``, ``_atomic`` (atomic file writes), ``_checks`` (input validators),
          ``_runtime`` (this process's place in a job, which data needs to shard), ``_schema`` (what a
          file read from disk must hold), ``hookspecs`` (the plugin contract; pluggy markers only)
heads     ``heads/``: the loss heads, and ``heads._builtin``, which implements the hook
plugins   ``plugins``: the plugin manager; it loads ``heads._builtin`` and the entry points
registry  ``registry``: name → head class, filled from the plugin manager on first use
models    ``models/``: backbone, neck, head; checkpoints
data      ``data/``, ``metrics/``, ``plotting``: datasets and loaders; metrics; drawings of embeddings
engine    ``engine/``: extraction, evaluation, training, the run directory, the torchrun helpers
compare   ``compare``: one run per head, drawn and tabulated
cli       ``cli/``, ``__main__``
facade    ``headreg`` (``__init__``): the public API, re-exported lazily
========  ===========================================================================================

The rules:

1. A module imports only modules of its own layer or of the layers below it. The facade is on top:
   nothing inside the package imports it (``__version__`` lives in ``headreg._version``), so internal
   code never depends on what the facade happens to re-export.
2. No cycle, between layers or inside one: same-layer imports are allowed, but the module graph
   must stay acyclic, so every module can be read, and tested, after the ones it uses.

What counts as an import: every ``import`` and ``from ... import`` in the file, at module level, inside
functions and under ``if TYPE_CHECKING:`` alike, since a deferred import hides a cycle from the
interpreter but not from the reader. Relative imports are resolved; ``from pkg import name`` imports the
module ``pkg.name`` when there is one, else ``pkg`` itself (its ``__init__``). Not counted: the implicit
import of a module's parent packages (Python runs ``headreg/data/__init__.py`` before
``headreg/data/loader.py``; counting it would make a cycle of every package whose ``__init__``
re-exports), and imports by string (``importlib.import_module`` in the facade's ``_LAZY`` and the
CLI's ``COMMANDS``), which both sit at the top and so can only point down.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "headreg"
MAX_LINES = 400

#: (layer, the modules and packages in it), from the bottom.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "headreg.errors",
            "headreg._version",
            "headreg._atomic",
            "headreg._checks",
            "headreg._runtime",
            "headreg._schema",
            "headreg._schema_backbone",
            "headreg.hookspecs",
        ),
    ),
    ("heads", ("headreg.heads",)),
    ("plugins", ("headreg.plugins",)),
    ("registry", ("headreg.registry",)),
    ("models", ("headreg.models",)),
    ("data", ("headreg.data", "headreg.metrics", "headreg.plotting")),
    ("engine", ("headreg.engine",)),
    ("compare", ("headreg.compare",)),
    ("cli", ("headreg.cli", "headreg.__main__")),
    ("facade", ("headreg",)),
)

#: ``{path: why}`` of modules over MAX_LINES whose split is under way: each is an expected failure, and a
#: strict one, so the entry must go as soon as the module fits. Empty is the goal.
OVER_LIMIT_PENDING: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``module`` (in ``path``, at ``line``) imports ``target``."""

    module: str
    path: str
    line: int
    target: str


def package_sources(root: Path = PACKAGE) -> dict[str, tuple[str, str]]:
    """``{module name: (path relative to the repository, source)}`` for every ``.py`` file under ``root``."""
    out = {}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (str(file.relative_to(root.parent)), file.read_text())
    return out


def _is_package(path: str) -> bool:
    return path.endswith("__init__.py")


def imports_of(module: str, path: str, source: str, known: set[str]) -> list[Import]:
    """The edges from ``module`` to other modules of the package, wherever in the file the import sits."""
    edges = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # A package's own __init__ is the anchor of its level-1 imports; a plain module's parent is.
                base = module.split(".") if _is_package(path) else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join([*base, node.module] if node.module else base)
            else:
                parent = node.module or ""
            # "from pkg import sub" imports the module pkg.sub; "from pkg import name" runs pkg's __init__.
            targets = [f"{parent}.{a.name}" if f"{parent}.{a.name}" in known else parent for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target in known and target != module:
                edges.append(Import(module, path, node.lineno, target))
    return edges


def import_graph(sources: dict[str, tuple[str, str]]) -> list[Import]:
    known = set(sources)
    edges = [edge for name, (path, src) in sources.items() for edge in imports_of(name, path, src, known)]
    return sorted(edges, key=lambda e: (e.path, e.line, e.target))


def layer_of(module: str) -> int | None:
    """Index into :data:`LAYERS` of ``module`` (its longest listed prefix), or None when it is not listed."""
    best: tuple[int, int] | None = None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            covers = module == member or (member != "headreg" and module.startswith(member + "."))
            if covers and (best is None or len(member) > best[1]):
                best = (index, len(member))
    return None if best is None else best[0]


def unlisted_modules(sources: dict[str, tuple[str, str]]) -> list[str]:
    return [
        f"{path}: module {name} belongs to no layer" for name, (path, _) in sources.items() if layer_of(name) is None
    ]


def upward_imports(edges: list[Import]) -> list[str]:
    """One message per import of a module from a higher layer."""
    out = []
    for e in edges:
        src, dst = layer_of(e.module), layer_of(e.target)
        if src is not None and dst is not None and dst > src:
            out.append(
                f"{e.path}:{e.line}: {e.module} (layer '{LAYERS[src][0]}') imports {e.target} (layer "
                f"'{LAYERS[dst][0]}'): a module may import only its own layer or those below it"
            )
    return out


def import_cycles(edges: list[Import]) -> list[str]:
    """One message per cycle of the module graph (per strongly connected component), naming each edge's line."""
    graph: dict[str, list[Import]] = {}
    for e in edges:
        graph.setdefault(e.module, []).append(e)
        graph.setdefault(e.target, [])
    # Tarjan's strongly connected components, iteratively (no recursion limit on deep graphs).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(graph[node]):
                work.append((node, i + 1))
                nxt = graph[node][i].target
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return [_describe_cycle(graph, set(c)) for c in components]


def _describe_cycle(graph: dict[str, list[Import]], members: set[str]) -> str:
    """Walk one cycle through ``members`` from its first module and name each import on the way."""
    start = min(members)
    seen: dict[str, int] = {}
    path: list[Import] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        edge = next(e for e in graph[node] if e.target in members)
        path.append(edge)
        node = edge.target
    steps = " -> ".join(f"{e.path}:{e.line} imports {e.target}" for e in path[seen[node] :])
    return f"import cycle among {', '.join(sorted(members))}: {steps}; break it by moving the shared code down"


def line_counts(root: Path = PACKAGE) -> dict[str, int]:
    return {path: src.count("\n") for path, src in (v for v in package_sources(root).values())}


# --------------------------------------------------------------------------------------------- the package
def test_every_module_has_a_layer() -> None:
    assert unlisted_modules(package_sources()) == [], "add the module to LAYERS in tests/test_imports.py"


def test_no_module_imports_a_higher_layer() -> None:
    problems = upward_imports(import_graph(package_sources()))
    assert not problems, "\n".join(problems)


def test_no_import_cycle() -> None:
    problems = import_cycles(import_graph(package_sources()))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=OVER_LIMIT_PENDING[p]))
        if p in OVER_LIMIT_PENDING
        else p
        for p in sorted(line_counts())
    ],
)
def test_module_fits_in_400_lines(path: str) -> None:
    lines = line_counts()[path]
    assert lines <= MAX_LINES, f"{path} has {lines} lines, over {MAX_LINES}: split it by concern"


# ------------------------------------------------------------------------------------- the checker itself
def _with(module: str, extra: str) -> dict[str, tuple[str, str]]:
    """The real package's sources, with ``extra`` appended to ``module``'s file."""
    sources = dict(package_sources())
    path, src = sources[module]
    sources[module] = (path, src + extra)
    return sources


def _new_problems(module: str, extra: str) -> tuple[list[str], list[str], str]:
    """Upward imports and cycles that appending ``extra`` to ``module`` adds; and the last line's number."""
    before = import_graph(package_sources())
    sources = _with(module, extra)
    after = import_graph(sources)
    new_upward = [p for p in upward_imports(after) if p not in upward_imports(before)]
    new_cycles = [c for c in import_cycles(after) if c not in import_cycles(before)]
    return new_upward, new_cycles, sources[module][1].count("\n")


def test_checker_reports_an_upward_import_inside_a_function() -> None:
    upward, _, line = _new_problems("headreg.engine.train", "\n\ndef _late():\n    from headreg.cli import main\n")
    assert upward == [
        f"headreg/engine/train.py:{line}: headreg.engine.train (layer 'engine') imports headreg.cli "
        "(layer 'cli'): a module may import only its own layer or those below it"
    ]


def test_checker_resolves_relative_imports_and_submodules() -> None:
    upward, _, line = _new_problems(
        "headreg.metrics._kernels", "\nfrom ..engine import runtime\nfrom .. import __version__\n"
    )
    assert len(upward) == 2
    assert upward[0].startswith(f"headreg/metrics/_kernels.py:{line - 1}: ")
    assert "imports headreg.engine.runtime (layer 'engine')" in upward[0]
    assert upward[1].startswith(f"headreg/metrics/_kernels.py:{line}: ")
    assert "imports headreg (layer 'facade')" in upward[1]


def test_checker_reports_a_cycle_inside_one_layer() -> None:
    # _runner imports _loop (itself and through _epochlog, _setup): _loop importing _runner, even late, is a cycle.
    upward, cycles, line = _new_problems("headreg.engine._loop", "\n\ndef _late():\n    from . import _runner\n")
    assert upward == []
    (problem,) = cycles
    members = problem.split(": ", 1)[0]
    assert "headreg.engine._loop" in members and "headreg.engine._runner" in members
    assert f"headreg/engine/_loop.py:{line} imports headreg.engine._runner" in problem


def test_checker_on_a_synthetic_graph() -> None:
    def src(*lines: str) -> str:
        return "\n".join(lines) + "\n"

    sources = {
        "headreg": ("headreg/__init__.py", src("from .registry import x")),
        "headreg.errors": ("headreg/errors.py", src("from headreg import __version__")),
        "headreg.registry": ("headreg/registry.py", src("from .plugins import y")),
        "headreg.plugins": ("headreg/plugins.py", src("def f():", "    from . import registry")),
        "headreg.widgets": ("headreg/widgets.py", ""),
    }
    edges = import_graph(sources)
    assert unlisted_modules(sources) == ["headreg/widgets.py: module headreg.widgets belongs to no layer"]
    assert [p.split(": ", 1)[0] for p in upward_imports(edges)] == ["headreg/errors.py:1", "headreg/plugins.py:2"]
    assert import_cycles(edges) == [
        "import cycle among headreg.plugins, headreg.registry: headreg/plugins.py:2 imports headreg.registry -> "
        "headreg/registry.py:1 imports headreg.plugins; break it by moving the shared code down"
    ]
