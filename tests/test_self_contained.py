"""A clone of the repository alone passes its tests: no test, fixture, benchmark or CI file reaches outside it.

Two checks. Statically, every path these files build from their own location (``Path(__file__)`` followed by
``.parent``/``.parents[N]``) and every relative path literal climbing with ``..`` must land inside the
repository. At run time, ``tests/conftest.py`` watches every file the test session opens and fails the run
when one lies beside the repository (a sibling folder of the clone, such as a ``shared/`` checkout).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT, outside_reads

SCANNED = [*sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.py")), ROOT / ".ci" / "run"]


def _path_of_file_expression(node: ast.expr, file: Path) -> Path | None:
    """The path an expression like ``Path(__file__).resolve().parents[2].parent`` names; None for others."""
    steps: list[ast.expr] = []
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        steps.append(node)
        node = node.value if isinstance(node, ast.Attribute | ast.Subscript) else node.func
    root = steps[-1] if steps else None
    is_path_of_file = (
        isinstance(root, ast.Call)
        and isinstance(root.func, ast.Name)
        and root.func.id == "Path"
        and len(root.args) == 1
        and isinstance(root.args[0], ast.Name)
        and root.args[0].id == "__file__"
    )
    if not is_path_of_file:
        return None
    path = file.resolve()
    for step in reversed(steps[:-1]):
        if isinstance(step, ast.Attribute) and step.attr == "parent":
            path = path.parent
        elif isinstance(step, ast.Subscript) and isinstance(step.slice, ast.Constant):
            index = step.slice.value
            if not isinstance(index, int) or index >= len(path.parents):
                return Path("/")  # climbs above the file system root: outside by any measure
            path = path.parents[index]
        elif isinstance(step, ast.Call) or (isinstance(step, ast.Attribute) and step.attr in ("parents", "resolve")):
            continue
        else:
            return None
    return path


def escapes(file: Path, text: str | None = None) -> list[str]:
    """What in ``file`` (or in ``text``, judged as if it lay at ``file``) points outside the repository."""
    text = file.read_text() if text is None else text
    if file.suffix != ".py":
        return [line.strip() for line in text.splitlines() if "../" in line and not line.lstrip().startswith("#")]
    problems = []
    for node in ast.walk(ast.parse(text, str(file))):
        if isinstance(node, ast.Attribute | ast.Subscript):
            target = _path_of_file_expression(node, file)
            if target is not None and not target.is_relative_to(ROOT):
                problems.append(f"line {node.lineno}: {ast.unparse(node)} is {target}")
        climbs = isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("../")
        if climbs and not (file.parent / node.value).resolve().is_relative_to(ROOT):
            problems.append(f"line {node.lineno}: {node.value!r} leaves the repository from {file.parent}")
    return problems


@pytest.mark.parametrize("file", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_leaves_the_repository(file: Path) -> None:
    assert escapes(file) == []


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("F = Path(__file__).resolve().parents[3] / 'shared' / 'fixtures'", True),  # once broke fresh clones
        ("F = Path(__file__).parent.parent.parent.parent / 'shared'", True),
        ("F = '../../../shared/fixtures'", True),
        ("F = '../fixtures'", False),
        ("F = Path(__file__).resolve().parents[1] / 'fixtures'", False),
        ("F = Path(__file__).parent / 'data'", False),
    ],
)
def test_the_scan_tells_inside_from_outside(text: str, found: bool) -> None:
    assert bool(escapes(ROOT / "tests" / "model" / "example.py", text)) is found


def test_no_file_beside_the_repository_was_read_so_far() -> None:
    """The run-time watch (see tests/conftest.py) has seen nothing yet; it reports at the end of the run too."""
    assert outside_reads() == []
