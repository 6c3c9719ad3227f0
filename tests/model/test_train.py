"""Training: the loop, resume, fine-tuning, DDP under torchrun, data errors, and train/serve parity."""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from model import create_model, load_checkpoint, read_metadata
from model.config import ModelConfig, StageConfig
from model.data import (
    Collate,
    DataError,
    DigitAugment,
    FolderSource,
    ImageDataset,
    PhotoAugment,
    load_data,
    render_digit,
    scan_image_folder,
)
from model.train import (
    Distributed,
    TrainOptions,
    build_loaders,
    learning_rate,
    load_init_weights,
    options_from_args,
    run_training,
    state_path,
)
from stageformer.core import recipes
from stageformer.core.preprocess import PreprocessConfig, normalize, preprocess, stack
from stageformer.core.recipes import Recipe
from stageformer.local import free_port
from stageformer.train_args import add_arguments

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def small_config(tmp_path: Path, num_classes: int = 3) -> Path:
    """A two-stage model at 16x16 that trains in well under a second per epoch."""
    config = ModelConfig(
        (
            StageConfig(dim=16, depth=1, mixer="pooling", patch_size=4, stride=4, padding=0),
            StageConfig(dim=24, depth=1, mixer="scaled_dot_product", head_dim=8),
        ),
        image_size=16,
        num_classes=num_classes,
    )
    path = tmp_path / "small.json"
    path.write_text(config.to_json())
    return path


def make_folder(root: Path, classes: dict[str, tuple[int, int, int]] = COLOURS, train: int = 8, val: int = 3) -> Path:
    """Noisy images tinted by class, of varied sizes and modes (RGB, grayscale, RGBA, PNG and JPEG)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for name, colour in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 20 + 3 * i, 24 + 2 * (i % 3)
                pixels = np.clip(np.asarray(colour) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i % 3 == 1:
                    image.convert("RGBA").save(folder / f"{i}.png")
                elif i % 5 == 4:
                    image.convert("L").save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.jpg", quality=90)
    return root


def options(tmp_path: Path, data: Path, out: str = "out", **overrides: object) -> TrainOptions:
    values: dict[str, object] = {
        "data": str(data),
        "out": tmp_path / out,
        "config": small_config(tmp_path),
        "epochs": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_epochs": 1,
        "workers": 0,
        "threads": 1,
        "device": "cpu",
        "progress": False,
    }
    values.update(overrides)
    return TrainOptions(**values)  # type: ignore[arg-type]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"))


# --- the loop -------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_its_files(tmp_path: Path, folder: Path) -> None:
    result = run_training(options(tmp_path, folder, epochs=4))
    losses = [row["train_loss"] for row in result.metrics]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8, losses
    assert result.epochs == 4 and 0 < result.best_epoch <= 4
    out = tmp_path / "out"
    for name in ("last.safetensors", "best.safetensors", "last.state.safetensors", "metrics.csv", "metrics.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp*"))
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,lr,train_loss") and len(lines) == 5
    with Image.open(out / "metrics.png") as plot:
        assert plot.format == "PNG"
    checkpoint = load_checkpoint(out / "best.safetensors")
    assert checkpoint.labels == ["blue", "green", "red"]
    assert checkpoint.preprocess.image_size == 16 and checkpoint.config.num_classes == 3
    assert float(checkpoint.metadata["val_accuracy"]) == pytest.approx(result.best_accuracy, abs=1e-6)
    assert result.best_accuracy > 0.5  # three colours are easy


def test_a_second_run_into_the_same_folder_needs_overwrite(tmp_path: Path, folder: Path) -> None:
    run_training(options(tmp_path, folder, epochs=1))
    with pytest.raises(ValueError, match=r"already holds a run.*--resume.*--overwrite"):
        run_training(options(tmp_path, folder, epochs=1))
    run_training(options(tmp_path, folder, epochs=1, overwrite=True))


def test_learning_rate_warms_up_then_decays() -> None:
    lrs = [learning_rate(step, total_steps=100, warmup_steps=10, peak=1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


# --- resume and fine-tuning ----------------------------------------------------------------------------


class StopRunError(Exception):
    """Stands for a crash or Ctrl-C in the middle of a run."""


def test_resume_continues_where_the_run_stopped(tmp_path: Path, folder: Path) -> None:
    whole = run_training(options(tmp_path, folder, out="whole", epochs=3))

    def stop_after_two(row: dict[str, float]) -> None:
        if row["epoch"] == 2:
            raise StopRunError

    with pytest.raises(StopRunError):
        run_training(options(tmp_path, folder, out="cut", epochs=3, on_epoch_end=stop_after_two))
    last = tmp_path / "cut" / "last.safetensors"
    assert read_metadata(last)["epoch"] == "2"
    # Only the data and the output folder are given again: the recipe comes from the saved state.
    resumed = run_training(
        TrainOptions(data=str(folder), out=tmp_path / "cut", resume=last, device="cpu", workers=0, progress=False)
    )
    assert [row["epoch"] for row in resumed.metrics] == [3.0]
    assert resumed.epochs == 3
    assert resumed.metrics[0]["step"] == whole.metrics[-1]["step"]
    assert resumed.metrics[0]["train_loss"] == pytest.approx(whole.metrics[-1]["train_loss"], rel=1e-4)
    assert resumed.best_accuracy == pytest.approx(whole.best_accuracy)
    a, b = read_tensors(tmp_path / "whole" / "last.safetensors"), read_tensors(last)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    sa, sb = read_tensors(state_path(tmp_path / "whole" / "last.safetensors")), read_tensors(state_path(last))
    assert sa.keys() == sb.keys() and any(k.endswith("exp_avg_sq") for k in sa)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-6)
    rows = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_resume_without_the_state_file_says_what_is_missing(tmp_path: Path, folder: Path) -> None:
    run_training(options(tmp_path, folder, epochs=1))
    last = tmp_path / "out" / "last.safetensors"
    state_path(last).unlink()
    with pytest.raises(FileNotFoundError, match=r"last\.state\.safetensors"):
        run_training(TrainOptions(data=str(folder), out=tmp_path / "out", resume=last, progress=False))


def test_init_replaces_the_head_when_the_classes_differ(tmp_path: Path, folder: Path) -> None:
    run_training(options(tmp_path, folder, out="three", epochs=1))
    source = tmp_path / "three" / "best.safetensors"
    before = read_tensors(source)

    model = create_model(small_config(tmp_path), num_classes=2)
    fresh_head = model.head.weight.detach().clone()  # type: ignore[union-attr]
    load_init_weights(model, source)
    state = model.state_dict()
    assert tuple(state["head.weight"].shape) == (2, 24)
    torch.testing.assert_close(state["head.weight"], fresh_head)
    for key, value in before.items():
        if not key.startswith("head."):
            torch.testing.assert_close(state[key], value)

    same = create_model(small_config(tmp_path), num_classes=3)
    load_init_weights(same, source)
    torch.testing.assert_close(same.state_dict()["head.weight"], before["head.weight"])

    two = make_folder(tmp_path / "two", {"blue": COLOURS["blue"], "red": COLOURS["red"]}, train=4, val=2)
    result = run_training(
        TrainOptions(data=str(two), out=tmp_path / "tuned", init=source, epochs=1, batch_size=4, progress=False)
    )
    tuned = load_checkpoint(result.last_checkpoint)
    assert tuned.labels == ["blue", "red"] and tuned.config.num_classes == 2
    assert tuned.config.stages == load_checkpoint(source).config.stages


# --- DDP, for real: torchrun, two processes, gloo ------------------------------------------------------------


def test_distributed_training_with_torchrun(tmp_path: Path, folder: Path) -> None:
    port = free_port()  # for the rendezvous
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "stageformer", "train", "--config", str(small_config(tmp_path)), "--data", str(folder),
        "--out", str(out), "--epochs", "2", "--batch-size", "4", "--workers", "0", "--threads", "1",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count("batch 4 x 2 process(es)") == 1  # rank 0 logs, rank 1 stays quiet
    assert done.stderr.count("epoch 2/2") == 1
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    # 24 training images, 2 ranks x batch 4: 3 steps per epoch on each rank.
    assert rows[-1].split(",")[1] == "6"
    assert load_checkpoint(out / "last.safetensors").labels == ["blue", "green", "red"]
    assert not list(out.glob("*.tmp*"))


# --- data errors ---------------------------------------------------------------------------------------------


def test_missing_split_is_named(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", train=1, val=1)
    (tmp_path / "d" / "val").rename(tmp_path / "d" / "validation")
    with pytest.raises(DataError, match=r"has no val/ folder; expected .*/val/<class>/<image>"):
        scan_image_folder(tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")


def test_class_mismatch_is_spelled_out(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", train=1, val=1)
    (tmp_path / "d" / "val" / "red").rename(tmp_path / "d" / "val" / "rouge")
    with pytest.raises(DataError, match=r"only in train: \['red'\]; only in val: \['rouge'\]"):
        scan_image_folder(tmp_path / "d")


def test_empty_class_and_no_classes(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", train=1, val=1)
    for f in (tmp_path / "d" / "train" / "green").iterdir():
        f.unlink()
    (tmp_path / "d" / "train" / "green" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*train/green has no images"):
        scan_image_folder(tmp_path / "d")
    (tmp_path / "e" / "train").mkdir(parents=True)
    (tmp_path / "e" / "val").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        scan_image_folder(tmp_path / "e")


def test_corrupt_image_is_reported_with_its_path(tmp_path: Path, folder: Path) -> None:
    make_folder(tmp_path / "d", train=2, val=1)
    bad = tmp_path / "d" / "train" / "red" / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(DataError, match=r"(?s)1 file\(s\) are not readable images.*broken\.jpg"):
        scan_image_folder(tmp_path / "d")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        run_training(options(tmp_path, tmp_path / "d", epochs=1))


def test_truncated_image_fails_with_its_path_when_read(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", train=2, val=1)
    victim = tmp_path / "d" / "train" / "blue" / "0.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])  # the header parses, the pixels do not
    train, _, _ = scan_image_folder(tmp_path / "d")  # passes: only headers are read up front
    with pytest.raises(DataError, match=r"cannot read image .*blue/0\.jpg"):
        FolderSource(train).image(0)
    with pytest.raises(DataError, match=r"blue/0\.jpg"):
        run_training(options(tmp_path, tmp_path / "d", epochs=1, verify_images=False))


# --- train/serve parity --------------------------------------------------------------------------------------


def test_evaluation_batch_equals_the_servers_preprocessing(tmp_path: Path, folder: Path) -> None:
    config = PreprocessConfig(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.875, "bicubic")
    splits = load_data(str(folder), config)
    recipe = Recipe(batch_size=4, workers=0)
    _, _, val_loader = build_loaders(splits, config, recipe, seed=0, dist_info=Distributed(), pin=False)
    images = torch.cat([x for x, _ in val_loader]).numpy()
    paths = [s.path for s in splits.val.samples]  # type: ignore[attr-defined]
    served = []
    for path in paths:  # what the server does with an uploaded file: decode bytes, preprocess, normalize
        served.append(preprocess(Image.open(io.BytesIO(path.read_bytes())), config))
    expected = normalize(stack(served), config)
    assert images.dtype == np.float32 and images.shape == (9, 3, 16, 16)
    assert np.array_equal(images, expected)


def test_training_batches_have_the_served_value_range(folder: Path) -> None:
    config = PreprocessConfig(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
    splits = load_data(str(folder), config)
    dataset = ImageDataset(splits.train, config, splits.augment, seed=3)
    pixels, _ = dataset[5]
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
    again, _ = dataset[5]
    assert np.array_equal(pixels, again)  # augmentation depends on (seed, epoch, index) only
    dataset.epoch = 1
    assert not np.array_equal(pixels, dataset[5][0])
    x, y = Collate(config)([dataset[i] for i in range(4)])
    assert torch.equal(x, torch.from_numpy(normalize(stack([dataset[i][0] for i in range(4)]), config)))
    assert y.tolist() == [splits.train.label(i) for i in range(4)]
    photo = PhotoAugment(config)(Image.new("L", (40, 30), 128), np.random.default_rng(0))
    assert photo.dtype == np.uint8 and photo.shape == (16, 16, 3)


def test_augmented_epochs_are_the_same_with_persistent_workers(folder: Path) -> None:
    config = PreprocessConfig(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
    splits = load_data(str(folder), config)
    epochs = {}
    for workers in (0, 1):
        sampler, loader, _ = build_loaders(
            splits, config, Recipe(batch_size=8, workers=workers), 7, Distributed(), False
        )
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs[workers, epoch] = torch.cat([x for x, _ in loader])
    assert torch.equal(epochs[0, 0], epochs[1, 0]) and torch.equal(epochs[0, 1], epochs[1, 1])
    assert not torch.equal(epochs[0, 0], epochs[0, 1])


def test_digits_are_dark_ink_on_light_paper() -> None:
    pytest.importorskip("sklearn")
    config = PreprocessConfig(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
    splits = load_data("digits", config)
    assert len(splits.val) == 359 and len(splits.train) > 1438  # training adds typed and drawn digits (test_digits.py)
    assert splits.labels == [str(i) for i in range(10)]
    image = splits.val.image(0)
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert np.median(pixels) > 200 and pixels.min() < 60  # light paper, dark ink
    assert np.array_equal(pixels, preprocess(image, config))  # already at the served size
    augmented = DigitAugment(config)(image, np.random.default_rng(1))  # either polarity: the demo reads both
    assert augmented.dtype == np.uint8 and augmented.shape == (32, 32, 3)
    blank = render_digit(np.zeros((8, 8)), 32)
    assert np.asarray(blank).min() == 255


# --- command line -------------------------------------------------------------------------------------------


def test_command_line_options_map_onto_train_options(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--preset", "digits", "--data", "digits", "--out", str(tmp_path), "--epochs", "5", "--lr", "0.01",
         "--no-progress", "--no-verify-images", "--amp", "off", "--threads", "2", "--image-size", "24"]
    )  # fmt: skip
    opts = options_from_args(args)
    assert (opts.preset, opts.epochs, opts.lr, opts.threads, opts.image_size) == ("digits", 5, 0.01, 2, 24)
    assert opts.progress is False and opts.verify_images is False and opts.batch_size is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "digits", "--config", "x.json", "--data", "d", "--out", "o"])
    with pytest.raises(ValueError, match="--preset NAME or --config"):
        TrainOptions(data="digits", out=tmp_path)


def option_help() -> dict[str, str]:
    """Each ``train`` option's help text by its destination, as ``--help`` prints it (one line, ``%``)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {a.dest: " ".join((a.help or "").replace("%%", "%").split()) for a in parser._actions}


def shown(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Recipe)])
def test_each_recipe_option_names_the_default_and_every_presets_value(name: str) -> None:
    text = option_help()[name]  # every recipe field is a command-line option
    general = recipes.WORKERS_RULE if name == "workers" else shown(getattr(recipes.DEFAULT_RECIPE, name))
    presets = "".join(f"; {preset}: {shown(getattr(r, name))}" for preset, r in recipes.RECIPES.items())
    assert text.endswith(f"(default {general}{presets})"), text


def test_the_help_follows_a_change_of_the_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    before = option_help()
    digits = dataclasses.replace(recipes.RECIPES["digits"], epochs=417, lr=0.00123, warmup_epochs=2.5, threads=3)
    monkeypatch.setitem(recipes.RECIPES, "digits", digits)
    monkeypatch.setitem(recipes.RECIPES, "wide", Recipe(batch_size=96, workers=5))
    monkeypatch.setattr(recipes, "DEFAULT_RECIPE", dataclasses.replace(recipes.DEFAULT_RECIPE, clip_grad=2.5))
    monkeypatch.setattr(recipes, "FINAL_LR_RATIO", 0.05)
    after = option_help()
    assert "digits: 417;" in after["epochs"] and "digits: 417" not in before["epochs"]
    assert "digits: 0.00123;" in after["lr"]
    assert "digits: 2.5;" in after["warmup_epochs"] and "cosine decay to 5% of --lr" in after["warmup_epochs"]
    assert "digits: 3;" in after["threads"]
    assert after["batch_size"].endswith("; wide: 96)") and after["workers"].endswith("; wide: 5)")
    assert "(default 2.5;" in after["clip_grad"] and "(default 2.5;" not in before["clip_grad"]
    assert after["seed"] == before["seed"]  # not a recipe field


def test_train_arguments_import_without_torch() -> None:
    code = "import sys, stageformer.train_args; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
