"""The checkpoint format: what it stores, and the clear errors for files that do not fit."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import CheckpointError, create_model, default_preprocess, load_checkpoint, read_metadata, save_checkpoint
from stageformer.core.preprocess import PreprocessConfig


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = create_model("tiny")
    return save_checkpoint(model, tmp_path / "tiny.safetensors", default_preprocess("tiny"), extra={"source": "test"})


def test_metadata_describes_the_model(tiny_checkpoint) -> None:
    meta = read_metadata(tiny_checkpoint)
    assert meta["format"] == "stageformer.checkpoint"
    assert meta["format_version"] == "1"
    assert json.loads(meta["config"])["num_classes"] == 10
    assert json.loads(meta["preprocess"]) == {
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    assert json.loads(meta["labels"]) == [str(i) for i in range(10)]  # numbered when none are given
    assert meta["source"] == "test"
    assert not list(tiny_checkpoint.parent.glob("*.tmp"))


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_file_mode_follows_the_umask(tmp_path, umask: int, mode: int) -> None:
    # safetensors alone writes 600, which a container's non-root user cannot read from a mounted folder
    previous = os.umask(umask)
    try:
        path = save_checkpoint(create_model("tiny"), tmp_path / "ckpt.safetensors", default_preprocess("tiny"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_save_rejects_inconsistent_labels_and_preprocessing(tmp_path) -> None:
    model = create_model("tiny")
    with pytest.raises(CheckpointError, match="3 labels given for a model with 10 classes"):
        save_checkpoint(model, tmp_path / "x.safetensors", default_preprocess("tiny"), ["a", "b", "c"])
    with pytest.raises(CheckpointError, match=r"preprocess\.image_size 224 differs from the model's image_size 32"):
        save_checkpoint(model, tmp_path / "x.safetensors", PreprocessConfig(image_size=224))
    assert not (tmp_path / "x.safetensors").exists()


def _rewrite(src, dst, tensors=None, **metadata_changes):
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    data = tensors(data) if tensors else data
    metadata.update(metadata_changes)
    save_file(data, str(dst), metadata={k: v for k, v in metadata.items() if v is not None})
    return dst


def test_missing_file_and_non_safetensors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(pickled)
    torch_file = tmp_path / "model.pt"
    torch.save(create_model("tiny").state_dict(), torch_file)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(torch_file)


def test_foreign_and_newer_files_are_refused(tiny_checkpoint, tmp_path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match=r"not a stageformer checkpoint.*import-timm"):
        load_checkpoint(plain)
    newer = _rewrite(tiny_checkpoint, tmp_path / "newer.safetensors", format_version="99")
    with pytest.raises(CheckpointError, match="format_version 99, newer than this stageformer reads"):
        load_checkpoint(newer)
    no_labels = _rewrite(tiny_checkpoint, tmp_path / "nolabels.safetensors", labels=None)
    with pytest.raises(CheckpointError, match="lacks metadata labels"):
        load_checkpoint(no_labels)
    bad_config = _rewrite(
        tiny_checkpoint, tmp_path / "badcfg.safetensors", config='{"stages": [{"dim": 8, "mixr": 1}]}'
    )
    with pytest.raises(CheckpointError, match="unknown key\\(s\\) 'mixr'"):
        load_checkpoint(bad_config)


def test_weights_that_do_not_fit_name_the_bad_tensors(tiny_checkpoint, tmp_path) -> None:
    def drop(data):
        data.pop("trunk.stages.0.embed.proj.bias")
        return data

    def extra(data):
        data["trunk.extra.weight"] = torch.zeros(1)
        return data

    def reshape(data):
        data["head.weight"] = torch.zeros(5, 32)
        return data

    cases = [
        (drop, "missing 1 tensor\\(s\\): trunk.stages.0.embed.proj.bias"),
        (extra, "unexpected 1 tensor\\(s\\): trunk.extra.weight"),
        (reshape, "shape mismatch\\(es\\): head.weight \\(5, 32\\) != \\(10, 32\\)"),
    ]
    for i, (change, message) in enumerate(cases):
        path = _rewrite(tiny_checkpoint, tmp_path / f"bad{i}.safetensors", tensors=change)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
