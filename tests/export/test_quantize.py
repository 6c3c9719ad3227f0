"""int8 export: the committed digits model quantized with held-out digits as calibration images; the gate,
the metadata, the served signature, and the options that cannot work.

The int8 exports use the TorchScript exporter, which traces the model in a second: quantization starts
from whichever fp32 graph passed the parity gate, and the dynamo exporter has its own tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.onnx as export_onnx_module
from export import AgreementError, ExportError, export_onnx, read_onnx_metadata
from export.calibration import read_calibration_images
from export.onnx import ExportReport
from export.quantize import INT8, agreement
from model import load_checkpoint, read_metadata
from stageformer.core.formats import (
    INPUT_FORMAT_KEY,
    LABELS_KEY,
    NAME_KEY,
    PARITY_KEY,
    PRECISION_KEY,
    PREPROCESS_KEY,
    QUANTIZATION_KEY,
)
from stageformer.core.preprocess import normalize

from .conftest import MakeCheckpoint, files_under, small_config

DEMO = Path(__file__).resolve().parents[2] / "service" / "demo" / "digits.safetensors"
CALIBRATION_IMAGES = 40


def write_digits(folder: Path, count: int) -> Path:
    """Held-out handwritten digits as image files of several formats, sizes and modes, plus a file that is
    not an image: the kind of folder a user points --calibration at."""
    data = pytest.importorskip("model.data", reason="the digits data set needs scikit-learn")
    pytest.importorskip("sklearn")
    held_out = data.load_digits(load_checkpoint(DEMO).preprocess).val
    folder.mkdir(parents=True)
    for i in range(count):
        image = held_out.image(i)
        if i % 4 == 1:
            image = image.resize((61, 61))
        elif i % 4 == 2:
            image = image.convert("L")
        image.save(folder / f"{i:03d}.{('png', 'jpg', 'png', 'webp')[i % 4]}")
    (folder / "labels.txt").write_text("not an image: ignored\n")
    return folder


def int8_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    tmp = tmp_path_factory.mktemp("int8")
    calibration = write_digits(tmp / "calibration", CALIBRATION_IMAGES)
    return export_onnx(
        DEMO, tmp / "out" / "digits-int8.onnx", quantize="int8", calibration=calibration, exporter="torchscript"
    )


def test_int8_file_has_the_fp32_signature_and_int8_weights(int8_export: ExportReport) -> None:
    session = int8_session(int8_export.output_path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(uint8)", ["batch", 24, 24, 3])
    assert (out.name, out.type, out.shape) == ("logits", "tensor(float)", ["batch", 10])
    for batch in (1, 5):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 24, 24, 3), dtype=np.uint8)
        (logits,) = session.run(None, {"image": pixels})
        assert logits.shape == (batch, 10) and logits.dtype == np.float32 and np.all(np.isfinite(logits))

    model = onnx.load(str(int8_export.output_path))
    assert model.producer_name == "stageformer" and model.graph.name == "digits"
    weights = {t.name: t for t in model.graph.initializer}
    made_by = {out: node for node in model.graph.node for out in node.output}

    def int8_weight(name: str) -> bool:
        node = made_by.get(name)
        return (
            node is not None
            and node.op_type == "DequantizeLinear"
            and (weights[node.input[0]].data_type == onnx.TensorProto.INT8 if node.input[0] in weights else False)
        )

    def dequantized(name: str) -> bool:
        return name in made_by and made_by[name].op_type == "DequantizeLinear"

    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    linear = [n for n in matmuls if "qkv" in n.name or "proj" in n.name or "fc" in n.name or "pwconv" in n.name]
    attention = [n for n in matmuls if n not in linear]
    assert len(linear) == 16 and len(attention) == 4  # the digits model: two attention blocks
    assert all(int8_weight(n.input[1]) and dequantized(n.input[0]) for n in linear)  # int8 weights, uint8 inputs
    assert not any(dequantized(name) for n in attention for name in n.input)  # attention's products stay float
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(weights[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in convs)
    assert int8_export.file_size < 0.6 * DEMO.stat().st_size  # most weights take 1 byte instead of 4
    assert files_under(int8_export.output_path.parent) == ["digits-int8.onnx"]


def other_digits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits that no int8 export here was calibrated on, and PyTorch fp32's logits of them."""
    ckpt = load_checkpoint(DEMO)
    pixels = read_calibration_images(write_digits(folder, 3 * CALIBRATION_IMAGES), ckpt.preprocess).pixels
    pixels = pixels[CALIBRATION_IMAGES:]
    with torch.inference_mode():
        return pixels, ckpt.model.eval()(torch.from_numpy(normalize(pixels, ckpt.preprocess))).numpy()


def test_int8_predictions_agree_with_pytorch_beyond_the_gate(int8_export: ExportReport, tmp_path: Path) -> None:
    pixels, expected = other_digits(tmp_path / "more")
    (got,) = int8_session(int8_export.output_path).run(None, {"image": pixels})
    figures = agreement(got, expected)
    assert figures.top1_agreement >= 0.975 and figures.max_abs_softmax_diff < 0.1


def test_metadata_carries_the_gate_figures(int8_export: ExportReport) -> None:
    meta = read_onnx_metadata(int8_export.output_path)
    assert meta == int8_export.metadata and meta[PRECISION_KEY] == "int8" and int8_export.precision == "int8"
    checkpoint_meta = read_metadata(DEMO)
    for key in (PREPROCESS_KEY, LABELS_KEY):  # what the server reads, as in an fp32 file
        assert meta[key] == checkpoint_meta[key]
    assert meta[INPUT_FORMAT_KEY] == "raw" and meta[NAME_KEY] == "digits"

    report = int8_export.quantization
    assert report is not None
    stored = json.loads(meta[QUANTIZATION_KEY])
    assert stored == json.loads(json.dumps(report.to_dict()))
    assert stored["settings"]["op_types"] == list(INT8.op_types) and stored["settings"]["quant_format"] == "QDQ"
    assert stored["settings"]["per_channel"] is True and stored["min_agreement"] == 0.99
    held_out = CALIBRATION_IMAGES // 5
    assert (stored["calibration"]["images"], stored["held_out"]["images"]) == (CALIBRATION_IMAGES - held_out, held_out)
    assert stored["calibration_folder"] == "calibration" and stored["skipped_files"] == 0
    for figures in (stored["calibration"], stored["held_out"]):
        assert 0.99 <= figures["top1_agreement"] <= 1.0
        assert 0.0 < figures["mean_abs_softmax_diff"] <= figures["max_abs_softmax_diff"] < 0.1
    # the parity figures are those of the fp32 graph the int8 one was quantized from
    assert json.loads(meta[PARITY_KEY]) == json.loads(json.dumps(int8_export.parity.to_dict()))
    assert set(int8_export.timings) == {"load", "trace", "check", "quantize", "save", "total"}


def test_a_failed_gate_raises_and_writes_nothing(
    int8_export: ExportReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantized graph whose logits come out negated predicts the least likely class: the gate must stop it."""
    quantized = export_onnx_module._quantized

    def negated(proto: onnx.ModelProto, inputs: np.ndarray) -> onnx.ModelProto:
        model = quantized(proto, inputs)
        output = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f"{o}_before_neg" if o == output else o for o in node.output]
        model.graph.node.append(onnx.helper.make_node("Neg", [f"{output}_before_neg"], [output]))
        return model

    monkeypatch.setattr(export_onnx_module, "_quantized", negated)
    calibration = write_digits(tmp_path / "calibration", 10)
    out, repo = tmp_path / "out", tmp_path / "repo"
    with pytest.raises(AgreementError, match=r"int8 gate failed: .* < 99\.0%.*Nothing was written") as info:
        export_onnx(DEMO, out / "m.onnx", quantize="int8", calibration=calibration, triton_repo=repo,
                    exporter="torchscript")  # fmt: skip
    report = info.value.report
    assert report.calibration.top1_agreement < 0.5 and report.held_out.images == 2
    assert files_under(out) == [] and files_under(repo) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "int8"}, r"--quantize int8 needs --calibration DIR"),
        ({"calibration": "."}, r"calibration images are only used with --quantize int8"),
        ({"quantize": "int8", "calibration": ".", "fp16": True}, r"--quantize int8 and --fp16 exclude each other"),
        ({"quantize": "int4", "calibration": "."}, r"quantize 'int4' is not supported; choose int8"),
        ({"quantize": "int8", "calibration": "missing"}, r"calibration folder .*missing' does not exist"),
        ({"quantize": "int8", "calibration": ".", "min_agreement": 99}, r"min agreement must be a fraction"),
        ({"quantize": "int8", "calibration": "empty"}, r"holds 0 readable images; int8 quantization needs at least 2"),
    ],
)
def test_bad_int8_options_fail_before_anything(
    options: dict[str, object], message: str, tmp_path: Path, make_checkpoint: MakeCheckpoint
) -> None:
    checkpoint = make_checkpoint(small_config("identity"), file_name="m")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    folder = options.get("calibration")
    if folder is not None:
        options = {**options, "calibration": tmp_path / str(folder)}
    with pytest.raises(ExportError, match=message):
        export_onnx(checkpoint, tmp_path / "out" / "m.onnx", **options)  # type: ignore[arg-type]
    assert files_under(tmp_path / "out") == []


def test_int8_with_normalized_input_keeps_float_input(tmp_path: Path) -> None:
    calibration = write_digits(tmp_path / "calibration", 10)
    report = export_onnx(DEMO, tmp_path / "n.onnx", input="normalized", quantize="int8", calibration=calibration,
                         exporter="torchscript")  # fmt: skip
    session = int8_session(report.output_path)
    (inp,) = session.get_inputs()
    assert (inp.type, inp.shape) == ("tensor(float)", ["batch", 3, 24, 24])
    pixels, expected = other_digits(tmp_path / "more")
    (got,) = session.run(None, {"image": normalize(pixels, load_checkpoint(DEMO).preprocess)})
    assert agreement(got, expected).top1_agreement >= 0.975
