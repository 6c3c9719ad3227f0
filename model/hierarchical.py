"""The hierarchical model, bottom up: block -> stage -> trunk -> classifier.

A stage starts with a patch embedding that shrinks the token grid and widens the tokens (every stage
but the first may leave it out and keep the grid), adds its position encoding if the config has one,
then runs identical blocks (norm, token mixer, feedforward, residuals). The trunk chains the stages
and returns the last stage's tokens through the final norm; the classifier pools them and applies
the head. Every module is built anew for every block (no module is shared between repeated layers),
from a frozen ``ModelConfig``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import ModelConfig, StageConfig
from .layers import (
    FEEDFORWARD_LAYERS,
    DropPath,
    Grid,
    MlpHead,
    PatchEmbedding,
    Scale,
    build_norm,
    build_position_encoding,
    grid_to_tokens,
)
from .mixers import Attention, build_mixer


def _scale_or_identity(dim: int, init_value: float | None) -> nn.Module:
    return Scale(dim, init_value) if init_value is not None else nn.Identity()


class Block(nn.Module):
    """norm + token mixer and norm + feedforward, each on a residual branch.

    ``pre``: x + branch(norm(x)); ``post``: norm(x + branch(x)); ``deepnorm``: norm(alpha * x + branch(x))
    with alpha = (2 * total_blocks) ** 0.25 (DeepNet). Optional per-channel scales on the branch
    (layer scale) and on the residual (residual scale), and stochastic depth on the branch.
    """

    def __init__(self, stage: StageConfig, residual_norm_style: str, drop_path: float, alpha: float = 1.0) -> None:
        super().__init__()
        self.style = residual_norm_style
        self.alpha = alpha
        self.norm1 = build_norm(stage.norm, stage.dim, stage.norm_eps)
        self.mixer = build_mixer(stage)
        self.layer_scale1 = _scale_or_identity(stage.dim, stage.layer_scale)
        self.res_scale1 = _scale_or_identity(stage.dim, stage.res_scale)
        self.norm2 = build_norm(stage.norm, stage.dim, stage.norm_eps)
        hidden = int(stage.mlp_ratio * stage.dim)
        self.ffn = FEEDFORWARD_LAYERS[stage.feedforward](
            stage.dim, hidden, stage.activation, bias=stage.mlp_bias, dropout=stage.dropout
        )
        self.layer_scale2 = _scale_or_identity(stage.dim, stage.layer_scale)
        self.res_scale2 = _scale_or_identity(stage.dim, stage.res_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _mix(self, x: Tensor, hw: Grid) -> Tensor:
        return self.layer_scale1(self.drop_path(self.mixer(x, hw)))

    def _feed(self, x: Tensor, hw: Grid) -> Tensor:
        return self.layer_scale2(self.drop_path(self.ffn(x, hw)))

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        if self.style == "pre":
            x = self.res_scale1(x) + self._mix(self.norm1(x), hw)
            return self.res_scale2(x) + self._feed(self.norm2(x), hw)
        residual = self.res_scale1(x)
        if self.alpha != 1.0:
            residual = residual * self.alpha
        x = self.norm1(residual + self._mix(x, hw))
        residual = self.res_scale2(x)
        if self.alpha != 1.0:
            residual = residual * self.alpha
        return self.norm2(residual + self._feed(x, hw))


class Stage(nn.Module):
    """Patch embedding (optional), position encoding (optional), then ``depth`` blocks."""

    def __init__(
        self,
        stage: StageConfig,
        in_dim: int,
        index: int,
        seq_len: int,
        config: ModelConfig,
        drop_paths: list[float],
        alpha: float,
    ) -> None:
        super().__init__()
        self.embed: PatchEmbedding | None = None
        if stage.patch_size is not None:
            norm_dim, norm_slot = (stage.dim, "post_norm") if index == 0 else (in_dim, "pre_norm")
            norm = build_norm(config.embed_norm, norm_dim, stage.norm_eps)
            self.embed = PatchEmbedding(
                in_dim, stage.dim, stage.patch_size, stage.stride, stage.padding, **{norm_slot: norm}
            )
        self.seq_len = seq_len if config.position_encoding == "learnable" else None
        self.pos = build_position_encoding(config.position_encoding, seq_len, stage.dim)
        self.blocks = nn.ModuleList(
            Block(stage, config.residual_norm_style, drop_paths[i], alpha) for i in range(stage.depth)
        )

    def forward(self, x: Tensor, hw: Grid) -> tuple[Tensor, Grid]:
        if self.embed is not None:
            x, hw = self.embed(x, hw)
        if self.seq_len is not None and x.shape[1] != self.seq_len:
            raise ValueError(
                f"this stage has a learnable position encoding for {self.seq_len} tokens but got "
                f"{x.shape[1]}; feed images of the size the model was built for"
            )
        x = self.pos(x)
        for block in self.blocks:
            x = block(x, hw)
        return x, hw


class Trunk(nn.Module):
    """All stages and the final token norm: images (B, C, H, W) -> tokens (B, N, C_last)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        total = config.depth
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        alpha = (2.0 * total) ** 0.25 if config.residual_norm_style == "deepnorm" else 1.0
        stages, in_dim, start = [], config.in_channels, 0
        for i, (stage, seq_len) in enumerate(zip(config.stages, config.seq_lens(), strict=True)):
            stages.append(Stage(stage, in_dim, i, seq_len, config, rates[start : start + stage.depth], alpha))
            in_dim, start = stage.dim, start + stage.depth
        self.stages = nn.ModuleList(stages)
        self.norm = build_norm(config.final_norm, config.width, config.stages[-1].norm_eps)

    def forward_grid(self, images: Tensor) -> tuple[Tensor, Grid]:
        """Tokens of the last stage (through the final norm) and their grid's (height, width)."""
        hw: Grid = (images.shape[2], images.shape[3])
        x = grid_to_tokens(images)  # (B, H*W, C_in): the stem reads it back as a grid
        for stage in self.stages:
            x, hw = stage(x, hw)
        return self.norm(x), hw

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_grid(images)[0]


class Classifier(nn.Module):
    """Trunk + head: images (B, C, H, W) float -> logits (B, num_classes).

    The head averages the trunk's tokens, normalizes them (``head.norm``), then projects with a linear
    layer or an MLP. With ``num_classes=0`` it returns the pooled, normalized features instead.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = Trunk(config)
        head = config.head
        self.head_norm = build_norm(head.norm, config.width, head.norm_eps)
        self.head_drop = nn.Dropout(head.dropout) if head.kind == "linear" else nn.Identity()
        self.head: nn.Module
        if config.num_classes == 0:
            self.head = nn.Identity()
        elif head.kind == "mlp":
            hidden = int(head.mlp_ratio * config.width)
            self.head = MlpHead(config.width, config.num_classes, hidden, head.activation, head.norm_eps, head.dropout)
        else:
            self.head = nn.Linear(config.width, config.num_classes)
        init_weights(self, config)

    def forward_features(self, images: Tensor) -> Tensor:
        """Pooled, normalized features (B, C_last), the head's input."""
        return self.head_norm(self.trunk(images).mean(dim=1))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.head_drop(self.forward_features(images)))

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for every linear and conv layer; norms and
    scales keep their constructors' values. DeepNorm stacks scale the value, output and feedforward
    projections down by beta = (8 * total_blocks) ** -0.25, as DeepNet prescribes."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if config.residual_norm_style != "deepnorm":
        return
    beta = (8.0 * config.depth) ** -0.25
    for m in module.modules():
        if isinstance(m, Block):
            for name, p in m.ffn.named_parameters():
                if name.endswith("weight"):
                    p.data.mul_(beta)
            if isinstance(m.mixer, Attention):
                inner = m.mixer.heads * m.mixer.head_dim
                m.mixer.qkv.weight.data[2 * inner :].mul_(beta)  # the value projection
                m.mixer.proj.weight.data.mul_(beta)
