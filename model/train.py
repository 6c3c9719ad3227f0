"""Training: from a preset, a JSON config or a checkpoint to ``last`` and ``best`` checkpoints.

The recipe: AdamW (no weight decay on biases, norms, scales and other 1-d parameters, nor on position
embeddings), a linear warmup then cosine decay set every step, label smoothing, gradient clipping, light
augmentation (``model.data``), and autocast (bf16, or fp16 with a gradient scaler) on CUDA only. Its
numbers, in general and per preset, are in ``stageformer.core.recipes``.

Run under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) it trains with
DistributedDataParallel: gloo on CPU, nccl on CUDA, a ``DistributedSampler`` for training, and a
rank-strided shard of the validation set whose counts are summed over ranks. ``batch_size`` is per
process. Only rank 0 writes files and shows progress bars.

Files written to ``out``: ``last.safetensors`` and ``best.safetensors`` (checkpoints in the
``model.checkpoint`` format, carrying labels and preprocessing), ``last.state.safetensors`` (optimizer
state, step, epoch, best accuracy, RNG: what ``resume`` needs; no pickle), ``metrics.csv`` (a row per
epoch) and ``metrics.png`` (loss and accuracy curves, redrawn at most once a minute and at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from stageformer.core.preprocess import PreprocessConfig
from stageformer.core.recipes import DEFAULT_RECIPE, FINAL_LR_RATIO, RECIPES, Recipe

from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, read_metadata, save_checkpoint
from .config import ModelConfig, replace
from .data import Collate, DataError, DataSplits, EpochSampler, ImageDataset, load_data
from .factory import default_preprocess, resolve_config
from .hierarchical import Classifier

log = logging.getLogger(__name__)

STATE_FORMAT = "stageformer.train_state"
METRIC_FIELDS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "epoch_seconds",
    "images_per_second",
)
PLOT_EVERY_S = 60.0  # metrics.png is redrawn after an epoch at most this often (drawing takes ~0.5 s), and at the end


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """One training run. Recipe fields left at ``None`` take the saved run's values when resuming, else
    the preset's recipe, else the general one (``RECIPES`` and ``DEFAULT_RECIPE`` of
    ``stageformer.core.recipes``)."""

    data: str  # "digits", or a folder holding train/<class>/* and val/<class>/*
    out: Path  # output folder: checkpoints, training state, metrics.csv, metrics.png
    preset: str | None = None  # model preset name (see `stageformer presets`)
    config: Path | None = None  # or a model config JSON file
    init: Path | None = None  # fine-tune: start from this checkpoint's weights (new head if classes differ)
    resume: Path | None = None  # continue the run whose last.safetensors this is
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    clip_grad: float | None = None
    workers: int | None = None
    threads: int | None = None
    image_size: int | None = None  # override the model's (and preprocessing's) input size
    seed: int = 0  # model initialisation, data order and augmentation
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda" or "cuda:N"
    amp: str = "auto"  # CUDA autocast: "auto" (bf16 where supported, else fp16), "bf16", "fp16", "off"
    overwrite: bool = False  # allow starting a new run in a folder that already holds one
    verify_images: bool = True  # read every image header before training, to report bad files early
    progress: bool = True  # tqdm progress bars (rank 0 only)
    # Called on every rank after each epoch (files saved) with that epoch's metrics row; raising stops the run.
    on_epoch_end: Callable[[dict[str, float]], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("out", "config", "init", "resume"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.preset is not None and self.config is not None:
            raise ValueError("train: give either a preset or a config file, not both")
        if self.resume is not None and (self.preset or self.config or self.init):
            raise ValueError(
                "train: --resume continues a run as it was; do not combine it with --preset/--config/--init"
            )
        if self.resume is None and self.init is None and self.preset is None and self.config is None:
            raise ValueError("train: choose a model with --preset NAME or --config FILE.json (or --init/--resume CKPT)")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"train: image_size must be a positive integer, got {self.image_size}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"train: amp must be auto, bf16, fp16 or off, got {self.amp!r}")


@dataclass
class TrainResult:
    """What a run produced. Accuracies are fractions in [0, 1]."""

    out: Path
    epochs: int  # epochs completed, counting those before a resume
    best_accuracy: float
    best_epoch: int
    final_accuracy: float
    last_checkpoint: Path
    best_checkpoint: Path
    metrics: list[dict[str, float]] = field(default_factory=list)  # one row per epoch run now
    seconds: float = 0.0


def state_path(checkpoint: Path) -> Path:
    """The training state that goes with a checkpoint: ``last.safetensors`` -> ``last.state.safetensors``."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".state.safetensors")


# --- distributed -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_kind: str) -> Distributed:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("train: --device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise ValueError(f"train: device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def _all_reduce(values: list[float], dist_info: Distributed, device: torch.device) -> list[float]:
    if not dist_info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- schedule, optimizer, state file ---------------------------------------------------------------


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``peak * FINAL_LR_RATIO`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = peak * FINAL_LR_RATIO
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW; weights of linear and conv layers decay, everything 1-d (biases, norms, scales) and
    position embeddings do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or ".pos." in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999))


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_accuracy: float = -1.0
    best_epoch: int = 0
    recipe: dict[str, Any] = field(default_factory=dict)
    data: str = ""


def save_train_state(
    path: Path,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Optimizer tensors and the loop's counters in a safetensors file (atomic, no pickle)."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        "format": STATE_FORMAT,
        "state": json.dumps(dataclasses.asdict(state)),
        "param_groups": json.dumps(opt["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "scaler": json.dumps(scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_train_state(
    path: Path, optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None
) -> TrainState:
    """Read a state file. With ``optimizer`` given, restore its state and the torch RNG too; with
    ``scaler`` given (and enabled), restore its state."""
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} does not exist; --resume needs the last.safetensors of a run")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable training state ({exc})") from exc
    if metadata.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a stageformer training state (format={metadata.get('format')!r})")
    state = TrainState(**json.loads(metadata["state"]))
    if optimizer is not None:
        groups = json.loads(metadata["param_groups"])
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        entries: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                entries.setdefault(int(index), {})[name] = value
        for index, values in json.loads(metadata["optimizer_scalars"]).items():
            entries.setdefault(int(index), {}).update(values)
        try:
            optimizer.load_state_dict({"state": entries, "param_groups": groups})
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model ({exc})") from exc
        torch.set_rng_state(tensors["rng.torch"])
    scaler_state = json.loads(metadata.get("scaler", "{}"))
    if scaler is not None and scaler.is_enabled() and scaler_state:
        scaler.load_state_dict(scaler_state)
    return state


# --- model set-up --------------------------------------------------------------------------------


def resolve_recipe(options: TrainOptions, saved: dict[str, Any] | None) -> Recipe:
    """Explicit options, then the resumed run's values, then the preset's recipe, then the defaults."""
    base = RECIPES.get(options.preset or "", DEFAULT_RECIPE)
    values = dataclasses.asdict(base)
    if saved:
        values.update({k: v for k, v in saved.items() if k in values})
    for name in values:
        explicit = getattr(options, name)
        if explicit is not None:
            values[name] = explicit
    return Recipe(**values)


def _model_source(options: TrainOptions) -> tuple[ModelConfig, PreprocessConfig]:
    """Config and preprocessing of the model to train, before the head is sized to the data."""
    if options.resume is not None:
        metadata = read_metadata(options.resume)
        config = ModelConfig.from_json(metadata["config"])
        preprocess = PreprocessConfig.from_json(metadata["preprocess"])
        if options.image_size is not None and options.image_size != config.image_size:
            raise ValueError(f"train: cannot change image_size on resume (the run uses {config.image_size})")
        return config, preprocess
    if options.preset is not None or options.config is not None:
        source: str | Path = options.preset if options.preset is not None else options.config  # type: ignore[assignment]
        config, preprocess = resolve_config(source), default_preprocess(source)
    else:
        assert options.init is not None
        metadata = read_metadata(options.init)
        config = ModelConfig.from_json(metadata["config"])
        preprocess = PreprocessConfig.from_json(metadata["preprocess"])
    if options.image_size is not None:
        config = replace(config, image_size=options.image_size)
        preprocess = dataclasses.replace(preprocess, image_size=options.image_size)
    return config, preprocess


def load_init_weights(model: Classifier, path: Path) -> None:
    """Load a checkpoint's weights for fine-tuning. When its head does not fit (another number of
    classes, another head kind) the model keeps its freshly initialised head; every other tensor must
    match by name and shape."""
    read_metadata(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    own = model.state_dict()
    own_head = {k for k in own if k.startswith("head.")}
    their_head = {k for k in tensors if k.startswith("head.")}
    head_fits = own_head == their_head and all(tensors[k].shape == own[k].shape for k in own_head)
    if not head_fits:
        log.info(
            "%s: replacing its head (%d tensors) with a new one for %d classes",
            path,
            len(their_head),
            model.num_classes,
        )
        tensors = {k: v for k, v in tensors.items() if k not in their_head}
        tensors.update({k: own[k] for k in own_head})
    check_state_dict(model, tensors, str(path))
    model.load_state_dict(tensors, strict=True)


def _check_out_dir(options: TrainOptions) -> None:
    last = options.out / "last.safetensors"
    if options.resume is None and last.exists() and not options.overwrite:
        raise ValueError(
            f"train: {options.out} already holds a run ({last}); continue it with --resume {last}, "
            "start over with --overwrite, or choose another --out"
        )


# --- metrics ------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (int(row[k]) if k in ("epoch", "step") else f"{row[k]:.6g}") for k in METRIC_FIELDS})
    os.replace(tmp, path)


def plot_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    """Loss and accuracy curves per epoch as a PNG (matplotlib's Agg canvas; no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed, so no %s; pip install 'stageformer[train]'", path.name)
        return
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train (smoothed labels)")
    loss_ax.plot(epochs, [r["val_loss"] for r in rows], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.plot(epochs, [100 * r["train_accuracy"] for r in rows], label="train (augmented)")
    acc_ax.plot(epochs, [100 * r["val_accuracy"] for r in rows], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


# --- the loop ------------------------------------------------------------------------------------------


def _autocast(device: torch.device, amp: str) -> tuple[Any, torch.amp.GradScaler | None]:
    """An autocast context factory and, for fp16, a gradient scaler. CPU runs in float32."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext, None
    dtype = torch.float16 if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    log.info("mixed precision: %s autocast", "fp16" if dtype == torch.float16 else "bf16")
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


class _Shard(torch.utils.data.Sampler[int]):
    """Every ``world``-th index from ``rank``: a validation shard without the padding of DistributedSampler."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, size, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(
    splits: DataSplits, preprocess: PreprocessConfig, recipe: Recipe, seed: int, dist_info: Distributed, pin: bool
) -> tuple[EpochSampler, DataLoader[Any], DataLoader[Any]]:
    """The training loader (shuffled per epoch, sharded over ranks, augmented) with its sampler, and the
    validation loader (this rank's shard, preprocessed exactly as the server does). Workers persist
    across epochs; the sampler tells them the epoch."""
    collate = Collate(preprocess)
    train_set = ImageDataset(splits.train, preprocess, splits.augment, seed=seed)
    val_set = ImageDataset(splits.val, preprocess)
    shuffled: DistributedSampler[Any] = DistributedSampler(
        train_set, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed
    )
    sampler = EpochSampler(shuffled)
    common: dict[str, Any] = {
        "num_workers": recipe.workers,
        "collate_fn": collate,
        "pin_memory": pin,
        "persistent_workers": recipe.workers > 0,
    }
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, sampler=sampler, **common)
    val_sampler = _Shard(len(val_set), dist_info.rank, dist_info.world_size)
    val_loader = DataLoader(val_set, batch_size=recipe.batch_size * 2, sampler=val_sampler, **common)
    return sampler, train_loader, val_loader


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader[Any], device: torch.device, autocast: Any, dist_info: Distributed
) -> tuple[float, float]:
    """Validation loss and accuracy over all ranks' shards."""
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += labels.numel()
    loss_sum, correct, count = _all_reduce([loss_sum, correct, count], dist_info, device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _shortened(exc: DataError) -> DataError:
    """A ``DataError`` from a loader worker process with its own message only (it names the file),
    without the worker's traceback that PyTorch folds into the message."""
    text = str(exc)
    if "DataLoader worker" not in text:
        return exc
    return DataError(text.strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: "))


# --- one run, step by step ---------------------------------------------------------------------------


@dataclass
class _Run:
    """What the steps of one run share. ``_start_run`` builds it; each epoch advances ``state``, appends
    to the metric rows and sets ``val_accuracy``."""

    options: TrainOptions
    dist_info: Distributed
    device: torch.device
    preprocess: PreprocessConfig
    splits: DataSplits
    recipe: Recipe
    model: Classifier
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None  # fp16 autocast only
    autocast: Any  # a context manager factory: torch.autocast, or nullcontext without mixed precision
    sampler: EpochSampler
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    criterion: nn.CrossEntropyLoss
    state: TrainState
    net: nn.Module  # what the steps run: the model, or its DistributedDataParallel wrapper
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0: every epoch's row, for metrics.csv
    this_run: list[dict[str, float]] = field(default_factory=list)  # rows of the epochs trained by this call
    val_accuracy: float = -1.0  # of the latest epoch (before any: the best so far)
    plotted: float = -math.inf  # time.perf_counter() when metrics.png was last drawn

    @property
    def main(self) -> bool:
        return self.dist_info.is_main

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def total_steps(self) -> int:
        return self.recipe.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.recipe.warmup_epochs * self.steps_per_epoch)


def run_training(options: TrainOptions) -> TrainResult:
    """Train as ``options`` say; see the module docstring for what is written where."""
    started = time.perf_counter()
    dist_info = setup_distributed(_device_kind(options.device))
    previous_threads = torch.get_num_threads()
    try:
        run = _start_run(options, dist_info)
        for epoch in range(run.state.epoch, run.recipe.epochs):
            row = _run_epoch(run, epoch)
            if options.on_epoch_end is not None:
                options.on_epoch_end(row)
        return _finish(run, started)
    except DataError as exc:
        raise _shortened(exc) from exc.__cause__
    finally:
        torch.set_num_threads(previous_threads)
        if dist_info.owns_group:
            dist.destroy_process_group()


def _device_kind(device: str) -> str:
    """ "cuda" or "cpu": what ``--device`` will resolve to, known before the process group (whose backend
    depends on it) is joined."""
    return "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"


def _start_run(options: TrainOptions, dist_info: Distributed) -> _Run:
    """Everything before the first epoch: device, model, recipe, data, optimizer, the resumed state, DDP,
    and on rank 0 the output folder and a log line describing the run."""
    device = resolve_device(options.device, dist_info.local_rank)
    if dist_info.is_main:
        _check_out_dir(options)
    config, preprocess = _model_source(options)
    splits = load_data(
        options.data, preprocess, options.verify_images, show_progress=options.progress and dist_info.is_main
    )
    model, saved = _initial_model(options, config, splits)
    recipe = resolve_recipe(options, saved.recipe if saved is not None else None)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    model.to(device)
    run = _build_run(options, dist_info, device, preprocess, splits, recipe, model)
    if options.resume is not None:
        _restore(run, options.resume)
    if dist_info.enabled:
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if run.main:
        _open_output(run)
    return run


def _initial_model(
    options: TrainOptions, config: ModelConfig, splits: DataSplits
) -> tuple[Classifier, TrainState | None]:
    """The model before training, and the saved training state when resuming. Resumed: the checkpoint's
    model, after checking that the data has its classes and that checkpoint and state are of the same
    epoch. New: built from ``config`` with a head for the data's classes after seeding torch, then
    loaded with the ``--init`` weights if given."""
    if options.resume is None:
        torch.manual_seed(options.seed)
        model = Classifier(replace(config, num_classes=len(splits.labels)))
        if options.init is not None:
            load_init_weights(model, options.init)
        return model, None
    checkpoint = load_checkpoint(options.resume)
    if checkpoint.labels != splits.labels:
        raise ValueError(
            f"train: {options.resume} was trained on classes {checkpoint.labels}, but {options.data} has "
            f"{splits.labels}; resume with the same data, or fine-tune with --init"
        )
    saved = load_train_state(state_path(options.resume))
    if str(saved.epoch) != checkpoint.metadata.get("epoch"):
        raise CheckpointError(
            f"{options.resume} (epoch {checkpoint.metadata.get('epoch')}) and its training state "
            f"(epoch {saved.epoch}) disagree; the run was interrupted while saving"
        )
    return checkpoint.model, saved


def _build_run(
    options: TrainOptions,
    dist_info: Distributed,
    device: torch.device,
    preprocess: PreprocessConfig,
    splits: DataSplits,
    recipe: Recipe,
    model: Classifier,
) -> _Run:
    """Data loaders, autocast, optimizer, loss and a fresh training state around ``model``."""
    sampler, train_loader, val_loader = build_loaders(
        splits, preprocess, recipe, options.seed, dist_info, pin=device.type == "cuda"
    )
    autocast, scaler = _autocast(device, options.amp)
    return _Run(
        options=options,
        dist_info=dist_info,
        device=device,
        preprocess=preprocess,
        splits=splits,
        recipe=recipe,
        model=model,
        optimizer=build_optimizer(model, recipe),
        scaler=scaler,
        autocast=autocast,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
        state=TrainState(recipe=dataclasses.asdict(recipe), data=splits.name),
        net=model,
    )


def _restore(run: _Run, checkpoint: Path) -> None:
    """Continue where the run of ``checkpoint`` stopped: its optimizer, scaler and RNG state, step, epoch
    and best accuracy. The recipe recorded from now on is this run's (explicit options may change it)."""
    resumed = load_train_state(state_path(checkpoint), run.optimizer, run.scaler)
    run.state = dataclasses.replace(resumed, recipe=dataclasses.asdict(run.recipe))
    run.val_accuracy = run.state.best_accuracy
    if run.main:
        log.info("resuming %s after epoch %d (step %d)", checkpoint, run.state.epoch, run.state.step)


def _open_output(run: _Run) -> None:
    """Rank 0: create the output folder, take over the metrics of the epochs already done (when resuming),
    and log what is about to be trained."""
    options, recipe, splits = run.options, run.recipe, run.splits
    options.out.mkdir(parents=True, exist_ok=True)
    previous = read_metrics(options.out / "metrics.csv") if options.resume is not None else []
    run.history = [r for r in previous if r["epoch"] <= run.state.epoch]
    params = sum(p.numel() for p in run.model.parameters())
    size = run.model.config.image_size
    log.info(
        "training %s (%s parameters, %dx%d input) on %s: %d classes, %d train / %d val images, "
        "%d epochs x %d steps, batch %d x %d process(es), lr %g, device %s",
        options.preset or options.config or options.init or options.resume, f"{params:,}", size, size,
        splits.name, len(splits.labels), len(splits.train), len(splits.val), recipe.epochs, run.steps_per_epoch,
        recipe.batch_size, run.dist_info.world_size, recipe.lr, run.device,
    )  # fmt: skip
    if run.state.epoch >= recipe.epochs:
        log.warning("the run already has %d of %d epochs; nothing to train", run.state.epoch, recipe.epochs)


def _run_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """Train epoch ``epoch`` (counted from 0), evaluate, keep the best accuracy and, on rank 0, save the
    epoch's files. Returns the epoch's metrics row."""
    started = time.perf_counter()
    trained = _train_epoch(run, epoch, started)
    val_loss, run.val_accuracy = evaluate(run.model, run.val_loader, run.device, run.autocast, run.dist_info)
    run.state.epoch = epoch + 1
    row = {
        "epoch": float(run.state.epoch),
        "step": float(run.state.step),
        "lr": trained["lr"],
        "train_loss": trained["train_loss"],
        "train_accuracy": trained["train_accuracy"],
        "val_loss": val_loss,
        "val_accuracy": run.val_accuracy,
        "epoch_seconds": time.perf_counter() - started,
        "images_per_second": trained["images_per_second"],
    }
    run.this_run.append(row)
    improved = run.val_accuracy > run.state.best_accuracy
    if improved:
        run.state.best_accuracy, run.state.best_epoch = run.val_accuracy, run.state.epoch
    if run.main:
        _save_epoch(run, row, improved)
    return row


def _train_epoch(run: _Run, epoch: int, started: float) -> dict[str, float]:
    """One pass over this rank's share of the training set, with a progress bar on rank 0. Returns the
    last step's learning rate, the mean loss and accuracy over all ranks and their images per second."""
    from tqdm.auto import tqdm

    run.sampler.set_epoch(epoch)
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = 0
    show = run.options.progress and run.main
    bar = tqdm(
        run.train_loader,
        desc=f"epoch {epoch + 1}/{run.recipe.epochs}",
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not show,
    )
    lr = run.recipe.lr
    for index, (images, labels) in enumerate(bar):
        lr = learning_rate(run.state.step, run.total_steps, run.warmup_steps, run.recipe.lr)
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        loss, logits = _step(run, images, labels, lr)
        n = labels.numel()
        seen += n
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        if show and (index % 10 == 0 or index + 1 == run.steps_per_epoch):  # .item() waits for the GPU
            rate = seen * run.dist_info.world_size / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.1%}", img_s=f"{rate:.0f}"
            )
    bar.close()
    seconds = time.perf_counter() - started
    total_loss, total_correct, total_seen = _all_reduce(
        [loss_sum.item(), float(correct.item()), float(seen)], run.dist_info, run.device
    )
    return {
        "lr": lr,
        "train_loss": total_loss / max(total_seen, 1),
        "train_accuracy": total_correct / max(total_seen, 1),
        "images_per_second": total_seen / max(seconds, 1e-9),
    }


def _step(run: _Run, images: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at learning rate ``lr``: forward under autocast, backward (scaled for fp16),
    gradient clipping, update. Returns the batch's loss and logits."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with run.autocast():
        logits = run.net(images)
        loss = run.criterion(logits.float(), labels)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.recipe.clip_grad > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.recipe.clip_grad)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.state.step += 1
    return loss, logits


def _save_epoch(run: _Run, row: dict[str, float], improved: bool) -> None:
    """Rank 0, after an epoch: ``last`` checkpoint and training state, ``best`` when the accuracy
    improved, metrics.csv, metrics.png (at most every ``PLOT_EVERY_S`` and after the last epoch), and a
    log line."""
    out, state, splits = run.options.out, run.state, run.splits
    run.history.append(row)
    extra = {"epoch": str(state.epoch), "val_accuracy": f"{run.val_accuracy:.6f}", "train_data": splits.name}
    last = save_checkpoint(run.model, out / "last.safetensors", run.preprocess, splits.labels, extra=extra)
    save_train_state(state_path(last), state, run.optimizer, run.scaler)
    if improved:
        save_checkpoint(run.model, out / "best.safetensors", run.preprocess, splits.labels, extra=extra)
    write_metrics(out / "metrics.csv", run.history)
    if state.epoch == run.recipe.epochs or time.perf_counter() - run.plotted > PLOT_EVERY_S:
        plot_metrics(out / "metrics.png", run.history)
        run.plotted = time.perf_counter()
    log.info(
        "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  best %.2f%% (epoch %d)  "
        "%.1f s, %.0f img/s",
        state.epoch, run.recipe.epochs, row["train_loss"], 100 * row["train_accuracy"], row["val_loss"],
        100 * row["val_accuracy"], 100 * state.best_accuracy, state.best_epoch, row["epoch_seconds"],
        row["images_per_second"],
    )  # fmt: skip


def _finish(run: _Run, started: float) -> TrainResult:
    """Wait for every rank, log the outcome on rank 0, and describe what the run produced."""
    if run.dist_info.enabled:
        dist.barrier()
    seconds = time.perf_counter() - started
    out, state = run.options.out, run.state
    if run.main:
        log.info(
            "done in %.1f s: best validation accuracy %.2f%% at epoch %d; checkpoints in %s",
            seconds, 100 * state.best_accuracy, state.best_epoch, out,
        )  # fmt: skip
    return TrainResult(
        out=out,
        epochs=state.epoch,
        best_accuracy=state.best_accuracy,
        best_epoch=state.best_epoch,
        final_accuracy=run.val_accuracy,
        last_checkpoint=out / "last.safetensors",
        best_checkpoint=out / "best.safetensors",
        metrics=run.this_run,
        seconds=seconds,
    )


# --- command line -----------------------------------------------------------------------------------------


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """``TrainOptions`` from the namespace that ``stageformer.train_args.add_arguments`` declares."""
    names = {f.name for f in dataclasses.fields(TrainOptions)} - {"on_epoch_end"}
    return TrainOptions(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    """``stageformer train``: train, log a summary, return the exit status."""
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one log, from rank 0
    result = run_training(options_from_args(args))
    log.info("best checkpoint: %s (%.2f%%)", result.best_checkpoint, 100 * result.best_accuracy)
    return 0
