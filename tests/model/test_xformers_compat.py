"""The xformers hierarchical API: its shipped test configuration, its seed example, and the places
where xformers went wrong."""

from __future__ import annotations

import enum

import pytest
import torch
from torch import nn

from model import BasicLayerConfig, ConfigError, create_model, get_hierarchical_configuration, xFormer, xFormerConfig


def xformers_test_layers(image_size: int = 32) -> list[BasicLayerConfig]:
    """The configuration of xformers' own hierarchical-transformer test."""
    return [
        BasicLayerConfig(64, "pooling", 7, 4, 2, image_size * image_size // 16, "MLP"),
        BasicLayerConfig(128, "pooling", 3, 2, 1, image_size * image_size // 64, "MLP", repeat_layer=2),
        BasicLayerConfig(320, "scaled_dot_product", 3, 2, 1, image_size * image_size // 256, "MLP"),
    ]


def build_xformers_test_trunk() -> xFormer:
    layers = get_hierarchical_configuration(
        xformers_test_layers(), residual_norm_style="pre", use_rotary_embeddings=False, mlp_multiplier=4, dim_head=32
    )
    return xFormer.from_config(xFormerConfig(layers))


def test_xformers_test_configuration_gives_b_4_320() -> None:
    trunk = build_xformers_test_trunk()
    out = trunk(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 4, 320)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())


def test_seed_example_runs_with_only_the_import_changed() -> None:
    image_size = 224
    base_hierarchical_configs = [
        BasicLayerConfig(
            embedding=64,
            attention_mechanism="scaled_dot_product",
            patch_size=7,
            stride=4,
            padding=2,
            seq_len=image_size * image_size // 16,
            feedforward="MLP",
        ),
        BasicLayerConfig(
            embedding=128,
            attention_mechanism="scaled_dot_product",
            patch_size=3,
            stride=2,
            padding=1,
            seq_len=image_size * image_size // 64,
            feedforward="MLP",
        ),
        BasicLayerConfig(
            embedding=320,
            attention_mechanism="scaled_dot_product",
            patch_size=3,
            stride=2,
            padding=1,
            seq_len=image_size * image_size // 256,
            feedforward="MLP",
        ),
    ]
    xformer_config = get_hierarchical_configuration(
        base_hierarchical_configs,
        residual_norm_style="pre",
        use_rotary_embeddings=False,
        mlp_multiplier=4,
        dim_head=32,
    )
    config = xFormerConfig(xformer_config)
    trunk = xFormer.from_config(config)
    assert config.model_config.image_size == 224
    assert trunk(torch.rand(1, 3, 224, 224)).shape == (1, 196, 320)
    # the classifier on top: the seed_metaformer preset is this model with a head
    model = create_model(config, num_classes=1000)
    assert model.config.stages == create_model("seed_metaformer").config.stages
    assert model(torch.rand(2, 3, 224, 224)).shape == (2, 1000)


def test_helper_layout_matches_xformers_structure() -> None:
    layers = get_hierarchical_configuration(xformers_test_layers(), dim_head=32)
    assert len(layers) == 4
    first = layers[0]
    assert first["block_type"] == "encoder"
    assert first["dim_model"] == 64
    assert first["residual_norm_style"] == "pre"  # the default is a usable value
    assert first["multi_head_config"] == {
        "num_heads": 2,
        "use_rotary_embeddings": True,
        "attention": {"name": "pooling"},
    }
    assert first["feedforward_config"] == {
        "name": "MLP",
        "activation": "gelu",
        "hidden_layer_multiplier": 4,
        "dropout": 0.0,
    }
    assert first["position_encoding_config"] == {"name": "learnable", "seq_len": 64}
    assert first["patch_embedding_config"] == {"in_channels": 3, "kernel_size": 7, "stride": 4, "padding": 2}
    assert first["normalization"] == "layernorm"
    assert layers[1]["patch_embedding_config"]["in_channels"] == 64
    assert "patch_embedding_config" not in layers[2]  # the repeat joins the stage before it
    assert layers[3]["multi_head_config"]["num_heads"] == 10
    assert get_hierarchical_configuration(xformers_test_layers())[0]["multi_head_config"]["num_heads"] == 1


def test_repeated_layers_share_neither_dicts_nor_modules() -> None:
    layers = get_hierarchical_configuration(
        [BasicLayerConfig(32, "pooling", 4, 4, 0, 64, "MLP", repeat_layer=3)], dim_head=16
    )
    assert len({id(layer) for layer in layers}) == 3
    layers[1]["feedforward_config"]["dropout"] = 0.5
    assert layers[2]["feedforward_config"]["dropout"] == 0.0
    trunk = xFormer.from_config(
        xFormerConfig(
            get_hierarchical_configuration([BasicLayerConfig(32, "pooling", 4, 4, 0, 64, "MLP", repeat_layer=3)])
        )
    )
    blocks = list(trunk.stages[0].blocks)
    assert len(blocks) == 3
    params = [{id(p) for p in block.parameters()} for block in blocks]
    assert not (params[0] & params[1]) and not (params[1] & params[2])
    assert not torch.equal(blocks[0].ffn.fc1.weight, blocks[1].ffn.fc1.weight)


def test_pre_norm_stack_ends_with_its_final_norm() -> None:
    trunk = build_xformers_test_trunk()
    assert isinstance(trunk.norm, nn.LayerNorm)
    out = trunk(torch.rand(2, 3, 32, 32))
    # every token is normalized over its channels
    assert torch.allclose(out.mean(-1), torch.zeros(2, 4), atol=1e-5)
    post = get_hierarchical_configuration(xformers_test_layers(), residual_norm_style="post", dim_head=32)
    assert isinstance(xFormer.from_config(xFormerConfig(post)).norm, nn.Identity)  # post-norm blocks end normed


def test_residual_norm_style_enum_values_work() -> None:
    class Style(enum.Enum):
        Pre = "pre"
        DeepNorm = "deepnorm"

    layers = get_hierarchical_configuration(xformers_test_layers(), residual_norm_style=Style.DeepNorm, dim_head=32)
    assert layers[0]["residual_norm_style"] == "deepnorm"
    trunk = xFormer.from_config(xFormerConfig(layers))
    assert trunk(torch.rand(1, 3, 32, 32)).shape == (1, 4, 320)
    with pytest.raises(ConfigError, match="choose one of pre, post, deepnorm"):
        get_hierarchical_configuration(xformers_test_layers(), residual_norm_style="sandwich")


def test_helper_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    get_hierarchical_configuration(xformers_test_layers(), dim_head=32)
    xFormer.from_config(xFormerConfig(get_hierarchical_configuration(xformers_test_layers(), dim_head=32)))
    assert capsys.readouterr() == ("", "")


def test_unknown_keys_and_names_are_errors_naming_the_valid_choices() -> None:
    layers = get_hierarchical_configuration(xformers_test_layers(), dim_head=32)
    layers[1]["feedforward_config"]["hidden_layer_multiplyer"] = 2
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'hidden_layer_multiplyer'; valid keys: name, activation"):
        xFormerConfig(layers)

    layers = get_hierarchical_configuration(xformers_test_layers(), dim_head=32)
    layers[0]["dim_modle"] = 64
    with pytest.raises(ConfigError, match="stack_configs\\[0\\]: unknown key\\(s\\) 'dim_modle'"):
        xFormerConfig(layers)

    with pytest.raises(ConfigError, match="'linformer' is an xformers mechanism that stageformer does not support"):
        BasicLayerConfig(64, "linformer", 7, 4, 2, 64, "MLP")
    with pytest.raises(ConfigError, match="unknown attention 'scaled_dotproduct'; choose one of scaled_dot_product"):
        BasicLayerConfig(64, "scaled_dotproduct", 7, 4, 2, 64, "MLP")
    with pytest.raises(ConfigError, match="unknown feedforward 'FusedMLP'"):
        BasicLayerConfig(64, "pooling", 7, 4, 2, 64, "FusedMLP")

    layers = get_hierarchical_configuration(xformers_test_layers(), dim_head=32)
    layers[2]["multi_head_config"]["attention"]["name"] = "nystrom"
    with pytest.raises(ConfigError, match=r"stack_configs\[2\]\.multi_head_config\.attention: attention 'nystrom'"):
        xFormerConfig(layers)

    config = xFormerConfig(get_hierarchical_configuration(xformers_test_layers(), dim_head=32))
    config.weight_init = "moco"  # what xformers' CIFAR example does
    with pytest.raises(ConfigError, match="weight_init 'jax' unknown; choose one of vit, timm, moco, small"):
        config.weight_init = "jax"


def test_seq_len_that_contradicts_the_geometry_gives_the_expected_value() -> None:
    bad = xformers_test_layers()
    bad[1] = BasicLayerConfig(128, "pooling", 3, 2, 1, 64, "MLP", repeat_layer=2)
    with pytest.raises(ConfigError, match=r"stack_configs\[1\]\.position_encoding_config: seq_len 64 .* expected 16"):
        xFormerConfig(get_hierarchical_configuration(bad, dim_head=32))
    with pytest.raises(ConfigError, match="seq_len 63 is not a square"):
        xFormerConfig(get_hierarchical_configuration([BasicLayerConfig(8, "pooling", 4, 4, 0, 63, "MLP")]))
    with pytest.raises(ConfigError, match=r"seq_len 64 .* expected 256"):
        xFormerConfig(
            get_hierarchical_configuration([BasicLayerConfig(8, "pooling", 4, 4, 0, 64, "MLP")]), image_size=64
        )


def test_feeding_another_image_size_to_learned_positions_is_a_clear_error() -> None:
    trunk = build_xformers_test_trunk()
    with pytest.raises(ValueError, match="learnable position encoding for 64 tokens but got 256"):
        trunk(torch.rand(1, 3, 64, 64))
