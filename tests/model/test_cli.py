from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model import get_preset
from stageformer.cli import main


def test_presets_table_lists_every_preset_with_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "poolformer_s12" in out and "11,915,176" in out and "3x224x224" in out
    assert "digits" in out and "3x32x32" in out


def test_presets_json_and_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["caformer_s18"]["params"] == 26_341_656
    assert main(["presets", "--config", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out) == get_preset("tiny").config.to_dict()


def test_unknown_preset_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stageformer presets: error: unknown preset 'nope'; known presets:")
    assert "Traceback" not in err


def test_console_script_help_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "stageformer", "--help"], capture_output=True, text=True, check=True)
    assert "presets" in result.stdout
