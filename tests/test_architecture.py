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
