"""export_onnx on small models: the file's signature, inputs, metadata, dynamic batch, fp16, failures."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.onnx as export_onnx_module
from export import ExportError, ParityError, export_onnx, read_onnx_metadata
from export.onnx import ExportReport, ExportWrapper, cuda_works
from export.parity import ParityReport, parity_batches
from model import HeadConfig, ModelConfig, create_model, load_checkpoint, read_metadata, save_checkpoint
from model.config import TOKEN_MIXERS
from model.hierarchical import Classifier
from stageformer.core.preprocess import PreprocessConfig, normalize

from .conftest import SMALL_PREPROCESS, MakeCheckpoint, files_under, small_config


def _session(path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=list(providers))


def _torch_logits(checkpoint: Path, pixels: np.ndarray) -> np.ndarray:
    ckpt = load_checkpoint(checkpoint)
    with torch.inference_mode():
        return ckpt.model(torch.from_numpy(normalize(pixels, ckpt.preprocess))).numpy()


def assert_matches_pytorch(onnx_path: Path, checkpoint: Path, size: int = 32, atol: float = 1e-4) -> None:
    """The file against PyTorch on images the parity gate did not see (another seed, another batch size)."""
    pixels = parity_batches(size, [5], seed=11)[0].pixels
    (logits,) = _session(onnx_path).run(None, {"image": pixels})
    np.testing.assert_allclose(logits, _torch_logits(checkpoint, pixels), atol=atol, rtol=0)


def stored_parity(path: Path) -> dict[str, object]:
    return json.loads(read_onnx_metadata(path)["parity"])


def as_stored(report: ParityReport) -> dict[str, object]:
    return json.loads(json.dumps(report.to_dict()))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    """The tiny preset (every mixer, rotary attention, sine positions), exported with the defaults."""
    tmp = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    labels = [f"class {i}" for i in range(10)]
    ckpt = save_checkpoint(create_model("tiny"), tmp / "tiny.safetensors", PreprocessConfig(32), labels)
    return export_onnx(ckpt, tmp / "out" / "tiny.onnx")


def test_signature_is_uint8_nhwc_in_float32_logits_out(tiny_export: ExportReport) -> None:
    model = onnx.load(str(tiny_export.output_path))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 32, 32, 3]
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 10]
    assert {op.domain: op.version for op in model.opset_import}[""] == 20
    assert not list(tiny_export.output_path.parent.glob("*.data"))  # weights inside: one file
    assert files_under(tiny_export.output_path.parent) == ["tiny.onnx"]  # no temporary left over


def test_dynamic_batch_matches_pytorch(tiny_export: ExportReport) -> None:
    session = _session(tiny_export.output_path)
    checkpoint = tiny_export.checkpoint_path
    for batch in (1, 2, 5, 17):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        (logits,) = session.run(None, {"image": pixels})
        assert logits.shape == (batch, 10) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, _torch_logits(checkpoint, pixels), atol=1e-4, rtol=0)


def test_metadata_round_trip(tiny_export: ExportReport) -> None:
    meta = read_onnx_metadata(tiny_export.output_path)
    ckpt_meta = read_metadata(tiny_export.checkpoint_path)
    for key in ("config", "preprocess", "labels"):
        assert meta[key] == ckpt_meta[key]  # the same JSON strings
    assert ModelConfig.from_json(meta["config"]) == load_checkpoint(tiny_export.checkpoint_path).config
    assert json.loads(meta["labels"])[3] == "class 3"
    assert meta["input_format"] == "raw" and meta["precision"] == "fp32"
    assert meta["name"] == "tiny" and meta["opset"] == "20" and meta["exporter"] == "dynamo"
    assert meta["format"] == "stageformer.onnx" and meta["format_version"] == "1"
    assert meta["checkpoint_sha256"] == hashlib.sha256(tiny_export.checkpoint_path.read_bytes()).hexdigest()
    assert meta["checkpoint_file"] == "tiny.safetensors"
    import stageformer

    assert meta["stageformer_version"] == stageformer.__version__
    assert meta["torch_version"] == torch.__version__
    assert meta["onnx_version"] == onnx.__version__
    assert meta["onnxruntime_version"] == ort.__version__
    assert datetime.fromisoformat(meta["exported_at"]).tzinfo is not None
    parity = json.loads(meta["parity"])
    assert parity == as_stored(tiny_export.parity)  # the report's figures, all of them
    assert parity["passed"] is True and parity["atol"] == 1e-4
    assert [b["batch_size"] for b in parity["batches"]] == [1, 3, 8]
    assert {kind for b in parity["batches"] for kind in b["kinds"]} == {"scene", "noise", "flat"}
    assert parity["runtime"].endswith("CPUExecutionProvider")
    assert meta == tiny_export.metadata
    assert onnx.load(str(tiny_export.output_path)).producer_name == "stageformer"


def test_report_has_figures_and_timings(tiny_export: ExportReport) -> None:
    assert tiny_export.parity.top1_agreement == 1.0
    assert tiny_export.parity.max_abs_diff == max(b.max_abs_diff for b in tiny_export.parity.batches)
    assert set(tiny_export.timings) == {"load", "trace", "check", "save", "total"}
    assert tiny_export.file_size == tiny_export.output_path.stat().st_size
    assert tiny_export.num_parameters == sum(p.numel() for p in create_model("tiny").parameters())


def test_raw_and_normalized_inputs_agree(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(small_config("scaled_dot_product"), file_name="attn")
    raw = export_onnx(checkpoint, tmp_path / "raw.onnx", input="raw")
    normalized = export_onnx(checkpoint, tmp_path / "normalized.onnx", input="normalized")
    assert read_onnx_metadata(normalized.output_path)["input_format"] == "normalized"
    inp = onnx.load(str(normalized.output_path)).graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, 32, 32]

    pixels = parity_batches(32, [6], seed=7)[0].pixels
    (from_raw,) = _session(raw.output_path).run(None, {"image": pixels})
    (from_normalized,) = _session(normalized.output_path).run(None, {"image": normalize(pixels, SMALL_PREPROCESS)})
    # the graph's own normalization is stageformer.core.preprocess.normalize, to float rounding
    np.testing.assert_allclose(from_raw, from_normalized, atol=1e-5, rtol=0)
    np.testing.assert_allclose(from_raw, _torch_logits(checkpoint, pixels), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mixer", TOKEN_MIXERS)
def test_every_token_mixer_exports_and_passes_the_gate(
    mixer: str, make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    options: dict[str, object] = {"rotary": True} if mixer == "scaled_dot_product" else {}
    checkpoint = make_checkpoint(small_config(mixer, **options), file_name=mixer)
    report = export_onnx(checkpoint, tmp_path / f"{mixer}.onnx")
    assert_matches_pytorch(report.output_path, checkpoint)


def test_other_residual_styles_and_positions_export(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    base = small_config("scaled_dot_product", feedforward="conv2d", activation="squared_relu")
    config = ModelConfig(
        base.stages,
        image_size=32,
        num_classes=3,
        residual_norm_style="deepnorm",
        position_encoding="learnable",
        embed_norm="layernorm",
        head=HeadConfig(kind="mlp"),
    )
    checkpoint = make_checkpoint(config, file_name="deepnorm")
    report = export_onnx(checkpoint, tmp_path / "deepnorm.onnx")
    assert_matches_pytorch(report.output_path, checkpoint)


def test_torchscript_exporter_also_passes(tiny_export: ExportReport, tmp_path: Path) -> None:
    report = export_onnx(tiny_export.checkpoint_path, tmp_path / "ts.onnx", exporter="torchscript")
    assert read_onnx_metadata(report.output_path)["exporter"] == "torchscript"
    pixels = parity_batches(32, [4], seed=9)[0].pixels
    (torchscript,) = _session(report.output_path).run(None, {"image": pixels})
    (dynamo,) = _session(tiny_export.output_path).run(None, {"image": pixels})
    np.testing.assert_allclose(torchscript, dynamo, atol=1e-5, rtol=0)
    dims = onnx.load(str(report.output_path)).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 10]


# --- fp16 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_export(tiny_export: ExportReport, tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    return export_onnx(tiny_export.checkpoint_path, tmp_path_factory.mktemp("fp16") / "tiny16.onnx", fp16=True)


def test_fp16_keeps_input_and_output_types_and_runs_on_cpu(
    fp16_export: ExportReport, tiny_export: ExportReport
) -> None:
    model = onnx.load(str(fp16_export.output_path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    big = [t for t in weights if np.prod(t.dims) >= 64]  # the layers' weights, not small constants
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    meta = read_onnx_metadata(fp16_export.output_path)
    assert meta["precision"] == "fp16" and json.loads(meta["parity"])["atol"] == 5e-2
    assert fp16_export.output_path.stat().st_size < tiny_export.output_path.stat().st_size

    pixels = parity_batches(32, [4], seed=3)[0].pixels
    (fp16,) = _session(fp16_export.output_path).run(None, {"image": pixels})
    (fp32,) = _session(tiny_export.output_path).run(None, {"image": pixels})
    assert fp16.dtype == np.float32 and np.all(np.isfinite(fp16))
    np.testing.assert_allclose(fp16, fp32, atol=5e-2, rtol=0)


def test_fp16_on_cuda_matches_fp32(fp16_export: ExportReport, tiny_export: ExportReport) -> None:
    if not cuda_works():
        pytest.skip(
            "no working CUDA provider: onnxruntime lists "
            f"{ort.get_available_providers()}, and a CUDA session could not be made"
        )
    assert fp16_export.parity_cuda is not None  # the gate ran on CUDA too, and its figures are in the file
    assert stored_parity(fp16_export.output_path)["cuda"] == as_stored(fp16_export.parity_cuda)
    session = _session(fp16_export.output_path, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    pixels = parity_batches(32, [8], seed=5)[0].pixels
    (fp16,) = session.run(None, {"image": pixels})
    (fp32,) = _session(tiny_export.output_path).run(None, {"image": pixels})
    np.testing.assert_allclose(fp16, fp32, atol=5e-2, rtol=0)
    assert (fp16.argmax(-1) == fp32.argmax(-1)).mean() >= 0.75


# --- failures leave nothing behind ------------------------------------------------------------------
# These use the TorchScript exporter, which traces the tiny model in a second: what they test (the gate,
# the files) does not depend on the exporter.


def off_by_a_little(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the traced graph return PyTorch's logits plus 1e-3: a real mismatch, ten times the tolerance."""
    forward = ExportWrapper.forward
    monkeypatch.setattr(ExportWrapper, "forward", lambda self, image: forward(self, image) + 1e-3)


def test_parity_failure_writes_nothing(
    tiny_export: ExportReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off_by_a_little(monkeypatch)
    out, repo = tmp_path / "out", tmp_path / "repo"
    with pytest.raises(ParityError, match=r"parity gate failed: max \|diff\| 0\.001 ") as info:
        export_onnx(tiny_export.checkpoint_path, out / "tiny.onnx", triton_repo=repo, exporter="torchscript")
    assert info.value.report.max_abs_diff == pytest.approx(1e-3, rel=1e-2)  # the offset, measured
    assert "Nothing was written" in str(info.value)
    assert files_under(out) == [] and files_under(repo) == []


def test_a_tolerance_too_tight_for_float_rounding_fails_the_gate(tiny_export: ExportReport, tmp_path: Path) -> None:
    """No monkeypatching: the graph is right, but ONNX Runtime and PyTorch round differently by ~1e-6."""
    out = tmp_path / "out"
    with pytest.raises(ParityError, match=r"> atol 1e-09 .*FAILED\. Nothing was written") as info:
        export_onnx(tiny_export.checkpoint_path, out / "tiny.onnx", atol=1e-9, exporter="torchscript")
    assert 1e-9 < info.value.report.max_abs_diff < 1e-4 and info.value.report.top1_agreement == 1.0
    assert files_under(out) == []


def test_a_replaced_file_stays_intact_when_the_gate_fails(
    tiny_export: ExportReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    off_by_a_little(monkeypatch)
    with pytest.raises(ParityError):
        export_onnx(tiny_export.checkpoint_path, target, exporter="torchscript")
    assert target.read_bytes() == b"previous export" and files_under(tmp_path) == ["model.onnx"]


def test_untraceable_model_fails_clearly_before_writing(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = make_checkpoint(small_config("identity"), file_name="branchy")
    original = Classifier.forward

    def data_dependent(self: Classifier, images: torch.Tensor) -> torch.Tensor:
        logits = original(self, images)
        return logits * 2 if float(logits.sum()) > 0 else logits  # branches on tensor values

    monkeypatch.setattr(Classifier, "forward", data_dependent)
    with pytest.raises(ExportError, match=r"torch\.export cannot trace the model"):
        export_onnx(checkpoint, tmp_path / "out" / "branchy.onnx")
    assert files_under(tmp_path / "out") == []


def test_model_with_nan_weights_fails_before_tracing(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(small_config("pooling"))
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))  # type: ignore[operator]
    checkpoint = save_checkpoint(model, tmp_path / "nan.safetensors", SMALL_PREPROCESS)
    with pytest.raises(ExportError, match="NaN or inf"):
        export_onnx(checkpoint, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input": "nhwc"}, "input format 'nhwc' is not supported"),
        ({"opset": 11}, "opset 11 is out of range"),
        ({"exporter": "jit"}, "exporter 'jit' is not supported"),
        ({"atol": -1.0}, "atol must be a finite number"),
        ({"name": "../evil"}, "not usable as a directory"),
        ({"triton_max_batch_size": 0}, "max batch size must be a positive integer"),
    ],
)
def test_bad_options_fail_before_anything(
    options: dict[str, object], message: str, tmp_path: Path, make_checkpoint: MakeCheckpoint
) -> None:
    checkpoint = make_checkpoint(small_config("identity"), file_name="m")
    with pytest.raises(ExportError, match=message):
        export_onnx(checkpoint, tmp_path / "out" / "m.onnx", **options)  # type: ignore[arg-type]
    assert files_under(tmp_path / "out") == []


def test_missing_checkpoint_and_headless_model(tmp_path: Path, make_checkpoint: MakeCheckpoint) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(tmp_path / "nope.safetensors", tmp_path / "x.onnx")
    headless = make_checkpoint(small_config("identity", num_classes=0), file_name="headless")
    with pytest.raises(ExportError, match="no classification head"):
        export_onnx(headless, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_output_may_not_overwrite_the_checkpoint(tiny_export: ExportReport) -> None:
    with pytest.raises(ExportError, match="overwrite the checkpoint"):
        export_onnx(tiny_export.checkpoint_path, tiny_export.checkpoint_path)


def test_large_models_get_an_external_data_file(
    tiny_export: ExportReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_onnx_module, "EXTERNAL_DATA_THRESHOLD", 0)  # pretend the weights are over 2 GB
    report = export_onnx(
        tiny_export.checkpoint_path,
        tmp_path / "big.onnx",
        triton_repo=tmp_path / "repo",
        name="big",
        exporter="torchscript",
    )
    assert report.external_data_path == tmp_path / "big.onnx.data"
    assert files_under(tmp_path) == sorted(
        ["big.onnx", "big.onnx.data", "repo", "repo/big", "repo/big/1", "repo/big/1/model.onnx",
         "repo/big/1/big.onnx.data", "repo/big/config.pbtxt", "repo/big/labels.txt"]
    )  # fmt: skip
    pixels = np.zeros((3, 32, 32, 3), np.uint8)
    expected = _session(tiny_export.output_path).run(None, {"image": pixels})[0]
    for path in (report.output_path, tmp_path / "repo" / "big" / "1" / "model.onnx"):
        np.testing.assert_allclose(_session(path).run(None, {"image": pixels})[0], expected, atol=1e-6)
