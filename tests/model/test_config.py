from __future__ import annotations

import json

import pytest

from model import ConfigError, HeadConfig, ModelConfig, StageConfig, create_model, get_preset, list_presets
from model.config import replace


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_survives_a_json_round_trip(name: str) -> None:
    config = get_preset(name).config
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()


def test_configs_are_frozen_values() -> None:
    config = get_preset("tiny").config
    with pytest.raises(AttributeError):
        config.image_size = 64  # type: ignore[misc]
    assert get_preset("tiny").config == config  # building twice gives equal values


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim must be a positive number"),
        ({"dim": 8, "mixer": "favor"}, "mixer='favor' is not supported; choose one of scaled_dot_product"),
        ({"dim": 8, "norm": "batchnorm"}, "choose one of layernorm"),
        ({"dim": 8, "activation": "swish"}, "choose one of gelu"),
        ({"dim": 8, "feedforward": "moe"}, "feedforward='moe'"),
        ({"dim": 8, "padding": 3}, "padding=3 must be in [0, patch_size)"),
        ({"dim": 8, "pool_size": 4}, "pool_size must be odd"),
        ({"dim": 8, "rotary": True}, "rotary embeddings need mixer='scaled_dot_product'"),
        ({"dim": 8, "dropout": 1.0}, "dropout must be in [0, 1)"),
    ],
)
def test_stage_validation_says_what_to_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        StageConfig(**kwargs)
    assert message in str(info.value)


def test_xformers_feedforward_names_are_accepted() -> None:
    assert StageConfig(dim=8, feedforward="MLP").feedforward == "mlp"
    assert StageConfig(dim=8, feedforward="Conv2DFeedforward").feedforward == "conv2d"


def test_model_validation() -> None:
    stage = StageConfig(dim=8)
    with pytest.raises(ConfigError, match="stages is empty"):
        ModelConfig(stages=())
    with pytest.raises(ConfigError, match="stages\\[0\\] needs a patch embedding"):
        ModelConfig(stages=(StageConfig(dim=8, patch_size=None),))
    with pytest.raises(ConfigError, match=r"its dim must equal stages\[0\]\.dim=8"):
        ModelConfig(stages=(stage, StageConfig(dim=16, patch_size=None)))
    with pytest.raises(ConfigError, match="stages\\[1\\] leaves no tokens at image_size=4"):
        ModelConfig(stages=(StageConfig(dim=8, padding=0), StageConfig(dim=8, padding=0)), image_size=4)
    with pytest.raises(ConfigError, match="residual_norm_style='sandwich'"):
        ModelConfig(stages=(stage,), residual_norm_style="sandwich")
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 0"):
        ModelConfig(stages=(stage,), num_classes=-1)
    with pytest.raises(ConfigError, match="head: kind='svm'"):
        HeadConfig(kind="svm")


def test_unknown_json_keys_name_the_valid_ones() -> None:
    data = get_preset("tiny").config.to_dict()
    data["stages"][1]["dimm"] = 3
    with pytest.raises(ConfigError, match="stages\\[1\\]: unknown key\\(s\\) 'dimm'; valid keys: dim, depth"):
        ModelConfig.from_dict(data)
    data = get_preset("tiny").config.to_dict()
    data["imagesize"] = 3
    with pytest.raises(ConfigError, match="model: unknown key\\(s\\) 'imagesize'"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{stages:")
    with pytest.raises(ConfigError, match="'stages' is missing"):
        ModelConfig.from_json("{}")


def test_grid_sizes_follow_the_patch_geometry() -> None:
    config = get_preset("poolformer_s12").config
    assert config.grid_sizes() == [56, 28, 14, 7]
    assert config.seq_lens() == [3136, 784, 196, 49]
    assert get_preset("tiny").config.grid_sizes() == [8, 4, 4, 2, 2]


def test_json_config_file_builds_a_model(tmp_path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(get_preset("tiny").config.to_dict()))
    model = create_model(str(path), num_classes=3)
    assert model.config.num_classes == 3
    with pytest.raises(FileNotFoundError):
        create_model(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"neither a preset nor a \.json config file; presets: caformer_s18"):
        create_model("poolformer_s13")


def test_overrides_reject_unknown_fields() -> None:
    config = get_preset("tiny").config
    assert replace(config, drop_path_rate=0.1).drop_path_rate == 0.1
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'drop_path'; valid keys: stages"):
        create_model("tiny", drop_path=0.1)
