"""The one rule for model names, shared by export (file and Triton directory names) and the server (URL
path segments): letters, digits, ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``, at most 128
characters."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def is_model_name(name: str) -> bool:
    """Whether ``name`` may name a model (see the module docstring)."""
    return bool(NAME_PATTERN.match(name))


def check_model_name(name: str) -> str:
    """``name`` itself when it may name a model; ``ValueError`` saying how to fix it otherwise."""
    if not is_model_name(name):
        raise ValueError(
            f"model name {name!r} is not usable as a directory or URL segment; use at most 128 letters, digits, "
            "'_', '.' and '-' (not '.' or '-' first), e.g. --name my_model"
        )
    return name
