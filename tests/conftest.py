"""Session-wide test setup: seeded torch, and a watch that no test reads a file beside the repository.

A fresh clone has nothing beside it, so a test that reads a sibling folder (``../shared``, another checkout)
passes here and fails for every user. Every ``open`` of the test process goes through an audit hook; a file
under the repository's parent folder but outside the repository (hidden folders such as ``~/.cache`` aside)
is recorded, unless it belongs to the environment (the interpreter, a folder on ``sys.path``, the temporary
folder), and the run fails at its end, listing them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_ROOT_PREFIX = str(ROOT) + os.sep
_BESIDE_PREFIX = str(ROOT.parent).rstrip(os.sep) + os.sep
_outside: list[str] = []


def _watch(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or not args or not isinstance(args[0], str | bytes | os.PathLike):
        return
    try:
        path = os.path.abspath(os.fsdecode(args[0]))
    except (TypeError, ValueError):
        return
    beside = path.startswith(_BESIDE_PREFIX) and not path.startswith(_ROOT_PREFIX) and path != str(ROOT)
    if beside and not path[len(_BESIDE_PREFIX) :].startswith(".") and not _environment(path) and path not in _outside:
        _outside.append(path)


def _environment(path: str) -> bool:
    """Whether ``path`` belongs to the Python environment or the temporary folder, wherever they are."""
    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, tempfile.gettempdir(), *sys.path}
    return any(
        place and place != str(ROOT.parent) and path.startswith(place.rstrip(os.sep) + os.sep) for place in places
    )


if ROOT.parent != ROOT.parent.parent:  # a clone at the file system's root has no "beside"
    sys.addaudithook(_watch)


def outside_reads() -> list[str]:
    """Files beside the repository that this test process has opened so far."""
    return list(_outside)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _outside:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _outside:
        terminalreporter.section("files read from outside the repository", red=True)
        for path in _outside:
            terminalreporter.line(f"{path}: a fresh clone has no such file; copy what the test needs into tests/")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
