"""``--lanes``: narrow sessions that run batches side by side while requests queue, the full session for a
batch that runs alone (the routing itself is tested in test_batcher.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.registry import LANES_WORTH, MAX_AUTO_LANES, cpu_count
from service.runtime import OnnxModel
from service.settings import Settings

from .conftest import png, serve


def test_every_lane_gives_the_full_sessions_numbers(tiny_onnx: Path) -> None:
    model = OnnxModel(tiny_onnx, device="cpu", max_batch_size=4)
    model.add_lanes(2, 1)
    batch = np.random.default_rng(0).integers(0, 256, (3, *model.info.sample_shape), dtype=np.uint8)
    full = model.run(batch, 2)  # instance 2 = the first session, after lanes 0 and 1
    assert model.session(2) is model.sessions[0] and model.session(0) is model.lanes[0]
    for lane in (0, 1):
        np.testing.assert_allclose(model.run(batch, lane), full, rtol=1e-5, atol=1e-5)
    alone, together = model.measure_lanes(2, budget_s=0.3)
    assert alone > 0 and together > 0
    model.drop_lanes()
    assert model.session(0) is model.sessions[0]


async def test_the_server_answers_the_same_with_lanes_and_says_how_many(tiny_onnx: Path) -> None:
    images = [png(seed=i) for i in range(12)]

    async def answers(client) -> list[list[dict[str, object]]]:
        replies = await asyncio.gather(
            *(client.post("/v1/classify", files={"file": ("x.png", data, "image/png")}) for data in images)
        )
        assert all(r.status_code == 200 for r in replies)
        return [r.json()["results"][0]["predictions"] for r in replies]

    async with serve(models=[str(tiny_onnx)], max_batch_size=2, lanes=0) as client:
        expected = await answers(client)
        assert (await client.get("/v2/models/tiny")).json()["parameters"]["lanes"] == 0
    async with serve(models=[str(tiny_onnx)], max_batch_size=2, lanes=2) as client:
        got = await answers(client)
        params = (await client.get("/v2/models/tiny")).json()["parameters"]
        assert params["lanes"] == 2 and params["images_per_second_full_session_vs_lanes"] == {}  # set, not measured
        config = (await client.get("/v2/models/tiny/config")).json()
        assert config["instance_group"][0]["count"] == 2
    for mine, theirs in zip(got, expected, strict=True):
        assert [p["index"] for p in mine] == [p["index"] for p in theirs]
        assert [p["score"] for p in mine] == pytest.approx([p["score"] for p in theirs], abs=1e-5)


async def test_auto_keeps_lanes_only_when_measured_faster(tiny_onnx: Path) -> None:
    async with serve(models=[str(tiny_onnx)], max_batch_size=4, lanes="auto", auto_batch_budget_s=0.6) as client:
        params = (await client.get("/v2/models/tiny")).json()["parameters"]
    if cpu_count() < 2:
        assert params["lanes"] == 0 and params["images_per_second_full_session_vs_lanes"] == {}
        return
    rates = params["images_per_second_full_session_vs_lanes"]
    assert rates["full_session"] > 0 and rates["lanes"] > 0
    worth = rates["lanes"] >= LANES_WORTH * rates["full_session"]
    assert params["lanes"] == (min(cpu_count(), MAX_AUTO_LANES) if worth else 0)


async def test_auto_leaves_cores_split_by_hand_alone(tiny_onnx: Path) -> None:
    async with serve(models=[str(tiny_onnx)], max_batch_size=4, lanes="auto", threads=1) as client:
        params = (await client.get("/v2/models/tiny")).json()["parameters"]
    assert params["lanes"] == 0 and params["images_per_second_full_session_vs_lanes"] == {}


def test_lanes_settings_are_checked() -> None:
    assert Settings(lanes="2").lanes == 2 and Settings().lanes == "auto"
    with pytest.raises(ValidationError, match="lanes must be auto or an integer from 0 to 64"):
        Settings(lanes=-1)
    with pytest.raises(ValidationError, match="--lanes and --instances above 1 do not go together"):
        Settings(lanes=2, instances=2)
    assert Settings(lanes="auto", instances=2).instances == 2  # auto simply stays off
