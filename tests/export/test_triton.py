"""The Triton model repository: layout, labels, and a config.pbtxt that Triton's own schema parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from export import export_onnx
from export.triton import TritonModel, config_pbtxt, labels_text

from .conftest import MakeCheckpoint, files_under, small_config

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] provides Triton's ModelConfig protobuf schema"
)
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(text: str):  # type: ignore[no-untyped-def]
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_repository_layout_and_config(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    labels = ["cat", "dog", "axolotl", "line\nbreak", "ünïcode"]
    checkpoint = make_checkpoint(small_config("pooling"), labels=labels, file_name="pets")
    repo = tmp_path / "repo"
    report = export_onnx(
        checkpoint,
        tmp_path / "pets.onnx",
        triton_repo=repo,
        triton_max_batch_size=16,
        triton_max_queue_delay_us=250,
    )
    assert report.triton_model_dir == repo / "pets"
    assert files_under(repo) == ["pets", "pets/1", "pets/1/model.onnx", "pets/config.pbtxt", "pets/labels.txt"]
    assert (repo / "pets" / "1" / "model.onnx").read_bytes() == report.output_path.read_bytes()
    assert (repo / "pets" / "labels.txt").read_text(encoding="utf-8").splitlines() == [
        "cat", "dog", "axolotl", "line break", "ünïcode"
    ]  # fmt: skip

    config = parse((repo / "pets" / "config.pbtxt").read_text())
    assert config.name == "pets" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    (inp,) = config.input
    assert inp.name == "image" and inp.data_type == model_config_pb2.TYPE_UINT8
    assert list(inp.dims) == [32, 32, 3] and inp.format == model_config_pb2.ModelInput.FORMAT_NHWC
    (out,) = config.output
    assert out.name == "logits" and out.data_type == model_config_pb2.TYPE_FP32
    assert list(out.dims) == [5] and out.label_filename == "labels.txt"


def test_normalized_input_config_and_custom_name(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(small_config("identity"), file_name="plain")
    export_onnx(checkpoint, tmp_path / "plain.onnx", input="normalized", triton_repo=tmp_path / "repo", name="v2.model")
    config = parse((tmp_path / "repo" / "v2.model" / "config.pbtxt").read_text())
    assert config.name == "v2.model" and config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    (inp,) = config.input
    assert inp.data_type == model_config_pb2.TYPE_FP32 and list(inp.dims) == [3, 32, 32]
    assert inp.format == model_config_pb2.ModelInput.FORMAT_NCHW


def test_config_text_for_a_big_classifier_parses() -> None:
    text = config_pbtxt(TritonModel("poolformer_s12", "raw", 224, 1000, 64, 0))
    config = parse(text)
    assert list(config.input[0].dims) == [224, 224, 3] and list(config.output[0].dims) == [1000]
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert labels_text(["a", "b"]) == "a\nb\n"
