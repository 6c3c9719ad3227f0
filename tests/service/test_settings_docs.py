"""The settings table of docs/serving.md lists every setting, with its environment variable and its default,
and nothing that is not a setting: the table is written by hand, so this keeps it true."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
ROW = re.compile(r"^\| `(--[a-z0-9-]+)` \| `(STAGEFORMER_[A-Z0-9_]+)` \| ([^|]+) \|", re.MULTILINE)


def _table() -> dict[str, tuple[str, str]]:
    return {flag: (env, default.strip()) for flag, env, default in ROW.findall(DOC.read_text())}


def _shown(default: object) -> set[str]:
    """How a default may be written in the table."""
    if default is None or default == []:
        return {"none", "first model"}
    if isinstance(default, bool):
        return {"on" if default else "off"}
    if isinstance(default, float):
        return {f"`{default}`", f"`{default:g}`"}
    return {f"`{default}`"}


def test_every_setting_has_its_row_with_its_variable_and_default() -> None:
    table = _table()
    for name, field in Settings.model_fields.items():
        if name == "models":  # the positional MODEL arguments, a row of their own
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in table, f"docs/serving.md has no row for {flag}"
        env, default = table[flag]
        assert env == f"STAGEFORMER_{name.upper()}", (flag, env)
        assert default in _shown(field.get_default(call_default_factory=True)), (flag, default)


def test_the_table_lists_no_setting_that_does_not_exist() -> None:
    flags = {"--" + name.replace("_", "-") for name in Settings.model_fields}
    assert set(_table()) <= flags, set(_table()) - flags
