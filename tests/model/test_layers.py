"""Layers and mixers checked against plain PyTorch references and their stated behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import ModelConfig, StageConfig, create_model
from model import config as names
from model.config import TOKEN_MIXERS
from model.hierarchical import Block
from model.layers import (
    ACTIVATION_LAYERS,
    FEEDFORWARD_LAYERS,
    NORM_LAYERS,
    POSITION_ENCODING_LAYERS,
    DropPath,
    GroupNorm1,
    SinePositionEncoding,
    StarReLU,
    build_norm,
    grid_to_tokens,
    tokens_to_grid,
)
from model.mixers import TOKEN_MIXER_LAYERS, Attention, Pooling, RotaryEmbedding, build_mixer


@pytest.mark.parametrize(
    ("table", "accepted"),
    [
        (TOKEN_MIXER_LAYERS, names.TOKEN_MIXERS),
        (FEEDFORWARD_LAYERS, names.FEEDFORWARDS),
        (NORM_LAYERS, names.NORMS),
        (ACTIVATION_LAYERS, names.ACTIVATIONS),
        (POSITION_ENCODING_LAYERS, names.POSITION_ENCODINGS),
    ],
)
def test_every_name_a_config_accepts_has_exactly_one_layer(table: dict, accepted: tuple[str, ...]) -> None:
    assert sorted(table) == sorted(accepted)


@pytest.mark.parametrize("name", names.NORMS)
def test_norms_keep_the_token_shape_and_have_biases_unless_named_nobias(name: str) -> None:
    norm = build_norm(name, 16, 1e-6)
    x = torch.randn(2, 12, 16)
    assert norm(x).shape == x.shape
    biases = [p for n, p in norm.named_parameters() if n == "bias"]
    assert bool(biases) == (name in ("layernorm", "groupnorm"))


def test_grid_and_tokens_round_trip() -> None:
    grid = torch.randn(2, 5, 3, 4)
    tokens = grid_to_tokens(grid)
    assert tokens.shape == (2, 12, 5)
    assert torch.equal(tokens_to_grid(tokens, (3, 4)), grid)


def test_groupnorm1_equals_torch_groupnorm_with_one_group() -> None:
    grid = torch.randn(2, 6, 4, 4) * 3 + 1
    reference = nn.GroupNorm(1, 6, eps=1e-5)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    ours = GroupNorm1(6, eps=1e-5)
    ours.load_state_dict(reference.state_dict())
    expected = grid_to_tokens(reference(grid))
    assert torch.allclose(ours(grid_to_tokens(grid)), expected, atol=1e-5)
    assert GroupNorm1(6, bias=False).bias is None


def test_pooling_is_average_without_padding_minus_identity() -> None:
    grid = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = tokens_to_grid(Pooling(3)(grid_to_tokens(grid), (4, 4)), (4, 4))
    corner = grid[0, 0, :2, :2].mean() - grid[0, 0, 0, 0]  # only 4 real pixels are averaged at a corner
    assert torch.isclose(out[0, 0, 0, 0], corner)


def test_attention_equals_manual_softmax_attention() -> None:
    attn = Attention(dim=16, heads=2, head_dim=8, bias=True, rotary=False, dropout=0.0).eval()
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 16))
    assert torch.allclose(attn(x, (1, 5)), expected, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    rotary = RotaryEmbedding(8)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    rq, rk = rotary(q, k)
    scores = (rq @ rk.transpose(-1, -2))[0, 0]
    assert torch.allclose(scores.diagonal(0), scores.diagonal(0)[0].expand(6), atol=1e-5)
    assert torch.allclose(scores.diagonal(2), scores.diagonal(2)[0].expand(4), atol=1e-5)
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


def test_star_relu_and_sine_encoding() -> None:
    act = StarReLU(scale=2.0, bias=0.5)
    assert torch.allclose(act(torch.tensor([-1.0, 3.0])), torch.tensor([0.5, 18.5]))
    table = SinePositionEncoding(10, 6).table
    assert table.shape == (1, 10, 6)
    assert torch.allclose(table[0, 0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))


def test_drop_path_only_acts_in_training() -> None:
    drop = DropPath(0.5)
    x = torch.ones(1000, 4, 2)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    kept = out[:, 0, 0] != 0
    assert 350 < int(kept.sum()) < 650  # whole samples are dropped ...
    assert torch.all(out[kept] == 2.0)  # ... and the kept ones rescaled


@pytest.mark.parametrize("mixer", TOKEN_MIXERS)
def test_every_mixer_keeps_the_token_shape(mixer: str) -> None:
    stage = StageConfig(dim=16, mixer=mixer, head_dim=8, rotary=mixer == "scaled_dot_product")
    x = torch.randn(2, 12, 16, requires_grad=True)
    out = build_mixer(stage)(x, (3, 4))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("style", ["pre", "post", "deepnorm"])
def test_residual_styles(style: str) -> None:
    stage = StageConfig(dim=16, mixer="scaled_dot_product", head_dim=8, norm="layernorm")
    alpha = 2.0 if style == "deepnorm" else 1.0
    block = Block(stage, style, drop_path=0.0, alpha=alpha)
    x = torch.randn(2, 6, 16)
    out = block(x, (2, 3))
    assert out.shape == x.shape
    if style == "pre":  # pre-norm leaves the residual stream unnormalized
        manual = x + block.mixer(block.norm1(x), (2, 3))
        manual = manual + block.ffn(block.norm2(manual), (2, 3))
    else:  # post-norm and deepnorm normalize after each residual sum
        manual = block.norm1(alpha * x + block.mixer(x, (2, 3)))
        manual = block.norm2(alpha * manual + block.ffn(manual, (2, 3)))
    assert torch.allclose(out, manual, atol=1e-5)


def test_deepnorm_model_scales_its_init() -> None:
    stages = (StageConfig(dim=16, depth=2, mixer="scaled_dot_product", head_dim=8),)
    pre = create_model(ModelConfig(stages, image_size=16, num_classes=2))
    torch.manual_seed(0)
    deep = create_model(ModelConfig(stages, image_size=16, num_classes=2, residual_norm_style="deepnorm"))
    beta = (8.0 * 2) ** -0.25
    assert deep.trunk.stages[0].blocks[0].alpha == pytest.approx((2.0 * 2) ** 0.25)
    deep_std = deep.trunk.stages[0].blocks[0].ffn.fc1.weight.detach().std()
    ratio = float(deep_std / pre.trunk.stages[0].blocks[0].ffn.fc1.weight.detach().std())
    assert ratio == pytest.approx(beta, rel=0.15)


def test_drop_path_rate_rises_over_the_blocks() -> None:
    model = create_model("tiny", drop_path_rate=0.2)
    rates = [b.drop_path.p if isinstance(b.drop_path, DropPath) else 0.0 for s in model.trunk.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)


def test_layer_and_residual_scales_start_at_their_values() -> None:
    model = create_model("poolformerv2_s12")
    block = model.trunk.stages[2].blocks[0]
    assert torch.all(block.res_scale1.scale == 1.0)
    assert isinstance(model.trunk.stages[0].blocks[0].res_scale1, nn.Identity)
    v1 = create_model("poolformer_s12").trunk.stages[0].blocks[0]
    assert torch.all(v1.layer_scale1.scale == 1e-5)


def test_eval_mode_forward_is_deterministic_and_batch_independent() -> None:
    model = create_model("tiny", drop_path_rate=0.1).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(full[1:2], model(x[1:2]), atol=1e-5)
        assert torch.equal(full, model(x))
