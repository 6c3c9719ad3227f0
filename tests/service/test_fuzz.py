"""Fuzzing: schemathesis generates requests from the server's own OpenAPI schema (valid and invalid
ones) and sends them to a real server; no 500, no hang, every answer as documented. Hypothesis mutates
real image files of every supported format: decoding never fails other than with a clear ServiceError."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.errors import KINDS, ServiceError
from service.images import prepare
from stageformer.core.preprocess import PreprocessConfig

from .harness import LiveServer, live_server

EXAMPLES = 30  # per operation: CI stays fast, the seed changes every run


@pytest.fixture(scope="module")
def live(tiny_onnx: Path, norm_onnx: Path) -> Iterator[LiveServer]:
    with live_server(models=[str(tiny_onnx), str(norm_onnx)], request_timeout_s=5, max_body_bytes=1 << 20) as server:
        yield server


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_generated_requests_get_no_500_and_documented_answers(live: LiveServer, mode: Any) -> None:
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    base_url = f"http://127.0.0.1:{live.port}"
    operations = len(list(schema.get_all_operations()))
    answered: dict[int, int] = {}

    # model names: the served ones (to reach the decoding and the checks behind them) or anything
    strategy = st.one_of(
        *(schema.as_strategy(generation_mode=mode, path_parameters={"model": name}) for name in ("tiny", "tiny-norm")),
        schema.as_strategy(generation_mode=mode),
    )

    @settings(max_examples=EXAMPLES * operations, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        response = case.call(base_url=base_url, timeout=15)  # a hang fails the test
        answered[response.status_code] = answered.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    fuzz()
    assert sum(answered.values()) >= operations, answered
    assert all(status < 500 for status in answered), answered


def _seed_files() -> list[bytes]:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    variants = [("JPEG", image), ("PNG", image), ("PNG", image.convert("RGBA")), ("GIF", image.convert("P")),
                ("BMP", image), ("WEBP", image), ("TIFF", image), ("PNG", image.convert("L").convert("I;16")),
                ("JPEG", image.convert("CMYK"))]  # fmt: skip
    files = []
    for fmt, variant in variants:
        buffer = io.BytesIO()
        variant.save(buffer, format=fmt)
        files.append(buffer.getvalue())
    return files


SEEDS = _seed_files()


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_damaged_images_of_every_format_fail_only_with_a_clear_image_error(
    seed: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        pixels = prepare(bytes(data), PreprocessConfig(image_size=32), 1_000_000)
    except ServiceError as exc:
        assert 400 <= KINDS[exc.kind].http_status < 500 and exc.message
    else:
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
