"""Print the requirements of the project's base install plus some extras, one a line, from pyproject.toml.

The image installs these before it copies the source tree, so that editing code rebuilds only the small
layer holding the project's own wheel, while the dependency layer stays cached until pyproject.toml changes.
Self-references such as ``stageformer[torch]`` are expanded. Needs Python 3.11+ (tomllib).

    python requirements.py pyproject.toml serve    ->  numpy>=1.26, pillow>=10.0, ..., onnxruntime>=1.18
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

_SELF = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*\[([^\]]+)\]\s*$")


def _normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The base dependencies and those of ``extras``, in order, without duplicates."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    name = _normalize(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    result: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()

    def add(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}; choose from {', '.join(sorted(optional))}")
        seen.add(extra)
        for requirement in optional[extra]:
            match = _SELF.match(requirement)
            if match and _normalize(match.group(1)) == name:
                for inner in match.group(2).split(","):
                    add(inner.strip())
            elif requirement not in result:
                result.append(requirement)

    for extra in extras:
        add(extra)
    return result


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: requirements.py PYPROJECT.toml EXTRA [EXTRA ...]", file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(argv[0]), argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
