"""``stageformer export``'s arguments and handler, through a parser built with add_arguments."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from export import read_onnx_metadata
from export.cli import add_arguments, run
from export.onnx import ExportWrapper

from .conftest import MakeCheckpoint, files_under, small_config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stageformer export")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_and_help() -> None:
    args = parse(["m.safetensors", "-o", "m.onnx"])
    assert (args.checkpoint, args.output, args.input, args.opset) == ("m.safetensors", "m.onnx", "raw", 20)
    assert not args.fp16 and args.exporter == "dynamo" and args.triton_max_queue_delay_us == 1000
    assert args.atol is None and args.triton_repo is None and args.triton_max_batch_size == 32 and args.name is None
    assert args.quantize is None and args.calibration is None and args.min_agreement == 0.99
    parser = argparse.ArgumentParser(prog="stageformer export")
    add_arguments(parser)
    text = parser.format_help()
    for flag in ("--input", "--opset", "--fp16", "--atol", "--triton-repo", "--triton-max-batch-size", "--name",
                 "--quantize", "--calibration", "--min-agreement"):  # fmt: skip
        assert flag in text
    with pytest.raises(SystemExit):
        parse(["m.safetensors"])  # -o is required
    with pytest.raises(SystemExit):
        parse(["m.safetensors", "-o", "m.onnx", "--quantize", "int4"])
    args = parse(["m.safetensors", "-o", "m.onnx", "--quantize", "int8", "--calibration", "photos", "--min-agreement",
                  "0.95"])  # fmt: skip
    assert (args.quantize, args.calibration, args.min_agreement) == ("int8", "photos", 0.95)


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, export, export.cli; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_run_prints_a_line_per_step_and_writes_triton(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = make_checkpoint(small_config("sepconv"), file_name="conv")
    args = parse([str(checkpoint), "-o", str(tmp_path / "conv.onnx"), "--name", "convy", "--triton-repo",
                  str(tmp_path / "repo"), "--triton-max-batch-size", "8", "--atol", "1e-3"])  # fmt: skip
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["load", "trace", "check", "save", "triton", "done"]
    assert "max |diff|" in lines[2] and "<= atol 0.001" in lines[2] and lines[2].endswith(" s)")
    assert lines[-1].startswith("  done  exported convy in ") and lines[-1].endswith(" s")
    assert read_onnx_metadata(tmp_path / "conv.onnx")["name"] == "convy"
    assert "max_batch_size: 8" in (tmp_path / "repo" / "convy" / "config.pbtxt").read_text()


def test_run_fails_with_status_1_and_writes_nothing(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = make_checkpoint(small_config("pooling"), file_name="p")
    forward = ExportWrapper.forward
    monkeypatch.setattr(ExportWrapper, "forward", lambda self, image: forward(self, image) + 1e-3)
    assert run(parse([str(checkpoint), "-o", str(tmp_path / "out" / "p.onnx"), "--exporter", "torchscript"])) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out.splitlines()[-1]  # the check line, with its figures
    assert captured.err.startswith("stageformer export: error: parity gate failed")
    assert files_under(tmp_path / "out") == []


def test_run_says_what_int8_needs(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = make_checkpoint(small_config("pooling"), file_name="p")
    assert run(parse([str(checkpoint), "-o", str(tmp_path / "p.onnx"), "--quantize", "int8"])) == 1
    assert "error: --quantize int8 needs --calibration DIR" in capsys.readouterr().err
    empty = tmp_path / "photos"
    empty.mkdir()
    assert run(parse([str(checkpoint), "-o", str(tmp_path / "p.onnx"), "--quantize", "int8", "--calibration",
                      str(empty)])) == 1  # fmt: skip
    assert "holds 0 readable images" in capsys.readouterr().err
    assert files_under(tmp_path) == ["ckpt", "ckpt/p.safetensors", "photos"]


def test_run_reports_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse([str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "m.onnx")])) == 1
    assert "does not exist" in capsys.readouterr().err
    assert files_under(tmp_path) == []
