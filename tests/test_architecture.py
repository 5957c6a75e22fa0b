"""The architecture document keeps up with the code.

docs/architecture.md is the truth about compatmp's design; these checks fail when a module or a
NOTE block is added without a line in it, when a module imports against the documented
direction, or when the repository points to design documents outside itself.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "compatmp"

# A NOTE name may wrap across lines, inside a comment or a docstring.
_NOTE = re.compile(r"NOTE \[ ([^\]]+?) \]")
_WRAP = re.compile(r"\s*\n\s*(?:#\s*)?")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _modules() -> list[str]:
    """Module names as the map lists them: ``_pool.py``, ``bench/`` for a subpackage."""
    names = []
    for path in sorted(PACKAGE.iterdir()):
        if path.suffix == ".py":
            names.append(path.name)
        elif path.is_dir() and (path / "__init__.py").exists():
            names.append(path.name + "/")
    return names


def _map_rows() -> dict[str, str]:
    """``module -> 'may import' cell`` from the module map table."""
    rows = {}
    section = _doc().split("## Module map", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[-1]
    return rows


def test_every_module_is_in_the_module_map() -> None:
    rows = _map_rows()
    missing = [m for m in _modules() if m not in rows]
    assert not missing, f"add these modules to the module map in {DOC}: {missing}"
    stale = [m for m in rows if m not in _modules()]
    assert not stale, f"the module map lists modules that no longer exist: {stale}"


def test_every_note_is_in_the_index() -> None:
    index = _doc().split("## NOTE index", 1)[1].replace("\\_", "_")
    notes = set()
    for path in PACKAGE.rglob("*.py"):
        text = _WRAP.sub(" ", path.read_text(encoding="utf-8"))
        for name in _NOTE.findall(text):
            if "..." not in name:  # a shortened reference, e.g. "How Keras 3 drives ..."
                notes.add(name)
    missing = sorted(n for n in notes if n not in index)
    assert not missing, f"add these NOTE blocks to the NOTE index in {DOC}: {missing}"


def _compatmp_imports(path: Path) -> set[str]:
    """Private compatmp modules ``path`` imports at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return {f"{m}.py" for m in found if m.startswith("_")}


@pytest.mark.parametrize(
    "module",
    [m for m in _modules() if m.startswith("_") and m != "__init__.py" and m != "__main__.py"],
)
def test_imports_follow_the_module_map(module: str) -> None:
    allowed = _map_rows()[module]
    if "everything" in allowed or "public API" in allowed:
        return
    imported = _compatmp_imports(PACKAGE / module)
    undocumented = sorted(m for m in imported if f"`{m[:-3]}`" not in allowed)
    assert not undocumented, (
        f"{module} imports {undocumented}, which its 'may import' cell in {DOC} does not list "
        f"({allowed!r}); fix the import direction or the document"
    )


def _module_name(path: Path) -> str:
    """``compatmp/_core.py`` -> ``_core``; ``compatmp/bench/cli.py`` -> ``bench.cli``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """compatmp module -> the compatmp modules it imports: at module level, inside functions,
    under ``if TYPE_CHECKING``, relative (``from . import _shm``, ``from .report import x``,
    ``from .. import y``) or absolute (``import compatmp._core``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        if name == "__init__":
            package = []
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                else:
                    if not (node.module or "").startswith("compatmp"):
                        continue
                    base = []
                module = (node.module or "").removeprefix("compatmp").lstrip(".")
                if node.level == 0 and module == "":
                    module = ""
                stem = [*base, *([module] if module else [])]
                for alias in node.names:
                    as_module = ".".join([*stem, alias.name])
                    targets.append(as_module if as_module in modules else ".".join(stem))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "compatmp" or alias.name.startswith("compatmp."):
                        targets.append(alias.name.removeprefix("compatmp").lstrip("."))
        for target in targets:
            target = target or "__init__"
            if target != name and target in modules:
                graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_compatmp_modules() -> None:
    """Imports point one way, counting those inside functions (issue 16).

    The package ``__init__`` is left out as a target: it re-exports the public API, so a
    module reaching the public surface (``from .. import available_methods`` in the
    benchmark) would otherwise close a loop through every module the surface names.
    """
    graph = _import_graph()
    graph = {m: {t for t in ts if t != "__init__"} for m, ts in graph.items()}
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle among compatmp modules: {' -> '.join(cycle or [])}"


def test_the_cycle_check_sees_function_level_and_relative_imports() -> None:
    graph = _import_graph()
    assert "_serialize" in graph["_pool"]  # module level
    assert "_serialize" in graph["_worker"]  # only inside functions there
    assert "bench.report" in graph["bench.cli"]  # relative, inside a subpackage
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_readme_links_the_architecture_document() -> None:
    assert "docs/architecture.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_nothing_points_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if (
            path.suffix not in {".py", ".md", ".sh", ".yml", ".cfg", ".toml", ""}
            or not path.is_file()
        ):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if "../shared" in text or re.search(r"(?<![\w/])DESIGN\.md", text):
            offenders.append(name)
    offenders = [o for o in offenders if o != "tests/test_architecture.py"]
    assert not offenders, f"these files refer to documents outside the repository: {offenders}"
