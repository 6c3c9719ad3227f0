"""The import graph follows the project's layers: each package imports only those below it.

    stageformer (the CLI)            bench
        service        export
           |             model
        stageformer.core (the ground floor: torch-free, web-framework-free)

Every import statement counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROJECT = ("model", "export", "service", "stageformer", "bench")
# For each layer: the project packages it may import, and third-party packages it must not.
ALLOWED = {
    # ONNX and ONNX Runtime only inside stageformer.core.cuda's probe, imported when it is asked
    "stageformer.core": ((), ("torch", "fastapi", "starlette", "uvicorn", "pydantic")),
    "model": (("stageformer.core",), ("fastapi", "starlette", "uvicorn", "onnxruntime")),
    "export": (("stageformer.core", "model"), ("fastapi", "starlette", "uvicorn")),
    "service": (("stageformer.core",), ("torch", "onnx", "onnxscript")),
}


def layer_of(file: Path) -> str | None:
    parts = file.relative_to(ROOT).parts
    if parts[:2] == ("stageformer", "core"):
        return "stageformer.core"
    return parts[0] if parts[0] in ALLOWED else None


def module_of(file: Path) -> list[str]:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported(file: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``file`` (or in ``text`` as if it were there),
    relative ones resolved."""
    text = file.read_text() if text is None else text
    found = []
    package = module_of(file)[:-1] if file.name != "__init__.py" else module_of(file)
    for node in ast.walk(ast.parse(text, str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if name == "stageformer"]
    return found


def violations(file: Path, text: str | None = None) -> list[str]:
    layer = layer_of(file)
    if layer is None:
        return []
    allowed, banned = ALLOWED[layer]
    problems = []
    for line, name in imported(file, text):
        top = name.split(".")[0]
        own = name == layer or name.startswith(layer + ".")
        if top in PROJECT and not own and not any(name == a or name.startswith(a + ".") for a in allowed):
            if name in ("stageformer", "stageformer.__version__"):
                problems.append(f"line {line}: imports {name}; the version is stageformer.core.__version__")
            else:
                problems.append(f"line {line}: {layer} imports {name}, a layer above or beside it")
        if top in banned:
            problems.append(f"line {line}: {layer} imports {top}, which this layer must not need")
    return problems


FILES = sorted(f for package in ("model", "export", "service", "stageformer") for f in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("file", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(file: Path) -> None:
    assert violations(file) == []


def test_every_layer_is_checked() -> None:
    layers = {layer_of(f) for f in FILES}
    assert layers >= set(ALLOWED)


@pytest.mark.parametrize(
    ("where", "text", "found"),
    [
        ("model/data.py", "from service.images import prepare", True),  # the import this check was made for
        ("export/onnx.py", "def f():\n    import service", True),
        ("service/runtime.py", "import torch", True),
        ("service/routes/v1.py", "from ...model import create_model", True),
        ("stageformer/core/naming.py", "from stageformer import __version__", True),
        ("stageformer/core/naming.py", "from model import ModelConfig", True),
        ("service/routes/v1.py", "from ..batcher import Batcher", False),
        ("export/onnx.py", "from model import load_checkpoint", False),
        ("model/data.py", "from stageformer.core.preprocess import preprocess", False),
        ("stageformer/cli.py", "import service.cli", False),
    ],
)
def test_the_check_tells_down_from_up(where: str, text: str, found: bool) -> None:
    assert bool(violations(ROOT / where, text)) is found
