"""Every preset: builds, runs forward and backward, is deterministic and survives a checkpoint."""

from __future__ import annotations

import pytest
import torch

from model import create_model, default_preprocess, get_preset, list_presets, load_checkpoint, save_checkpoint
from model.cli import count_parameters
from model.presets import register_preset

# Full-size parameter counts of timm 1.0.31 (from the reference fixtures' README).
TIMM_PARAMETER_COUNTS = {
    "poolformer_s12": 11_915_176,
    "poolformer_s24": 21_388_968,
    "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520,
    "poolformer_m48": 73_473_448,
    "poolformerv2_s12": 11_891_712,
    "convformer_s18": 26_774_448,
    "caformer_s18": 26_341_656,
}

PRESETS = list_presets()


def probe_size(name: str) -> int:
    """Input side for tests: the preset's own size when positions are learned, else a small one."""
    config = get_preset(name).config
    return config.image_size if config.position_encoding == "learnable" else min(config.image_size, 64)


def test_registry_has_the_promised_presets() -> None:
    expected = {"seed_metaformer", "xformers_cifar_metaformer", "tiny", "digits", *TIMM_PARAMETER_COUNTS}
    assert expected <= set(PRESETS)


def test_duplicate_preset_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="preset 'tiny' is already registered"):

        @register_preset("again", get_preset("tiny").preprocess)
        def tiny():
            return get_preset("tiny").config


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown preset 'caformer_s19'; known presets: caformer_s18"):
        get_preset("caformer_s19")


@pytest.mark.parametrize("name", sorted(TIMM_PARAMETER_COUNTS))
def test_parameter_counts_match_timm(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == TIMM_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", PRESETS)
def test_forward_backward_shape_and_finite(name: str) -> None:
    model = create_model(name)
    size = probe_size(name)
    x = torch.randn(2, model.config.in_channels, size, size)
    logits = model(x)
    assert logits.shape == (2, model.config.num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", PRESETS)
def test_building_is_deterministic(name: str) -> None:
    torch.manual_seed(7)
    first = create_model(name).state_dict()
    torch.manual_seed(7)
    second = create_model(name).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(8)
    third = create_model(name).state_dict()
    assert not all(torch.equal(first[k], third[k]) for k in first)


@pytest.mark.parametrize("name", PRESETS)
def test_checkpoint_round_trip_is_bit_exact(name: str, tmp_path) -> None:
    model = create_model(name).eval()
    labels = [f"class {i}" for i in range(model.config.num_classes)]
    path = save_checkpoint(model, tmp_path / f"{name}.safetensors", default_preprocess(name), labels)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.labels == labels
    assert loaded.preprocess == get_preset(name).preprocess
    assert not loaded.model.training
    original, again = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    size = probe_size(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
