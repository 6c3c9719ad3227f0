"""Every preset exports and passes the parity gate (atol 1e-4), once each.

Every preset but four goes through the defaults: the dynamo exporter and the gate at batch sizes 1, 3
and 8. The deep PoolFormer v1 variants (S24, S36, M36, M48) are PoolFormer-S12's layers at a larger
depth and width, and they are the slowest to test, so they take two shortcuts that keep the suite within
a few minutes on two cores: the TorchScript exporter, which traces M48 in 16 s where dynamo takes 73 s,
and a gate at batch sizes 1 and 3 (PyTorch's own forward pass on the parity images is the other large
cost). ``test_deep_variants_add_no_new_layer`` keeps the argument true.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from export import export_onnx, read_onnx_metadata
from export.options import DEFAULT_EXPORTER, PARITY_BATCH_SIZES
from model import get_preset, list_presets

from .conftest import MakeCheckpoint

DEEP_VARIANTS = {"poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"}
DEEP_VARIANTS_OF = "poolformer_s12"


def _layer_kinds(name: str) -> set[tuple[object, ...]]:
    config = get_preset(name).config
    return {
        (s.mixer, s.norm, s.activation, s.feedforward, s.mlp_bias, s.layer_scale is None, s.res_scale is None)
        for s in config.stages
    } | {(config.head, config.embed_norm, config.final_norm, config.position_encoding, config.residual_norm_style)}


def test_deep_variants_add_no_new_layer() -> None:
    assert set(list_presets()) >= DEEP_VARIANTS
    for name in DEEP_VARIANTS:
        assert _layer_kinds(name) == _layer_kinds(DEEP_VARIANTS_OF), name


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_exports_and_passes_the_gate(preset: str, make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    deep = preset in DEEP_VARIANTS
    checkpoint = make_checkpoint(preset)
    report = export_onnx(
        checkpoint,
        tmp_path / f"{preset}.onnx",
        exporter="torchscript" if deep else DEFAULT_EXPORTER,
        parity_batch_sizes=(1, 3) if deep else PARITY_BATCH_SIZES,
    )
    stored = json.loads(read_onnx_metadata(report.output_path)["parity"])
    assert stored == json.loads(json.dumps(report.parity.to_dict())) and stored["atol"] == 1e-4
    assert [b.batch_size for b in report.parity.batches] == ([1, 3] if deep else [1, 3, 8])
    assert report.parity.top1_agreement == 1.0
    config = get_preset(preset).config
    session = ort.InferenceSession(str(report.output_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.type == "tensor(uint8)" and inp.shape == ["batch", config.image_size, config.image_size, 3]
    assert out.type == "tensor(float)" and out.shape == ["batch", config.num_classes]
