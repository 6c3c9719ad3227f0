"""Token mixers: the part of a block that lets tokens exchange information.

Each mixer takes (B, N, C) tokens on a grid ``hw`` and returns tokens of the same shape.
``TOKEN_MIXER_LAYERS`` maps the names configs use (``model.config.TOKEN_MIXERS``) to the mixers; the
xformers attention names that have no mixer here are listed in ``model.xformers_compat``, so that they
get a clear "not supported" error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import StageConfig
from .layers import ACTIVATION_LAYERS, Grid, grid_to_tokens, tokens_to_grid


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) over the token index, applied to queries and keys."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q, k: (B, heads, N, head_dim)."""
        position = torch.arange(q.shape[-2], device=q.device, dtype=torch.float32)
        freqs = torch.outer(position, self.inv_freq)  # (N, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (N, head_dim)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, rotary: bool, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.rotary = RotaryEmbedding(head_dim) if rotary else None
        self.proj = nn.Linear(inner, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.drop(self.proj(x))


class Pooling(nn.Module):
    """PoolFormer's mixer: average pool (stride 1, padding not counted) minus the input."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        grid = tokens_to_grid(x, hw)
        return grid_to_tokens(self.pool(grid) - grid)


class Visual(nn.Module):
    """Large-kernel attention (VAN): depthwise 5x5, dilated depthwise 7x7, pointwise conv, then the
    result gates the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        grid = tokens_to_grid(x, hw)
        attn = self.conv1(self.conv_spatial(self.conv0(grid)))
        return grid_to_tokens(attn * grid)


class SepConv(nn.Module):
    """ConvFormer's mixer: pointwise expand, activation, depthwise conv, pointwise project (no biases)."""

    def __init__(self, dim: int, expansion_ratio: float, kernel_size: int, activation: str) -> None:
        super().__init__()
        hidden = int(expansion_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden, bias=False)
        self.act = ACTIVATION_LAYERS[activation]()
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False)
        self.pwconv2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        x = self.act(self.pwconv1(x))
        x = grid_to_tokens(self.dwconv(tokens_to_grid(x, hw)))
        return self.pwconv2(x)


class IdentityMixer(nn.Module):
    """No mixing at all (IdentityFormer): the block is then a per-token MLP with residuals."""

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        return x


# Config name (model.config.TOKEN_MIXERS) -> the mixer, built from the stage's settings.
TOKEN_MIXER_LAYERS: dict[str, Callable[[StageConfig], nn.Module]] = {
    "scaled_dot_product": lambda s: Attention(s.dim, s.heads, s.head_dim, s.attn_bias, s.rotary, s.dropout),
    "pooling": lambda s: Pooling(s.pool_size),
    "visual": lambda s: Visual(s.dim),
    "sepconv": lambda s: SepConv(s.dim, s.expansion_ratio, s.kernel_size, s.activation),
    "identity": lambda s: IdentityMixer(),
}


def build_mixer(stage: StageConfig) -> nn.Module:
    """The token mixer a stage config names."""
    if stage.mixer not in TOKEN_MIXER_LAYERS:
        raise ValueError(f"unknown token mixer {stage.mixer!r}")  # configs are validated before this point
    return TOKEN_MIXER_LAYERS[stage.mixer](stage)
