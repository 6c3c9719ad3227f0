"""The checkpoint file: one ``.safetensors`` file holding the weights and, in its string metadata,
everything needed to rebuild and use the model (config, preprocessing, labels).

Loading never unpickles anything: safetensors stores raw tensors and a JSON header only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stageformer.core import __version__
from stageformer.core.formats import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINT_REQUIRED_KEYS,
    CONFIG_KEY,
    FORMAT_KEY,
    FORMAT_VERSION_KEY,
    LABELS_KEY,
    PREPROCESS_KEY,
    VERSION_KEY,
)
from stageformer.core.preprocess import PreprocessConfig

from .config import ConfigError, ModelConfig
from .hierarchical import Classifier


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and what travels with it."""

    model: Classifier
    preprocess: PreprocessConfig
    labels: list[str]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def default_labels(num_classes: int) -> list[str]:
    """Numbered labels "0", "1", ... for a model whose classes have no names."""
    return [str(i) for i in range(num_classes)]


def save_checkpoint(
    model: Classifier,
    path: str | os.PathLike[str],
    preprocess: PreprocessConfig,
    labels: Sequence[str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model``'s weights with its config, ``preprocess`` and ``labels`` (numbered when omitted).

    ``extra`` adds string metadata (e.g. where the weights came from). The file appears atomically:
    a crash mid-write leaves no half-written checkpoint under ``path``.
    """
    config = model.config
    labels = list(labels) if labels is not None else default_labels(config.num_classes)
    if len(labels) != config.num_classes:
        raise CheckpointError(f"{len(labels)} labels given for a model with {config.num_classes} classes")
    if not all(isinstance(label, str) for label in labels):
        raise CheckpointError("labels must be strings")
    if preprocess.image_size != config.image_size:
        raise CheckpointError(
            f"preprocess.image_size {preprocess.image_size} differs from the model's image_size {config.image_size}"
        )
    metadata = {
        **(dict(extra) if extra else {}),
        FORMAT_KEY: CHECKPOINT_FORMAT,
        FORMAT_VERSION_KEY: str(CHECKPOINT_FORMAT_VERSION),
        CONFIG_KEY: config.to_json(),
        PREPROCESS_KEY: preprocess.to_json(),
        LABELS_KEY: json.dumps(labels),
        VERSION_KEY: __version__,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    # safetensors creates files with mode 600; give the checkpoint the mode any new file gets (644 under the
    # usual umask), so that other users, e.g. a container's non-root server, can read it.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return path


def _umask() -> int:
    """The process's umask: read from /proc on Linux, elsewhere by setting it and putting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The checkpoint's string metadata, checked for format and version, without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({exc}); give a stageformer checkpoint") from exc
    if metadata.get(FORMAT_KEY) != CHECKPOINT_FORMAT:
        hint = "; convert timm weights with `stageformer import-timm`" if FORMAT_KEY not in metadata else ""
        raise CheckpointError(f"{path} is not a stageformer checkpoint (format={metadata.get(FORMAT_KEY)!r}){hint}")
    missing = [k for k in CHECKPOINT_REQUIRED_KEYS if k not in metadata]
    if missing:
        raise CheckpointError(f"{path} lacks metadata {', '.join(missing)}; re-save it with save_checkpoint")
    if int(metadata[FORMAT_VERSION_KEY]) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {metadata[FORMAT_VERSION_KEY]}, newer than this stageformer reads "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade stageformer"
        )
    return metadata


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the checkpoint's config and load its weights, checking every name and
    shape. The model is returned in eval mode on ``device``."""
    metadata = read_metadata(path)
    try:
        config = ModelConfig.from_json(metadata[CONFIG_KEY])
        preprocess = PreprocessConfig.from_json(metadata[PREPROCESS_KEY])
        labels = json.loads(metadata[LABELS_KEY])
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid metadata: {exc}") from exc
    if not isinstance(labels, list) or len(labels) != config.num_classes:
        raise CheckpointError(f"{path}: labels must be a list of {config.num_classes} strings")
    model = Classifier(config)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    check_state_dict(model, tensors, str(path))
    model.load_state_dict(tensors, strict=True)
    return Checkpoint(model.to(device).eval(), preprocess, [str(x) for x in labels], metadata)


def check_state_dict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a ``CheckpointError`` naming the first missing, unexpected or mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} {tuple(tensors[k].shape)} != {expected[k]}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    problems = describe_mismatch(missing, unexpected, wrong)
    if problems:
        raise CheckpointError(f"{source} does not fit the model its config describes: {problems}")


def describe_mismatch(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """One line naming the first few missing, unexpected and mis-shaped tensors; empty when all fit."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:5])}")
    return " / ".join(problems)
