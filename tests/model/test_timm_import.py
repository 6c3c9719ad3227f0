"""Importing timm's MetaFormer weights, checked against timm's own outputs (tests/fixtures/timm-metaformer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Classifier, load_checkpoint, read_metadata
from model.presets import get_preset
from model.timm_import import (
    TimmImportError,
    config_from_timm_state_dict,
    convert_state_dict,
    family_of,
    import_timm,
    load_timm_state_dict,
    pretrained_preprocess,
    read_labels,
    timm_key,
)
from stageformer.cli import main
from stageformer.core.preprocess import IMAGENET_MEAN, IMAGENET_STD

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "timm-metaformer"
FAMILIES = ["poolformer_v1", "poolformer_v2", "convformer", "caformer"]
LABELS = [f"class {i}" for i in range(10)]


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not (FIXTURES / "README.md").is_file():
        pytest.fail(
            f"timm reference fixtures not found at {FIXTURES}; they are part of the repository (restore them "
            "with `git checkout -- tests/fixtures`)",
            pytrace=False,
        )
    return FIXTURES


def fixture_info(fixtures: Path, family: str) -> dict[str, object]:
    info: dict[str, object] = json.loads((fixtures / f"{family}.json").read_text())
    return info


def reference_name(fixtures: Path, family: str) -> str:
    return str(fixture_info(fixtures, family)["timm_reference_model"])


def timm_logits(model: torch.nn.Module, fixtures: Path, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    io = load_file(str(fixtures / f"{family}.io.safetensors"))
    with torch.no_grad():
        return model(io["input"]), io["logits"]


def write_variant(
    tmp_path: Path, fixtures: Path, family: str, change: Callable[[dict[str, torch.Tensor]], object]
) -> Path:
    """The family's timm weights with ``change(state_dict)`` applied, written to a new file."""
    state = load_file(str(fixtures / f"{family}.safetensors"))
    change(state)
    path = tmp_path / f"{family}-changed.safetensors"
    save_file(state, str(path))
    return path


# --- parity with timm ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_timm(fixtures: Path, family: str) -> None:
    state = load_timm_state_dict(fixtures / f"{family}.safetensors")
    config = config_from_timm_state_dict(family, state)
    info = fixture_info(fixtures, family)
    assert [s.depth for s in config.stages] == info["depths"]
    assert [s.dim for s in config.stages] == info["dims"]
    assert config.num_classes == info["num_classes"]
    assert config.stages[1].patch_size is None  # dims 32, 32: timm has no downsample there
    model = Classifier(config)
    model.load_state_dict(convert_state_dict(state, model), strict=True)
    ours, theirs = timm_logits(model.eval(), fixtures, family)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_caformer_attention_stages_come_from_the_tensors(fixtures: Path) -> None:
    state = load_timm_state_dict(fixtures / "caformer.safetensors")
    config = config_from_timm_state_dict("caformer", state)
    assert [s.mixer for s in config.stages] == ["sepconv", "sepconv", "scaled_dot_product", "scaled_dot_product"]
    assert config.head.kind == "mlp"
    assert (
        config_from_timm_state_dict(
            "poolformer_v2", load_timm_state_dict(fixtures / "poolformer_v2.safetensors")
        ).head.kind
        == "linear"
    )


@pytest.mark.parametrize(
    ("timm_name", "params"),
    [
        ("poolformer_s12", 11_915_176),
        ("poolformer_m48", 73_473_448),
        ("poolformerv2_s12", 11_891_712),
        ("convformer_s18", 26_774_448),
        ("caformer_s18", 26_341_656),
    ],
)
def test_full_size_layout_is_read_back_from_tensors(timm_name: str, params: int) -> None:
    """The preset's tensors, in timm's names, give back the preset's architecture (meta device: no memory)."""
    preset = get_preset(timm_name).config
    with torch.device("meta"):
        reference = Classifier(preset)
        state = {timm_key(k): v for k, v in reference.state_dict().items()}
        config = config_from_timm_state_dict(family_of(timm_name), state)
        model = Classifier(config)
    assert [(s.depth, s.dim, s.mixer, s.patch_size) for s in config.stages] == [
        (s.depth, s.dim, s.mixer, s.patch_size) for s in preset.stages
    ]
    assert config.head == preset.head and config.num_classes == 1000
    assert sum(p.numel() for p in model.parameters()) == params
    assert set(convert_state_dict(state, model)) == set(model.state_dict())


# --- the checkpoint -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_import_writes_a_loadable_checkpoint(fixtures: Path, tmp_path: Path, family: str) -> None:
    name = reference_name(fixtures, family)
    out = import_timm(name, fixtures / f"{family}.safetensors", tmp_path / "ckpt.safetensors", LABELS)
    checkpoint = load_checkpoint(out)
    assert checkpoint.labels == LABELS
    preprocess = checkpoint.preprocess
    assert preprocess.image_size == 224 and checkpoint.config.image_size == 224
    assert preprocess.mean == IMAGENET_MEAN and preprocess.std == IMAGENET_STD
    assert preprocess.interpolation == "bicubic"
    assert preprocess.crop_pct == (0.9 if family == "poolformer_v1" else 1.0)
    assert checkpoint.metadata["source"] == "timm" and checkpoint.metadata["timm_model"] == name
    ours, theirs = timm_logits(checkpoint.model, fixtures, family)  # any input size: no position encoding
    assert (ours - theirs).abs().max().item() < 1e-4


def test_labels_default_to_numbers(fixtures: Path, tmp_path: Path) -> None:
    out = import_timm("poolformer_s12", fixtures / "poolformer_v1.safetensors", tmp_path / "c.safetensors")
    assert json.loads(read_metadata(out)["labels"]) == [str(i) for i in range(10)]


@pytest.mark.parametrize(
    ("name", "family", "crop_pct"),
    [
        ("poolformer_s36", "poolformer_v1", 0.9),
        ("poolformer_m36", "poolformer_v1", 0.95),
        ("timm/poolformer_m48.sail_in1k", "poolformer_v1", 0.95),
        ("poolformerv2_m36", "poolformer_v2", 1.0),
        ("convformer_b36.sail_in22k_ft_in1k_384", "convformer", 1.0),
        ("caformer_s18", "caformer", 1.0),
    ],
)
def test_family_and_preprocess_from_the_name(name: str, family: str, crop_pct: float) -> None:
    assert family_of(name).name == family
    assert pretrained_preprocess(name).crop_pct == crop_pct


# --- errors -------------------------------------------------------------------------------------


def test_unknown_family_lists_the_known_ones(fixtures: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resnet50") as excinfo:
        import_timm("resnet50", fixtures / "caformer.safetensors", tmp_path / "c.safetensors")
    for prefix in ("poolformer_", "poolformerv2_", "convformer_", "caformer_"):
        assert prefix in str(excinfo.value)
    assert not (tmp_path / "c.safetensors").exists()


def test_weights_of_another_family_are_refused(fixtures: Path, tmp_path: Path) -> None:
    with pytest.raises(TimmImportError, match=r"missing .*norm1\.bias"):
        import_timm("poolformer_s12", fixtures / "poolformer_v2.safetensors", tmp_path / "c.safetensors")
    with pytest.raises(TimmImportError, match=r"unexpected .*token_mixer\.qkv\.weight"):
        import_timm("convformer_s18", fixtures / "caformer.safetensors", tmp_path / "c.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_key_is_named(fixtures: Path, tmp_path: Path, family: str) -> None:
    key = "stages.2.blocks.1.mlp.fc1.weight"
    path = write_variant(tmp_path, fixtures, family, lambda s: s.pop(key))
    with pytest.raises(TimmImportError, match=rf"missing 1 tensor\(s\): {key}"):
        import_timm(reference_name(fixtures, family), path, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_extra_key_is_named(fixtures: Path, tmp_path: Path) -> None:
    path = write_variant(tmp_path, fixtures, "convformer", lambda s: s.update({"stem.extra.weight": torch.ones(3)}))
    with pytest.raises(TimmImportError, match=r"unexpected 1 tensor\(s\): stem\.extra\.weight"):
        import_timm("convformer_s18", path, tmp_path / "c.safetensors")


def test_wrong_shape_is_named(fixtures: Path, tmp_path: Path) -> None:
    key = "stages.3.blocks.0.token_mixer.qkv.weight"
    path = write_variant(tmp_path, fixtures, "caformer", lambda s: s.update({key: torch.zeros(287, 96)}))
    with pytest.raises(TimmImportError, match=rf"shape mismatch.*{key} has shape \(287, 96\), expected \(288, 96\)"):
        import_timm("caformer_s18", path, tmp_path / "c.safetensors")


def test_label_count_must_match_classes(fixtures: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 labels given, but the weights have 10 classes"):
        import_timm("caformer_s18", fixtures / "caformer.safetensors", tmp_path / "c.safetensors", ["a", "b", "c"])


def test_pickles_are_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"stem.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(TimmImportError, match="not a safetensors file"):
        import_timm("poolformer_s12", path, tmp_path / "c.safetensors")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        import_timm("poolformer_s12", tmp_path / "nope.safetensors", tmp_path / "c.safetensors")


# --- labels files -------------------------------------------------------------------------------


def test_read_labels_text_and_json(tmp_path: Path) -> None:
    text = tmp_path / "labels.txt"
    text.write_text("tench\n\ngoldfish\n  great white shark  \n\n")
    assert read_labels(text) == ["tench", "goldfish", "great white shark"]
    as_json = tmp_path / "labels.json"
    as_json.write_text(json.dumps(["tench", "goldfish"]))
    assert read_labels(as_json) == ["tench", "goldfish"]
    as_dict = tmp_path / "index.json"
    as_dict.write_text(json.dumps({"0": "tench"}))
    with pytest.raises(ValueError, match="list of strings"):
        read_labels(as_dict)


# --- the command --------------------------------------------------------------------------------


def test_cli_import_timm(fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "caformer.safetensors"
    argv = ["import-timm", "caformer_s18", str(fixtures / "caformer.safetensors"), "-o", str(out)]
    assert main([*argv, "--labels", str(labels)]) == 0
    printed = capsys.readouterr().out
    for text in ("caformer", "[1, 1, 2, 1]", "[32, 32, 64, 96]", "10", str(out)):
        assert text in printed
    checkpoint = load_checkpoint(out)
    assert checkpoint.labels == LABELS
    ours, theirs = timm_logits(checkpoint.model, fixtures, "caformer")
    assert (ours - theirs).abs().max().item() < 1e-4


def test_cli_import_timm_errors_are_one_line(
    fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["import-timm", "resnet50", str(fixtures / "caformer.safetensors"), "-o", str(tmp_path / "c.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stageformer import-timm: error:" in err and "caformer_" in err and "Traceback" not in err
