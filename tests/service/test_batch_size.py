"""``--max-batch-size auto``: each model's batch size is chosen by timing it at start-up."""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from service.runtime import OnnxModel, choose_batch_size, powers_of_two

from .conftest import serve
from .harness import metric


def test_the_smallest_size_within_five_percent_of_the_best_is_chosen() -> None:
    assert choose_batch_size({1: 100.0, 2: 150.0, 4: 190.0, 8: 200.0, 16: 198.0}) == 4
    assert choose_batch_size({1: 31.0, 2: 31.5, 4: 32.0, 8: 30.0}) == 1  # big batches buy nothing: batch 1
    assert choose_batch_size({1: 19.0, 2: 12.0, 4: 8.0}) == 1  # slower with size: batch 1
    assert choose_batch_size({1: 1000.0, 2: 1900.0, 4: 3600.0, 8: 6400.0, 16: 9000.0, 32: 9200.0}) == 16


@given(st.dictionaries(st.sampled_from(powers_of_two(64)), st.floats(0.1, 1e5), min_size=1).filter(lambda d: 1 in d))
def test_never_a_size_slower_per_image_than_batch_one(throughput: dict[int, float]) -> None:
    chosen = choose_batch_size(throughput)
    assert throughput[chosen] >= throughput[1]
    assert throughput[chosen] >= 0.95 * max(throughput.values())


def test_measuring_times_powers_of_two_within_the_budget(tiny_onnx: Path) -> None:
    model = OnnxModel(tiny_onnx, device="cpu")
    started = time.perf_counter()
    throughput = model.measure_batch_sizes(limit=16, budget_s=1.0)
    assert time.perf_counter() - started < 3.0
    assert 1 in throughput and set(throughput) <= {1, 2, 4, 8, 16} and all(rate > 0 for rate in throughput.values())
    assert model.batch_throughput == throughput


async def test_the_server_measures_shows_and_uses_the_chosen_size(tiny_onnx: Path) -> None:
    async with serve(models=[str(tiny_onnx)], auto_batch_limit=8, auto_batch_budget_s=0.5) as client:
        params = (await client.get("/v2/models/tiny")).json()["parameters"]
        table = {int(b): rate for b, rate in params["images_per_second_by_batch_size"].items()}
        assert params["max_batch_size_measured"] is True and 1 in table and set(table) <= {1, 2, 4, 8}
        assert params["max_batch_size"] == choose_batch_size(table)
        text = (await client.get("/metrics")).text
        assert metric(text, "stageformer_max_batch_size", model="tiny") == params["max_batch_size"]
    async with serve(models=[str(tiny_onnx)], max_batch_size=3) as client:
        params = (await client.get("/v2/models/tiny")).json()["parameters"]
        assert params["max_batch_size"] == 3 and params["max_batch_size_measured"] is False
